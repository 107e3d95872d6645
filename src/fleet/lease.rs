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
//! than [`MAX_LEASE_BYTES`], that does not parse, or whose `Expires` is
//! more than [`MAX_LEASE_TTL`] ahead counts as expired, so garbage cannot
//! hold a slot for longer than one break. A node can still keep slots
//! busy by writing live leases: it can delay a rollout, which every node
//! with write access to the prefix can do anyway, never make a node install
//! anything.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{info, warn};

use super::{Fleet, FleetError};
use crate::publish::lock::{Holder, lock_text, parse_holder};
use crate::publish::store::{Body, Condition, Written};

/// A lease object is a few lines; anything larger is not one of ours.
pub const MAX_LEASE_BYTES: u64 = 4096;

/// Read this much of a lease slot's object at most: enough to see that a
/// too-large object is garbage (and break it), not to read a huge one.
const MAX_LEASE_READ: u64 = 1 << 20;

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
        let text = lock_text(&self.node_id, now, ttl);
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

    /// The lease of a held `slot`, if it is this node's own (from before a
    /// restart) or expired: replaced with `If-Match` on the ETag read.
    async fn take_held_lease(&self, slot: u32, ttl: Duration) -> Result<Option<Lease>, FleetError> {
        let path = self.lease_path(slot);
        let Some(current) = self.get(&path, MAX_LEASE_READ).await? else {
            // Released since the LIST: the next attempt (a poll later)
            // finds it free. No loop here: a node should not spin.
            return Ok(None);
        };
        let holder = (current.bytes.len() as u64 <= MAX_LEASE_BYTES)
            .then(|| parse_holder(&current.bytes))
            .flatten();
        let ours = holder.as_ref().is_some_and(|h| h.owner == self.node_id);
        let now = self.now();
        if !ours && !expired(holder.as_ref(), now) {
            if let Some(expires) = holder.as_ref().and_then(|h| h.expires) {
                self.seen_leases().insert(slot, expires);
            }
            return Ok(None);
        }
        let Some(etag) = current.etag.as_deref() else {
            return Ok(None);
        };
        let text = lock_text(&self.node_id, now, ttl);
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
                        info!(lease = %self.store.url(&path), "took over this node's own lease")
                    }
                    false => warn!(
                        lease = %self.store.url(&path),
                        stale_holder = %holder.as_ref().map(|h| h.owner.as_str()).unwrap_or("unreadable lease"),
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
        let text = lock_text(&fleet.node_id, now, self.ttl);
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
