//! The repository side: `pulldeploy publish`, `promote` and `refresh`
//! write a signed apt repository that agents and apt-get read.
//!
//! - [`deb`]: a .deb's control file (ar, control.tar.{gz,xz,zst}).
//! - [`index`]: Packages stanzas and the Release text.
//! - [`sign`]: the signing key, InRelease and Release.gpg (Sequoia).
//! - [`store`]: reads with ETags and conditional writes (S3, a directory).
//! - [`lock`]: the per-suite publish lock and its stale-lock rule.
//! - [`verify`]: verify before flip, through the agent's own reader.
//!
//! # Order of writes (what a polling reader sees)
//!
//! A reader starts at InRelease and follows hashes from there, so the
//! repository changes for it at one instant, when InRelease is replaced.
//! Everything InRelease will name is written first:
//!
//! 1. pool files (new paths, `If-None-Match: *`: never overwritten);
//! 2. indexes at `by-hash/SHA256/<hex>` and `by-hash/SHA512/<hex>` (new
//!    paths, content-addressed), which the old InRelease does not name and
//!    the new one does; readers with `Acquire-By-Hash: yes` (apt, the
//!    agent) fetch only these;
//! 3. the canonical `Packages{,.gz,.xz}`, then `Release` and `Release.gpg`,
//!    for clients without by-hash or InRelease; while InRelease exists, an
//!    agent and apt never read these (a client that does may see a hash
//!    mismatch for a moment, and refuses it: never a mix it would install);
//! 4. verify before flip ([`verify::before_flip`]);
//! 5. InRelease, with `If-Match` on the ETag it had when this attempt read
//!    the suite (`If-None-Match: *` for a new suite). If another publisher
//!    flipped meanwhile, the write fails, and the attempt starts again from
//!    the new InRelease: no publish overwrites a package another added.
//!
//! After the flip, by-hash files named by neither the new nor the previous
//! Release are deleted; a reader that fetched the previous InRelease just
//! before the flip still finds its indexes. Pool files are never deleted
//! here: the pool is shared by all suites (promote refers to the same
//! file), so removing them needs a look at every suite.

pub mod deb;
pub mod index;
pub mod lock;
pub mod sign;
pub mod store;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256, Sha512};
use tracing::{info, warn};

use self::deb::{DebError, DebInfo};
use self::index::{Checksum, Entry, Stanza};
use self::sign::SigningKey;
use self::store::{Body, Condition, Store, Written};
use crate::cli::{PromoteArgs, PublishArgs, RefreshArgs, RepoArgs};
use crate::config::RepoUrl;
use crate::error::{Error, PublishError};
use crate::keyring::Keyring;
use crate::repo::capped;
use crate::repo::release::IndexFile;
use crate::source::Source;

/// Cap on InRelease and on an index read back from the store.
const MAX_RELEASE_BYTES: u64 = 16 << 20;
const MAX_INDEX_BYTES: u64 = 512 << 20;
/// How many times a publish starts over, after losing the flip to another
/// publisher or failing verify before flip, before it gives up. Each
/// attempt rereads the suite; between attempts it waits a random
/// 50..250 ms times the attempt number (at most 5.25 s in all).
const FLIP_ATTEMPTS: u32 = 6;

/// `pulldeploy publish`: adds `.deb`s to a suite and publishes it.
pub async fn publish(args: PublishArgs) -> Result<(), Error> {
    check_dist_name("--suite", &args.suite)?;
    if args.keep == Some(0) {
        return Err(usage("--keep must be at least 1"));
    }
    for arch in &args.architecture {
        if !index::valid_architecture(arch) || arch == "all" {
            return Err(usage(format!(
                "--architecture {arch:?} is not a Debian architecture"
            )));
        }
    }
    let mut debs = Vec::new();
    for path in &args.debs {
        let read_path = path.clone();
        let info = tokio::task::spawn_blocking(move || deb::read(&read_path))
            .await
            .map_err(|e| PublishError::InvalidDeb {
                path: path.clone(),
                reason: format!("reader task failed: {e}"),
            })?;
        let info = match info {
            Ok(info) => info,
            Err(DebError::Io(source)) => {
                return Err(PublishError::ReadDeb {
                    path: path.clone(),
                    source,
                }
                .into());
            }
            Err(DebError::Invalid(reason)) => {
                return Err(PublishError::InvalidDeb {
                    path: path.clone(),
                    reason,
                }
                .into());
            }
        };
        debs.push((path.clone(), info));
    }
    let publisher = Publisher::open(&args.repo).await?;
    let operation = Operation::Publish {
        debs,
        keep: args.keep,
        architectures: args.architecture.iter().cloned().collect(),
    };
    let report = publisher.update(&args.suite, operation).await?;
    print_report(&report);
    Ok(())
}

