//! Verify before flip: before InRelease is written, read back what was
//! published as an agent reads it (the agent's own [`Source`] and
//! [`Keyring`]) and refuse the flip if any byte is off.
//!
//! Checked, in the agent's order: Release and Release.gpg verify with the
//! public part of the signing key and say what we meant; the InRelease
//! about to be written verifies too and signs the same text; Release
//! parses with the agent's parser and is for this suite; every index it
//! names matches its size and SHA256 (and SHA512) at its by-hash path and
//! at its canonical path; every Packages index parses with the agent's
//! parser, and its compressed forms inflate to the same text; every pool
//! file it names exists with its size, and those added by this publish
//! hash to what the index says.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha512};

use super::index::{self, Checksum, Entry};
use super::store::Store;
use crate::keyring::Keyring;
use crate::repo::capped;
use crate::repo::digest::{Expected, StreamDigest, StreamError};
use crate::repo::release;
use crate::source::{self, Fetched, Source};

/// Cap on what is read back into memory (Release, an index).
const READ_LIMIT: u64 = 512 << 20;

/// What a publish is about to flip to.
pub struct Published<'a> {
    pub suite: &'a str,
    pub release_text: &'a str,
    pub inrelease: &'a [u8],
    /// Pool files this publish wrote or referenced for the first time:
    /// read back in full.
    pub new_pool_files: &'a BTreeSet<String>,
}

async fn fetch(source: &dyn Source, path: &str) -> Result<Vec<u8>, String> {
    let url = source.url(path);
    match source.get(path, None).await {
        Ok(Fetched::Object(object)) => source::read_capped(&url, object.body, READ_LIMIT)
            .await
            .map_err(|e| e.to_string()),
        Ok(Fetched::NotModified) => Err(format!("{url}: 304 to an unconditional request")),
        Err(e) => Err(e.to_string()),
    }
}

async fn fetch_digest(source: &dyn Source, path: &str, expected: &Expected) -> Result<(), String> {
    let url = source.url(path);
    let body = match source.get(path, None).await {
        Ok(Fetched::Object(object)) => object.body,
        Ok(Fetched::NotModified) => return Err(format!("{url}: 304 to an unconditional request")),
        Err(e) => return Err(e.to_string()),
    };
    let digest = source::HashingBody::new(body, StreamDigest::new(expected.size))
        .copy_to(&mut tokio::io::sink())
        .await
        .map_err(|e| match e {
            StreamError::Overflow(_) => format!(
                "{url}: longer than the {} bytes the index says",
                expected.size
            ),
            other => format!("{url}: {other}"),
        })?;
    digest
        .verify(expected)
        .map_err(|m| source::mismatch(&url, m).to_string())
}

/// The whole text of the index at `url` (compressed as its `path` says),
/// or why not: past `limit` is an error, never a shorter text.
fn inflate(url: &str, path: &str, bytes: &[u8], limit: u64) -> Result<Vec<u8>, String> {
    capped::decompress_all(capped::compression_of(path), bytes, limit).map_err(|e| {
        match capped::over_limit(&e) {
            Some(limit) => format!("{url}: inflates past the limit of {limit} bytes"),
            None => format!("{url}: cannot decompress: {e}"),
        }
    })
}

