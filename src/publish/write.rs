//! Writing what a suite's new Release names, before it is signed: pool
//! files (`If-None-Match: *`, never overwritten) and the Packages indexes
//! of the component, by hash first (new, content-addressed paths), then
//! at their canonical paths; then the Release text itself.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256, Sha512};
use tracing::info;

use super::Publisher;
use super::deb::DebInfo;
use super::index::{self, Checksum};
use super::merge::Merged;
use super::policy;
use super::store::{Body, Condition, Written};
use super::suite::{Current, MAX_INDEX_BYTES};
use crate::error::{Error, PublishError};
use crate::rollout;

/// The new content of a suite, before it is signed.
pub(super) struct Content {
    pub(super) release_text: String,
    /// Pool files to read back in full before the flip.
    pub(super) new_pool_files: BTreeSet<String>,
    pub(super) report: Vec<String>,
}

impl Publisher {
    /// Writes `bytes`, a file the Release will list at `path` (relative to
    /// `dists/<suite>/`), at its by-hash paths (`by-hash/SHA256/...` and
    /// `by-hash/SHA512/...` next to it); returns its SHA256 and SHA512
    /// lines for the Release. The canonical path is the caller's to write,
    /// after every by-hash copy.
    pub(super) async fn write_by_hash(
        &self,
        suite: &str,
        path: &str,
        bytes: &[u8],
    ) -> Result<(Checksum, Checksum), Error> {
        let hex256 = hex::encode(Sha256::digest(bytes));
        let hex512 = hex::encode(Sha512::digest(bytes));
        let dir = match path.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/"),
            None => String::new(),
        };
        for by_hash in [
            format!("{dir}by-hash/SHA256/{hex256}"),
            format!("{dir}by-hash/SHA512/{hex512}"),
        ] {
            // Content-addressed: an existing object has these bytes.
            self.store
                .put(
                    &Self::dists(suite, &by_hash),
                    Body::Bytes(bytes),
                    Condition::IfAbsent,
                )
                .await?;
        }
        let checksum = |hex: String| Checksum {
            path: path.to_string(),
            size: bytes.len() as u64,
            hex,
        };
        Ok((checksum(hex256), checksum(hex512)))
    }

    /// Writes the indexes of `merged` (by hash, then canonical) and returns
    /// the Release text to sign: our component's indexes, the others'
    /// carried over from `current`.
    pub(super) async fn write_indexes(
        &self,
        suite: &str,
        current: Option<&Current>,
        merged: Merged,
        date: DateTime<Utc>,
        valid_until: Option<DateTime<Utc>>,
    ) -> Result<Content, Error> {
        let Merged {
            entries,
            architectures,
            new_pool_files,
            report,
        } = merged;
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
                let (by256, by512) = self.write_by_hash(suite, &path, &bytes).await?;
                sha256.push(by256);
                sha512.push(by512);
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
        // Release named outside ours) are carried over unchanged; the
        // rollout policy is written anew, with the new versions' start.
        let ours = format!("{}/binary-", self.component);
        let carried = |c: &&Checksum| !c.path.starts_with(&ours) && c.path != rollout::FILE;
        if let Some(current) = current {
            sha256.extend(current.sha256.iter().filter(carried).cloned());
            sha512.extend(current.sha512.iter().filter(carried).cloned());
        }
        let policy = policy::stamped(current.and_then(|c| c.policy.as_ref()), &entries, date);
        let (policy256, policy512) = self.write_policy(suite, &policy).await?;
        sha256.push(policy256);
        sha512.push(policy512);
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

    /// Uploads a .deb to its pool path unless it is there already with the
    /// same bytes; different bytes under that path are a conflict.
    pub(super) async fn upload_pool(
        &self,
        path: &Path,
        info: &DebInfo,
        filename: &str,
    ) -> Result<(), Error> {
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
}

/// `Packages`, `Packages.gz`, `Packages.xz` of one text. Both compressors
/// are deterministic (gzip with mtime 0), so the same text gives the same
/// by-hash names.
pub(super) fn compressed_variants(text: &[u8]) -> Result<Vec<(&'static str, Vec<u8>)>, Error> {
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
