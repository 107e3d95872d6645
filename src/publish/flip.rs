//! The flip and the attempts around it. An attempt reads the suite as
//! published, builds the new one on it, signs it, writes Release and
//! Release.gpg, verifies before flip ([`verify::before_flip`]) and writes
//! InRelease on the condition that it is still the one the attempt read.
//! An attempt that loses the flip to another publisher (or fails verify
//! before flip) leaves InRelease as it was, and the next attempt starts
//! over from the suite as it is then.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::index;
use super::lock;
use super::store::{Body, Condition, Written};
use super::suite::Current;
use super::verify;
use super::write::Content;
use super::{Operation, Publisher};
use crate::error::{Error, PublishError};

/// How many failed attempts an update makes before it gives up: the first
/// and five more after losing the flip to another publisher or failing
/// verify before flip. A failed attempt during which another publisher
/// flipped InRelease (the next attempt reads a new ETag) does not count:
/// the failure is that race's, and the other publisher is done. So
/// publishers racing without a lock all get through, one per flip, instead
/// of the slowest giving up while the others still make progress; a store
/// that keeps serving wrong bytes still fails after six. At most
/// [`MAX_ATTEMPTS`] in all. Each attempt rereads the suite. After a failed
/// attempt number `n` (counted) it waits a random 50..=250 ms times `n`,
/// so that publishers that lost a race start again at different times:
///
/// | after attempt | waits        |
/// |---------------|--------------|
/// | 1             | 50-250 ms    |
/// | 2             | 100-500 ms   |
/// | 3             | 150-750 ms   |
/// | 4             | 200-1000 ms  |
/// | 5             | 250-1250 ms  |
/// | 6             | 300-1500 ms, then gives up |
///
/// 1.05 s to 5.25 s in all, on top of the attempts themselves (and of the
/// wait for the lock, `--lock-wait`, before the first).
const FLIP_ATTEMPTS: u32 = 6;

/// The bound on attempts, counted or not: a crowd of racing publishers
/// cannot keep one trying for ever.
const MAX_ATTEMPTS: u32 = 30;

/// How an attempt ended.
enum Flip {
    Done,
    /// Another publisher flipped InRelease since this attempt read it.
    Lost,
    /// Verify before flip failed, for this reason; nothing was flipped.
    Refused(String),
}

impl Publisher {
    /// Attempts until one flips, at most [`FLIP_ATTEMPTS`] failures that
    /// were not a lost race (see there); the report of the one that did.
    pub(super) async fn attempts(
        &self,
        suite: &str,
        operation: &Operation,
        lock: &mut lock::Lock,
    ) -> Result<Vec<String>, Error> {
        let mut uploaded = BTreeSet::new();
        let mut refused = None;
        // Failed attempts that count, and the InRelease ETag the last one
        // started from.
        let mut attempt = 0;
        let mut started_from: Option<Option<String>> = None;
        for _ in 0..MAX_ATTEMPTS {
            let current = self.read_current(suite).await?;
            let etag = current.as_ref().and_then(|c| c.etag.clone());
            let raced = started_from.as_ref().is_some_and(|before| *before != etag);
            if !raced {
                attempt += 1;
            }
            if attempt > FLIP_ATTEMPTS {
                break;
            }
            started_from = Some(etag);
            refused = None;
            let date = next_date(current.as_ref()).await?;
            // Without --valid-for, the suite keeps the validity period it
            // had: a publish must not quietly drop freshness protection.
            let valid_until = match self.valid_for {
                Some(d) => Some(crate::clock::add(date, d)),
                // Saturating: a signed Valid-Until far past the calendar
                // is refused by the verify before flip, not a panic here.
                None => current.as_ref().and_then(|c| {
                    c.valid_until.map(|v| {
                        date.checked_add_signed(v - c.date)
                            .unwrap_or(DateTime::<Utc>::MAX_UTC)
                    })
                }),
            };
            // Refresh and rollout change a suite that must exist.
            let existing = || {
                current
                    .as_ref()
                    .ok_or_else(|| PublishError::NothingToRefresh {
                        suite: suite.to_string(),
                        url: self.store.url(&Self::dists(suite, "InRelease")),
                    })
            };
            let content = match operation {
                Operation::Refresh => {
                    let current = existing()?;
                    Content {
                        release_text: index::refreshed_release(&current.release, date, valid_until),
                        new_pool_files: BTreeSet::new(),
                        report: vec![format!("refreshed {suite}: same content, signed again")],
                    }
                }
                Operation::Rollout(change) => {
                    let current = existing()?;
                    match self
                        .rollout_content(suite, current, change, date, valid_until)
                        .await?
                    {
                        Some(content) => content,
                        // Nothing to change: nothing is signed or written.
                        None => {
                            return Ok(vec![format!(
                                "rollout of {suite} unchanged: {}",
                                super::rollout::describe(
                                    &current.policy.clone().unwrap_or_default()
                                )
                            )]);
                        }
                    }
                }
                Operation::Publish { .. } | Operation::Promote { .. } => {
                    let merged = self
                        .merge(suite, operation, current.as_ref(), &mut uploaded)
                        .await?;
                    let content = self
                        .write_indexes(suite, current.as_ref(), merged, date, valid_until)
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
            // Publishers that lost a race start again at different times
            // (the schedule is in FLIP_ATTEMPTS' comment).
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

/// The longest a write waits for the clock to pass the suite's previous
/// write. Past whole seconds, a wait means the previous write's Date or
/// Last-Modified is ahead of this host's clock: a clock to fix, not to
/// sleep through.
const MAX_DATE_WAIT: Duration = Duration::from_secs(10);

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
    let now = index::whole_seconds(Utc::now());
    let Some(current) = current else {
        return Ok(now);
    };
    // The later of the two marks of the previous write.
    let (previous, what) = match current.last_modified {
        Some(modified) if modified > current.date => (modified, "Last-Modified"),
        _ => (current.date, "Release Date"),
    };
    let date = now.max(crate::clock::add(previous, Duration::from_secs(1)));
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
