//! Fleet coordination through a store (S3 or a directory) alone: in-flight
//! leases, halt markers and node reports under `[fleet] url`, and the
//! `fleet` commands that read them.
//!
//! Layout, per suite (names binding: other nodes and tools read them):
//!
//! ```text
//! <fleet>/<suite>/leases/<slot>                slot = 0..max_in_flight-1   (lease)
//! <fleet>/<suite>/halted/<package>_<version>   names encoded by `key`      (halt)
//! <fleet>/<suite>/nodes/<node-id>.json                                     (report)
//! ```
//!
//! Every node with write access to the prefix can write every object in
//! it, so whatever is read back is untrusted: capped in size, parsed
//! defensively, shown with control characters escaped, and never a
//! reason to install anything. A node can delay a rollout (hold a lease,
//! write a halt marker), not make another node install a version: what
//! is installed comes from the signed repository and its signed policy.
//!
//! The store failing is not the same as the store saying "free" or "not
//! halted": a fleet error (other than a 403, no access at all) reaches the
//! caller, and a serving node waits on it (`crate::agent`'s coordinate).
//! Two processes with one node id are told apart by [`instance_token`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::warn;

use crate::clock::{Clock, SystemClock};
use crate::config::RepoUrl;
use crate::error::PublishError;
use crate::publish::store::{Body, Condition, DirStore, Store, Stored, Written};

mod command;
mod error;
mod halt;
mod key;
mod lease;
mod node_id;
mod report;
mod status;

pub use command::{FleetArgs, FleetCommand, run};
pub use error::FleetError;
pub use halt::Halt;
pub use key::{decode as decode_key, encode as encode_key};
pub use lease::{Lease, LeaseInfo, MAX_LEASE_TTL};
pub use node_id::{node_id_from, resolve_node_id};
pub use report::{MAX_REPORT_BYTES, NodeReport};
pub use status::{Status, UnreadableReport};

/// Objects of one kind read for `fleet status` (a fleet of this many
/// nodes is far beyond what one suite's prefix is meant for).
const MAX_LISTED: usize = 20_000;
/// Reports read at once by [`Fleet::reports`].
const READ_CONCURRENCY: usize = 16;

/// One node's (or the operator's) view of a suite's fleet objects.
pub struct Fleet {
    store: Arc<dyn Store>,
    suite: String,
    node_id: String,
    /// Set once the "no write access" warning was logged.
    warned_forbidden: AtomicBool,
    /// Lease slots seen held by another node's live lease, and until when
    /// (see `Fleet::take_lease`): not read again before then.
    seen_leases: std::sync::Mutex<std::collections::HashMap<u32, chrono::DateTime<chrono::Utc>>>,
    /// The time leases are judged by: the system clock unless the caller
    /// hands in a better one ([`Fleet::with_clock`]).
    clock: Arc<dyn Clock>,
    /// This process's token ([`instance_token`]), in its leases and report.
    instance: String,
    /// When this fleet was opened (by `clock`): a lease with this node's id
    /// and another token written later is a second node's, not this
    /// node's own from before a restart.
    started: chrono::DateTime<chrono::Utc>,
    /// The last sign that another node uses this node's id: when, and what.
    duplicate: std::sync::Mutex<Option<(chrono::DateTime<chrono::Utc>, String)>>,
    /// The ETag of the report this process last wrote: the next report is
    /// written with `If-Match` on it, so another writer of this node's
    /// report shows as a 412 at no extra request.
    report_etag: std::sync::Mutex<Option<String>>,
}

/// A random token, made once per process, that tells two processes with
/// one node id apart (in leases and reports).
pub fn instance_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| hex::encode(rand::random::<[u8; 8]>()))
}

impl Fleet {
    /// Opens the fleet store at `url` for `suite` as node `node_id`. An
    /// s3:// url is reached through `endpoint` and `region`, those of the
    /// repository (the same S3 server). Reaches nothing yet.
    pub async fn open(
        url: &RepoUrl,
        endpoint: Option<&str>,
        region: Option<&str>,
        suite: &str,
        node_id: &str,
    ) -> Result<Fleet, FleetError> {
        crate::config::node_id(node_id).map_err(|reason| FleetError::Invalid { reason })?;
        crate::repo::names::Suite::parse(suite).map_err(|reason| FleetError::Invalid { reason })?;
        let store: Box<dyn Store> = match url {
            RepoUrl::File(dir) => Box::new(DirStore::new(dir.clone())),
            #[cfg(feature = "s3")]
            RepoUrl::S3 { bucket, prefix } => Box::new(
                crate::publish::store::S3Store::new(
                    bucket.clone(),
                    prefix.clone(),
                    endpoint,
                    region,
                )
                .await?,
            ),
            #[cfg(not(feature = "s3"))]
            RepoUrl::S3 { .. } => {
                let _ = (endpoint, region);
                return Err(FleetError::Invalid {
                    reason: format!("{url}: built without S3 support"),
                });
            }
        };
        Ok(Fleet::with_store(store, suite, node_id))
    }