/// `pulldeploy promote`: the exact .debs of `PKG[=VER]` in one suite
/// added to another.
pub async fn promote(args: PromoteArgs) -> Result<(), Error> {
    check_dist_name("--from", &args.from)?;
    check_dist_name("--to", &args.to)?;
    if args.from == args.to {
        return Err(usage("--from and --to name the same suite"));
    }
    if args.keep == Some(0) {
        return Err(usage("--keep must be at least 1"));
    }
    let mut wanted = Vec::new();
    for spec in &args.packages {
        let (name, version) = match spec.split_once('=') {
            Some((name, version)) => (name, Some(version.to_string())),
            None => (spec.as_str(), None),
        };
        if !index::valid_package_name(name)
            || version.as_deref().is_some_and(|v| !index::valid_version(v))
        {
            return Err(usage(format!("{spec:?} is not PACKAGE or PACKAGE=VERSION")));
        }
        wanted.push((name.to_string(), version));
    }
    let publisher = Publisher::open(&args.repo).await?;
    let operation = Operation::Promote {
        from: args.from.clone(),
        wanted,
        keep: args.keep,
    };
    let report = publisher.update(&args.to, operation).await?;
    print_report(&report);
    Ok(())
}

/// `pulldeploy refresh`: the same content, signed again with a new Date
/// (and Valid-Until).
pub async fn refresh(args: RefreshArgs) -> Result<(), Error> {
    check_dist_name("--suite", &args.suite)?;
    let publisher = Publisher::open(&args.repo).await?;
    let report = publisher.update(&args.suite, Operation::Refresh).await?;
    print_report(&report);
    Ok(())
}

fn print_report(lines: &[String]) {
    let mut out = std::io::stdout().lock();
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
}

fn usage(message: impl Into<String>) -> Error {
    PublishError::Usage {
        message: message.into(),
    }
    .into()
}

fn check_dist_name(option: &str, name: &str) -> Result<(), Error> {
    if index::valid_dist_name(name) {
        Ok(())
    } else {
        Err(usage(format!("{option} {name:?} is not a valid name")))
    }
}

/// What one update does to a suite.
enum Operation {
    Publish {
        debs: Vec<(PathBuf, DebInfo)>,
        keep: Option<usize>,
        architectures: BTreeSet<String>,
    },
    Promote {
        from: String,
        wanted: Vec<(String, Option<String>)>,
        keep: Option<usize>,
    },
    Refresh,
}

/// A suite as published now, verified with the signing key.
struct Current {
    /// InRelease's ETag in the store: the flip's precondition.
    etag: Option<String>,
    /// InRelease's Last-Modified in the store, when it says.
    last_modified: Option<DateTime<Utc>>,
    url: String,
    release: Stanza,
    date: DateTime<Utc>,
    valid_until: Option<DateTime<Utc>>,
    /// The packages of the component being published, all architectures.
    entries: Vec<Entry>,
    architectures: BTreeSet<String>,
    components: BTreeSet<String>,
    sha256: Vec<Checksum>,
    sha512: Vec<Checksum>,
}

/// How an attempt ended.
enum Flip {
    Done,
    /// Another publisher flipped InRelease since this attempt read it.
    Lost,
    /// Verify before flip failed, for this reason; nothing was flipped.
    Refused(String),
}

/// The new content of a suite, before it is signed.
struct Content {
    release_text: String,
    /// Pool files to read back in full before the flip.
    new_pool_files: BTreeSet<String>,
    report: Vec<String>,
}

struct Publisher {
    store: Box<dyn Store>,
    source: Box<dyn Source>,
    key: SigningKey,
    keyring: Keyring,
    /// The file `keyring` was loaded from; removed on drop.
    _keyring_file: tempfile::NamedTempFile,
    component: String,
    valid_for: Option<Duration>,
    lock_ttl: Duration,
    lock_wait: Duration,
}

impl Publisher {
    async fn open(args: &RepoArgs) -> Result<Publisher, Error> {
        check_dist_name("--component", &args.component)?;
        if args.endpoint.is_some() && matches!(args.repo, RepoUrl::File(_)) {
            return Err(usage(
                "--endpoint is only meaningful with an s3:// repository",
            ));
        }
        let key = SigningKey::load(&args.signing_key)?;
        // The agent's verifier, pinned to the public part of our key.
        let mut keyring_file = tempfile::Builder::new()
            .prefix("pulldeploy-publish-")
            .suffix(".asc")
            .tempfile()
            .map_err(|e| PublishError::Sign {
                fingerprint: key.fingerprint(),
                reason: format!("cannot write a temporary keyring: {e}"),
            })?;
        keyring_file
            .write_all(&key.public_armored()?)
            .and_then(|()| keyring_file.flush())
            .map_err(|e| PublishError::Sign {
                fingerprint: key.fingerprint(),
                reason: format!("cannot write a temporary keyring: {e}"),
            })?;
        let keyring = Keyring::load(keyring_file.path())?;
        let (store, source) =
            open_repository(&args.repo, args.endpoint.as_deref(), args.region.as_deref()).await?;
        Ok(Publisher {
            store,
            source,
            key,
            keyring,
            _keyring_file: keyring_file,
            component: args.component.clone(),
            valid_for: args.valid_for,
            lock_ttl: args.lock_ttl,
            lock_wait: args.lock_wait,
        })
    }

    fn dists(suite: &str, file: &str) -> String {
        format!("dists/{suite}/{file}")
    }

