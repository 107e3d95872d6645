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
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::error::{Error, InstallError, SourceError, StateError, VerifyError};
use crate::health::Health;
use crate::install::{Dpkg, DpkgStatus};
use crate::keyring::{Keyring, Verified};
use crate::repo::depends;
use crate::repo::digest::{Expected, StreamDigest};
use crate::repo::packages::{self, Candidate, PackagesError, SelectError, Selection, same_version};
use crate::repo::release::{self, Compression, Freshness, IndexFile, Release, Stale};
use crate::source::{self, Fetched, Source};
use crate::state::{
    AcceptedRelease, Event, FileStamp, InstalledPackage, LOCK_WAIT, Pending, PendingPackage, Poll,
    State, StateLock,
};

/// Whether the cached .debs handed to dpkg must be hashed again: not when
/// this process streamed and checked them moments ago, always when they
/// come from an earlier run (resume, rollback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DebCheck {
    JustNow,
    Again,
}

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
    dpkg: Dpkg,
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
    /// These packages were installed: (name, from, to).
    Installed(Vec<(String, Option<String>, String)>),
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
                    .map(|(name, _, to)| format!("{name} {to}"))
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

/// A signed Release as fetched, before its content is trusted.
struct SignedRelease {
    file: &'static str,
    url: String,
    etag: Option<String>,
    verified: Verified,
}

