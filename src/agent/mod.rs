//! One cycle: fetch and verify the Release, read the index, pick versions,
//! fetch and verify .debs, install, record. The only place that sequences
//! these steps.
//!
//! A cycle has two halves. [`Agent::prepare`] reads the repository and
//! leaves verified .debs in the cache; it runs under the cycle deadline and
//! may be cancelled at any await point (by the deadline or a shutdown)
//! without harm. [`Agent::apply`] runs dpkg and commits state; it is never
//! cancelled, so a started install always finishes. State moves only after
//! everything succeeded: a failure anywhere leaves the last accepted
//! Release, its ETag and the installed versions where they were.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use tracing::{debug, info, warn};

use crate::clock::{AgentClock, Clock, SystemClock};
use crate::config::{Config, PackageSpec};
use crate::error::{Error, InstallError, StateError, VerifyError};
use crate::fleet::Fleet;
use crate::health::Health;
use crate::install::{Dpkg, DpkgStatus, Installer};
use crate::keyring::Keyring;
use crate::repo::packages::same_version;
use crate::repo::release::{self};
use crate::rollout::Policy;
use crate::source::{self, Source};
use crate::state::{
    AcceptedRelease, Event, FileStamp, InstalledPackage, LOCK_WAIT, Poll, PollOutcome, State,
    StateLock, Waiting,
};

mod coordinate;
mod fetch;
pub mod plan;
#[cfg(test)]
mod tests;
mod txn;

use plan::{Choice, Stay};

use fetch::stale_error;

/// The subdirectory of `agent.cache_dir` that the agent owns: every file it
/// writes to the cache is in there, and pruning never looks anywhere else,
/// so `cache_dir` may be shared with other programs.
pub const CACHE_SUBDIR: &str = "pulldeploy";

/// How long an unchanged poll may go unrecorded in state.json.
const UNCHANGED_POLL_PERSIST: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

pub struct Agent {
    config: Config,
    source: Box<dyn Source>,
    keyring: Keyring,
    installer: Box<dyn Installer>,
    /// The node's clock corrected to the repository's (see
    /// [`AgentClock`]): rollout times, leases and records go by it.
    clock: Arc<AgentClock>,
    /// The offset last reported (whole seconds), so that a wrong clock is
    /// logged once per change, not at every poll.
    offset_logged: Mutex<Option<i64>>,
    health: Arc<Health>,
    architecture: String,
    /// dpkg's status file when the installed versions last matched state;
    /// lets an unchanged poll skip parsing it.
    agreed_status: Mutex<Option<FileStamp>>,
    /// state.json as this agent last read or wrote it: a cycle re-reads the
    /// file under the lock only when another process replaced it.
    state_stamp: Mutex<Option<FileStamp>>,
    /// Whether temp files left by a killed write were swept (once per
    /// process, under the lock).
    swept: AtomicBool,
    /// Tells the team about rollbacks (`[notify]`); disabled unless
    /// [`Agent::with_notifier`] gave one.
    notifier: crate::webhook::Notifier,
    /// The fleet prefix (`[fleet] url`): leases, halt markers, reports.
    fleet: Option<Arc<Fleet>>,
    /// Resolved when first needed (see [`Agent::node_id`]).
    node_id: tokio::sync::OnceCell<String>,
    /// (position, wave) in the current policy's waves, once known.
    wave: Mutex<(Option<f64>, Option<usize>)>,
    /// The last report written, and when.
    last_report: Mutex<Option<(Instant, Vec<u8>)>>,
    /// The last outcome that said something (an unchanged poll does not
    /// change what the node reports).
    last_outcome: Mutex<Option<String>>,
    /// Versions found halted in the fleet: (package, version) -> when
    /// checked, by whom. Not asked again within `report_interval`.
    halts_seen: Mutex<std::collections::HashMap<(String, String), (Instant, String)>>,
    /// Verified installs that wait for an in-flight lease.
    lease_wait: Mutex<Option<coordinate::WaitingPlan>>,
    /// How long an in-flight lease lives without renewal:
    /// [`coordinate::LEASE_TTL`]; unit tests shorten it to see renewal.
    lease_ttl: std::time::Duration,
}