    /// Takes the suite's lock, runs attempts until one flips, releases
    /// the lock whatever happened.
    async fn update(&self, suite: &str, operation: Operation) -> Result<Vec<String>, Error> {
        let lock_path = Self::dists(suite, ".publish-lock");
        let mut lock = lock::acquire(
            self.store.as_ref(),
            &lock_path,
            self.lock_ttl,
            self.lock_wait,
        )
        .await?;
        let result = self.attempts(suite, &operation, &mut lock).await;
        lock.release(self.store.as_ref()).await;
        result
    }

    async fn attempts(
        &self,
        suite: &str,
        operation: &Operation,
        lock: &mut lock::Lock,
    ) -> Result<Vec<String>, Error> {
        let mut uploaded = BTreeSet::new();
        let mut refused = None;
        for attempt in 1..=FLIP_ATTEMPTS {
            let current = self.read_current(suite).await?;
            refused = None;
            let date = next_date(current.as_ref()).await?;
            // Without --valid-for, the suite keeps the validity period it
            // had: a publish must not quietly drop freshness protection.
            let valid_until = match self.valid_for {
                Some(d) => {
                    Some(date + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX))
                }
                None => current
                    .as_ref()
                    .and_then(|c| c.valid_until.map(|v| date + (v - c.date))),
            };
            let content = match operation {
                Operation::Refresh => {
                    let current =
                        current
                            .as_ref()
                            .ok_or_else(|| PublishError::NothingToRefresh {
                                suite: suite.to_string(),
                                url: self.store.url(&Self::dists(suite, "InRelease")),
                            })?;
                    Content {
                        release_text: index::refreshed_release(&current.release, date, valid_until),
                        new_pool_files: BTreeSet::new(),
                        report: vec![format!("refreshed {suite}: same content, signed again")],
                    }
                }
                Operation::Publish { .. } | Operation::Promote { .. } => {
                    let content = self
                        .build(
                            suite,
                            operation,
                            current.as_ref(),
                            date,
                            valid_until,
                            &mut uploaded,
                        )
                        .await?;
                    // Uploads can take long: push the lock's expiry out.
                    lock.renew(self.store.as_ref()).await?;
                    content
                }
            };
            match self
                .sign_verify_flip(suite, current.as_ref(), &content)
                .await?
            {
                Flip::Done => {
                    if !matches!(operation, Operation::Refresh) {
                        self.prune_by_hash(suite, current.as_ref(), &content.release_text)
                            .await;
                    }
                    let mut report = content.report;
                    report.push(format!(
                        "InRelease of {suite} signed by {}, Date {}{}",
                        self.key.fingerprint(),
                        index::release_date(date),
                        valid_until
                            .map(|v| format!(", Valid-Until {}", index::release_date(v)))
                            .unwrap_or_default()
                    ));
                    return Ok(report);
                }
                Flip::Lost => {
                    warn!(
                        suite,
                        attempt,
                        "another publisher flipped InRelease first; starting over from its content"
                    );
                }
                Flip::Refused(reason) => {
                    // A publisher whose lock was broken may have rewritten
                    // Release or a canonical index under us; a store that
                    // serves wrong bytes fails every attempt.
                    warn!(suite, attempt, %reason, "verify before flip failed; InRelease not written");
                    refused = Some(reason);
                }
            }
            // Publishers that lost a race start again at different times.
            let pause = rand::random_range(50..=250u64) * u64::from(attempt);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        if let Some(reason) = refused {
            return Err(PublishError::VerifyBeforeFlip { reason }.into());
        }
        Err(PublishError::Conflict {
            url: self.store.url(&Self::dists(suite, "InRelease")),
            attempts: FLIP_ATTEMPTS,
        }
        .into())
    }

    /// The suite as published, verified with our key; `None` for a suite
    /// without InRelease.
    async fn read_current(&self, suite: &str) -> Result<Option<Current>, Error> {
        let path = Self::dists(suite, "InRelease");
        let url = self.store.url(&path);
        let Some(stored) = self.store.get(&path, MAX_RELEASE_BYTES).await? else {
            return Ok(None);
        };
        let refuse = |reason: String| PublishError::CurrentSuite {
            url: url.clone(),
            reason,
        };
        let verified = self
            .keyring
            .verify_cleartext(&url, &stored.bytes, SystemTime::now())
            .map_err(|e| refuse(format!("not verified with the signing key: {e}")))?;
        let parsed = crate::repo::release::parse(&verified.text).map_err(refuse)?;
        let release = index::parse_stanzas(&verified.text)
            .map_err(refuse)?
            .into_iter()
            .next()
            .ok_or_else(|| refuse("empty Release".into()))?;
        let sha512 = index::release_checksums(&release, "SHA512").map_err(refuse)?;
        let sha256: Vec<Checksum> = parsed
            .sha256
            .iter()
            .map(|(path, expected)| Checksum {
                path: path.clone(),
                size: expected.size,
                hex: expected.sha256.clone(),
            })
            .collect();
        let mut architectures = index::word_list(&release, "Architectures");
        let components = index::word_list(&release, "Components");
        let prefix = format!("{}/binary-", self.component);
        let mut index_archs = BTreeSet::new();
        for checksum in &sha256 {
            if let Some(rest) = checksum.path.strip_prefix(&prefix)
                && let Some((arch, _)) = rest.split_once('/')
            {
                index_archs.insert(arch.to_string());
            }
        }
        architectures.extend(index_archs.iter().cloned());
        architectures.remove("all");

        let mut entries: BTreeMap<(String, String, String), Entry> = BTreeMap::new();
        for arch in &index_archs {
            let Some(index) = parsed.packages_index(&self.component, arch) else {
                continue;
            };
            let text = read_index(
                self.store.as_ref(),
                &Self::dists(suite, ""),
                &index,
                parsed.acquire_by_hash,
                MAX_INDEX_BYTES,
            )
            .await?;
            let text = String::from_utf8(text)
                .map_err(|_| refuse(format!("{}: not UTF-8", index.path)))?;
            for stanza in
                index::parse_stanzas(&text).map_err(|e| refuse(format!("{}: {e}", index.path)))?
            {
                let entry = Entry::from_stanza(stanza)
                    .map_err(|e| refuse(format!("{}: {e}", index.path)))?;
                match entries.get(&entry.key()) {
                    Some(seen) if seen.sha256 != entry.sha256 => {
                        return Err(refuse(format!(
                            "{} {} {} is listed with two different SHA256",
                            entry.name, entry.version, entry.architecture
                        ))
                        .into());
                    }
                    Some(_) => {}
                    None => {
                        entries.insert(entry.key(), entry);
                    }
                }
            }
        }
        Ok(Some(Current {
            etag: stored.etag,
            last_modified: stored.last_modified,
            url,
            date: parsed.date,
            valid_until: parsed.valid_until,
            release,
            entries: entries.into_values().collect(),
            architectures,
            components,
            sha256,
            sha512,
        }))
    }

