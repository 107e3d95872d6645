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

use chrono::{DateTime, Utc};
use tracing::{debug, info, warn};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::error::{Error, InstallError, StateError, VerifyError};
use crate::health::Health;
use crate::install::{Dpkg, DpkgStatus, Installer};
use crate::keyring::Keyring;
use crate::repo::release::{self};
use crate::source::{self, Source};
use crate::state::{
    AcceptedRelease, Event, FileStamp, InstalledPackage, LOCK_WAIT, Poll, PollOutcome, State,
    StateLock,
};

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
    clock: Box<dyn Clock>,
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
        }
    }
}

/// Verified .debs waiting for dpkg, and the Release that named them.
pub struct Plan {
    release: AcceptedRelease,
    installs: Vec<PlannedInstall>,
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
        Ok(Agent::from_parts(
            config,
            architecture,
            source,
            installer,
            keyring,
            Box::new(SystemClock),
            health,
        ))
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
        Agent {
            config,
            source,
            keyring,
            installer,
            clock,
            health,
            architecture,
            agreed_status: Mutex::new(None),
            state_stamp: Mutex::new(None),
            swept: AtomicBool::new(false),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// When the first pinned signing key expires, if one does.
    pub fn signing_key_expiry(&self) -> Option<DateTime<Utc>> {
        self.keyring
            .signing_key_expiry(self.clock.now().into())
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
        let result = if state.pending.is_some() {
            self.resume(state).await
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
                Ok(Ok(Some(plan))) => self.apply(plan, state).await,
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

    /// Reads and verifies the repository; leaves verified .debs in the
    /// cache. `None` when nothing changed since the last accepted Release.
    pub(super) async fn prepare(&self, state: &State) -> Result<Option<Plan>, Error> {
        let etag = match self.may_skip_unchanged(state) {
            true => state.release.as_ref().and_then(|r| r.etag.as_deref()),
            false => None,
        };
        let Some(signed) = self.fetch_signed_release(state, etag).await? else {
            debug!("Release unchanged (304)");
            // Freshness still holds for the Release we run on: an expired or
            // frozen repository, or a clock gone backwards, is reported even
            // when nothing changed.
            if let Some(accepted) = &state.release {
                let rules = self.freshness(state);
                release::check_times(accepted.date, accepted.valid_until, &rules)
                    .map_err(|stale| stale_error(stale, &accepted.url, accepted.date, &rules))?;
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
        let dpkg = self.dpkg_status()?;
        let index_url = self.source.url(&self.dists(&index.path));
        let choices = plan::choose(
            &candidates,
            &self.config.agent.packages,
            &dpkg,
            state,
            &index_url,
        )?;
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
