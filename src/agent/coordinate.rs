//! The node's part in a fleet rollout, between the repository half and
//! dpkg: who the node is (its wave), the in-flight lease, the halt check,
//! the halt marker after a failed install, and the node's report.
//!
//! Order for a new version V (see `crate::rollout` for the policy):
//! wave reached (in [`super::plan::apply_policy`]) -> lease taken, when the
//! node serves and the policy limits installs in flight -> halt marker for
//! V checked -> drain, dpkg, health gate ([`Agent::apply`]) -> commit, or
//! roll back and write V's halt marker -> lease released.
//!
//! Without `[fleet] url` the policy still applies (waves, pause, pins);
//! leases, halts and reports need the fleet prefix. A fleet store that
//! refuses this node (403: no write access at all) never stops a deploy:
//! the node says so once and follows the signed policy alone. Any other
//! failure of the store (5xx, throttling, a timeout) while a serving node
//! takes its lease or checks the halt markers makes it wait for the next
//! poll (fail closed: never drained without a lease, never installed as if
//! "not halted"); a fresh node, which drains nobody, carries on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::plan::Choice;
use super::{Agent, Outcome, Plan, PlannedInstall};
use crate::error::Error;
use crate::fleet::{Fleet, FleetError, Lease, NodeReport};
use crate::repo::packages::{Candidate, same_version};
use crate::rollout::Policy;
use crate::state::{State, Waiting};

/// How long a lease lives without renewal: a node that dies holding one
/// blocks its slot at most this long. Renewed every third of it while the
/// node installs.
pub(super) const LEASE_TTL: Duration = Duration::from_secs(120);

/// The verified installs that waited for a lease, kept for the next poll.
pub(super) struct WaitingPlan {
    pub(super) installs: Vec<PlannedInstall>,
    pub(super) policy: Option<Policy>,
}

/// A lease held while dpkg and the health gate run, renewed in the
/// background.
pub(super) struct HeldLease {
    stop: oneshot::Sender<()>,
    renewer: tokio::task::JoinHandle<Lease>,
}

impl Agent {
    /// This node's id: `[fleet] node_id`, else IMDS's instance-id, else
    /// /etc/machine-id; resolved once. A node that has none (no IMDS, no
    /// machine id) uses its host name, and says so.
    pub(super) async fn node_id(&self) -> &str {
        let id = self
            .node_id
            .get_or_init(|| async {
                match crate::fleet::resolve_node_id(self.config.fleet.node_id.as_deref()).await {
                    Ok(id) => id,
                    Err(e) => {
                        let host = crate::config::node_id(&crate::webhook::hostname())
                            .unwrap_or_else(|_| "unknown-node".into());
                        warn!(error = %e, node_id = %host, "using the host name as this node's id");
                        host
                    }
                }
            })
            .await;
        self.notifier.set_node_id(id);
        id
    }

