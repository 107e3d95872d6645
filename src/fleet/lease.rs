//! In-flight leases: `<suite>/leases/<slot>`, slot 0..max_in_flight-1.
//!
//! The publish lock's mechanism ([`crate::publish::lock`]), one object per
//! slot: a lease is created with `If-None-Match: *`; it names its holder
//! (the node id) and an `Expires` time by the holder's clock, which the
//! holder pushes out with `If-Match` on the ETag it wrote. Another node
//! may break a lease only once `Expires` has passed by its own clock, by
//! replacing it with `If-Match` on the ETag it read, so of several nodes
//! that find one expired lease exactly one takes it (on a store whose
//! conditional writes are atomic: S3 and a directory store; moto checks
//! then writes without a lock, so there two racers can both "win").
//!
//! What another node wrote is untrusted: a lease object that is larger
//! than [`MAX_LEASE_BYTES`] (of any size: its ETag comes from a HEAD, the
//! body is never read), that does not parse, or whose `Expires` is more
//! than [`MAX_LEASE_TTL`] ahead counts as expired and is broken by its
//! ETag, so garbage cannot hold a slot for longer than one break. A slot
//! that cannot be read at all (the store fails) is a held slot: the
//! caller gets the error and a serving node waits (fail closed). A node
//! can still keep slots busy by writing live leases: it can delay a
//! rollout, which every node with write access to the prefix can do
//! anyway, never make a node install anything.
//!
//! A lease names its holder's node id and the holder process's instance
//! token ([`super::instance_token`]). Only a lease with this node's id AND
//! this process's token is this node's own: a live lease with this node's
//! id and another token is never taken over. It is either a second node
//! configured with the same id (when it was written after this process
//! started: reported as a duplicate id) or this node's own lease from
//! before a restart, which the node waits out like any live lease (at
//! most [`crate::agent`]'s lease TTL).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{info, warn};

use super::{Fleet, FleetError};
use crate::publish::index::parse_stanzas;
use crate::publish::lock::{Holder, lock_text, parse_holder};
use crate::publish::store::{Body, Condition, Written};

/// A lease object is a few lines; anything larger is not one of ours.
pub const MAX_LEASE_BYTES: u64 = 4096;

/// The longest a lease may run ahead of the reader's clock before it
/// counts as garbage (a clock years off, or a node pinning a slot).
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// A lease this node holds.
#[derive(Debug, Clone)]
pub struct Lease {
    slot: u32,
    path: String,
    /// `None` once the lease was found taken over (renew lost it).
    etag: Option<String>,
    ttl: Duration,
    expires: DateTime<Utc>,
}

/// A lease as `fleet status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseInfo {
    pub slot: u32,
    /// `None` when the object does not parse (it counts as expired).
    pub holder: Option<String>,
    pub acquired: Option<String>,
    pub expires: Option<DateTime<Utc>>,
    /// Past its `Expires` by this reader's clock (or unreadable): the next
    /// node that wants the slot breaks it.
    pub expired: bool,
}

/// Whether the lease described by `holder` may be broken at `now`.
fn expired(holder: Option<&Holder>, now: DateTime<Utc>) -> bool {
    let limit = crate::clock::add(now, MAX_LEASE_TTL);
    match holder.and_then(|h| h.expires) {
        Some(expires) => expires < now || expires > limit,
        None => true,
    }
}

/// The `Instance:` token of a lease, when it has one (older agents wrote
/// none).
fn lease_instance(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let stanza = parse_stanzas(text).ok()?.into_iter().next()?;
    stanza.get("Instance").map(str::to_string)
}

fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    crate::clock::add(now, ttl)
}

impl Fleet {
    fn lease_path(&self, slot: u32) -> String {
        format!("{}/leases/{slot}", self.suite)
    }