    /// A fleet on any store (tests, a directory store). `suite` and
    /// `node_id` must be valid already (a [`crate::config::Config`]'s are).
    pub fn with_store(store: Box<dyn Store>, suite: &str, node_id: &str) -> Fleet {
        Fleet {
            store: Arc::from(store),
            suite: suite.to_string(),
            node_id: node_id.to_string(),
            warned_forbidden: AtomicBool::new(false),
            seen_leases: std::sync::Mutex::new(std::collections::HashMap::new()),
            clock: Arc::new(SystemClock),
            instance: instance_token().to_string(),
            started: SystemClock.now(),
            duplicate: std::sync::Mutex::new(None),
            report_etag: std::sync::Mutex::new(None),
        }
    }

    /// The same fleet, judging lease times by `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Fleet {
        self.started = clock.now();
        self.clock = clock;
        self
    }

    /// The same fleet as another process would be: its own instance token
    /// (tests of two processes with one node id).
    pub fn with_instance(mut self, token: &str) -> Fleet {
        self.instance = token.to_string();
        self
    }

    /// This process's instance token.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The last sign that another node uses this node's id (when, by this
    /// fleet's clock, and what was seen); `None` when none was seen.
    pub fn duplicate_seen(&self) -> Option<(chrono::DateTime<chrono::Utc>, String)> {
        self.duplicate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records (and logs, loudly) a sign that another node uses this id.
    fn note_duplicate(&self, what: String) {
        warn!(
            node_id = %self.node_id,
            fleet = %self.url(),
            evidence = %what,
            "two nodes use this node id; give each node its own [fleet] node_id"
        );
        *self.duplicate.lock().unwrap_or_else(|e| e.into_inner()) = Some((self.now(), what));
    }

    /// Now, by the clock this fleet judges lease times by.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn suite(&self) -> &str {
        &self.suite
    }

    /// The URL of the suite's fleet prefix, for messages.
    pub fn url(&self) -> String {
        self.store.url(&self.suite)
    }

    /// Logs a fleet failure for a node that carries on without the
    /// fleet: a missing write permission once per process (it will not go
    /// away by itself), anything else each time. Returns whether `error`
    /// was the missing permission.
    pub fn log_unavailable(&self, error: &FleetError) -> bool {
        match error {
            FleetError::Forbidden { .. } => {
                if !self.warned_forbidden.swap(true, Ordering::Relaxed) {
                    warn!(
                        fleet = %self.url(),
                        error = %error,
                        "no write access to the fleet prefix; following the signed policy without leases, halt markers or reports"
                    );
                }
                true
            }
            other => {
                warn!(fleet = %self.url(), error = %other, "fleet store unavailable; carrying on without it this time");
                false
            }
        }
    }

    /// Writes this node's report, `nodes/<node-id>.json`, with this
    /// process's instance token. After the first write (unconditional: the
    /// object may be this node's from before a restart) each write is
    /// `If-Match` on the ETag this process wrote last: a 412 means another
    /// writer wrote this node's report, read back here; another process's
    /// token in it is a second node with this id ([`Fleet::duplicate_seen`]),
    /// and the report is then written as it is, flagged.
    pub async fn write_report(&self, report: &NodeReport) -> Result<(), FleetError> {
        let path = format!("{}/nodes/{}.json", self.suite, key::encode(&report.node_id));
        let mut report = report.clone();
        report.instance = Some(self.instance.clone());
        let last = self
            .report_etag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let condition = match &last {
            Some(etag) => Condition::IfMatch(etag),
            None => Condition::Always,
        };
        let bytes = report.to_json();
        let written = match self.put(&path, Body::Bytes(&bytes), condition).await? {
            Written::Done { etag } => etag,
            Written::PreconditionFailed => {
                let other = match self.get(&path, MAX_REPORT_BYTES).await {
                    Ok(Some(stored)) => NodeReport::parse(&stored.bytes, &self.node_id).ok(),
                    _ => None,
                };
                if let Some(token) = other.and_then(|r| r.instance)
                    && token != self.instance
                {
                    self.note_duplicate(format!(
                        "the report {} was rewritten by another process with this node's id ({})",
                        self.store.url(&path),
                        printable(&token)
                    ));
                    report.duplicate_node_id = true;
                }
                let bytes = report.to_json();
                match self
                    .put(&path, Body::Bytes(&bytes), Condition::Always)
                    .await?
                {
                    Written::Done { etag } => etag,
                    Written::PreconditionFailed => None,
                }
            }
        };
        *self.report_etag.lock().unwrap_or_else(|e| e.into_inner()) = written;
        Ok(())
    }

    // ---- the store, with its errors as fleet errors ---------------------

    async fn get(&self, path: &str, limit: u64) -> Result<Option<Stored>, FleetError> {
        Ok(self.store.get(path, limit).await?)
    }

    async fn put(
        &self,
        path: &str,
        body: Body<'_>,
        condition: Condition<'_>,
    ) -> Result<Written, FleetError> {
        Ok(self.store.put(path, body, condition).await?)
    }

    async fn delete(&self, path: &str, if_match: Option<&str>) -> Result<bool, FleetError> {
        Ok(self.store.delete(path, if_match).await?)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, FleetError> {
        Ok(self.store.list(prefix).await?)
    }
}

/// A store's "larger than the limit" refusal of a read.
fn too_large(error: &PublishError) -> bool {
    matches!(error, PublishError::StoreRead { message, .. } if message.starts_with("larger than"))
}

/// Text from another node, safe to print on a terminal: control
/// characters (escape sequences, newlines) are shown escaped.
pub fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c.is_control() {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect()
}

#[cfg(test)]
mod tests;
