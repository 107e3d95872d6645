//! Readiness for the load balancer: `GET /healthz` and the app probe.
//!
//! The node is ready (200) when every configured package is installed and
//! the optional `check_url` answers 2xx; otherwise 503. The body is JSON
//! with what was decided and why, for humans and for scripts. `/metrics`
//! is in [`metrics`]; the server and its limits against hostile peers are
//! in [`server`].

mod metrics;
mod server;

pub use metrics::{Cycle, Metrics, RolloutGauges};
pub use server::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS, serve};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

/// What the last cycle left behind, shared with the health server.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub wanted: Vec<String>,
    /// Committed versions of the wanted packages: installed and found
    /// healthy. A node that never had a healthy version has none.
    pub installed: BTreeMap<String, String>,
    pub last_poll: Option<String>,
    pub last_error: Option<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    ready: bool,
    reason: String,
    #[serde(flatten)]
    snapshot: &'a Snapshot,
}

pub struct Health {
    snapshot: RwLock<Snapshot>,
    /// Behind a mutex: a scrape sets some gauges before encoding.
    metrics: Mutex<Metrics>,
    check_url_lock: RwLock<Option<String>>,
    /// Set around dpkg: /healthz answers 503 so the load balancer drains
    /// the node, and 200 again only after the new version is healthy.
    draining: std::sync::atomic::AtomicBool,
    /// Set once the instance is leaving its Auto Scaling group
    /// (`lifecycle`): 503 for good, whatever an install does with
    /// `draining`.
    terminating: std::sync::atomic::AtomicBool,
    client: reqwest::Client,
}

/// How long the app probe may take before the node counts as not ready.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Health {
    /// The health of the node `config` describes.
    pub fn for_config(config: &crate::config::Config) -> Arc<Health> {
        Health::new(
            config
                .agent
                .packages
                .iter()
                .map(|p| p.name.clone())
                .collect(),
            config.health.check_url.clone(),
        )
    }

    pub fn new(wanted: Vec<String>, check_url: Option<String>) -> Arc<Health> {
        Arc::new(Health {
            snapshot: RwLock::new(Snapshot {
                wanted,
                ..Snapshot::default()
            }),
            metrics: Mutex::new(Metrics::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
            terminating: std::sync::atomic::AtomicBool::new(false),
            check_url_lock: RwLock::new(check_url),
            // check_url is plain http (config): no TLS roots to load, so
            // building the client reads nothing from the OS. (With roots,
            // a store of only unparsable certificates fails the build, and
            // reqwest's Client::new() panics on that.)
            client: reqwest::Client::builder()
                .tls_built_in_root_certs(false)
                .build()
                .unwrap_or_default(),
        })
    }

    /// Replaces the snapshot with `update` applied to it.
    pub fn update(&self, update: impl FnOnce(&mut Snapshot)) {
        // A poisoned lock only means a panic elsewhere mid-update; the
        // snapshot is plain data, so keep serving it.
        let mut snapshot = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        update(&mut snapshot);
    }

    /// Counts a finished cycle in `/metrics`.
    pub fn record_cycle(&self, cycle: &Cycle) {
        self.metrics().record(cycle, chrono::Utc::now());
    }

    /// The counters `/metrics` shows for the webhook's notifier.
    pub fn webhook_counters(&self) -> crate::webhook::Counters {
        self.metrics().webhook_counters()
    }

    /// The `/metrics` body at `now`.
    pub fn render_metrics(&self, now: chrono::DateTime<chrono::Utc>) -> String {
        let snapshot = self.snapshot();
        self.metrics().render(&snapshot, now)
    }

    /// The rollout gauges of /metrics (cheap handles to the same figures).
    pub fn rollout_gauges(&self) -> RolloutGauges {
        self.metrics().rollout_gauges()
    }

    fn metrics(&self) -> std::sync::MutexGuard<'_, Metrics> {
        // Poisoned only by a panic mid-update: the figures are still
        // counters and gauges, so keep serving them.
        self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes a reloaded config's package list and app probe.
    pub fn reconfigure(&self, config: &crate::config::Config) {
        *self
            .check_url_lock
            .write()
            .unwrap_or_else(|e| e.into_inner()) = config.health.check_url.clone();
        self.update(|s| {
            s.wanted = config
                .agent
                .packages
                .iter()
                .map(|p| p.name.clone())
                .collect()
        });
    }

    fn check_url(&self) -> Option<String> {
        self.check_url_lock
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining
            .store(draining, std::sync::atomic::Ordering::SeqCst);
    }

    /// From now on /healthz answers 503: the instance is terminating.
    pub fn set_terminating(&self) {
        self.terminating
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Adds a metric of another module (the lifecycle hooks') to `/metrics`.
    pub fn register_metric(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.metrics().register(name, help, metric);
    }

    /// One probe of `check_url`: `Ok` on 2xx within [`PROBE_TIMEOUT`].
    /// Without a `check_url` the app counts as healthy once installed.
    pub async fn probe(&self) -> Result<String, String> {
        let Some(url) = self.check_url() else {
            return Ok("no check_url configured".into());
        };
        let url = &url;
        match self.client.get(url).timeout(PROBE_TIMEOUT).send().await {
            Ok(response) if response.status().is_success() => {
                Ok(format!("{url} answered {}", response.status()))
            }
            Ok(response) => Err(format!("{url} answered {}", response.status())),
            Err(e) => Err(format!("{url} unreachable: {e}")),
        }
    }

    /// The health gate after an install: `healthy_after` consecutive good
    /// probes, `interval` apart, within `timeout`. Says what the last probe
    /// saw when it gives up.
    pub async fn wait_healthy(
        &self,
        healthy_after: u32,
        timeout: Duration,
        interval: Duration,
    ) -> Result<(), String> {
        if self.check_url().is_none() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut in_a_row = 0;
        loop {
            match self.probe().await {
                Ok(_) => {
                    in_a_row += 1;
                    if in_a_row >= healthy_after {
                        return Ok(());
                    }
                }
                Err(last) => {
                    in_a_row = 0;
                    if tokio::time::Instant::now() + interval > deadline {
                        return Err(format!("within {timeout:?} (last probe: {last})"));
                    }
                }
            }
            if tokio::time::Instant::now() + interval > deadline {
                return Err(format!(
                    "within {timeout:?} ({in_a_row} of {healthy_after} good probes)"
                ));
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Decides readiness now: draining, packages, then the app probe.
    pub async fn evaluate(&self) -> (bool, String, Snapshot) {
        let snapshot = self.snapshot();
        if self.terminating.load(std::sync::atomic::Ordering::SeqCst) {
            return (
                false,
                "terminating: the instance is leaving its Auto Scaling group".into(),
                snapshot,
            );
        }
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return (
                false,
                "draining: an update is being installed".into(),
                snapshot,
            );
        }
        let missing: Vec<&str> = snapshot
            .wanted
            .iter()
            .filter(|name| !snapshot.installed.contains_key(*name))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            let reason = format!("not installed: {}", missing.join(", "));
            return (false, reason, snapshot);
        }
        match self.probe().await {
            Ok(reason) => (true, reason, snapshot),
            Err(reason) => (false, reason, snapshot),
        }
    }

    async fn respond(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if request.uri().path() == "/metrics" {
            let body = self.render_metrics(chrono::Utc::now());
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            return response;
        }
        if request.uri().path() != "/healthz" {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        }
        let (ready, reason, snapshot) = self.evaluate().await;
        let body = serde_json::to_vec_pretty(&Report {
            ready,
            reason,
            snapshot: &snapshot,
        })
        .unwrap_or_default();
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        response
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}