    /// Before dpkg: the in-flight lease (when needed) and the halt check
    /// of every version about to be installed. Versions halted by another
    /// node are taken out of the plan; when no lease is free, the whole
    /// plan waits (the verified .debs stay in the cache for the next try).
    pub(super) async fn coordinate(
        &self,
        plan: &mut Plan,
        state: &State,
    ) -> Result<Option<HeldLease>, Error> {
        let Some(fleet) = &self.fleet else {
            return Ok(None);
        };
        if plan.installs.is_empty() {
            return Ok(None);
        }
        let now = self.clock.now();
        let limit = plan.policy.as_ref().and_then(|p| p.max_in_flight);
        // A node that serves nothing yet drains nobody: it needs no lease.
        let serving = !state.installed.is_empty();
        self.health.rollout_gauges().set_waiting_for_lease(false);
        let Some(slots) = limit.filter(|_| serving) else {
            // No lease to wait for: the halt check in `prepare`, just
            // before the downloads, was the last word.
            return Ok(None);
        };
        let lease = match fleet.take_lease(slots, self.lease_ttl).await {
            Ok(Some(taken)) => taken,
            Ok(None) => {
                let versions = describe_installs(plan);
                info!(%versions, slots, "every in-flight lease is held; waiting");
                self.health.rollout_gauges().set_waiting_for_lease(true);
                let reason = format!("lease: {versions} waits for one of {slots} in-flight slots");
                self.wait_for_next_poll(plan, reason);
                return Ok(None);
            }
            Err(e @ FleetError::Forbidden { .. }) => {
                fleet.log_unavailable(&e);
                return Ok(None);
            }
            Err(e) => {
                // A slot that cannot be read may be held: fail closed.
                warn!(fleet = %fleet.url(), error = %e, "fleet store unavailable; a serving node takes no lease and waits for the next poll");
                let reason = format!("fleet: no in-flight lease, the fleet store failed: {e}");
                self.wait_for_next_poll(plan, reason);
                return Ok(None);
            }
        };
        // With the lease: the authoritative halt check. A node that held
        // the lease before may have failed this version and halted it.
        let chosen: Vec<(String, String)> = plan
            .installs
            .iter()
            .map(|i| (i.name.clone(), i.to.clone()))
            .collect();
        let (halted, failed) = self.halted_versions(fleet, &chosen).await;
        if let Some(e) = failed {
            warn!(fleet = %fleet.url(), error = %e, "cannot check the halt markers; a serving node waits for the next poll");
            if let Err(e) = lease.release(fleet).await {
                fleet.log_unavailable(&e);
            }
            let reason = format!("fleet: halt markers unreadable, the fleet store failed: {e}");
            self.wait_for_next_poll(plan, reason);
            return Ok(None);
        }
        if !halted.is_empty() {
            plan.installs
                .retain(|i| !halted.iter().any(|(n, v, _)| *n == i.name && *v == i.to));
            let (reasons, recheck_at) = self.halt_wait(&halted, now);
            plan.waiting = Some(Waiting {
                reason: reasons.join("; "),
                recheck_at: Some(recheck_at),
                for_lease: false,
            });
        }
        if plan.installs.is_empty() {
            if let Err(e) = lease.release(fleet).await {
                fleet.log_unavailable(&e);
            }
            return Ok(None);
        }
        Ok(Some(renew_in_background(
            fleet.clone(),
            lease,
            self.lease_ttl,
        )))
    }

    /// The whole verified plan waits (`reason`) and is kept for the next
    /// poll: while the Release has not changed (304), the same plan tries
    /// again without reading the repository.
    fn wait_for_next_poll(&self, plan: &mut Plan, reason: String) {
        plan.waiting = Some(Waiting {
            reason,
            recheck_at: None,
            for_lease: true,
        });
        *self.lease_wait.lock().unwrap_or_else(|e| e.into_inner()) = Some(WaitingPlan {
            installs: std::mem::take(&mut plan.installs),
            policy: plan.policy.clone(),
        });
    }

    /// Why a plan waits for the `halted` versions ("halted: PKG VERSION
    /// (by NODE)" each), and when to look at the halt markers again: one
    /// `report_interval` from `now`.
    pub(super) fn halt_wait(
        &self,
        halted: &[(String, String, String)],
        now: DateTime<Utc>,
    ) -> (Vec<String>, DateTime<Utc>) {
        let reasons = halted
            .iter()
            .map(|(name, version, by)| format!("halted: {name} {version} (by {by})"))
            .collect();
        let recheck_at = crate::clock::add(now, self.config.fleet.report_interval);
        (reasons, recheck_at)
    }

    /// Drops from `candidates` the versions known to be halted (checked
    /// within the last `report_interval`), without a request; returns
    /// them as (package, version, halted by).
    pub(super) fn drop_known_halts(
        &self,
        candidates: &mut Vec<Candidate>,
    ) -> Vec<(String, String, String)> {
        let known = self.halts_seen.lock().unwrap_or_else(|e| e.into_inner());
        let recheck = self.config.fleet.report_interval;
        let mut dropped = Vec::new();
        candidates.retain(|c| {
            let version = c.version.to_string();
            let halted = known.iter().find(|((name, v), (at, _))| {
                *name == c.name && same_version(v, &version) && at.elapsed() < recheck
            });
            match halted {
                Some((_, (_, by))) => {
                    dropped.push((c.name.clone(), version, by.clone()));
                    false
                }
                None => true,
            }
        });
        dropped
    }