/// How far in the future a signature the publisher reads back may be made:
/// the agent's default `clock_skew`, so that a suite another publisher
/// (a CI host whose clock runs ahead) signed is read as a node with the
/// default setting reads it, and the publisher's verify before flip
/// accepts no more and no less than such a node.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Reads the suite back through `source` and checks it against what was
/// meant. `Err` says what failed, naming the URL.
pub async fn before_flip(
    source: &dyn Source,
    store: &dyn Store,
    keyring: &Keyring,
    published: &Published<'_>,
) -> Result<(), String> {
    let dists = |file: &str| format!("dists/{}/{file}", published.suite);
    let now = SystemTime::now();

    // 1. The signed Release, as an agent without InRelease reads it.
    let release_path = dists("Release");
    let release_url = source.url(&release_path);
    let release_bytes = fetch(source, &release_path).await?;
    let signature = fetch(source, &dists("Release.gpg")).await?;
    let verified = keyring
        .verify_detached(&release_url, &release_bytes, &signature, now, CLOCK_SKEW)
        .map_err(|e| e.to_string())?;
    if verified.text != published.release_text {
        return Err(format!(
            "{release_url} reads back different from what was written ({} vs {} bytes)",
            verified.text.len(),
            published.release_text.len()
        ));
    }
    // 2. The InRelease about to be written.
    let inrelease_url = source.url(&dists("InRelease"));
    let clear = keyring
        .verify_cleartext(&inrelease_url, published.inrelease, now, CLOCK_SKEW)
        .map_err(|e| e.to_string())?;
    if clear.text != published.release_text.trim_end_matches('\n') {
        return Err(format!(
            "{inrelease_url}: the cleartext-signed text differs from Release"
        ));
    }
    // 3. The agent's parser and rules.
    let parsed = release::parse(&verified.text).map_err(|e| format!("{release_url}: {e}"))?;
    if !parsed.matches_suite(published.suite) {
        return Err(format!("{release_url}: not for suite {}", published.suite));
    }
    if !parsed.acquire_by_hash {
        return Err(format!("{release_url}: no Acquire-By-Hash: yes"));
    }
    let stanza = index::parse_stanzas(&verified.text)
        .map_err(|e| format!("{release_url}: {e}"))?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{release_url}: empty"))?;
    let sha512 =
        index::release_checksums(&stanza, "SHA512").map_err(|e| format!("{release_url}: {e}"))?;

    // 4. Every index, by hash and at its canonical path.
    let mut packages_texts: Vec<(String, Vec<u8>)> = Vec::new();
    for (path, expected) in &parsed.sha256 {
        let dir = path.rsplit_once('/').map_or("", |(dir, _)| dir);
        let by_hash = if dir.is_empty() {
            format!("by-hash/SHA256/{}", expected.sha256)
        } else {
            format!("{dir}/by-hash/SHA256/{}", expected.sha256)
        };
        for candidate in [by_hash, path.clone()] {
            fetch_digest(source, &dists(&candidate), expected).await?;
        }
        if let Some(Checksum { hex, .. }) = sha512.iter().find(|c| &c.path == path) {
            let by_hash = if dir.is_empty() {
                format!("by-hash/SHA512/{hex}")
            } else {
                format!("{dir}/by-hash/SHA512/{hex}")
            };
            let bytes = fetch(source, &dists(&by_hash)).await?;
            let actual = hex::encode(Sha512::digest(&bytes));
            if &actual != hex {
                return Err(format!(
                    "{}: SHA512 mismatch: expected {hex}, got {actual}",
                    source.url(&dists(&by_hash))
                ));
            }
        }
        let file = path.rsplit('/').next().unwrap_or_default();
        if file.starts_with("Packages") {
            let bytes = fetch(source, &dists(path)).await?;
            let url = source.url(&dists(path));
            packages_texts.push((path.clone(), inflate(&url, path, &bytes, READ_LIMIT)?));
        }
    }
    if parsed.sha256.is_empty() {
        return Err(format!("{release_url}: names no index"));
    }

    // 5. Packages: the agent's parser, the same text in every compression,
    // and the pool files.
    let mut checked_pool = BTreeSet::new();
    let mut plain_by_dir: Vec<(String, Vec<u8>)> = Vec::new();
    for (path, text) in &packages_texts {
        let dir = path.rsplit_once('/').map_or("", |(dir, _)| dir).to_string();
        match plain_by_dir.iter().find(|(d, _)| *d == dir) {
            Some((_, first)) if first != text => {
                return Err(format!(
                    "{}: inflates to a different Packages than its siblings",
                    source.url(&dists(path))
                ));
            }
            Some(_) => continue,
            None => plain_by_dir.push((dir.clone(), text.clone())),
        }
        let url = source.url(&dists(path));
        let text = std::str::from_utf8(text).map_err(|_| format!("{url}: not UTF-8"))?;
        let stanzas = index::parse_stanzas(text).map_err(|e| format!("{url}: {e}"))?;
        let mut names = BTreeSet::new();
        for stanza in stanzas {
            let entry = Entry::from_stanza(stanza).map_err(|e| format!("{url}: {e}"))?;
            names.insert(entry.name.clone());
            if !checked_pool.insert(entry.filename.clone()) {
                continue;
            }
            let expected = Expected {
                sha256: entry.sha256.clone(),
                size: entry.size,
            };
            if published.new_pool_files.contains(&entry.filename) {
                fetch_digest(source, &entry.filename, &expected).await?;
            } else {
                match store.size(&entry.filename).await {
                    Ok(Some(size)) if size == entry.size => {}
                    Ok(Some(size)) => {
                        return Err(format!(
                            "{}: size mismatch: expected {} bytes, got {size}",
                            store.url(&entry.filename),
                            entry.size
                        ));
                    }
                    Ok(None) => return Err(format!("{} not found", store.url(&entry.filename))),
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        let arch = dir.rsplit("binary-").next().unwrap_or_default();
        let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        crate::repo::packages::read_candidates(text.as_bytes(), &wanted, arch)
            .map_err(|e| format!("{url}: the agent's parser refuses it: {e:?}"))?;
    }
    Ok(())
}

/// After the flip: InRelease read back as an agent reads it. `Ok(false)`
/// when it verifies but is not ours (another publish flipped right after).
pub async fn after_flip(
    source: &dyn Source,
    keyring: &Keyring,
    suite: &str,
    inrelease: &[u8],
) -> Result<bool, String> {
    let path = format!("dists/{suite}/InRelease");
    let bytes = fetch(source, &path).await?;
    keyring
        .verify_cleartext(&source.url(&path), &bytes, SystemTime::now(), CLOCK_SKEW)
        .map_err(|e| e.to_string())?;
    Ok(bytes == inrelease)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn an_index_past_the_limit_is_refused_not_cut() {
        let text = b"Package: a\nVersion: 1\n\n".repeat(10);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&text).unwrap();
        let gz = gz.finish().unwrap();
        let limit = text.len() as u64;
        for (path, bytes) in [("Packages", &text), ("Packages.gz", &gz)] {
            assert_eq!(inflate("u", path, bytes, limit).unwrap(), text);
            let error = inflate(
                "s3://b/dists/s/main/binary-amd64/Packages",
                path,
                bytes,
                limit - 1,
            )
            .unwrap_err();
            assert_eq!(
                error,
                format!(
                    "s3://b/dists/s/main/binary-amd64/Packages: inflates past the limit of {} bytes",
                    limit - 1
                )
            );
        }
        let error = inflate("u", "Packages.xz", b"not xz", limit).unwrap_err();
        assert!(error.starts_with("u: cannot decompress"), "{error}");
    }
}