    /// Merges the operation into the current packages, uploads new pool
    /// files, writes the indexes (by hash, then canonical), and returns
    /// the Release text to sign.
    async fn build(
        &self,
        suite: &str,
        operation: &Operation,
        current: Option<&Current>,
        date: DateTime<Utc>,
        valid_until: Option<DateTime<Utc>>,
        uploaded: &mut BTreeSet<String>,
    ) -> Result<Content, Error> {
        let mut entries: Vec<Entry> = current.map(|c| c.entries.clone()).unwrap_or_default();
        let mut architectures = current.map(|c| c.architectures.clone()).unwrap_or_default();
        let mut report = Vec::new();
        let mut new_pool_files = BTreeSet::new();
        let target_url = self.store.url(&Self::dists(suite, "InRelease"));
        let keep = match operation {
            Operation::Publish {
                debs,
                keep,
                architectures: extra,
            } => {
                architectures.extend(extra.iter().cloned());
                for (path, info) in debs {
                    let entry = self.new_entry(info)?;
                    if !add_entry(&mut entries, entry.clone(), &target_url)? {
                        report.push(format!(
                            "{} {} ({}) is already in {suite}",
                            info.package, info.version, info.architecture
                        ));
                        continue;
                    }
                    if info.architecture != "all" {
                        architectures.insert(info.architecture.clone());
                    }
                    if !uploaded.contains(&entry.filename) {
                        self.upload_pool(path, info, &entry.filename).await?;
                        uploaded.insert(entry.filename.clone());
                    }
                    new_pool_files.insert(entry.filename.clone());
                    report.push(format!(
                        "added {} {} ({}) to {suite}: {}",
                        info.package, info.version, info.architecture, entry.filename
                    ));
                }
                *keep
            }
            Operation::Promote { from, wanted, keep } => {
                let source =
                    self.read_current(from)
                        .await?
                        .ok_or_else(|| PublishError::NotInSuite {
                            package: wanted.first().map(|w| w.0.clone()).unwrap_or_default(),
                            version: None,
                            suite: from.clone(),
                            url: self.store.url(&Self::dists(from, "InRelease")),
                        })?;
                for (name, version) in wanted {
                    let chosen = promoted_entries(&source.entries, name, version.as_deref());
                    if chosen.is_empty() {
                        return Err(PublishError::NotInSuite {
                            package: name.clone(),
                            version: version.clone(),
                            suite: from.clone(),
                            url: source.url.clone(),
                        }
                        .into());
                    }
                    for entry in chosen {
                        // The exact bytes the source suite names: hashed
                        // from the store, not trusted from the index.
                        self.check_pool_file(&entry).await?;
                        if entry.architecture != "all" {
                            architectures.insert(entry.architecture.clone());
                        }
                        let filename = entry.filename.clone();
                        let line = format!(
                            "promoted {} {} ({}) from {from} to {suite}: {filename}",
                            entry.name, entry.version, entry.architecture
                        );
                        if add_entry(&mut entries, entry, &target_url)? {
                            new_pool_files.insert(filename);
                            report.push(line);
                        } else {
                            report.push(format!("{line} (already there)"));
                        }
                    }
                }
                *keep
            }
            Operation::Refresh => None,
        };
        if let Some(keep) = keep {
            for dropped in index::apply_keep(&mut entries, keep) {
                report.push(format!(
                    "dropped {} {} ({}) from {suite} (--keep {keep}); its pool file stays",
                    dropped.name, dropped.version, dropped.architecture
                ));
                new_pool_files.remove(&dropped.filename);
            }
        }
        index::sort_entries(&mut entries);
        if architectures.is_empty() {
            return Err(usage(
                "the suite would have no architecture (only Architecture: all packages): \
                 name one with --architecture",
            ));
        }

        // Indexes: by hash first (new paths), then the canonical names.
        let mut sha256: Vec<Checksum> = Vec::new();
        let mut sha512: Vec<Checksum> = Vec::new();
        let mut canonical = Vec::new();
        for arch in &architectures {
            let text = index::packages_text(&entries, arch);
            let dir = format!("{}/binary-{arch}", self.component);
            // Past the cap, the next publish (and an agent, whose default
            // cap is the same) would refuse it: not written at all.
            if text.len() as u64 > MAX_INDEX_BYTES {
                return Err(PublishError::IndexTooLarge {
                    url: self
                        .store
                        .url(&Self::dists(suite, &format!("{dir}/Packages"))),
                    limit: MAX_INDEX_BYTES,
                }
                .into());
            }
            for (name, bytes) in compressed_variants(text.as_bytes())? {
                let path = format!("{dir}/{name}");
                let hex256 = hex::encode(Sha256::digest(&bytes));
                let hex512 = hex::encode(Sha512::digest(&bytes));
                for by_hash in [
                    format!("{dir}/by-hash/SHA256/{hex256}"),
                    format!("{dir}/by-hash/SHA512/{hex512}"),
                ] {
                    // Content-addressed: an existing object has these bytes.
                    self.store
                        .put(
                            &Self::dists(suite, &by_hash),
                            Body::Bytes(&bytes),
                            Condition::IfAbsent,
                        )
                        .await?;
                }
                sha256.push(Checksum {
                    path: path.clone(),
                    size: bytes.len() as u64,
                    hex: hex256,
                });
                sha512.push(Checksum {
                    path: path.clone(),
                    size: bytes.len() as u64,
                    hex: hex512,
                });
                canonical.push((path, bytes));
            }
        }
        for (path, bytes) in &canonical {
            self.store
                .put(
                    &Self::dists(suite, path),
                    Body::Bytes(bytes),
                    Condition::Always,
                )
                .await?;
        }
        // Indexes of other components (and anything else the previous
        // Release named outside ours) are carried over unchanged.
        let ours = format!("{}/binary-", self.component);
        if let Some(current) = current {
            sha256.extend(
                current
                    .sha256
                    .iter()
                    .filter(|c| !c.path.starts_with(&ours))
                    .cloned(),
            );
            sha512.extend(
                current
                    .sha512
                    .iter()
                    .filter(|c| !c.path.starts_with(&ours))
                    .cloned(),
            );
        }
        let mut components = current.map(|c| c.components.clone()).unwrap_or_default();
        components.insert(self.component.clone());
        let release_text = index::release_text(&index::ReleaseContent {
            previous: current.map(|c| &c.release),
            suite,
            date,
            valid_until,
            architectures: &architectures,
            components: &components,
            sha256,
            sha512,
        });
        Ok(Content {
            release_text,
            new_pool_files,
            report,
        })
    }