impl Agent {
    /// `health` is shared with the /healthz server: the agent drains it
    /// around dpkg and probes the app through it.
    pub async fn new(config: Config, health: Arc<Health>) -> Result<Agent, Error> {
        let keyring = Keyring::load(&config.repository.keyring)?;
        let architecture = config.architecture()?;
        crate::state::ensure_dir(&config.agent.state_dir)?;
        crate::state::ensure_dir(&config.agent.cache_dir.join(CACHE_SUBDIR))?;
        let source = source::from_config(&config).await?;
        Ok(Agent {
            dpkg: Dpkg::new(&config.install.root),
            health,
            config,
            source,
            keyring,
            architecture,
            agreed_status: Mutex::new(None),
            state_stamp: Mutex::new(None),
            swept: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// When the first pinned signing key expires, if one does.
    pub fn signing_key_expiry(&self) -> Option<DateTime<Utc>> {
        self.keyring
            .signing_key_expiry(SystemTime::now())
            .map(DateTime::<Utc>::from)
    }

    fn wanted(&self) -> Vec<&str> {
        self.config
            .agent
            .packages
            .iter()
            .map(|p| p.name.as_str())
            .collect()
    }

    fn dists(&self, file: &str) -> String {
        format!("dists/{}/{file}", self.config.repository.suite)
    }

    /// dpkg's database (parsed once per version of its status file).
    fn dpkg_status(&self) -> Result<Arc<DpkgStatus>, Error> {
        Ok(self.dpkg.status()?)
    }

    /// The agent's own directory in the cache.
    fn cache(&self) -> PathBuf {
        self.config.agent.cache_dir.join(CACHE_SUBDIR)
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
        self.dpkg.forget_status();
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
    fn reload_state(&self, state: &mut State) -> Result<(), Error> {
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
    fn record(&self, state: &mut State, result: &Result<Outcome, Error>) -> Result<(), Error> {
        let now = Utc::now();
        match result {
            Ok(outcome) => {
                let quiet = matches!(outcome, Outcome::Unchanged)
                    && state.last_poll.as_ref().is_some_and(|p| {
                        p.outcome == Outcome::Unchanged.to_string()
                            && now.signed_duration_since(p.at) < UNCHANGED_POLL_PERSIST
                    });
                if quiet {
                    return Ok(());
                }
                state.last_poll = Some(Poll {
                    at: now,
                    outcome: outcome.to_string(),
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
    async fn prepare(&self, state: &State) -> Result<Option<Plan>, Error> {
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
        let candidates = self.fetch_candidates(&release, &index).await?;

        let mut candidates = candidates;
        // Versions that failed before are not tried again; a newer one is.
        candidates.retain(|c| !state.is_bad(&c.name, &c.version.to_string()));

        let dpkg = self.dpkg_status()?;
        let mut chosen = Vec::new();
        for spec in &self.config.agent.packages {
            let current = dpkg.version(&spec.name);
            let index_url = self.source.url(&self.dists(&index.path));
            let candidate = match packages::select(&candidates, spec, current) {
                Ok(Selection::Install(candidate)) => candidate,
                Ok(Selection::Current) => continue,
                Ok(Selection::KeepNewer { installed, offered }) => {
                    warn!(package = %spec.name, %installed, %offered, "repository offers an older version; not downgrading without a pin");
                    continue;
                }
                Err(SelectError::Missing) if state.bad.contains_key(&spec.name) => {
                    info!(package = %spec.name, "only versions marked bad are published; staying");
                    continue;
                }
                Err(SelectError::Missing) => {
                    return Err(VerifyError::PackageMissing {
                        package: spec.name.clone(),
                        url: index_url,
                    }
                    .into());
                }
                Err(SelectError::PinnedMissing) => {
                    let version = spec.pinned.clone().unwrap_or_default();
                    if state.is_bad(&spec.name, &version) {
                        warn!(package = %spec.name, %version, "the pinned version is marked bad; staying");
                        continue;
                    }
                    return Err(VerifyError::PinnedMissing {
                        package: spec.name.clone(),
                        version,
                        url: index_url,
                    }
                    .into());
                }
                Err(SelectError::BadInstalledVersion(version)) => {
                    warn!(package = %spec.name, %version, "dpkg reports an unparsable version; reinstalling");
                    match packages::select(&candidates, spec, None) {
                        Ok(Selection::Install(candidate)) => candidate,
                        _ => continue,
                    }
                }
            };
            chosen.push((candidate, current));
        }
        self.check_depends(&dpkg, &chosen)?;
        self.check_space(&chosen)?;

        // The way back first: no upgrade starts without it.
        let mut ways_back = Vec::new();
        for (candidate, current) in &chosen {
            let from = match current {
                Some(current) => Some(
                    self.way_back(candidate, current, state, &candidates)
                        .await?,
                ),
                None => None,
            };
            ways_back.push(from);
        }
        let mut installs = Vec::new();
        for ((candidate, _), from) in chosen.into_iter().zip(ways_back) {
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
                file: signed.file.to_string(),
                url: signed.url.clone(),
                packages: self.package_specs(),
                signer: signed.verified.signer,
                accepted_at: Utc::now(),
            },
            installs,
        }))
    }

    /// The way back for an upgrade of `candidate.name` from `current`: the
    /// committed version's verified .deb in the cache. When the cache lost
    /// it (tmpfiles, an operator) or it no longer matches its hash, it is
    /// fetched again from the signed repository; when the repository no
    /// longer has it either, the upgrade is refused ([`InstallError::NoWayBack`]),
    /// so that a failing postinst cannot leave the node worse than before.
    ///
    /// A version that is not committed (it never passed the health gate,
    /// or failed it) has no way back to keep: it is returned as it is.
    async fn way_back(
        &self,
        candidate: &Candidate,
        current: &str,
        state: &State,
        candidates: &[Candidate],
    ) -> Result<InstalledPackage, Error> {
        let name = &candidate.name;
        let committed = state
            .installed
            .get(name)
            .filter(|p| same_version(&p.version, current));
        let Some(committed) = committed else {
            return Ok(InstalledPackage {
                version: current.to_string(),
                sha256: None,
                installed_at: None,
                deb: None,
            });
        };
        if let (Some(file), Some(sha256)) = (&committed.deb, &committed.sha256)
            && file_sha256(&self.cached_path(file))
                .await
                .is_ok_and(|actual| actual.eq_ignore_ascii_case(sha256))
        {
            return Ok(committed.clone());
        }
        let refuse = |reason: String| InstallError::NoWayBack {
            package: name.clone(),
            version: current.to_string(),
            target: candidate.version.to_string(),
            reason,
        };
        let Some(previous) = candidates
            .iter()
            .find(|c| &c.name == name && same_version(&c.version.to_string(), current))
        else {
            return Err(refuse(format!(
                "its .deb is not in the cache and the repository no longer offers {current}"
            ))
            .into());
        };
        info!(package = %name, version = %current, "the way back is not in the cache; fetching it again");
        let deb = self
            .fetch_deb(previous)
            .await
            .map_err(|e| refuse(format!("cannot fetch {current} again: {e}")))?;
        Ok(InstalledPackage {
            version: committed.version.clone(),
            sha256: Some(previous.expected.sha256.clone()),
            installed_at: committed.installed_at,
            deb: deb.file_name().map(|n| n.to_string_lossy().into_owned()),
        })
    }

    /// Refuses, before anything is downloaded, a package whose `Depends` are
    /// neither installed nor part of this plan.
    fn check_depends(
        &self,
        dpkg: &DpkgStatus,
        chosen: &[(&Candidate, Option<&str>)],
    ) -> Result<(), Error> {
        if chosen.iter().all(|(c, _)| c.depends.is_none()) {
            return Ok(());
        }
        let mut installed = dpkg.installed.clone();
        for (candidate, _) in chosen {
            installed.add(
                &candidate.name,
                candidate.version.clone(),
                candidate.provides.as_deref(),
            );
        }
        for (candidate, _) in chosen {
            let missing =
                depends::unmet(candidate.depends.as_deref().unwrap_or_default(), &installed);
            if !missing.is_empty() {
                return Err(InstallError::UnmetDepends {
                    package: candidate.name.clone(),
                    version: candidate.version.to_string(),
                    missing,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Checks, before downloading, that the cache can hold the .debs and
    /// the install root their unpacked size (`Installed-Size`).
    fn check_space(&self, chosen: &[(&Candidate, Option<&str>)]) -> Result<(), Error> {
        let download: u64 = chosen.iter().map(|(c, _)| c.expected.size).sum();
        let unpacked: u64 = chosen
            .iter()
            .map(|(c, _)| c.installed_size_kib.unwrap_or(0) * 1024)
            .sum();
        let cache = self.cache();
        for (path, needed) in [(&cache, download), (&self.config.install.root, unpacked)] {
            if needed == 0 {
                continue;
            }
            let available = crate::install::free_space(path).map_err(|source| StateError::Dir {
                path: path.clone(),
                source,
            })?;
            // A margin, so that the node is not left with a full disk.
            let needed = needed + needed / 10 + (16 << 20);
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

    /// Installs the plan and commits it once healthy, or rolls back. Not
    /// cancellable: callers await it to the end.
    async fn apply(&self, plan: Plan, state: &mut State) -> Result<Outcome, Error> {
        if plan.installs.is_empty() {
            let mut next = state.clone();
            next.release = Some(plan.release);
            self.sync_installed(&mut next)?;
            next.save(&self.config.state_path())?;
            *state = next;
            self.remember_status_stamp();
            return Ok(Outcome::UpToDate);
        }
        let now = Utc::now();
        let pending = Pending {
            started_at: now,
            release: plan.release,
            packages: plan
                .installs
                .iter()
                .map(|p| PendingPackage {
                    name: p.name.clone(),
                    from: p.from.clone(),
                    to: InstalledPackage {
                        version: p.to.clone(),
                        sha256: Some(p.sha256.clone()),
                        installed_at: Some(now),
                        deb: p.deb.file_name().map(|n| n.to_string_lossy().into_owned()),
                    },
                })
                .collect(),
        };
        self.run_pending(pending, state, DebCheck::JustNow).await
    }

    /// Finishes an install that an earlier run started and did not commit
    /// (the agent was killed): the same .debs again, the health gate, then
    /// commit or roll back.
    async fn resume(&self, state: &mut State) -> Result<Outcome, Error> {
        let Some(pending) = state.pending.clone() else {
            return Ok(Outcome::Unchanged);
        };
        warn!(started_at = %pending.started_at, "finishing an install interrupted by a restart");
        self.run_pending(pending, state, DebCheck::Again).await
    }

    async fn run_pending(
        &self,
        pending: Pending,
        state: &mut State,
        debs: DebCheck,
    ) -> Result<Outcome, Error> {
        let timeout = self.config.install.lock_timeout;
        let Some(_lock) = self.dpkg.lock(timeout).await? else {
            // A pending install stays journalled in state: it is still owed.
            return Err(Error::Deferred {
                reason: format!(
                    "another package manager holds dpkg's lock for more than {timeout:?}"
                ),
            });
        };
        if self.dpkg.needs_recovery()? {
            warn!("dpkg was interrupted; running dpkg --configure -a first");
            self.dpkg.recover().await?;
        }

        // A cached .deb changed since it was verified (disk error,
        // tampering): give up this install without blaming the version; the
        // next cycle fetches it again from the signed repository.
        let debs = match self.cached_debs(&pending, &target_of, debs).await {
            Ok(debs) => debs,
            Err(e) => {
                let mut next = state.clone();
                next.pending = None;
                next.push_event(format!("install abandoned: {e}"));
                next.save(&self.config.state_path())?;
                *state = next;
                return Err(e);
            }
        };

        // The intent goes to disk before dpkg starts, so a kill at any
        // point after this is finished by `resume` at the next start.
        let mut next = state.clone();
        next.pending = Some(pending.clone());
        next.save(&self.config.state_path())?;
        *state = next;

        self.health.set_draining(true);
        let drain = self.config.health.drain;
        if !drain.is_zero() {
            info!(?drain, "draining before dpkg");
            tokio::time::sleep(drain).await;
        }
        let result = match self.run_dpkg(&pending, target_of, &debs).await {
            Ok(()) => self
                .health_gate()
                .await
                .map_err(|reason| format!("did not become healthy: {reason}")),
            Err(e) => Err(format!("failed to install: {e}")),
        };
        let outcome = match result {
            Ok(()) => self.commit(pending, state),
            Err(reason) => self.roll_back(pending, reason, state).await,
        };
        self.health.set_draining(false);
        self.remember_status_stamp();
        outcome
    }

    /// dpkg -i of the .debs `which` picks from `pending`, each re-verified
    /// against its recorded SHA256 first when `check` asks for it.
    async fn install_debs(
        &self,
        pending: &Pending,
        which: impl Fn(&PendingPackage) -> Option<&InstalledPackage>,
        check: DebCheck,
    ) -> Result<(), Error> {
        let debs = self.cached_debs(pending, &which, check).await?;
        self.run_dpkg(pending, which, &debs).await
    }

    /// dpkg -i of `debs` (from [`Agent::cached_debs`]) in one transaction;
    /// then dpkg must report exactly the versions `which` picks, by Debian
    /// version equality.
    async fn run_dpkg(
        &self,
        pending: &Pending,
        which: impl Fn(&PendingPackage) -> Option<&InstalledPackage>,
        debs: &[PathBuf],
    ) -> Result<(), Error> {
        if debs.is_empty() {
            return Ok(());
        }
        self.dpkg.install(debs).await?;
        let installed = self.dpkg_status()?;
        for package in &pending.packages {
            let Some(target) = which(package) else {
                continue;
            };
            let actual = installed.version(&package.name);
            if !actual.is_some_and(|actual| same_version(actual, &target.version)) {
                return Err(InstallError::NotInstalled {
                    package: package.name.clone(),
                    expected: target.version.clone(),
                    actual: actual.map(str::to_string),
                }
                .into());
            }
        }
        Ok(())
    }

    /// The cached .debs that `which` picks, each hashed again first when
    /// `check` asks for it. Packages dpkg already has fully installed at the
    /// target version are left out (a resume after the health gate must not
    /// restart a healthy app). A file that does not match is removed: it
    /// can only be fetched again from the signed repository.
    async fn cached_debs(
        &self,
        pending: &Pending,
        which: &impl Fn(&PendingPackage) -> Option<&InstalledPackage>,
        check: DebCheck,
    ) -> Result<Vec<PathBuf>, Error> {
        let installed = self.dpkg_status()?;
        let mut debs = Vec::new();
        for package in &pending.packages {
            let Some(target) = which(package) else {
                continue;
            };
            if installed
                .version(&package.name)
                .is_some_and(|v| same_version(v, &target.version))
            {
                continue;
            }
            let (Some(file), Some(sha256)) = (&target.deb, &target.sha256) else {
                return Err(StateError::Corrupt {
                    path: self.config.state_path(),
                    message: format!(
                        "no cached .deb recorded for {} {}",
                        package.name, target.version
                    ),
                }
                .into());
            };
            let path = self.cached_path(file);
            if check == DebCheck::Again {
                let actual = file_sha256(&path)
                    .await
                    .unwrap_or_else(|e| format!("unreadable ({e})"));
                if !actual.eq_ignore_ascii_case(sha256) {
                    let _ = std::fs::remove_file(&path);
                    return Err(VerifyError::HashMismatch {
                        url: path.display().to_string(),
                        expected: sha256.clone(),
                        actual,
                    }
                    .into());
                }
            }
            info!(package = %package.name, version = %target.version, "installing");
            debs.push(path);
        }
        Ok(debs)
    }

    /// Waits for the app to answer healthy (see [`Health::wait_healthy`]).
    async fn health_gate(&self) -> Result<(), String> {
        let health = &self.config.health;
        self.health
            .wait_healthy(
                health.healthy_after,
                health.health_timeout,
                health.check_interval,
            )
            .await
    }

    fn commit(&self, pending: Pending, state: &mut State) -> Result<Outcome, Error> {
        let mut next = state.clone();
        let mut installed = Vec::new();
        for package in &pending.packages {
            info!(package = %package.name, from = package.from.as_ref().map_or("-", |f| f.version.as_str()), to = %package.to.version, "installed and healthy");
            if let Some(from) = &package.from {
                next.last_known_good
                    .insert(package.name.clone(), from.clone());
            }
            next.installed
                .insert(package.name.clone(), package.to.clone());
            installed.push((
                package.name.clone(),
                package.from.as_ref().map(|f| f.version.clone()),
                package.to.version.clone(),
            ));
            next.push_event(format!(
                "installed {} {} (was {})",
                package.name,
                package.to.version,
                package.from.as_ref().map_or("-", |f| f.version.as_str())
            ));
        }
        next.release = Some(pending.release);
        next.pending = None;
        self.sync_installed(&mut next)?;
        next.save(&self.config.state_path())?;
        *state = next;
        self.prune_cache(state);
        self.health
            .update(|s| s.installed = committed_versions(state));
        Ok(Outcome::Installed(installed))
    }

    /// Puts the last-known-good versions back, marks the new ones bad, and
    /// leaves the accepted Release where it was (the next cycle re-reads it
    /// and skips the bad versions).
    async fn roll_back(
        &self,
        pending: Pending,
        reason: String,
        state: &mut State,
    ) -> Result<Outcome, Error> {
        let mut next = state.clone();
        for package in &pending.packages {
            next.mark_bad(&package.name, &package.to.version);
        }
        let first = &pending.packages[0];
        let restorable = pending
            .packages
            .iter()
            .any(|p| p.from.as_ref().is_some_and(|f| f.deb.is_some()));
        let error = if !restorable {
            InstallError::NoRollback {
                package: first.name.clone(),
                version: first.to.version.clone(),
                reason: reason.clone(),
            }
        } else {
            let restored = pending
                .packages
                .iter()
                .filter_map(|p| p.from.as_ref().map(|f| format!("{} {}", p.name, f.version)))
                .collect::<Vec<_>>()
                .join(", ");
            warn!(%reason, %restored, "rolling back");
            let rollback = match self
                .install_debs(
                    &pending,
                    |p| p.from.as_ref().filter(|f| f.deb.is_some()),
                    DebCheck::Again,
                )
                .await
            {
                Ok(()) => self.health_gate().await,
                Err(e) => Err(e.to_string()),
            };
            if rollback.is_ok() {
                // The committed versions are back; keep the record of their
                // .debs (fetched again if the cache had lost them), so that
                // pruning keeps them as the way back of the next upgrade.
                for package in &pending.packages {
                    if let Some(from) = package.from.as_ref().filter(|f| f.deb.is_some()) {
                        next.installed.insert(package.name.clone(), from.clone());
                    }
                }
            }
            match rollback {
                Ok(()) => InstallError::RolledBack {
                    package: first.name.clone(),
                    version: first.to.version.clone(),
                    reason: reason.clone(),
                    restored,
                },
                Err(rollback_error) => InstallError::RollbackFailed {
                    package: first.name.clone(),
                    version: first.to.version.clone(),
                    reason: reason.clone(),
                    restored,
                    rollback_error,
                },
            }
        };
        next.pending = None;
        next.push_event(error.to_string());
        next.save(&self.config.state_path())?;
        *state = next;
        self.prune_cache(state);
        Err(error.into())
    }

    /// Records dpkg's view of the wanted packages that this agent did not
    /// install itself (so the 304 shortcut can compare), keeping the entries
    /// it did install.
    fn sync_installed(&self, state: &mut State) -> Result<(), Error> {
        let installed = self.dpkg_status()?;
        for name in self.wanted() {
            match installed.version(name) {
                Some(version)
                    if state
                        .installed
                        .get(name)
                        .is_some_and(|p| same_version(&p.version, version)) => {}
                // A version that failed its health gate is not "committed",
                // even though dpkg has it (there was nothing to roll back to).
                Some(version) if state.is_bad(name, version) => {
                    state.installed.remove(name);
                }
                Some(version) => {
                    state.installed.insert(
                        name.to_string(),
                        InstalledPackage {
                            version: version.to_string(),
                            sha256: None,
                            installed_at: None,
                            deb: None,
                        },
                    );
                }
                None => {
                    state.installed.remove(name);
                }
            }
        }
        Ok(())
    }

    /// Whether a 304 may end the cycle: the accepted Release was read for
    /// the same package list, and dpkg's installed versions are the ones
    /// state recorded. Cheap when dpkg's status file has not changed since it
    /// last matched (one stat).
    fn may_skip_unchanged(&self, state: &State) -> bool {
        let Some(accepted) = &state.release else {
            return false;
        };
        if accepted.packages != self.package_specs() {
            info!("agent.packages changed; fetching the full repository");
            return false;
        }
        let stamp = FileStamp::of(&self.dpkg.status_path());
        let mut remembered = self.agreed_status.lock().unwrap_or_else(|e| e.into_inner());
        if stamp.is_some() && *remembered == stamp {
            return true;
        }
        let Ok(installed) = self.dpkg_status() else {
            return false;
        };
        let agrees = self.wanted().iter().all(|name| {
            matches!((installed.version(name), state.installed.get(*name)), (Some(a), Some(b)) if same_version(a, &b.version))
        });
        if agrees {
            *remembered = stamp;
        } else {
            info!("installed versions differ from state; fetching the full repository");
        }
        agrees
    }

    fn package_specs(&self) -> Vec<String> {
        self.config
            .agent
            .packages
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn remember_status_stamp(&self) {
        *self.agreed_status.lock().unwrap_or_else(|e| e.into_inner()) =
            FileStamp::of(&self.dpkg.status_path());
    }

    /// InRelease if present, otherwise Release + Release.gpg; `None` on 304.
    async fn fetch_signed_release(
        &self,
        state: &State,
        etag: Option<&str>,
    ) -> Result<Option<SignedRelease>, Error> {
        let limit = self.config.repository.max_release_bytes;
        let accepted_file = state.release.as_ref().map(|r| r.file.as_str());
        let now = SystemTime::now();

        let path = self.dists("InRelease");
        let url = self.source.url(&path);
        let accepted_url = state.release.as_ref().map(|r| r.url.as_str());
        let inrelease_etag = etag
            .filter(|_| accepted_file == Some("InRelease") && accepted_url == Some(url.as_str()));
        match self.source.get(&path, inrelease_etag).await {
            Ok(Fetched::NotModified) => return Ok(None),
            Ok(Fetched::Object(object)) => {
                let bytes = source::read_capped(&url, object.body, limit).await?;
                let verified = self.keyring.verify_cleartext(&url, &bytes, now)?;
                return Ok(Some(SignedRelease {
                    file: "InRelease",
                    url,
                    etag: object.etag,
                    verified,
                }));
            }
            Err(e) if e.is_not_found() => {
                debug!(%url, "no InRelease; trying Release + Release.gpg")
            }
            Err(e) => return Err(e.into()),
        }

        let path = self.dists("Release");
        let url = self.source.url(&path);
        let release_etag =
            etag.filter(|_| accepted_file == Some("Release") && accepted_url == Some(url.as_str()));
        let fetched = match self.source.get(&path, release_etag).await {
            Err(e) if e.is_not_found() => {
                return Err(SourceError::NotFound {
                    url: format!("{} (and {url})", self.source.url(&self.dists("InRelease"))),
                }
                .into());
            }
            other => other?,
        };
        let (release_bytes, release_etag) = match fetched {
            Fetched::NotModified => return Ok(None),
            Fetched::Object(object) => (
                source::read_capped(&url, object.body, limit).await?,
                object.etag,
            ),
        };
        let sig_path = self.dists("Release.gpg");
        let sig_url = self.source.url(&sig_path);
        let signature = match self.source.get(&sig_path, None).await? {
            Fetched::Object(object) => source::read_capped(&sig_url, object.body, limit).await?,
            Fetched::NotModified => {
                return Err(SourceError::Unavailable {
                    url: sig_url,
                    message: "answered 304 to an unconditional request".into(),
                }
                .into());
            }
        };
        let verified = self
            .keyring
            .verify_detached(&url, &release_bytes, &signature, now)?;
        Ok(Some(SignedRelease {
            file: "Release",
            url,
            etag: release_etag,
            verified,
        }))
    }

    /// Parses the verified text and applies the suite and freshness rules.
    fn check_release(&self, signed: &SignedRelease, state: &State) -> Result<Release, Error> {
        let url = &signed.url;
        let release =
            release::parse(&signed.verified.text).map_err(|reason| VerifyError::ReleaseParse {
                url: url.clone(),
                reason,
            })?;
        let suite = &self.config.repository.suite;
        if !release.matches_suite(suite) {
            return Err(VerifyError::WrongSuite {
                url: url.clone(),
                expected: suite.clone(),
                actual: format!(
                    "{}/{}",
                    release.suite.as_deref().unwrap_or("-"),
                    release.codename.as_deref().unwrap_or("-")
                ),
            }
            .into());
        }
        let rules = self.freshness(state);
        release
            .check_freshness(&rules)
            .map_err(|stale| stale_error(stale, url, release.date, &rules))?;
        info!(file = signed.file, signer = %signed.verified.signer, date = %release.date, "Release verified");
        Ok(release)
    }

    fn freshness(&self, state: &State) -> Freshness {
        Freshness {
            now: Utc::now(),
            accepted: state.release.as_ref().map(|r| r.date),
            max_age: self.config.repository.max_age,
            clock_skew: self.config.repository.clock_skew,
        }
    }

    /// Fetches the Packages index (by hash when the Release offers it),
    /// checks it against Release, then reads the wanted candidates from it.
    async fn fetch_candidates(
        &self,
        release: &Release,
        index: &IndexFile,
    ) -> Result<Vec<Candidate>, Error> {
        let limit = self.config.repository.max_index_bytes;
        if index.expected.size > limit {
            return Err(SourceError::TooLarge {
                url: self.source.url(&self.dists(&index.path)),
                limit,
            }
            .into());
        }
        let local = self
            .cache()
            .join(format!("Packages{}", index.compression.extension()));
        let mut paths = Vec::new();
        if release.acquire_by_hash {
            paths.push(self.dists(&index.by_hash_path()));
        }
        paths.push(self.dists(&index.path));
        let mut fetched = None;
        for path in &paths {
            let url = self.source.url(path);
            match self.source.get(path, None).await {
                Ok(Fetched::Object(object)) => {
                    source::download_verified(&url, object.body, &index.expected, &local).await?;
                    fetched = Some(url);
                    break;
                }
                Ok(Fetched::NotModified) => {}
                Err(e) if e.is_not_found() && path != paths.last().unwrap_or(path) => {
                    debug!(%url, "by-hash index missing; trying the canonical path");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let url = fetched.ok_or_else(|| SourceError::NotFound {
            url: self.source.url(&self.dists(&index.path)),
        })?;
        let wanted: Vec<String> = self.wanted().iter().map(|s| s.to_string()).collect();
        let arch = self.architecture.clone();
        let compression = index.compression;
        let parse_url = url.clone();
        let result = tokio::task::spawn_blocking(move || {
            let result = read_index(&local, compression, limit, &wanted, &arch, &parse_url);
            // The index is read once; the cache holds only .debs.
            let _ = std::fs::remove_file(&local);
            result
        })
        .await
        .map_err(|e| VerifyError::PackagesParse {
            url: url.clone(),
            reason: format!("parser task failed: {e}"),
        })?;
        result.map_err(Error::from)
    }

    /// The verified .deb for `candidate` in the cache: reused when a file
    /// of that name already hashes right, otherwise downloaded. Either way
    /// its own control file must name the package, version and
    /// architecture of the index entry it was selected by.
    async fn fetch_deb(&self, candidate: &Candidate) -> Result<PathBuf, Error> {
        let dest = self.cache().join(candidate.cache_name());
        let url = self.source.url(&candidate.filename);
        if cached_file_matches(&dest, &candidate.expected).await {
            debug!(path = %dest.display(), "using cached .deb");
        } else {
            match self.source.get(&candidate.filename, None).await? {
                Fetched::Object(object) => {
                    source::download_verified(&url, object.body, &candidate.expected, &dest)
                        .await?;
                }
                Fetched::NotModified => {
                    return Err(SourceError::Unavailable {
                        url,
                        message: "answered 304 to an unconditional request".into(),
                    }
                    .into());
                }
            }
        }
        if let Err(e) = check_deb_identity(&dest, candidate, &url).await {
            let _ = std::fs::remove_file(&dest);
            return Err(e.into());
        }
        Ok(dest)
    }

    /// Where the cached file `name` (as state records it) is. A file that an
    /// older agent kept directly in `cache_dir` is moved into the agent's
    /// own directory the first time it is asked for.
    fn cached_path(&self, name: &str) -> PathBuf {
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

    /// Keeps, per package, the current .deb and the last known good one
    /// (both named in state) and removes every other file in the agent's
    /// own cache directory; nothing outside it is touched.
    fn prune_cache(&self, state: &State) {
        let keep: Vec<&str> = state
            .installed
            .values()
            .chain(state.last_known_good.values())
            .filter_map(|p| p.deb.as_deref())
            .collect();
        let Ok(entries) = std::fs::read_dir(self.cache()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if is_file
                && !keep.contains(&name.as_str())
                && let Err(e) = std::fs::remove_file(entry.path())
            {
                warn!(path = %entry.path().display(), error = %e, "cannot prune cache");
            }
        }
    }
}

/// What an install puts in place: the new version.
fn target_of(package: &PendingPackage) -> Option<&InstalledPackage> {
    Some(&package.to)
}

/// Committed versions, for /healthz.
pub fn committed_versions(state: &State) -> std::collections::BTreeMap<String, String> {
    state
        .installed
        .iter()
        .map(|(name, p)| (name.clone(), p.version.clone()))
        .collect()
}

/// The named error for a Release that failed a freshness rule.
fn stale_error(stale: Stale, url: &str, date: DateTime<Utc>, rules: &Freshness) -> VerifyError {
    let show = |d: DateTime<Utc>| d.to_rfc2822();
    let url = url.to_string();
    match stale {
        Stale::ClockBehind { accepted } => VerifyError::ClockBehind {
            now: show(rules.now),
            accepted: show(accepted),
        },
        Stale::Replay { accepted } => VerifyError::Replay {
            url,
            date: show(date),
            accepted: show(accepted),
        },
        Stale::Expired { valid_until } => VerifyError::Expired {
            url,
            valid_until: show(valid_until),
            now: show(rules.now),
        },
        Stale::FromFuture => VerifyError::FromFuture {
            url,
            date: show(date),
            now: show(rules.now),
            skew: rules.clock_skew,
        },
        Stale::TooOld { max_age } => VerifyError::TooOld {
            url,
            date: show(date),
            max_age,
        },
    }
}

/// Checks that the .deb at `path` is the package its index entry
/// describes: its control file's Package, Version (by Debian equality) and
/// Architecture. The bytes were verified against the entry's SHA256, but
/// that only says the repository signed them as this entry: a mislabelled
/// package (another name, whose maintainer scripts would run as root and
/// which a rollback would not remove) is refused before dpkg sees it, as
/// apt refuses it.
async fn check_deb_identity(
    path: &Path,
    candidate: &Candidate,
    url: &str,
) -> Result<(), VerifyError> {
    let deb = path.to_path_buf();
    let control = tokio::task::spawn_blocking(move || crate::publish::deb::read_identity(&deb))
        .await
        .map_err(|e| e.to_string())
        .and_then(|read| read.map_err(|e| e.to_string()))
        .map_err(|reason| VerifyError::DebControl {
            url: url.to_string(),
            reason,
        })?;
    let mismatch = |field, expected: String, actual: &str| VerifyError::DebMismatch {
        url: url.to_string(),
        field,
        expected,
        actual: actual.to_string(),
    };
    if control.package != candidate.name {
        return Err(mismatch(
            "Package",
            candidate.name.clone(),
            &control.package,
        ));
    }
    if !same_version(&control.version, &candidate.version.to_string()) {
        return Err(mismatch(
            "Version",
            candidate.version.to_string(),
            &control.version,
        ));
    }
    if control.architecture != candidate.architecture {
        return Err(mismatch(
            "Architecture",
            candidate.architecture.clone(),
            &control.architecture,
        ));
    }
    Ok(())
}

/// The SHA256 of a file in the cache, or why it cannot be read.
async fn file_sha256(path: &Path) -> Result<String, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        let mut digest = StreamDigest::new(u64::MAX);
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut buffer) {
                Ok(0) => return Ok(digest.finish().0),
                // The limit is u64::MAX: update cannot overflow.
                Ok(n) => digest
                    .update(&buffer[..n])
                    .map_err(|_| "too large".to_string())?,
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

/// True when `path` has exactly the expected size and SHA256.
async fn cached_file_matches(path: &Path, expected: &Expected) -> bool {
    let size_matches = std::fs::metadata(path).is_ok_and(|m| m.len() == expected.size);
    size_matches
        && file_sha256(path)
            .await
            .is_ok_and(|actual| actual.eq_ignore_ascii_case(&expected.sha256))
}

/// Decompresses and parses a verified index file, refusing to inflate past
/// `limit` bytes (a decompression bomb signed by mistake is still a bomb).
fn read_index(
    path: &Path,
    compression: Compression,
    limit: u64,
    wanted: &[String],
    arch: &str,
    url: &str,
) -> Result<Vec<Candidate>, VerifyError> {
    let file = std::fs::File::open(path).map_err(|e| VerifyError::PackagesParse {
        url: url.to_string(),
        reason: format!("cannot reopen {}: {e}", path.display()),
    })?;
    // The same capped decompression the publisher reads indexes with.
    let mut inflated: crate::repo::capped::CappedReader<Box<dyn Read>> =
        crate::repo::capped::decompress(compression, file, limit);
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let result = packages::read_candidates(BufReader::new(&mut inflated), &wanted, arch);
    // Past the cap is an error whatever the parser made of it: never
    // candidates from the part of an index before the cut.
    if inflated.exceeded() {
        return Err(VerifyError::Decompress {
            url: url.to_string(),
            reason: format!("inflates past the limit of {limit} bytes"),
        });
    }
    result.map_err(|e| match e {
        PackagesError::Parse(reason) => VerifyError::PackagesParse {
            url: url.to_string(),
            reason,
        },
        PackagesError::UnsafeFilename { package, filename } => {
            VerifyError::UnsafeFilename { package, filename }
        }
        PackagesError::MissingField { package, field } => VerifyError::PackagesParse {
            url: url.to_string(),
            reason: format!("{package} has no {field} field"),
        },
    })
}
