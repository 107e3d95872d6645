//! The repository half of a cycle: from the store to a verified Release,
//! a verified index, and verified .debs in the cache. Nothing here changes
//! state or the node; every await point may be cancelled.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use tracing::{debug, info};

use super::Agent;
use crate::error::{Error, InstallError, SourceError, VerifyError};
use crate::keyring::Verified;
use crate::repo::digest::{Expected, HashingReader, Mismatch, StreamDigest, StreamError};
use crate::repo::packages::{self, Candidate, PackagesError, same_version};
use crate::repo::release::{self, Compression, Freshness, IndexFile, Release, Stale};
use crate::rollout::{self, Policy};
use crate::source::{self, Fetched};
use crate::state::{InstalledPackage, ReleaseFile, State};

/// A signed Release as fetched, before its content is trusted.
pub(super) struct SignedRelease {
    pub(super) file: ReleaseFile,
    pub(super) url: String,
    pub(super) etag: Option<String>,
    pub(super) verified: Verified,
}

impl Agent {
    /// Whether a 304 may end the cycle: the accepted Release was read for
    /// the same package list, and dpkg's installed versions are the ones
    /// state recorded. Cheap when dpkg's status file has not changed since it
    /// last matched (one stat).
    pub(super) fn may_skip_unchanged(&self, state: &State) -> bool {
        let Some(accepted) = &state.release else {
            return false;
        };
        let lease_plan_lost = |w: &crate::state::Waiting| {
            w.for_lease
                && self
                    .lease_wait
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_none()
        };
        if let Some(waiting) = &state.waiting
            && (waiting.recheck_at.is_some_and(|at| at <= self.clock.now())
                || lease_plan_lost(waiting))
        {
            debug!(reason = %waiting.reason, "time to look at the rollout again");
            return false;
        }
        if accepted.packages != self.package_specs() {
            info!("agent.packages changed; fetching the full repository");
            return false;
        }
        let stamp = self.installer.status_stamp();
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

    /// The way back for an upgrade of `candidate.name` from `current`: the
    /// committed version's verified .deb in the cache. When the cache lost
    /// it (tmpfiles, an operator) or it no longer matches its hash, it is
    /// fetched again from the signed repository; when the repository no
    /// longer has it either, the upgrade is refused ([`InstallError::NoWayBack`]),
    /// so that a failing postinst cannot leave the node worse than before.
    ///
    /// A version that is not committed (it never passed the health gate,
    /// or failed it) has no way back to keep: it is returned as it is.
    pub(super) async fn way_back(
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

    /// InRelease if present, otherwise Release + Release.gpg; `None` on 304.
    pub(super) async fn fetch_signed_release(
        &self,
        state: &State,
        etag: Option<&str>,
    ) -> Result<Option<SignedRelease>, Error> {
        let limit = self.config.repository.max_release_bytes;
        let accepted_file = state.release.as_ref().map(|r| r.file);
        let now = SystemTime::from(self.clock.node());
        let skew = self.config.repository.clock_skew;

        let path = self.dists(ReleaseFile::InRelease.name());
        let url = self.source.url(&path);
        let accepted_url = state.release.as_ref().map(|r| r.url.as_str());
        let inrelease_etag = etag.filter(|_| {
            accepted_file == Some(ReleaseFile::InRelease) && accepted_url == Some(url.as_str())
        });
        match self.source.get(&path, inrelease_etag).await {
            Ok(Fetched::NotModified) => return Ok(None),
            Ok(Fetched::Object(object)) => {
                let bytes = source::read_capped(&url, object.body, limit).await?;
                let verified = self.keyring.verify_cleartext(&url, &bytes, now, skew)?;
                return Ok(Some(SignedRelease {
                    file: ReleaseFile::InRelease,
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

        let path = self.dists(ReleaseFile::Release.name());
        let url = self.source.url(&path);
        let release_etag = etag.filter(|_| {
            accepted_file == Some(ReleaseFile::Release) && accepted_url == Some(url.as_str())
        });
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
            .verify_detached(&url, &release_bytes, &signature, now, skew)?;
        Ok(Some(SignedRelease {
            file: ReleaseFile::Release,
            url,
            etag: release_etag,
            verified,
        }))
    }

    /// Parses the verified text and applies the suite and freshness rules.
    pub(super) fn check_release(
        &self,
        signed: &SignedRelease,
        state: &State,
    ) -> Result<Release, Error> {
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
        let rules = self.expiry(state, signed.verified.signed_at);
        release::check_times(release.date, release.valid_until, &rules)
            .map_err(|stale| stale_error(stale, url, release.date, &rules))?;
        info!(file = %signed.file, signer = %signed.verified.signer, date = %release.date, "Release verified");
        Ok(release)
    }

    /// The freshness rules at the node's own clock: a Release Date ahead
    /// of it by more than `clock_skew`, or a clock behind the accepted
    /// Date, is the node's to report.
    pub(super) fn freshness(&self, state: &State) -> Freshness {
        Freshness {
            now: self.clock.node(),
            accepted: state.release.as_ref().map(|r| r.date),
            max_age: self.config.repository.max_age,
            clock_skew: self.config.repository.clock_skew,
        }
    }

    /// The same rules at the latest time the node knows has come: the
    /// later of its own clock, the repository's clock and the good
    /// signature's creation time (the signature was made, so that time has
    /// passed). Expiry (Valid-Until, max_age) is judged there, so that a
    /// clock running behind, which `clock_skew` lets a signature from the
    /// future past, never makes an expired Release current (fail closed).
    pub(super) fn expiry(&self, state: &State, signed_at: Option<DateTime<Utc>>) -> Freshness {
        let now = self.clock.later();
        Freshness {
            now: signed_at.map_or(now, |signed| now.max(signed)),
            accepted: None,
            ..self.freshness(state)
        }
    }

    /// Fetches the Packages index (by hash when the Release offers it),
    /// checks it against Release, then reads the wanted candidates from it.
    pub(super) async fn fetch_candidates(
        &self,
        release: &Release,
        index: &IndexFile,
    ) -> Result<Vec<Candidate>, Error> {
        let limit = self.config.repository.max_index_bytes;
        let (url, body) = self.fetch_listed(release, index, limit).await?;
        let local = self
            .cache()
            .join(format!("Packages{}", index.compression.extension()));
        source::download_verified(&url, body, &index.expected, &local).await?;
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

    /// The suite's rollout policy when its Release lists one: fetched by
    /// hash when the Release offers it, checked against Release (size and
    /// SHA256, cut at the declared size) and parsed. A listed policy that is
    /// missing, does not match or does not parse fails the cycle: a node
    /// must not guess at the operator's intent.
    pub(super) async fn fetch_policy(&self, release: &Release) -> Result<Option<Policy>, Error> {
        let Some((path, expected)) = release.sha256.iter().find(|(p, _)| p == rollout::FILE) else {
            return Ok(None);
        };
        let file = IndexFile {
            path: path.clone(),
            compression: Compression::None,
            expected: expected.clone(),
        };
        let (url, body) = self
            .fetch_listed(release, &file, rollout::MAX_BYTES)
            .await?;
        let mut bytes = Vec::new();
        let digest = source::HashingBody::new(body, StreamDigest::new(expected.size))
            .copy_to(&mut bytes)
            .await
            .map_err(|e| match e {
                StreamError::Overflow(_) => Error::from(VerifyError::TooLong {
                    url: url.clone(),
                    expected: expected.size,
                }),
                other => Error::from(SourceError::Unavailable {
                    url: url.clone(),
                    message: other.to_string(),
                }),
            })?;
        digest.verify(expected).map_err(|m| {
            let what = match m {
                Mismatch::Size { expected, actual } => {
                    format!("{actual} bytes, the signed Release says {expected}")
                }
                Mismatch::Sha256 { expected, actual } => {
                    format!("SHA256 {actual}, the signed Release says {expected}")
                }
            };
            VerifyError::RolloutPolicy {
                url: url.clone(),
                reason: format!(
                    "{} does not match the signed Release: {what}",
                    rollout::FILE
                ),
            }
        })?;
        let text = String::from_utf8(bytes).map_err(|_| VerifyError::RolloutPolicy {
            url: url.clone(),
            reason: "not UTF-8".into(),
        })?;
        let policy =
            Policy::parse(&text).map_err(|reason| VerifyError::RolloutPolicy { url, reason })?;
        Ok(Some(policy))
    }

    /// A file the Release lists, still unverified, and its URL: by hash
    /// when the Release offers it (a copy that never changes, so a poll
    /// during a publish gets this Release's bytes), else, or when that
    /// copy is missing, at its canonical path. One whose declared size is
    /// over `limit` is refused before any request.
    async fn fetch_listed(
        &self,
        release: &Release,
        file: &IndexFile,
        limit: u64,
    ) -> Result<(String, source::Body), Error> {
        if file.expected.size > limit {
            return Err(SourceError::TooLarge {
                url: self.source.url(&self.dists(&file.path)),
                limit,
            }
            .into());
        }
        let mut paths = Vec::new();
        if release.acquire_by_hash {
            paths.push(self.dists(&file.by_hash_path()));
        }
        paths.push(self.dists(&file.path));
        for path in &paths {
            let url = self.source.url(path);
            match self.source.get(path, None).await {
                Ok(Fetched::Object(object)) => return Ok((url, object.body)),
                Ok(Fetched::NotModified) => {}
                Err(e) if e.is_not_found() && path != paths.last().unwrap_or(path) => {
                    debug!(%url, "by-hash copy missing; trying the canonical path");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(SourceError::NotFound {
            url: self.source.url(&self.dists(&file.path)),
        }
        .into())
    }

    /// The verified .deb for `candidate` in the cache: reused when a file
    /// of that name already hashes right, otherwise downloaded. Either way
    /// its own control file must name the package, version and
    /// architecture of the index entry it was selected by.
    pub(super) async fn fetch_deb(&self, candidate: &Candidate) -> Result<PathBuf, Error> {
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
}

/// The named error for a Release that failed a freshness rule.
pub(super) fn stale_error(
    stale: Stale,
    url: &str,
    date: DateTime<Utc>,
    rules: &Freshness,
) -> VerifyError {
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
pub(super) async fn file_sha256(path: &Path) -> Result<String, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        HashingReader::new(file, StreamDigest::new(u64::MAX))
            .copy_to(&mut std::io::sink())
            .map(|digest| digest.finish().0)
            .map_err(|e| e.to_string())
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