    fn new_entry(&self, info: &DebInfo) -> Result<Entry, Error> {
        let filename = index::pool_path(
            &self.component,
            &info.source,
            &info.package,
            &info.version,
            &info.architecture,
        );
        let mut stanza = info.control.clone();
        stanza.set("Filename", &filename);
        stanza.set("Size", &info.size.to_string());
        stanza.set("SHA256", &info.sha256);
        stanza.set("SHA512", &info.sha512);
        Entry::from_stanza(stanza)
            .map_err(|reason| usage(format!("cannot index {}: {reason}", info.package)))
    }

    /// Uploads a .deb to its pool path unless it is there already with the
    /// same bytes; different bytes under that path are a conflict.
    async fn upload_pool(&self, path: &Path, info: &DebInfo, filename: &str) -> Result<(), Error> {
        match self
            .store
            .put(filename, Body::File(path), Condition::IfAbsent)
            .await?
        {
            Written::Done { .. } => {
                info!(pool = %self.store.url(filename), "uploaded");
                Ok(())
            }
            Written::PreconditionFailed => match self.store.digest(filename).await? {
                Some((sha256, size)) if sha256 == info.sha256 && size == info.size => Ok(()),
                Some((sha256, _)) => Err(PublishError::VersionExists {
                    package: format!("{} {} ({})", info.package, info.version, info.architecture),
                    url: self.store.url(filename),
                    existing: sha256,
                    new: info.sha256.clone(),
                }
                .into()),
                None => Err(PublishError::StoreWrite {
                    url: self.store.url(filename),
                    message: "exists for If-None-Match but not for GET; retry".into(),
                }
                .into()),
            },
        }
    }

    /// A promoted .deb must be in the pool with the bytes its index names.
    async fn check_pool_file(&self, entry: &Entry) -> Result<(), Error> {
        let url = self.store.url(&entry.filename);
        match self.store.digest(&entry.filename).await? {
            Some((sha256, size)) if sha256 == entry.sha256 && size == entry.size => Ok(()),
            Some((sha256, size)) => Err(PublishError::CurrentSuite {
                url,
                reason: format!(
                    "SHA256 {sha256} ({size} bytes), the index says {} ({} bytes): not promoted",
                    entry.sha256, entry.size
                ),
            }
            .into()),
            None => Err(PublishError::CurrentSuite {
                url,
                reason: "named by the index but missing: not promoted".into(),
            }
            .into()),
        }
    }