impl Agent {
    /// What a cycle does with the verified plan `prepare` hands it, in
    /// this order: the lease and the halt check under it (`coordinate`),
    /// dpkg and the health gate (`apply`), then the halt marker of a
    /// version this attempt marked bad and only then the lease back
    /// (`after_install`). One sequence, which the fleet unit tests run
    /// too.
    async fn coordinate_and_apply(
        &self,
        mut plan: Plan,
        state: &mut State,
    ) -> Result<Outcome, Error> {
        let lease = self.coordinate(&mut plan, state).await?;
        let attempted: Vec<(String, String)> = plan
            .installs
            .iter()
            .map(|i| (i.name.clone(), i.to.clone()))
            .collect();
        state.waiting = plan.waiting.take();
        let result = self.apply(plan, state).await;
        self.after_install(&attempted, lease, state, &result).await;
        result
    }
}

/// What a cycle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The signed Release did not change (HTTP 304) and dpkg agrees with
    /// state: nothing else was fetched.
    Unchanged,
    /// A new Release was verified; every package is at its wanted version.
    UpToDate,
    /// These packages were installed, found healthy and committed.
    Installed(Vec<Change>),
    /// Nothing was installed: the rollout holds it back (a later wave, no
    /// free in-flight lease, a halted version); why.
    Waiting(String),
}

/// One package moved from one version to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub package: String,
    /// The version before, if there was one.
    pub from: Option<String>,
    pub to: String,
}

impl Outcome {
    /// How state.json records it.
    fn as_poll(&self) -> PollOutcome {
        match self {
            Outcome::Unchanged => PollOutcome::Unchanged,
            Outcome::UpToDate => PollOutcome::UpToDate,
            Outcome::Installed(_) => PollOutcome::Installed(self.to_string()),
            Outcome::Waiting(why) => PollOutcome::Waiting(why.clone()),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Unchanged => f.write_str("unchanged"),
            Outcome::UpToDate => f.write_str("up to date"),
            Outcome::Installed(list) => {
                f.write_str("installed ")?;
                let items: Vec<String> = list
                    .iter()
                    .map(|c| format!("{} {}", c.package, c.to))
                    .collect();
                f.write_str(&items.join(", "))
            }
            Outcome::Waiting(why) => write!(f, "waiting: {why}"),
        }
    }
}

/// Verified .debs waiting for dpkg, and the Release that named them.
pub struct Plan {
    release: AcceptedRelease,
    installs: Vec<PlannedInstall>,
    /// The suite's signed rollout policy, when it has one.
    policy: Option<Policy>,
    /// What the rollout holds back.
    waiting: Option<Waiting>,
    /// The .debs were verified in an earlier cycle (a plan that waited for
    /// a lease): hashed again before dpkg.
    recheck_debs: bool,
}

struct PlannedInstall {
    name: String,
    /// The version installed now: the way back, with its verified .deb in
    /// the cache when it is a committed version (see [`Agent::way_back`]).
    from: Option<InstalledPackage>,
    to: String,
    deb: PathBuf,
    sha256: String,
}

impl Agent {
    /// The agent a node runs: the source `repository.url` names, dpkg on
    /// `install.root`, the pinned keyring and the system clock. `health` is
    /// shared with the /healthz server: the agent drains it around dpkg and
    /// probes the app through it.
    pub async fn new(config: Config, health: Arc<Health>) -> Result<Agent, Error> {
        let keyring = Keyring::load(&config.repository.keyring)?;
        let architecture = config.architecture()?;
        crate::state::ensure_dir(&config.agent.state_dir)?;
        crate::state::ensure_dir(&config.agent.cache_dir.join(CACHE_SUBDIR))?;
        let source = source::from_config(&config).await?;
        let installer = Box::new(Dpkg::new(&config.install.root));
        let fleet = match &config.fleet.url {
            Some(url) => {
                let node_id =
                    crate::fleet::resolve_node_id(config.fleet.node_id.as_deref()).await?;
                Some(
                    Fleet::open(
                        url,
                        config.repository.endpoint.as_deref(),
                        config.repository.region.as_deref(),
                        &config.repository.suite,
                        &node_id,
                    )
                    .await?,
                )
            }
            None => None,
        };
        let agent = Agent::from_parts(
            config,
            architecture,
            source,
            installer,
            keyring,
            Box::new(SystemClock),
            health,
        );
        Ok(match fleet {
            Some(fleet) => agent.with_fleet(fleet),
            None => agent,
        })
    }