    /// The chosen versions that are halted in the fleet: one request per
    /// version, before anything is downloaded for it; and the store's
    /// failure when a marker could not be read (see `halted_versions`).
    pub(super) async fn halted_choices(
        &self,
        chosen: &[Choice<'_>],
    ) -> (Vec<(String, String, String)>, Option<FleetError>) {
        let Some(fleet) = &self.fleet else {
            return (Vec::new(), None);
        };
        let versions: Vec<(String, String)> = chosen
            .iter()
            .map(|c| (c.candidate.name.clone(), c.candidate.version.to_string()))
            .collect();
        self.halted_versions(fleet, &versions).await
    }

    /// Reads the halt marker of each (package, version), remembering what
    /// it found; returns the halted ones with who halted them, and the
    /// first failure of the store other than a 403. A 403 (no access to
    /// the prefix) counts as "not halted": such a node follows the signed
    /// policy alone. Any other failure is the caller's to fail closed on
    /// (a serving node waits; a fresh one carries on).
    async fn halted_versions(
        &self,
        fleet: &Fleet,
        versions: &[(String, String)],
    ) -> (Vec<(String, String, String)>, Option<FleetError>) {
        let mut halted = Vec::new();
        let mut failed = None;
        for (name, version) in versions {
            let key = (name.clone(), version.clone());
            match fleet.halted(name, version).await {
                Ok(Some(halt)) => {
                    let by = crate::fleet::printable(
                        halt.node.as_deref().unwrap_or("an unreadable marker"),
                    );
                    let reason = crate::fleet::printable(halt.reason.as_deref().unwrap_or(""));
                    warn!(package = %name, %version, halted_by = %by, %reason, "version halted in the fleet; not installing it");
                    self.halts_seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, (Instant::now(), by.clone()));
                    halted.push((name.clone(), version.clone(), by));
                }
                Ok(None) => {
                    self.halts_seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                }
                Err(e @ FleetError::Forbidden { .. }) => {
                    fleet.log_unavailable(&e);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        (halted, failed)
    }

    /// After an install: a halt marker for every version this attempt
    /// marked bad (so no other node tries it), then the lease back.
    pub(super) async fn after_install(
        &self,
        attempted: &[(String, String)],
        lease: Option<HeldLease>,
        state: &State,
        result: &Result<Outcome, Error>,
    ) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        if let Err(error) = result {
            for (package, version) in attempted {
                if !state.is_bad(package, version) {
                    continue;
                }
                match fleet.halt(package, version, &error.to_string()).await {
                    Ok(()) => {
                        warn!(%package, %version, "wrote the fleet halt marker: no other node installs this version");
                        self.notifier.node_event(
                            crate::config::NodeEvent::Halt,
                            // The notifier names the node (by its fleet
                            // id) and the suite.
                            format!("{package} {version} halted for the fleet: {error}"),
                        );
                    }
                    Err(e) => {
                        fleet.log_unavailable(&e);
                    }
                }
            }
        }
        if let Some(held) = lease {
            let _ = held.stop.send(());
            match held.renewer.await {
                Ok(lease) => {
                    if let Err(e) = lease.release(fleet).await {
                        fleet.log_unavailable(&e);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "the lease renewer failed; the lease expires by itself")
                }
            }
        }
    }

    /// Writes this node's report when it changed, and otherwise once per
    /// `report_interval`.
    pub(super) async fn report(&self, state: &State, outcome: Option<&str>) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let interval = self.config.fleet.report_interval;
        let (position, wave) = *self.wave.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = NodeReport {
            node_id: fleet.node_id().to_string(),
            installed: super::committed_versions(state),
            wave_position: position,
            wave,
            last_outcome: self.reported_outcome(outcome, state),
            last_error: match (&state.last_error, &state.last_poll) {
                (Some(error), Some(poll)) if error.at > poll.at => Some(error.message.clone()),
                (Some(error), None) => Some(error.message.clone()),
                _ => None,
            },
            waiting: state.waiting.as_ref().map(|w| w.reason.clone()),
            report_interval_secs: interval.as_secs(),
            at: DateTime::<Utc>::UNIX_EPOCH,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            // Set by the fleet as it writes.
            instance: None,
            duplicate_node_id: self.duplicate_node_id().is_some(),
        };
        let content = report.to_json();
        {
            let last = self.last_report.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, previous)) = &*last
                && *previous == content
                && at.elapsed() < interval
            {
                return;
            }
        }
        report.at = self.clock.now();
        match fleet.write_report(&report).await {
            Ok(()) => {
                *self.last_report.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), content));
            }
            Err(e) => {
                fleet.log_unavailable(&e);
            }
        }
    }
}