    /// Signs, writes Release and Release.gpg, verifies before the flip,
    /// flips InRelease.
    async fn sign_verify_flip(
        &self,
        suite: &str,
        current: Option<&Current>,
        content: &Content,
    ) -> Result<Flip, Error> {
        let release = content.release_text.as_bytes();
        let signature = self.key.detach_sign(release)?;
        let inrelease = self.key.clearsign(&content.release_text)?;
        self.store
            .put(
                &Self::dists(suite, "Release"),
                Body::Bytes(release),
                Condition::Always,
            )
            .await?;
        self.store
            .put(
                &Self::dists(suite, "Release.gpg"),
                Body::Bytes(&signature),
                Condition::Always,
            )
            .await?;
        let published = verify::Published {
            suite,
            release_text: &content.release_text,
            inrelease: &inrelease,
            new_pool_files: &content.new_pool_files,
        };
        if let Err(reason) = verify::before_flip(
            self.source.as_ref(),
            self.store.as_ref(),
            &self.keyring,
            &published,
        )
        .await
        {
            return Ok(Flip::Refused(reason));
        }
        let condition = match current.and_then(|c| c.etag.as_deref()) {
            Some(etag) => Condition::IfMatch(etag),
            None => Condition::IfAbsent,
        };
        let path = Self::dists(suite, "InRelease");
        match self
            .store
            .put(&path, Body::Bytes(&inrelease), condition)
            .await?
        {
            Written::PreconditionFailed => return Ok(Flip::Lost),
            Written::Done { .. } => {}
        }
        match verify::after_flip(self.source.as_ref(), &self.keyring, suite, &inrelease).await {
            Ok(true) => info!(inrelease = %self.store.url(&path), "flipped and read back"),
            Ok(false) => {
                warn!(inrelease = %self.store.url(&path), "flipped; another publish flipped right after")
            }
            Err(reason) => {
                warn!(inrelease = %self.store.url(&path), %reason, "flipped, but reading it back failed")
            }
        }
        Ok(Flip::Done)
    }

    /// Deletes by-hash indexes named by neither the new nor the previous
    /// Release. Failures are logged: stale by-hash files harm no reader.
    async fn prune_by_hash(&self, suite: &str, previous: Option<&Current>, release_text: &str) {
        let mut keep: BTreeSet<String> = BTreeSet::new();
        if let Some(previous) = previous {
            keep.extend(previous.sha256.iter().map(|c| c.hex.clone()));
            keep.extend(previous.sha512.iter().map(|c| c.hex.clone()));
        }
        if let Some(stanza) = index::parse_stanzas(release_text)
            .ok()
            .and_then(|s| s.into_iter().next())
        {
            for field in ["SHA256", "SHA512"] {
                if let Ok(lines) = index::release_checksums(&stanza, field) {
                    keep.extend(lines.into_iter().map(|c| c.hex));
                }
            }
        }
        let prefix = Self::dists(suite, "");
        let keys = match self.store.list(&prefix).await {
            Ok(keys) => keys,
            Err(e) => {
                warn!(error = %e, "cannot list by-hash indexes to prune them");
                return;
            }
        };
        for key in keys {
            let Some((_, hash)) = key.rsplit_once('/') else {
                continue;
            };
            // Only by-hash objects proper: a hex name (never another
            // publisher's temporary file).
            let is_hash = !hash.is_empty() && hash.bytes().all(|b| b.is_ascii_hexdigit());
            if !key.contains("/by-hash/") || !is_hash || keep.contains(hash) {
                continue;
            }
            if let Err(e) = self.store.delete(&key, None).await {
                warn!(error = %e, "cannot prune a by-hash index");
            }
        }
    }
}

/// An index named by the current Release (`dists` is the suite's
/// directory, `dists/SUITE/`): by hash first, then at its canonical path;
/// checked against Release and inflated whole. An index that inflates past
/// `limit` is an error: building on a truncated index would publish a
/// suite without the packages past the cut.
async fn read_index(
    store: &dyn Store,
    dists: &str,
    index: &IndexFile,
    by_hash: bool,
    limit: u64,
) -> Result<Vec<u8>, Error> {
    let expected = &index.expected;
    let mut candidates = Vec::new();
    if by_hash {
        candidates.push(format!("{dists}{}", index.by_hash_path()));
    }
    candidates.push(format!("{dists}{}", index.path));
    for candidate in &candidates {
        let url = store.url(candidate);
        // Larger than the cap as stored: not read at all (as an agent).
        if expected.size > limit {
            return Err(PublishError::IndexTooLarge { url, limit }.into());
        }
        let Some(stored) = store.get(candidate, limit).await? else {
            continue;
        };
        let actual = hex::encode(Sha256::digest(&stored.bytes));
        if actual != expected.sha256 || stored.bytes.len() as u64 != expected.size {
            return Err(PublishError::CurrentSuite {
                url,
                reason: format!(
                    "SHA256 {actual} ({} bytes), Release says {} ({} bytes)",
                    stored.bytes.len(),
                    expected.sha256,
                    expected.size
                ),
            }
            .into());
        }
        return capped::decompress_all(index.compression, &stored.bytes, limit).map_err(|e| {
            match capped::over_limit(&e) {
                Some(limit) => PublishError::IndexTooLarge { url, limit },
                None => PublishError::CurrentSuite {
                    url,
                    reason: format!("cannot decompress: {e}"),
                },
            }
            .into()
        });
    }
    Err(PublishError::CurrentSuite {
        url: store.url(&format!("{dists}{}", index.path)),
        reason: "named by Release but missing".into(),
    }
    .into())
}

