//! The suite as published now, read as the publisher builds on it:
//! InRelease verified with the publisher's own key (through the agent's
//! verifier, pinned to the public part of the signing key), then the
//! Packages indexes of the component being published, each checked against
//! Release and read whole.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::Publisher;
use super::index::{self, Checksum, Entry, Stanza};
use super::store::Store;
use crate::error::{Error, PublishError};
use crate::repo::capped;
use crate::repo::release::IndexFile;
use crate::rollout::{self, Policy};

/// Cap on InRelease and on an index read back from the store.
const MAX_RELEASE_BYTES: u64 = 16 << 20;
pub(super) const MAX_INDEX_BYTES: u64 = 512 << 20;

/// A suite as published now, verified with the signing key.
pub(super) struct Current {
    /// InRelease's ETag in the store: the flip's precondition.
    pub(super) etag: Option<String>,
    /// InRelease's Last-Modified in the store, when it says.
    pub(super) last_modified: Option<DateTime<Utc>>,
    pub(super) url: String,
    pub(super) release: Stanza,
    pub(super) date: DateTime<Utc>,
    pub(super) valid_until: Option<DateTime<Utc>>,
    /// The packages of the component being published, all architectures.
    pub(super) entries: Vec<Entry>,
    pub(super) architectures: BTreeSet<String>,
    pub(super) components: BTreeSet<String>,
    pub(super) sha256: Vec<Checksum>,
    pub(super) sha512: Vec<Checksum>,
    /// The suite's rollout policy, when Release lists one.
    pub(super) policy: Option<Policy>,
}

impl Publisher {
    /// The suite as published, verified with our key; `None` for a suite
    /// without InRelease.
    pub(super) async fn read_current(&self, suite: &str) -> Result<Option<Current>, Error> {
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
            .verify_cleartext(
                &url,
                &stored.bytes,
                SystemTime::now(),
                super::verify::CLOCK_SKEW,
            )
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
        let policy = match parsed.sha256.iter().find(|(path, _)| path == rollout::FILE) {
            None => None,
            Some((path, expected)) => {
                let file = IndexFile {
                    path: path.clone(),
                    compression: capped::compression_of(path),
                    expected: expected.clone(),
                };
                let bytes = read_index(
                    self.store.as_ref(),
                    &Self::dists(suite, ""),
                    &file,
                    parsed.acquire_by_hash,
                    rollout::MAX_BYTES,
                )
                .await?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| refuse(format!("{}: not UTF-8", rollout::FILE)))?;
                Some(Policy::parse(&text).map_err(|e| refuse(format!("{}: {e}", rollout::FILE)))?)
            }
        };
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
            policy,
        }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::store::{self, Body, Condition};
    use crate::publish::write::compressed_variants;
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
