//! The publish lock of a suite: one object, `dists/<suite>/.publish-lock`,
//! created with `If-None-Match: *` and broken, when stale, with
//! `If-Match` on its ETag.
//!
//! The lock keeps two publishers from doing the same work at once; it is
//! not what makes a publish safe. Safety comes from the flip: InRelease is
//! written with `If-Match` on the ETag read at the start of the attempt
//! (or `If-None-Match: *` for a new suite), so a publisher whose view went
//! stale (its lock was broken while it was slow) loses the flip, rereads,
//! and tries again, instead of overwriting a package someone else added.
//!
//! # The stale-lock rule
//!
//! The lock names its holder and an `Expires` time (acquired + `--lock-ttl`,
//! by the holder's clock), renewed by the holder between phases. Another
//! publisher that finds it may break it only once `Expires` has passed by
//! its own clock; it does so by replacing the lock object with `If-Match`
//! on the ETag it read, so of several publishers that find the same stale
//! lock exactly one takes it. An unreadable lock object counts as stale.
//! The TTL must exceed the longest publish plus the clock skew between
//! publishers; if it does not, the flip's precondition still prevents a
//! lost update, at the cost of a retry.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::index::{Stanza, parse_stanzas};
use super::store::{Body, Condition, Store, Written};
use crate::error::PublishError;

/// Waits between attempts to take a busy lock, the one schedule:
/// 100 ms, 200 ms, 400 ms, 800 ms, 1.6 s, then 2 s each, each plus up to
/// half again of random jitter, until `--lock-wait` has passed.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(5))
        .min(Duration::from_secs(2));
    let jitter = rand::random_range(0..=base.as_millis() as u64 / 2);
    base + Duration::from_millis(jitter)
}

/// A lock this process holds.
pub struct Lock {
    path: String,
    etag: Option<String>,
    owner: String,
    ttl: Duration,
}

/// What a lock object says.
#[derive(Debug, Clone)]
pub struct Holder {
    pub owner: String,
    pub acquired: String,
    pub expires: Option<DateTime<Utc>>,
}

pub(crate) fn lock_text(owner: &str, acquired: DateTime<Utc>, ttl: Duration) -> String {
    let expires = crate::clock::add(acquired, ttl);
    format!(
        "Owner: {owner}\nAcquired: {}\nExpires: {}\n",
        acquired.to_rfc3339(),
        expires.to_rfc3339()
    )
}

pub(crate) fn parse_holder(bytes: &[u8]) -> Option<Holder> {
    let text = std::str::from_utf8(bytes).ok()?;
    let stanza: Stanza = parse_stanzas(text).ok()?.into_iter().next()?;
    Some(Holder {
        owner: stanza.get("Owner")?.to_string(),
        acquired: stanza.get("Acquired")?.to_string(),
        expires: DateTime::parse_from_rfc3339(stanza.get("Expires")?)
            .ok()
            .map(|d| d.with_timezone(&Utc)),
    })
}

/// `user@host pid N run R`: enough to find the process, unique per run.
fn owner_id() -> String {
    let host = crate::webhook::hostname();
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!(
        "{user}@{host} pid {} run {:016x}",
        std::process::id(),
        rand::random::<u64>()
    )
}