/// Adds `entry` unless the same (name, version, arch) is there. `false`
/// when it is there with the same bytes; an error when with other bytes.
fn add_entry(entries: &mut Vec<Entry>, entry: Entry, url: &str) -> Result<bool, Error> {
    if let Some(existing) = entries.iter().find(|e| e.key() == entry.key()) {
        if existing.sha256 == entry.sha256 {
            return Ok(false);
        }
        return Err(PublishError::VersionExists {
            package: format!("{} {} ({})", entry.name, entry.version, entry.architecture),
            url: url.to_string(),
            existing: existing.sha256.clone(),
            new: entry.sha256.clone(),
        }
        .into());
    }
    entries.push(entry);
    Ok(true)
}

/// The entries of `name` to promote: of `version`, or of its newest
/// version, every architecture.
fn promoted_entries(entries: &[Entry], name: &str, version: Option<&str>) -> Vec<Entry> {
    let mine: Vec<&Entry> = entries.iter().filter(|e| e.name == name).collect();
    let wanted = match version {
        Some(text) => match text.parse::<debversion::Version>() {
            Ok(v) => v,
            Err(_) => return Vec::new(),
        },
        None => match mine.iter().map(|e| &e.version).max() {
            Some(v) => v.clone(),
            None => return Vec::new(),
        },
    };
    mine.into_iter()
        .filter(|e| e.version == wanted)
        .cloned()
        .collect()
}

/// `Packages`, `Packages.gz`, `Packages.xz` of one text. Both compressors
/// are deterministic (gzip with mtime 0), so the same text gives the same
/// by-hash names.
fn compressed_variants(text: &[u8]) -> Result<Vec<(&'static str, Vec<u8>)>, Error> {
    let compress_error = |e: std::io::Error| PublishError::StoreWrite {
        url: "Packages".into(),
        message: format!("compressing: {e}"),
    };
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(text).map_err(compress_error)?;
    let gz = gz.finish().map_err(compress_error)?;
    let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(text).map_err(compress_error)?;
    let xz = xz.finish().map_err(compress_error)?;
    Ok(vec![
        ("Packages", text.to_vec()),
        ("Packages.gz", gz),
        ("Packages.xz", xz),
    ])
}

/// The longest a write waits for the clock to pass the suite's previous
/// write. Past whole seconds, a wait means the previous write's Date or
/// Last-Modified is ahead of this host's clock: a clock to fix, not to
/// sleep through.
const MAX_DATE_WAIT: Duration = Duration::from_secs(10);

/// `t` without its fraction of a second, as Release dates and HTTP dates
/// have it.
fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// The new Release's Date: now, in whole seconds, and strictly later than
/// both the Date of the Release it replaces and that InRelease's
/// Last-Modified (when the store gives it); when it would not be, this
/// waits for the next whole second after the later of the two. Every write
/// of a suite (publish, promote, refresh) takes its Date here.
///
/// Why both. Agents refuse a Date that is not newer (replay). apt
/// revalidates InRelease with `If-Modified-Since` set to the Last-Modified
/// it last saw, which S3 (and an HTTP server over a directory) keeps in
/// whole seconds and compares with `<=`: a second write of a suite in the
/// same second as the first gets 304, and apt keeps the old suite. So
/// the new InRelease's Last-Modified must be strictly later than the old
/// one's, and the reasoning is:
///
/// 1. This returns only once this host's clock has reached the returned
///    Date `D` (it sleeps until then), and the flip PUTs InRelease after
///    that, so its Last-Modified `L >= D` (the store stamps the time it
///    received the PUT, truncated to the second like `D`).
/// 2. `D > Date_prev` and `D > L_prev` (both whole seconds), hence
///    `D >= L_prev + 1` and `L >= L_prev + 1 > L_prev`.
///
/// Step 1 reads the store's clock against ours; they agree on a host with
/// NTP. A store clock ahead of ours only makes `L` later (and `L_prev`,
/// which this then waits past). A store clock behind ours by `e` < 1 s
/// stamps `L >= D - 1`, and `L == L_prev` only if this write flips less
/// than `e` after the clock reads `D`; between the two it signs, writes
/// Release and Release.gpg and reads the whole suite back, which takes
/// longer than any NTP error. Waiting for `Date_prev` alone was not
/// enough: a write whose flip falls a second or more after its Date
/// (a large upload) leaves `L_prev > Date_prev`, and a quick next write
/// then flipped in the second of `L_prev`.
///
/// Waits at most [`MAX_DATE_WAIT`]: a previous Date or Last-Modified
/// further ahead of this clock is a clock problem, reported as such.
async fn next_date(current: Option<&Current>) -> Result<DateTime<Utc>, Error> {
    let now = whole_seconds(Utc::now());
    let Some(current) = current else {
        return Ok(now);
    };
    // The later of the two marks of the previous write.
    let (previous, what) = match current.last_modified {
        Some(modified) if modified > current.date => (modified, "Last-Modified"),
        _ => (current.date, "Release Date"),
    };
    let date = now.max(previous + chrono::Duration::seconds(1));
    let limit = chrono::Duration::from_std(MAX_DATE_WAIT).unwrap_or(chrono::Duration::MAX);
    let clock_behind = || PublishError::ClockBehind {
        url: current.url.clone(),
        what,
        previous: index::release_date(previous),
        now: index::release_date(Utc::now()),
        limit: MAX_DATE_WAIT,
    };
    if previous - now > limit {
        return Err(clock_behind().into());
    }
    // Until this host's clock reads `date` (a timer may end a little
    // early by the wall clock, which can also be stepped meanwhile).
    let deadline = tokio::time::Instant::now() + MAX_DATE_WAIT + Duration::from_secs(1);
    while let Ok(wait) = (date - Utc::now()).to_std() {
        if wait.is_zero() {
            break;
        }
        if tokio::time::Instant::now() + wait > deadline {
            return Err(clock_behind().into());
        }
        tokio::time::sleep(wait).await;
    }
    Ok(date)
}