    /// The slots (below `slots`) that have a lease object now: one LIST.
    async fn present_slots(&self, slots: u32) -> Result<Vec<u32>, FleetError> {
        let prefix = format!("{}/leases/", self.suite);
        Ok(self
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|path| {
                let name = path.strip_prefix(&prefix)?.to_string();
                let slot = name.parse::<u32>().ok()?;
                (slot.to_string() == name && slot < slots).then_some(slot)
            })
            .collect())
    }

    /// Takes one of `slots` leases (see the module doc): `Ok(None)` when
    /// each is held by a live lease of another node. A lease this node
    /// holds already (it restarted mid-install) is taken over. `ttl` is
    /// capped at [`MAX_LEASE_TTL`].
    ///
    /// What it costs matters when many nodes wait: one LIST says which
    /// slots have a lease; free ones are tried first, from a random one
    /// on (so waiting nodes do not all race for slot 0); a held slot is
    /// read only when this node has not already seen a live lease there
    /// (its `Expires` is remembered), so a node that waits while every
    /// slot is busy makes one request per attempt.
    pub async fn take_lease(&self, slots: u32, ttl: Duration) -> Result<Option<Lease>, FleetError> {
        let ttl = ttl.min(MAX_LEASE_TTL);
        if slots == 0 {
            return Ok(None);
        }
        let present = self.present_slots(slots).await?;
        let first = rand::random_range(0..slots);
        let order = (0..slots).map(|i| (first + i) % slots);
        let (held, free): (Vec<u32>, Vec<u32>) = order.partition(|s| present.contains(s));
        for slot in free {
            if let Some(lease) = self.create_lease(slot, ttl).await? {
                return Ok(Some(lease));
            }
        }
        for slot in held {
            let live_until = self.seen_leases().get(&slot).copied();
            if live_until.is_some_and(|until| until > self.now()) {
                continue;
            }
            if let Some(lease) = self.take_held_lease(slot, ttl).await? {
                return Ok(Some(lease));
            }
        }
        Ok(None)
    }

    fn seen_leases(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u32, DateTime<Utc>>> {
        self.seen_leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lease for `slot` if it has none (`If-None-Match: *`).
    async fn create_lease(&self, slot: u32, ttl: Duration) -> Result<Option<Lease>, FleetError> {
        let path = self.lease_path(slot);
        let now = self.now();
        let text = self.lease_text(now, ttl);
        match self
            .put(&path, Body::Bytes(text.as_bytes()), Condition::IfAbsent)
            .await?
        {
            Written::Done { etag } => {
                info!(lease = %self.store.url(&path), node = %self.node_id, "lease taken");
                Ok(Some(Lease::written(slot, path, etag, ttl, now)))
            }
            Written::PreconditionFailed => Ok(None),
        }
    }

    /// The lease of a held `slot`, if it is this process's own (a release
    /// that failed) or expired or garbage: replaced with `If-Match` on the
    /// ETag read. A store failure is the caller's (the slot counts as held).
    async fn take_held_lease(&self, slot: u32, ttl: Duration) -> Result<Option<Lease>, FleetError> {
        let path = self.lease_path(slot);
        let (holder, instance, etag) = match self.get(&path, MAX_LEASE_BYTES).await {
            Ok(Some(current)) => (
                parse_holder(&current.bytes),
                lease_instance(&current.bytes),
                current.etag,
            ),
            // Released since the LIST: the next attempt (a poll later)
            // finds it free. No loop here: a node should not spin.
            Ok(None) => return Ok(None),
            // Too large to be a lease: garbage, broken by the ETag of a
            // HEAD (its body is never read). The HEAD must itself show an
            // object too large to be a lease: between the GET and the HEAD
            // another node may have broken the garbage and written its
            // live lease, whose ETag would otherwise break it in turn.
            Err(FleetError::Store(e)) if super::too_large(&e) => {
                match self.store.head(&path).await? {
                    Some(head) if head.size > MAX_LEASE_BYTES => (None, None, head.etag),
                    // Gone or replaced since the GET: look again next poll.
                    _ => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        };
        let same_id = holder.as_ref().is_some_and(|h| h.owner == self.node_id);
        let ours = same_id && instance.as_deref() == Some(self.instance.as_str());
        let now = self.now();
        if !ours && !expired(holder.as_ref(), now) {
            if let Some(holder) = holder.as_ref().filter(|_| same_id) {
                self.note_duplicate_lease(&path, holder, instance.as_deref());
            }
            if let Some(expires) = holder.as_ref().and_then(|h| h.expires) {
                self.seen_leases().insert(slot, expires);
            }
            return Ok(None);
        }
        let Some(etag) = etag.as_deref() else {
            return Ok(None);
        };
        let text = self.lease_text(now, ttl);
        match self
            .put(
                &path,
                Body::Bytes(text.as_bytes()),
                Condition::IfMatch(etag),
            )
            .await?
        {
            Written::Done { etag } => {
                match ours {
                    true => {
                        info!(lease = %self.store.url(&path), "took over this process's own lease")
                    }
                    false => warn!(
                        lease = %self.store.url(&path),
                        stale_holder = %holder.as_ref().map(|h| super::printable(&h.owner)).unwrap_or_else(|| "unreadable lease".into()),
                        expired = %holder.as_ref().and_then(|h| h.expires).map(|e| e.to_rfc3339()).unwrap_or_default(),
                        "broke an expired lease"
                    ),
                }
                self.seen_leases().remove(&slot);
                Ok(Some(Lease::written(slot, path, etag, ttl, now)))
            }
            // Another node broke it first.
            Written::PreconditionFailed => Ok(None),
        }
    }

    /// A live lease with this node's id and another process's token: a
    /// second node with this id when it was written (acquired or renewed)
    /// after this process started; before that, it may be this node's own
    /// from before a restart, and only waits.
    fn note_duplicate_lease(&self, path: &str, holder: &Holder, instance: Option<&str>) {
        let written = DateTime::parse_from_rfc3339(&holder.acquired)
            .ok()
            .map(|t| t.with_timezone(&Utc));
        if written.is_some_and(|at| at > self.started) {
            self.note_duplicate(format!(
                "the live lease {} has this node's id and another process's token ({})",
                self.store.url(path),
                super::printable(instance.unwrap_or("none"))
            ));
        } else {
            info!(lease = %self.store.url(path), "a lease with this node's id from before this process started; waiting for it to expire");
        }
    }

    /// What this process writes into a lease: the holder, its times and
    /// this process's instance token.
    fn lease_text(&self, now: DateTime<Utc>, ttl: Duration) -> String {
        format!(
            "{}Instance: {}\n",
            lock_text(&self.node_id, now, ttl),
            self.instance
        )
    }

    /// Every lease object of the suite, in slot order.
    pub async fn leases(&self) -> Result<Vec<LeaseInfo>, FleetError> {
        let prefix = format!("{}/leases/", self.suite);
        let mut slots: Vec<(u32, String)> = self
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|path| {
                let name = path.strip_prefix(&prefix)?;
                // Canonical decimal only: "01" would be a second key for slot 1.
                let slot = name.parse::<u32>().ok()?;
                (slot.to_string() == name).then_some((slot, path))
            })
            .collect();
        slots.sort();
        let now = self.now();
        let mut leases = Vec::new();
        for (slot, path) in slots.into_iter().take(super::MAX_LISTED) {
            let holder = match self.get(&path, MAX_LEASE_BYTES).await {
                Ok(Some(stored)) => parse_holder(&stored.bytes),
                Ok(None) => continue,
                Err(FleetError::Store(e)) => {
                    warn!(error = %e, "unreadable lease; shown as expired");
                    None
                }
                Err(e) => return Err(e),
            };
            leases.push(LeaseInfo {
                slot,
                expired: expired(holder.as_ref(), now),
                holder: holder.as_ref().map(|h| super::printable(&h.owner)),
                acquired: holder.as_ref().map(|h| super::printable(&h.acquired)),
                expires: holder.and_then(|h| h.expires),
            });
        }
        Ok(leases)
    }
}

impl Lease {
    /// The lease this node just wrote at `path` (at `now`, for `ttl`).
    fn written(
        slot: u32,
        path: String,
        etag: Option<String>,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Lease {
        Lease {
            slot,
            path,
            etag,
            ttl,
            expires: expiry(now, ttl),
        }
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// When the lease expires unless renewed, by this node's clock.
    pub fn expires(&self) -> DateTime<Utc> {
        self.expires
    }

    /// Whether the lease was still ours at the last write.
    pub fn held(&self) -> bool {
        self.etag.is_some()
    }

    /// Pushes `Expires` out by the TTL again (`If-Match` on the ETag we
    /// wrote). `Ok(false)` when the lease was broken by another node
    /// meanwhile (we were slower than our own TTL): it is no longer ours,
    /// and [`Lease::release`] will leave the new holder's lease alone.
    pub async fn renew(&mut self, fleet: &Fleet) -> Result<bool, FleetError> {
        let Some(etag) = self.etag.clone() else {
            return Ok(false);
        };
        let now = fleet.now();
        let text = fleet.lease_text(now, self.ttl);
        match fleet
            .put(
                &self.path,
                Body::Bytes(text.as_bytes()),
                Condition::IfMatch(&etag),
            )
            .await?
        {
            Written::Done { etag } => {
                self.etag = etag;
                self.expires = expiry(now, self.ttl);
                Ok(true)
            }
            Written::PreconditionFailed => {
                warn!(lease = %fleet.store.url(&self.path), "our lease was broken by another node (renewed too late)");
                self.etag = None;
                Ok(false)
            }
        }
    }

    /// Deletes the lease if it is still ours (`If-Match` on its ETag).
    /// `Ok(false)`: it was taken over, and the new holder's lease stays.
    pub async fn release(self, fleet: &Fleet) -> Result<bool, FleetError> {
        let Some(etag) = self.etag.as_deref() else {
            return Ok(false);
        };
        let released = fleet.delete(&self.path, Some(etag)).await?;
        match released {
            true => info!(lease = %fleet.store.url(&self.path), "lease released"),
            false => {
                warn!(lease = %fleet.store.url(&self.path), "our lease was taken over; left in place")
            }
        }
        Ok(released)
    }
}
