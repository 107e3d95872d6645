//! Readiness for the load balancer: `GET /healthz` and the app probe.
//!
//! The node is ready (200) when every configured package is installed and
//! the optional `check_url` answers 2xx; otherwise 503. The body is JSON
//! with what was decided and why, for humans and for scripts.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the last cycle left behind, shared with the health server.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub wanted: Vec<String>,
    /// Committed versions of the wanted packages: installed and found
    /// healthy. A node that never had a healthy version has none.
    pub installed: BTreeMap<String, String>,
    pub last_poll: Option<String>,
    pub last_error: Option<String>,
    #[serde(skip)]
    pub metrics: Metrics,
}

/// Figures for `/metrics` (Prometheus text format 0.0.4).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub cycles_total: u64,
    pub errors_total: u64,
    pub last_cycle_seconds: f64,
    pub cycle_seconds_sum: f64,
    pub last_success: Option<chrono::DateTime<chrono::Utc>>,
    pub last_error: Option<chrono::DateTime<chrono::Utc>>,
    pub release_valid_until: Option<chrono::DateTime<chrono::Utc>>,
    pub signing_key_expiry: Option<chrono::DateTime<chrono::Utc>>,
}

/// Prometheus label values escape `\`, `"` and newlines.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Snapshot {
    /// The Prometheus text exposition of this snapshot at `now`.
    pub fn render_metrics(&self, now: chrono::DateTime<chrono::Utc>) -> String {
        use std::fmt::Write;
        let m = &self.metrics;
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, lines: Vec<String>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for line in lines {
                let _ = writeln!(out, "{name}{line}");
            }
        };
        gauge(
            "pulldeploy_package_info",
            "Committed (installed and healthy) version of each configured package.",
            "gauge",
            self.wanted
                .iter()
                .filter_map(|p| {
                    self.installed
                        .get(p)
                        .map(|v| format!("{{package=\"{}\",version=\"{}\"}} 1", label(p), label(v)))
                })
                .collect(),
        );
        let timestamp = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map(|t| vec![format!(" {}", t.timestamp())])
                .unwrap_or_default()
        };
        gauge(
            "pulldeploy_last_success_timestamp_seconds",
            "When the last cycle succeeded (Unix time).",
            "gauge",
            timestamp(m.last_success),
        );
        gauge(
            "pulldeploy_last_error_timestamp_seconds",
            "When the last cycle failed (Unix time).",
            "gauge",
            timestamp(m.last_error),
        );
        gauge(
            "pulldeploy_cycles_total",
            "Cycles run.",
            "counter",
            vec![format!(" {}", m.cycles_total)],
        );
        gauge(
            "pulldeploy_cycle_errors_total",
            "Cycles that failed.",
            "counter",
            vec![format!(" {}", m.errors_total)],
        );
        gauge(
            "pulldeploy_last_cycle_duration_seconds",
            "Duration of the last cycle.",
            "gauge",
            vec![format!(" {:.6}", m.last_cycle_seconds)],
        );
        gauge(
            "pulldeploy_cycle_duration_seconds",
            "Durations of all cycles.",
            "summary",
            vec![
                format!("_sum {:.6}", m.cycle_seconds_sum),
                format!("_count {}", m.cycles_total),
            ],
        );
        let until = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map(|t| {
                vec![format!(
                    " {:.3}",
                    (t - now).num_milliseconds() as f64 / 1000.0
                )]
            })
            .unwrap_or_default()
        };
        gauge(
            "pulldeploy_release_valid_until_seconds",
            "Seconds until the accepted Release's Valid-Until (absent without one).",
            "gauge",
            until(m.release_valid_until),
        );
        gauge(
            "pulldeploy_signing_key_expiry_seconds",
            "Seconds until the first pinned signing key expires (absent if none expires).",
            "gauge",
            until(m.signing_key_expiry),
        );
        out
    }
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
    check_url_lock: RwLock<Option<String>>,
    /// Set around dpkg: /healthz answers 503 so the load balancer drains
    /// the node, and 200 again only after the new version is healthy.
    draining: std::sync::atomic::AtomicBool,
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
            draining: std::sync::atomic::AtomicBool::new(false),
            check_url_lock: RwLock::new(check_url),
            client: reqwest::Client::new(),
        })
    }

    /// Replaces the snapshot with `update` applied to it.
    pub fn update(&self, update: impl FnOnce(&mut Snapshot)) {
        // A poisoned lock only means a panic elsewhere mid-update; the
        // snapshot is plain data, so keep serving it.
        let mut snapshot = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        update(&mut snapshot);
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
            let body = self.snapshot().render_metrics(chrono::Utc::now());
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
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

/// Serves `/healthz` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "health server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(health.respond(request).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "health server: connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_prometheus_text_format() {
        let now = chrono::Utc::now();
        let snapshot = Snapshot {
            wanted: vec!["myapp".into(), "other".into()],
            installed: [("myapp".to_string(), "1:2.0-1".to_string())].into(),
            metrics: Metrics {
                cycles_total: 3,
                errors_total: 1,
                release_valid_until: Some(now + chrono::Duration::seconds(90)),
                ..Metrics::default()
            },
            ..Snapshot::default()
        };
        let text = snapshot.render_metrics(now);
        assert!(
            text.contains("pulldeploy_package_info{package=\"myapp\",version=\"1:2.0-1\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("package=\"other\""));
        assert!(text.contains("pulldeploy_cycles_total 3\n"));
        assert!(text.contains("pulldeploy_cycle_errors_total 1\n"));
        assert!(
            text.contains("pulldeploy_release_valid_until_seconds 90.000\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE pulldeploy_cycle_duration_seconds summary\n"));
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("pulldeploy_signing_key_expiry_seconds")),
            "no expiry, no sample"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