    /// An agent built from its parts, so that tests can hand in a fake
    /// source, installer or clock. `architecture` is the Debian
    /// architecture whose packages it installs.
    pub fn from_parts(
        config: Config,
        architecture: String,
        source: Box<dyn Source>,
        installer: Box<dyn Installer>,
        keyring: Keyring,
        clock: Box<dyn Clock>,
        health: Arc<Health>,
    ) -> Agent {
        let clock = Arc::new(AgentClock::new(clock, source.server_time()));
        Agent {
            config,
            source,
            keyring,
            installer,
            clock,
            offset_logged: Mutex::new(None),
            health,
            architecture,
            agreed_status: Mutex::new(None),
            state_stamp: Mutex::new(None),
            swept: AtomicBool::new(false),
            notifier: crate::webhook::Notifier::disabled(),
            fleet: None,
            node_id: tokio::sync::OnceCell::new(),
            wave: Mutex::new((None, None)),
            last_report: Mutex::new(None),
            last_outcome: Mutex::new(None),
            halts_seen: Mutex::new(std::collections::HashMap::new()),
            lease_wait: Mutex::new(None),
            lease_ttl: coordinate::LEASE_TTL,
        }
    }

    /// The same agent coordinating through `fleet` (leases, halt markers,
    /// reports); its node id is the fleet's. The fleet judges lease times
    /// by the agent's corrected clock.
    pub fn with_fleet(mut self, fleet: Fleet) -> Agent {
        self.node_id = tokio::sync::OnceCell::new_with(Some(fleet.node_id().to_string()));
        self.notifier.set_node_id(fleet.node_id());
        let clock: Arc<dyn Clock> = self.clock.clone();
        self.fleet = Some(Arc::new(fleet.with_clock(clock)));
        self
    }

    /// The agent, telling `notifier` about rollbacks.
    pub fn with_notifier(mut self, notifier: crate::webhook::Notifier) -> Agent {
        if let Some(id) = self.node_id.get() {
            notifier.set_node_id(id);
        }
        self.notifier = notifier;
        self
    }