/// Takes the lock at `path`, waiting up to `wait` for a live holder and
/// breaking a stale one (see the module doc).
pub async fn acquire(
    store: &dyn Store,
    path: &str,
    ttl: Duration,
    wait: Duration,
) -> Result<Lock, PublishError> {
    let owner = owner_id();
    let started = std::time::Instant::now();
    let mut last_holder: Option<Holder> = None;
    // Bounded: by `wait` through the sleeps, and by a count for the
    // paths that do not sleep (a lock released between two requests).
    for attempt in 0..10_000u32 {
        let text = lock_text(&owner, Utc::now(), ttl);
        match store
            .put(path, Body::Bytes(text.as_bytes()), Condition::IfAbsent)
            .await?
        {
            Written::Done { etag } => {
                info!(lock = %store.url(path), %owner, "publish lock taken");
                return Ok(Lock {
                    path: path.to_string(),
                    etag,
                    owner,
                    ttl,
                });
            }
            Written::PreconditionFailed => {}
        }
        let Some(current) = store.get(path, 64 * 1024).await? else {
            // Released between our two requests: try again at once.
            continue;
        };
        let holder = parse_holder(&current.bytes);
        let stale = holder
            .as_ref()
            .is_none_or(|h| h.expires.is_none_or(|expires| expires < Utc::now()));
        if stale && let Some(etag) = current.etag.as_deref() {
            let text = lock_text(&owner, Utc::now(), ttl);
            if let Written::Done { etag } = store
                .put(path, Body::Bytes(text.as_bytes()), Condition::IfMatch(etag))
                .await?
            {
                warn!(
                    lock = %store.url(path),
                    stale_owner = %holder.as_ref().map(|h| h.owner.as_str()).unwrap_or("unreadable lock"),
                    expired = %holder.as_ref().and_then(|h| h.expires).map(|e| e.to_rfc3339()).unwrap_or_default(),
                    "broke a stale publish lock"
                );
                return Ok(Lock {
                    path: path.to_string(),
                    etag,
                    owner,
                    ttl,
                });
            }
            // Someone else broke or renewed it first: look again.
            continue;
        }
        last_holder = holder;
        if started.elapsed() >= wait {
            break;
        }
        let pause = backoff(attempt).min(wait.saturating_sub(started.elapsed()));
        tokio::time::sleep(pause).await;
    }
    let holder = last_holder.unwrap_or(Holder {
        owner: "unknown".into(),
        acquired: "unknown".into(),
        expires: None,
    });
    Err(PublishError::Locked {
        url: store.url(path),
        owner: holder.owner,
        acquired: holder.acquired,
        expires: holder
            .expires
            .map(|e| e.to_rfc3339())
            .unwrap_or_else(|| "unknown".into()),
        waited: started.elapsed(),
    })
}

impl Lock {
    /// Pushes `Expires` out by the TTL again. If the lock was broken
    /// meanwhile, says so and carries on: the flip's precondition decides.
    pub async fn renew(&mut self, store: &dyn Store) -> Result<(), PublishError> {
        let Some(etag) = self.etag.clone() else {
            return Ok(());
        };
        let text = lock_text(&self.owner, Utc::now(), self.ttl);
        match store
            .put(
                &self.path,
                Body::Bytes(text.as_bytes()),
                Condition::IfMatch(&etag),
            )
            .await?
        {
            Written::Done { etag } => self.etag = etag,
            Written::PreconditionFailed => {
                warn!(lock = %store.url(&self.path), "our publish lock was broken by another publisher; continuing, the flip decides");
                self.etag = None;
            }
        }
        Ok(())
    }

    /// Deletes the lock if it is still ours (If-Match on its ETag).
    pub async fn release(self, store: &dyn Store) {
        let Some(etag) = self.etag.as_deref() else {
            return;
        };
        match store.delete(&self.path, Some(etag)).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(lock = %store.url(&self.path), "the publish lock was taken over; left in place")
            }
            Err(e) => warn!(error = %e, "cannot release the publish lock; it expires by itself"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_text_round_trips() {
        let now = Utc::now();
        let text = lock_text("me@host pid 1", now, Duration::from_secs(60));
        let holder = parse_holder(text.as_bytes()).unwrap();
        assert_eq!(holder.owner, "me@host pid 1");
        assert_eq!(
            holder.expires.map(|e| e.timestamp()),
            Some((now + chrono::Duration::seconds(60)).timestamp())
        );
        assert!(parse_holder(b"garbage").is_none());
    }

    #[test]
    fn backoff_is_bounded() {
        assert!(backoff(0) >= Duration::from_millis(100));
        assert!(backoff(0) <= Duration::from_millis(150));
        assert!(backoff(30) <= Duration::from_secs(3));
    }
}
