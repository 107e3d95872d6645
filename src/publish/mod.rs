//! The repository side: `pulldeploy publish`, `promote` and `refresh`
//! write a signed apt repository that agents and apt-get read.
//!
//! - [`publish`], [`promote`], [`refresh`] (here): the operations, each
//!   an `Operation` a `Publisher` runs under the suite's publish lock.
//! - `suite`: the suite as published now, verified with the signing key.
//! - `merge`: an operation merged into the suite's current packages.
//! - `write`: pool files, indexes (by hash, then canonical), Release text.
//! - `flip`: the attempts: sign, verify before flip, the conditional
//!   InRelease write, starting over when another publisher flipped first.
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
mod flip;
pub mod index;
pub mod lock;
mod merge;
pub mod policy;
pub mod rollout;
pub mod sign;
pub mod store;
mod suite;
pub mod verify;
mod write;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use self::deb::{DebError, DebInfo};
use self::sign::SigningKey;
use self::store::Store;
use crate::cli::{PromoteArgs, PublishArgs, RefreshArgs, RepoArgs};
use crate::config::RepoUrl;
use crate::error::{Error, PublishError};
use crate::keyring::Keyring;
use crate::source::Source;
use crate::webhook::PublisherEvent;

// The arguments arrive checked by clap (src/cli.rs): names, PKG[=VER],
// --architecture, the range of --keep and --valid-for. Left here: what
// takes two of them to tell.

/// `pulldeploy publish`: adds `.deb`s to a suite and publishes it.
pub async fn publish(args: PublishArgs) -> Result<(), Error> {
    let mut debs = Vec::new();
    for path in &args.debs {
        debs.push((path.clone(), read_deb(path).await?));
    }
    let publisher = Publisher::open(&args.repo).await?;
    let operation = Operation::Publish {
        debs,
        keep: args.keep,
        architectures: args.architecture.iter().cloned().collect(),
    };
    let report = publisher.update(&args.suite, operation).await?;
    print_report(&report);
    announce(&args.repo, PublisherEvent::Published, &args.suite, &report).await;
    Ok(())
}

/// `pulldeploy promote`: the exact .debs of `PKG[=VER]` in one suite
/// added to another.
pub async fn promote(args: PromoteArgs) -> Result<(), Error> {
    // Each a valid name, checked by clap; that they differ it cannot tell.
    if args.from == args.to {
        return Err(usage("--from and --to name the same suite"));
    }
    let wanted = args
        .packages
        .iter()
        .map(|spec| match spec.split_once('=') {
            Some((name, version)) => (name.to_string(), Some(version.to_string())),
            None => (spec.clone(), None),
        })
        .collect();
    let publisher = Publisher::open(&args.repo).await?;
    let operation = Operation::Promote {
        from: args.from.clone(),
        wanted,
        keep: args.keep,
    };
    let report = publisher.update(&args.to, operation).await?;
    print_report(&report);
    announce(&args.repo, PublisherEvent::Promoted, &args.to, &report).await;
    Ok(())
}

/// `pulldeploy refresh`: the same content, signed again with a new Date
/// (and Valid-Until).
pub async fn refresh(args: RefreshArgs) -> Result<(), Error> {
    let publisher = Publisher::open(&args.repo).await?;
    let report = publisher.update(&args.suite, Operation::Refresh).await?;
    print_report(&report);
    Ok(())
}

/// A .deb's control file, read off the async runtime.
async fn read_deb(path: &Path) -> Result<DebInfo, Error> {
    let read_path = path.to_path_buf();
    let info = tokio::task::spawn_blocking(move || deb::read(&read_path))
        .await
        .map_err(|e| PublishError::InvalidDeb {
            path: path.to_path_buf(),
            reason: format!("reader task failed: {e}"),
        })?;
    match info {
        Ok(info) => Ok(info),
        Err(DebError::Io(source)) => Err(PublishError::ReadDeb {
            path: path.to_path_buf(),
            source,
        }
        .into()),
        Err(DebError::Invalid(reason)) => Err(PublishError::InvalidDeb {
            path: path.to_path_buf(),
            reason,
        }
        .into()),
    }
}

/// Tells `--webhook`, if given, what the command changed in `suite` (its
/// report): after the flip, the lock released. Waits for the message at
/// most `webhook::CLI_DEADLINE`; a webhook that is down costs a warning,
/// never the command.
async fn announce(args: &RepoArgs, event: PublisherEvent, suite: &str, report: &[String]) {
    let text = crate::webhook::suite_change_text(&args.repo, suite, report);
    crate::webhook::announce(
        args.webhook
            .as_ref()
            .map(crate::webhook::WebhookUrl::expose),
        event,
        text,
    )
    .await;
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
    /// A change of the rollout policy; the packages stay as they are.
    Rollout(policy::Change),
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
        // --repo is file:// or s3:// by its value: clap cannot tell this
        // conflict.
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