    /// Where the agent's events go (the daemon adds its failing streaks).
    pub fn notifier(&self) -> &crate::webhook::Notifier {
        &self.notifier
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// When the first pinned signing key expires, if one does.
    pub fn signing_key_expiry(&self) -> Option<DateTime<Utc>> {
        self.keyring
            .signing_key_expiry(self.clock.node().into())
            .map(DateTime::<Utc>::from)
    }

    pub(super) fn wanted(&self) -> Vec<&str> {
        self.config
            .agent
            .packages
            .iter()
            .map(|p| p.name.as_str())
            .collect()
    }

    pub(super) fn dists(&self, file: &str) -> String {
        format!("dists/{}/{file}", self.config.repository.suite)
    }

    /// dpkg's database (parsed once per version of its status file).
    pub(super) fn dpkg_status(&self) -> Result<Arc<DpkgStatus>, Error> {
        Ok(self.installer.status()?)
    }

    /// The agent's own directory in the cache.
    pub(super) fn cache(&self) -> PathBuf {
        self.config.agent.cache_dir.join(CACHE_SUBDIR)
    }

    /// Where the cached file `name` (as state records it) is. A file that an
    /// older agent kept directly in `cache_dir` is moved into the agent's
    /// own directory the first time it is asked for.
    pub(super) fn cached_path(&self, name: &str) -> PathBuf {
        let path = self.cache().join(name);
        let legacy = self.config.agent.cache_dir.join(name);
        if !path.exists() && legacy.is_file() {
            match std::fs::rename(&legacy, &path) {
                Ok(()) => {
                    info!(from = %legacy.display(), to = %path.display(), "moved a cached .deb into the agent's cache directory")
                }
                Err(e) => warn!(path = %legacy.display(), error = %e, "cannot move a cached .deb"),
            }
        }
        path
    }

    /// One whole cycle, the only sequence of the steps (`run` and `once`
    /// both call it): take the state lock, re-read state if another process
    /// replaced it, finish a pending install or read the repository and
    /// install, then record the outcome or error in `state` and on disk.
    ///
    /// `shutdown` cancels the cycle while it waits for the lock or reads
    /// the repository (nothing has changed yet then): `None`. Once dpkg may
    /// run, the cycle goes to its end. The repository half runs under
    /// `agent.cycle_timeout`. A cycle that cannot get the lock within
    /// [`LOCK_WAIT`] fails with [`Error::Busy`] and writes nothing: the
    /// state belongs to the holder.
    pub async fn cycle(
        &self,
        state: &mut State,
        shutdown: impl Future<Output = ()>,
    ) -> Option<Result<Outcome, Error>> {
        tokio::pin!(shutdown);
        let state_dir = &self.config.agent.state_dir;
        let lock = tokio::select! {
            biased;
            () = &mut shutdown => return None,
            lock = StateLock::acquire(state_dir, LOCK_WAIT) => lock,
        };
        let _lock = match lock {
            Ok(lock) => lock,
            Err(e) => return Some(Err(e)),
        };
        if let Err(e) = self.reload_state(state) {
            return Some(Err(e));
        }
        let limit = self.config.agent.cycle_timeout;
        let result = if let Some(pending) = &state.pending {
            let attempted: Vec<(String, String)> = pending
                .packages
                .iter()
                .map(|p| (p.name.clone(), p.to.version.clone()))
                .collect();
            let result = self.resume(state).await;
            self.after_install(&attempted, None, state, &result).await;
            result
        } else {
            let prepared = tokio::select! {
                biased;
                () = &mut shutdown => return None,
                prepared = tokio::time::timeout(limit, self.prepare(state)) => prepared,
            };
            match prepared {
                Err(_elapsed) => Err(Error::CycleDeadline { limit }),
                Ok(Err(e)) => Err(e),
                Ok(Ok(None)) => Ok(Outcome::Unchanged),
                Ok(Ok(Some(plan))) => self.coordinate_and_apply(plan, state).await,
            }
        };
        let recorded = self.record(state, &result);
        *self.state_stamp.lock().unwrap_or_else(|e| e.into_inner()) =
            FileStamp::of(&self.config.state_path());
        // No copy of dpkg's database is kept between cycles.
        self.installer.forget_status();
        if let Err(e) = recorded {
            // The cycle's own outcome matters more; say both.
            warn!(error = %e, "cannot record the cycle in state");
            if result.is_ok() {
                return Some(Err(e));
            }
        }
        let outcome = result.as_ref().ok().map(ToString::to_string);
        self.report(state, outcome.as_deref()).await;
        self.note_duplicate_id(state);
        Some(result)
    }

    /// Re-reads state.json (the lock is held) unless it is the file this
    /// agent last read or wrote: another `once` may have moved it on. The
    /// first cycle of a process also sweeps temp files a killed write left.
    pub(super) fn reload_state(&self, state: &mut State) -> Result<(), Error> {
        let path = self.config.state_path();
        if !self.swept.swap(true, Ordering::Relaxed) {
            crate::state::remove_stale_temp_files(&path);
        }
        let stamp = FileStamp::of(&path);
        let mut known = self.state_stamp.lock().unwrap_or_else(|e| e.into_inner());
        if stamp.is_none() || *known != stamp {
            *state = State::load(&path)?;
            *known = stamp;
        }
        Ok(())
    }

    /// Writes the poll time and outcome, or the error, to state.json.
    ///
    /// An unchanged poll after an unchanged poll is written at most every
    /// [`UNCHANGED_POLL_PERSIST`]: state.json is replaced with two fsyncs,
    /// which would otherwise be most of the cost of a 304 poll.
    pub(super) fn record(
        &self,
        state: &mut State,
        result: &Result<Outcome, Error>,
    ) -> Result<(), Error> {
        let now = self.clock.now();
        state.clock_offset = self.observe_clock_offset();
        match result {
            Ok(outcome) => {
                let quiet = matches!(outcome, Outcome::Unchanged)
                    && state.last_poll.as_ref().is_some_and(|p| {
                        p.outcome == PollOutcome::Unchanged
                            && now.signed_duration_since(p.at) < UNCHANGED_POLL_PERSIST
                    });
                if quiet {
                    return Ok(());
                }
                state.last_poll = Some(Poll {
                    at: now,
                    outcome: outcome.as_poll(),
                })
            }
            Err(e) => {
                state.last_error = Some(Event {
                    at: now,
                    message: e.to_string(),
                })
            }
        }
        state.save(&self.config.state_path())?;
        Ok(())
    }

    /// How far the node's clock is ahead of the repository's, in whole
    /// seconds, set into `/metrics`; a warning when it exceeds
    /// `clock_skew`, logged again only when it moves by more than a
    /// minute (not at every poll), and a note when it is back within.
    fn observe_clock_offset(&self) -> Option<i64> {
        let offset = self.clock.offset().map(|o| o.num_seconds());
        self.health
            .rollout_gauges()
            .set_clock_offset(offset.map(|s| s as f64));
        let skew = i64::try_from(self.config.repository.clock_skew.as_secs()).unwrap_or(i64::MAX);
        let mut logged = self.offset_logged.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            Some(seconds) if seconds.unsigned_abs() > skew.unsigned_abs() => {
                if logged.is_none_or(|last| last.abs_diff(seconds) > 60) {
                    warn!(
                        offset_seconds = seconds,
                        clock_skew = ?self.config.repository.clock_skew,
                        "this node's clock is {} the repository's by {}: check time sync; rollout times go by the repository's clock",
                        if seconds > 0 { "ahead of" } else { "behind" },
                        humantime::format_duration(std::time::Duration::from_secs(seconds.unsigned_abs())),
                    );
                    *logged = Some(seconds);
                }
            }
            _ => {
                if logged.take().is_some() {
                    info!(offset_seconds = ?offset, "this node's clock agrees with the repository's again");
                }
            }
        }
        offset
    }