impl Agent {
    /// What showed, within the last three report intervals, that another
    /// node uses this node's id (a live lease or a rewritten report with
    /// this id and another process's token).
    fn duplicate_node_id(&self) -> Option<String> {
        let fleet = self.fleet.as_ref()?;
        let (seen, what) = fleet.duplicate_seen()?;
        let keep = self.config.fleet.report_interval.saturating_mul(3);
        let until = crate::clock::add(seen, keep);
        (fleet.now() < until).then_some(what)
    }

    /// After a cycle: a duplicate node id seen (or gone) goes to state.json
    /// (for `status`), `/metrics` and, when it starts, the webhook. The
    /// warning itself is logged where it is seen ([`Fleet`]).
    pub(super) fn note_duplicate_id(&self, state: &mut State) {
        if self.fleet.is_none() {
            return;
        }
        let seen = self.duplicate_node_id();
        self.health
            .rollout_gauges()
            .set_duplicate_node_id(seen.is_some());
        if state.duplicate_node_id == seen {
            return;
        }
        if let Some(what) = &seen
            && state.duplicate_node_id.is_none()
        {
            self.notifier.node_event(
                crate::config::NodeEvent::DuplicateId,
                format!("two nodes use one fleet node id: {what}"),
            );
        }
        state.duplicate_node_id = seen;
        let path = self.config.state_path();
        match state.save(&path) {
            Ok(()) => {
                *self.state_stamp.lock().unwrap_or_else(|e| e.into_inner()) =
                    crate::state::FileStamp::of(&path);
            }
            Err(e) => warn!(error = %e, "cannot record the duplicate node id in state"),
        }
    }

    /// The outcome a report gives: the last one that said something. An
    /// unchanged poll says nothing new, so a node that alternates between
    /// "waiting: ..." and "unchanged" does not rewrite its report each time.
    fn reported_outcome(&self, outcome: Option<&str>, state: &State) -> Option<String> {
        let mut last = self.last_outcome.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(text) = outcome.filter(|text| *text != "unchanged") {
            *last = Some(text.to_string());
        }
        last.clone()
            .or_else(|| state.last_poll.as_ref().map(|p| p.outcome.to_string()))
    }
}

/// `myapp 1.1, tool 2.0`.
fn describe_installs(plan: &Plan) -> String {
    plan.installs
        .iter()
        .map(|i| format!("{} {}", i.name, i.to))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renews `lease` every third of its TTL (`ttl`) until stopped; hands it
/// back.
fn renew_in_background(fleet: Arc<Fleet>, mut lease: Lease, ttl: Duration) -> HeldLease {
    let (stop, mut stopped) = oneshot::channel();
    let renewer = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => return lease,
                () = tokio::time::sleep(ttl / 3) => {
                    if let Err(e) = lease.renew(&fleet).await {
                        fleet.log_unavailable(&e);
                    }
                }
            }
        }
    });
    HeldLease { stop, renewer }
}
