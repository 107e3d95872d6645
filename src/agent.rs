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

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::error::{Error, SourceError, VerifyError};
use crate::install::Dpkg;
use crate::keyring::{Keyring, Verified};
use crate::repo::digest::{Expected, StreamDigest};
use crate::repo::packages::{self, Candidate, PackagesError, SelectError, Selection};
use crate::repo::release::{self, Compression, Freshness, IndexFile, Release, Stale};
use crate::source::{self, Fetched, Source};
use crate::state::{AcceptedRelease, Event, InstalledPackage, Poll, State};

/// How long an unchanged poll may go unrecorded in state.json.
const UNCHANGED_POLL_PERSIST: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

pub struct Agent {
    config: Config,
    source: Box<dyn Source>,
    keyring: Keyring,
    dpkg: Dpkg,
    architecture: String,
    /// (mtime, size, inode) of dpkg's status file when the installed
    /// versions last matched state; lets an unchanged poll skip parsing it.
    status_stamp: Mutex<Option<(i64, i64, u64, u64)>>,
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
    from: Option<String>,
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
    pub async fn new(config: Config) -> Result<Agent, Error> {
        let keyring = Keyring::load(&config.repository.keyring)?;
        let architecture = config.architecture()?;
        crate::state::ensure_dir(&config.agent.state_dir)?;
        crate::state::ensure_dir(&config.agent.cache_dir)?;
        let source = source::from_config(&config).await?;
        Ok(Agent {
            dpkg: Dpkg::new(&config.install.root),
            config,
            source,
            keyring,
            architecture,
            status_stamp: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
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

    /// Installed versions of the wanted packages, from dpkg's database.
    pub fn installed(&self) -> Result<HashMap<String, String>, Error> {
        Ok(self.dpkg.installed_versions(&self.wanted())?)
    }

    /// One whole cycle, recording its outcome or error in `state` and on
    /// disk. The repository half runs under `agent.cycle_timeout`.
    pub async fn cycle(&self, state: &mut State) -> Result<Outcome, Error> {
        let limit = self.config.agent.cycle_timeout;
        let result = match tokio::time::timeout(limit, self.prepare(state)).await {
            Err(_elapsed) => Err(Error::CycleDeadline { limit }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) => Ok(Outcome::Unchanged),
            Ok(Ok(Some(plan))) => self.apply(plan, state).await,
        };
        if let Err(e) = self.record(state, &result) {
            // The cycle's own outcome matters more; say both.
            warn!(error = %e, "cannot record the cycle in state");
            if result.is_ok() {
                return Err(e);
            }
        }
        result
    }

    /// Writes the poll time and outcome, or the error, to state.json.
    ///
    /// An unchanged poll after an unchanged poll is written at most every
    /// [`UNCHANGED_POLL_PERSIST`]: state.json is replaced with two fsyncs,
    /// which would otherwise be most of the cost of a 304 poll.
    pub fn record(&self, state: &mut State, result: &Result<Outcome, Error>) -> Result<(), Error> {
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
    pub async fn prepare(&self, state: &State) -> Result<Option<Plan>, Error> {
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
        crate::state::ensure_dir(&self.config.agent.cache_dir)?;

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

        let installed = self.installed()?;
        let mut installs = Vec::new();
        for spec in &self.config.agent.packages {
            let current = installed.get(&spec.name).map(String::as_str);
            let index_url = self.source.url(&self.dists(&index.path));
            let chosen = match packages::select(&candidates, spec, current) {
                Ok(Selection::Install(candidate)) => candidate,
                Ok(Selection::Current) => continue,
                Ok(Selection::KeepNewer { installed, offered }) => {
                    warn!(package = %spec.name, %installed, %offered, "repository offers an older version; not downgrading without a pin");
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
                    return Err(VerifyError::PinnedMissing {
                        package: spec.name.clone(),
                        version: spec.pinned.clone().unwrap_or_default(),
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
            let deb = self.fetch_deb(chosen).await?;
            installs.push(PlannedInstall {
                name: chosen.name.clone(),
                from: current.map(str::to_string),
                to: chosen.version.to_string(),
                deb,
                sha256: chosen.expected.sha256.clone(),
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

    /// Installs the plan with dpkg and commits it to state. Not cancellable.
    pub async fn apply(&self, plan: Plan, state: &mut State) -> Result<Outcome, Error> {
        let now = Utc::now();
        let mut outcome = Vec::new();
        if !plan.installs.is_empty() {
            let debs: Vec<PathBuf> = plan.installs.iter().map(|p| p.deb.clone()).collect();
            for p in &plan.installs {
                info!(package = %p.name, from = p.from.as_deref().unwrap_or("-"), to = %p.to, "installing");
            }
            self.dpkg.install(&debs).await?;
        }
        let installed = self.installed()?;
        for p in &plan.installs {
            let actual = installed.get(&p.name);
            if actual != Some(&p.to) {
                return Err(crate::error::InstallError::NotInstalled {
                    package: p.name.clone(),
                    expected: p.to.clone(),
                    actual: actual.cloned(),
                }
                .into());
            }
            info!(package = %p.name, from = p.from.as_deref().unwrap_or("-"), to = %p.to, "installed");
            outcome.push((p.name.clone(), p.from.clone(), p.to.clone()));
        }

        self.prune_cache(&plan);
        let mut next = state.clone();
        next.release = Some(plan.release);
        next.installed.clear();
        for (name, version) in &installed {
            let planned = plan.installs.iter().find(|p| &p.name == name);
            let previous = state.installed.get(name).filter(|p| &p.version == version);
            next.installed.insert(
                name.clone(),
                match (planned, previous) {
                    (Some(p), _) => InstalledPackage {
                        version: version.clone(),
                        sha256: Some(p.sha256.clone()),
                        installed_at: Some(now),
                    },
                    (None, Some(previous)) => previous.clone(),
                    (None, None) => InstalledPackage {
                        version: version.clone(),
                        sha256: None,
                        installed_at: None,
                    },
                },
            );
        }
        next.save(&self.config.state_path())?;
        *state = next;
        self.remember_status_stamp();
        Ok(if outcome.is_empty() {
            Outcome::UpToDate
        } else {
            Outcome::Installed(outcome)
        })
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
        let stamp = status_stamp(&self.dpkg.status_path());
        let mut remembered = self.status_stamp.lock().unwrap_or_else(|e| e.into_inner());
        if stamp.is_some() && *remembered == stamp {
            return true;
        }
        let Ok(installed) = self.installed() else {
            return false;
        };
        let agrees = self.wanted().iter().all(|name| {
            matches!((installed.get(*name), state.installed.get(*name)), (Some(a), Some(b)) if *a == b.version)
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
            .map(|p| match &p.pinned {
                Some(version) => format!("{}={version}", p.name),
                None => p.name.clone(),
            })
            .collect()
    }

    fn remember_status_stamp(&self) {
        *self.status_stamp.lock().unwrap_or_else(|e| e.into_inner()) =
            status_stamp(&self.dpkg.status_path());
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
            .config
            .agent
            .cache_dir
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
            read_index(&local, compression, limit, &wanted, &arch, &parse_url)
        })
        .await
        .map_err(|e| VerifyError::PackagesParse {
            url: url.clone(),
            reason: format!("parser task failed: {e}"),
        })?;
        result.map_err(Error::from)
    }

    /// The verified .deb for `candidate` in the cache: reused when a file
    /// of that name already hashes right, otherwise downloaded.
    async fn fetch_deb(&self, candidate: &Candidate) -> Result<PathBuf, Error> {
        let dest = self.config.agent.cache_dir.join(candidate.cache_name());
        if cached_file_matches(&dest, &candidate.expected).await {
            debug!(path = %dest.display(), "using cached .deb");
            return Ok(dest);
        }
        let url = self.source.url(&candidate.filename);
        match self.source.get(&candidate.filename, None).await? {
            Fetched::Object(object) => {
                source::download_verified(&url, object.body, &candidate.expected, &dest).await?;
                Ok(dest)
            }
            Fetched::NotModified => Err(SourceError::Unavailable {
                url,
                message: "answered 304 to an unconditional request".into(),
            }
            .into()),
        }
    }

    /// Keeps, per package, the .deb just installed and the one it replaced
    /// (the last known good); removes other .debs and leftover partials.
    fn prune_cache(&self, plan: &Plan) {
        let mut keep: Vec<String> = Vec::new();
        for p in &plan.installs {
            if let Some(name) = p.deb.file_name() {
                keep.push(name.to_string_lossy().into_owned());
            }
            if let Some(from) = &p.from {
                keep.push(format!("{}_{}_", p.name, from.replace(':', "%3a")));
            }
        }
        let touched: Vec<String> = plan
            .installs
            .iter()
            .map(|p| format!("{}_", p.name))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.config.agent.cache_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_deb = name.ends_with(".deb")
                && touched.iter().any(|t| name.starts_with(t))
                && !keep
                    .iter()
                    .any(|k| name == *k || name.starts_with(k.as_str()));
            if (stale_deb || name.ends_with(".partial"))
                && let Err(e) = std::fs::remove_file(entry.path())
            {
                warn!(path = %entry.path().display(), error = %e, "cannot prune cache");
            }
        }
    }
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

fn status_stamp(path: &Path) -> Option<(i64, i64, u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.mtime(), meta.mtime_nsec(), meta.len(), meta.ino()))
}

async fn cached_file_matches(path: &Path, expected: &Expected) -> bool {
    let path = path.to_path_buf();
    let expected = expected.clone();
    tokio::task::spawn_blocking(move || {
        let Ok(meta) = std::fs::metadata(&path) else {
            return false;
        };
        if meta.len() != expected.size {
            return false;
        }
        let Ok(mut file) = std::fs::File::open(&path) else {
            return false;
        };
        let mut digest = StreamDigest::new(expected.size);
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut buffer) {
                Ok(0) => return digest.verify(&expected).is_ok(),
                Ok(n) => {
                    if digest.update(&buffer[..n]).is_err() {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
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
    let decoder: Box<dyn Read> = match compression {
        Compression::Xz => Box::new(xz2::read::XzDecoder::new(BufReader::new(file))),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(BufReader::new(file))),
        Compression::None => Box::new(file),
    };
    let capped = CappedReader {
        inner: decoder,
        remaining: limit,
    };
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    packages::read_candidates(BufReader::new(capped), &wanted, arch).map_err(|e| match e {
        PackagesError::Parse(reason) if reason.contains(CAPPED_MESSAGE) => {
            VerifyError::Decompress {
                url: url.to_string(),
                reason: format!("inflates past the limit of {limit} bytes"),
            }
        }
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

const CAPPED_MESSAGE: &str = "decompressed index exceeds its limit";

/// A reader that fails once more than `remaining` bytes were read.
struct CappedReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.remaining {
            return Err(std::io::Error::other(CAPPED_MESSAGE));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}