    /// Reads and verifies the repository; leaves verified .debs in the
    /// cache. `None` when nothing changed since the last accepted Release.
    pub(super) async fn prepare(&self, state: &State) -> Result<Option<Plan>, Error> {
        let etag = match self.may_skip_unchanged(state) {
            true => state.release.as_ref().and_then(|r| r.etag.as_deref()),
            false => None,
        };
        // A plan that waited for a lease is tried again as it is while the
        // Release has not changed; any change reads the repository anew.
        let lease_wait = self
            .lease_wait
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(signed) = self.fetch_signed_release(state, etag).await? else {
            debug!("Release unchanged (304)");
            if let (Some(waited), Some(accepted)) = (lease_wait, &state.release) {
                return Ok(Some(Plan {
                    release: accepted.clone(),
                    installs: waited.installs,
                    policy: waited.policy,
                    waiting: None,
                    recheck_debs: true,
                }));
            }
            // Freshness still holds for the Release we run on: an expired or
            // frozen repository, or a clock gone backwards, is reported even
            // when nothing changed.
            if let Some(accepted) = &state.release {
                for rules in [self.freshness(state), self.expiry(state, None)] {
                    release::check_times(accepted.date, accepted.valid_until, &rules).map_err(
                        |stale| stale_error(stale, &accepted.url, accepted.date, &rules),
                    )?;
                }
            }
            return Ok(None);
        };
        let release = self.check_release(&signed, state)?;
        crate::state::ensure_dir(&self.cache())?;

        let index = release
            .packages_index(&self.config.repository.component, &self.architecture)
            .ok_or_else(|| VerifyError::IndexMissing {
                url: signed.url.clone(),
                wanted: format!(
                    "{}/binary-{}/Packages{{.xz,.gz,}}",
                    self.config.repository.component, self.architecture
                ),
            })?;
        let mut candidates = self.fetch_candidates(&release, &index).await?;
        plan::drop_bad(&mut candidates, state);
        let policy = self.fetch_policy(&release).await?;
        let dpkg = self.dpkg_status()?;
        let now = self.clock.now();
        let held = match &policy {
            Some(policy) => {
                let wave = self.wave_of(policy).await;
                let rollout = plan::Rollout { policy, wave, now };
                Some(plan::apply_policy(
                    &mut candidates,
                    &self.config.agent.packages,
                    &dpkg,
                    rollout,
                ))
            }
            None => None,
        };
        let mut specs: Vec<PackageSpec> = held
            .as_ref()
            .map_or(&self.config.agent.packages[..], |held| &held.specs[..])
            .to_vec();
        let index_url = self.source.url(&self.dists(&index.path));
        // Versions halted in the fleet are left out before anything is
        // downloaded, like bad ones: the next best version is chosen.
        let mut halted = self.drop_known_halts(&mut candidates);
        let mut fleet_failed = None;
        let mut choices = loop {
            let choices = plan::choose(&candidates, &specs, &dpkg, state, &index_url)?;
            let (found, failed) = self.halted_choices(&choices.install).await;
            if let Some(e) = failed {
                // Fail closed: a serving node does not install what it
                // could not check; a fresh one (drains nobody) carries on.
                if !state.installed.is_empty() {
                    warn!(error = %e, "cannot check the fleet halt markers; a serving node waits for the next poll");
                    let mut choices = choices;
                    choices.install.clear();
                    fleet_failed = Some(format!(
                        "fleet: halt markers unreadable, the fleet store failed: {e}"
                    ));
                    break choices;
                }
                warn!(error = %e, "cannot check the fleet halt markers; a fresh node carries on without them");
            }
            if found.is_empty() {
                break choices;
            }
            drop(choices);
            candidates.retain(|c| {
                !found.iter().any(|(name, version, _)| {
                    c.name == *name && same_version(&c.version.to_string(), version)
                })
            });
            // A package left with nothing to choose waits, it is not missing.
            specs.retain(|spec| {
                spec.pinned.is_some() || candidates.iter().any(|c| c.name == spec.name)
            });
            halted.extend(found);
        };
        let mut waiting = None;
        let waits_for_wave = held.as_ref().is_some_and(|h| h.next_release.is_some());
        let (mut reasons, recheck_at) = self.halt_wait(&halted, now);
        let mut recheck_at = (!halted.is_empty()).then_some(recheck_at);
        if let Some(reason) = fleet_failed {
            // Looked at again at the next poll, even on an unchanged Release.
            reasons.push(reason);
            recheck_at = Some(now);
        }
        if let Some(held) = held {
            choices.stay.extend(held.stay);
            for (package, stay) in &choices.stay {
                match stay {
                    Stay::WaitingForWave { version, at } => reasons.push(format!(
                        "wave: {package} {version} reaches this node's wave at {}",
                        at.to_rfc3339()
                    )),
                    Stay::Paused => reasons.push(format!("paused: {package} stays as it is")),
                    _ => {}
                }
            }
            if let Some(at) = held.next_release {
                if !reasons.iter().any(|r| r.starts_with("wave: ")) {
                    reasons.push(format!(
                        "wave: a newer version reaches this node's wave at {}",
                        at.to_rfc3339()
                    ));
                }
                recheck_at = Some(recheck_at.map_or(at, |r| r.min(at)));
            }
        }
        if !reasons.is_empty() {
            waiting = Some(Waiting {
                reason: reasons.join("; "),
                recheck_at,
                for_lease: false,
            });
        }
        self.health
            .rollout_gauges()
            .set_waiting_for_wave(waits_for_wave);
        for (package, stay) in &choices.stay {
            match stay {
                Stay::Current => {}
                Stay::KeepNewer { installed, offered } => {
                    warn!(%package, %installed, %offered, "repository offers an older version; not downgrading without a pin")
                }
                Stay::OnlyBadPublished => {
                    info!(%package, "only versions marked bad are published; staying")
                }
                Stay::PinnedBad { version } => {
                    warn!(%package, %version, "the pinned version is marked bad; staying")
                }
                Stay::WaitingForWave { version, at } => {
                    info!(%package, %version, at = %at.to_rfc3339(), "waiting for this node's wave")
                }
                Stay::Paused => info!(%package, "the rollout is paused; staying"),
            }
        }
        let chosen = choices.install;
        plan::check_depends(&dpkg, &chosen)?;
        self.check_space(&chosen)?;

        // The way back first: no upgrade starts without it.
        let mut ways_back = Vec::new();
        for choice in &chosen {
            let from = match &choice.current {
                Some(current) => Some(
                    self.way_back(choice.candidate, current, state, &candidates)
                        .await?,
                ),
                None => None,
            };
            ways_back.push(from);
        }
        let mut installs = Vec::new();
        for (Choice { candidate, .. }, from) in chosen.into_iter().zip(ways_back) {
            let deb = self.fetch_deb(candidate).await?;
            installs.push(PlannedInstall {
                name: candidate.name.clone(),
                from,
                to: candidate.version.to_string(),
                deb,
                sha256: candidate.expected.sha256.clone(),
            });
        }
        Ok(Some(Plan {
            release: AcceptedRelease {
                date: release.date,
                valid_until: release.valid_until,
                etag: signed.etag,
                file: signed.file,
                url: signed.url.clone(),
                packages: self.package_specs(),
                signer: signed.verified.signer,
                accepted_at: self.clock.now(),
            },
            installs,
            policy,
            waiting,
            recheck_debs: false,
        }))
    }