/// The store a publisher writes to and the agent's reader for the same
/// repository.
async fn open_repository(
    url: &RepoUrl,
    endpoint: Option<&str>,
    region: Option<&str>,
) -> Result<(Box<dyn Store>, Box<dyn Source>), Error> {
    Ok(match url {
        RepoUrl::File(dir) => (
            Box::new(store::DirStore::new(dir.clone())),
            Box::new(crate::source::file::FileSource::new(dir.clone())),
        ),
        #[cfg(feature = "s3")]
        RepoUrl::S3 { bucket, prefix } => (
            Box::new(store::S3Store::new(bucket.clone(), prefix.clone(), endpoint, region).await?),
            Box::new(
                crate::source::s3::S3Source::new(bucket.clone(), prefix.clone(), endpoint, region)
                    .await?,
            ),
        ),
        #[cfg(not(feature = "s3"))]
        RepoUrl::S3 { .. } => {
            let _ = (endpoint, region);
            return Err(usage("built without the s3 feature"));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::digest::Expected;
    use crate::repo::release::Compression;

    /// A Release entry for `bytes` at `path`, stored at its by-hash path
    /// under `dists/s/` in a directory store.
    async fn stored_index(store: &dyn Store, path: &str, bytes: &[u8]) -> IndexFile {
        let index = IndexFile {
            path: path.to_string(),
            compression: capped::compression_of(path),
            expected: Expected {
                sha256: hex::encode(Sha256::digest(bytes)),
                size: bytes.len() as u64,
            },
        };
        let key = format!("dists/s/{}", index.by_hash_path());
        store
            .put(&key, Body::Bytes(bytes), Condition::Always)
            .await
            .unwrap();
        index
    }

    /// The current suite's Packages inflates past the cap: the publisher
    /// must refuse to build on it (naming the file and the limit), not
    /// build on the part before the cap and drop every package after it.
    #[tokio::test]
    async fn publisher_index_over_cap_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = store::DirStore::new(dir.path().to_path_buf());
        let text = "Package: a\nVersion: 1\nArchitecture: amd64\n\n".repeat(50);
        let limit = text.len() as u64;
        for (name, bytes) in compressed_variants(text.as_bytes()).unwrap() {
            let path = format!("main/binary-amd64/{name}");
            let index = stored_index(&store, &path, &bytes).await;
            assert_eq!(
                index.compression,
                match name {
                    "Packages.xz" => Compression::Xz,
                    "Packages.gz" => Compression::Gzip,
                    _ => Compression::None,
                }
            );

            // Exactly at the cap: read whole.
            let read = read_index(&store, "dists/s/", &index, true, limit)
                .await
                .unwrap();
            assert_eq!(read, text.as_bytes(), "{name}");

            // One byte under it: an error, never the first `limit` bytes.
            let error = read_index(&store, "dists/s/", &index, true, limit - 1)
                .await
                .unwrap_err();
            let url = store.url(&format!("dists/s/{}", index.by_hash_path()));
            let message = error.to_string();
            match error {
                Error::Publish(e) => match *e {
                    PublishError::IndexTooLarge {
                        url: ref named,
                        limit: cap,
                    } => {
                        assert_eq!(*named, url);
                        assert_eq!(cap, limit - 1);
                    }
                    other => panic!("{name}: not IndexTooLarge: {other}"),
                },
                other => panic!("{name}: not a publish error: {other}"),
            }
            assert!(
                message.contains(&url) && message.contains(&format!("{} bytes", limit - 1)),
                "{message}"
            );
        }
    }

    #[tokio::test]
    async fn a_corrupt_index_is_not_over_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = store::DirStore::new(dir.path().to_path_buf());
        let index = stored_index(&store, "main/binary-amd64/Packages.xz", b"not xz").await;
        let error = read_index(&store, "dists/s/", &index, true, 1 << 20)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("cannot decompress"), "{error}");
    }
}
