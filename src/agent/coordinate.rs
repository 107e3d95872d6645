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
//! refuses this node (403) or is down never stops a deploy: the node says
//! so (the missing permission once) and follows the signed policy alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{Agent, Outcome, Plan};
use crate::error::Error;
use crate::fleet::{Fleet, Lease, NodeReport};
use crate::state::{State, Waiting};

/// How long a lease lives without renewal: a node that dies holding one
/// blocks its slot at most this long. Renewed every third of it while the
/// node installs.
pub(super) const LEASE_TTL: Duration = Duration::from_secs(120);

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
        self.node_id
            .get_or_init(|| async {
                match crate::fleet::resolve_node_id(self.config.fleet.node_id.as_deref()).await {
                    Ok(id) => id,
                    Err(e) => {
                        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                            .ok()
                            .and_then(|h| crate::config::node_id(h.trim()).ok())
                            .unwrap_or_else(|| "unknown-node".into());
                        warn!(error = %e, node_id = %host, "using the host name as this node's id");
                        host
                    }
                }
            })
            .await
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
        let mut lease = None;
        if let (Some(slots), true) = (limit, serving) {
            match fleet.take_lease(slots, LEASE_TTL).await {
                Ok(Some(taken)) => lease = Some(taken),
                Ok(None) => {
                    let versions = describe_installs(plan);
                    info!(%versions, slots, "every in-flight lease is held; waiting");
                    self.health.rollout_gauges().set_waiting_for_lease(true);
                    plan.installs.clear();
                    plan.waiting = Some(Waiting {
                        reason: format!(
                            "lease: {versions} waits for one of {slots} in-flight slots"
                        ),
                        recheck_at: Some(now),
                    });
                    return Ok(None);
                }
                Err(e) => {
                    fleet.log_unavailable(&e);
                }
            }
        }
        self.health.rollout_gauges().set_waiting_for_lease(false);
        let mut halted = Vec::new();
        for install in &plan.installs {
            match fleet.halted(&install.name, &install.to).await {
                Ok(Some(halt)) => halted.push((install.name.clone(), install.to.clone(), halt)),
                Ok(None) => {}
                Err(e) => {
                    fleet.log_unavailable(&e);
                }
            }
        }
        if !halted.is_empty() {
            let mut reasons = Vec::new();
            for (name, version, halt) in &halted {
                let by =
                    crate::fleet::printable(halt.node.as_deref().unwrap_or("an unreadable marker"));
                let reason = crate::fleet::printable(halt.reason.as_deref().unwrap_or(""));
                warn!(package = %name, %version, halted_by = %by, %reason, "version halted in the fleet; not installing it");
                reasons.push(format!("halted {name} {version} (by {by})"));
            }
            plan.installs
                .retain(|i| !halted.iter().any(|(n, v, _)| *n == i.name && *v == i.to));
            let recheck = chrono::Duration::from_std(self.config.fleet.report_interval)
                .unwrap_or(chrono::Duration::MAX);
            plan.waiting = Some(Waiting {
                reason: reasons.join(", "),
                recheck_at: Some(now + recheck),
            });
        }
        if plan.installs.is_empty() {
            if let Some(lease) = lease
                && let Err(e) = lease.release(fleet).await
            {
                fleet.log_unavailable(&e);
            }
            return Ok(None);
        }
        Ok(lease.map(|lease| renew_in_background(fleet.clone(), lease)))
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
                            format!(
                                "{package} {version} halted in suite {} by node {}: {error}",
                                self.config.repository.suite,
                                fleet.node_id()
                            ),
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
            last_outcome: outcome
                .map(str::to_string)
                .or_else(|| state.last_poll.as_ref().map(|p| p.outcome.to_string())),
            last_error: match (&state.last_error, &state.last_poll) {
                (Some(error), Some(poll)) if error.at > poll.at => Some(error.message.clone()),
                (Some(error), None) => Some(error.message.clone()),
                _ => None,
            },
            waiting: state.waiting.as_ref().map(|w| w.reason.clone()),
            report_interval_secs: interval.as_secs(),
            at: DateTime::<Utc>::UNIX_EPOCH,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
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

/// `myapp 1.1, tool 2.0`.
fn describe_installs(plan: &Plan) -> String {
    plan.installs
        .iter()
        .map(|i| format!("{} {}", i.name, i.to))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renews `lease` every third of its TTL until stopped; hands it back.
fn renew_in_background(fleet: Arc<Fleet>, mut lease: Lease) -> HeldLease {
    let (stop, mut stopped) = oneshot::channel();
    let renewer = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => return lease,
                () = tokio::time::sleep(LEASE_TTL / 3) => {
                    if let Err(e) = lease.renew(&fleet).await {
                        fleet.log_unavailable(&e);
                    }
                }
            }
        }
    });
    HeldLease { stop, renewer }
}