    /// Checks, before downloading, that the cache can hold the .debs and
    /// the install root their unpacked size (`Installed-Size`).
    fn check_space(&self, chosen: &[Choice]) -> Result<(), Error> {
        let (download, unpacked) = plan::space_needed(chosen);
        let cache = self.cache();
        for (path, needed) in [(&cache, download), (&self.config.install.root, unpacked)] {
            if needed == 0 {
                continue;
            }
            let available = crate::install::free_space(path).map_err(|source| StateError::Dir {
                path: path.clone(),
                source,
            })?;
            if available < needed {
                return Err(InstallError::DiskFull {
                    path: path.clone(),
                    needed,
                    available,
                }
                .into());
            }
        }
        Ok(())
    }

    /// This node's wave in `policy` (and its position, for reports and
    /// /metrics). With one wave the node id is not needed.
    async fn wave_of(&self, policy: &Policy) -> usize {
        if policy.waves.len() == 1 && self.fleet.is_none() {
            return 0;
        }
        let position = crate::rollout::position(self.node_id().await);
        let wave = policy.wave_of(position);
        *self.wave.lock().unwrap_or_else(|e| e.into_inner()) = (Some(position), Some(wave));
        self.health.rollout_gauges().set_wave(position, wave);
        wave
    }

    pub(super) fn package_specs(&self) -> Vec<String> {
        self.config
            .agent
            .packages
            .iter()
            .map(ToString::to_string)
            .collect()
    }
}

/// Committed versions, for /healthz.
pub fn committed_versions(state: &State) -> std::collections::BTreeMap<String, String> {
    state
        .installed
        .iter()
        .map(|(name, p)| (name.clone(), p.version.clone()))
        .collect()
}
