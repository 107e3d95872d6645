//! Readiness for the load balancer: `GET /healthz` and the app probe.
//!
//! The node is ready (200) when every configured package is installed and
//! the optional `check_url` answers 2xx; otherwise 503. The body is JSON
//! with what was decided and why, for humans and for scripts.
//!
//! The port is open to whoever can reach it: the server bounds how many
//! connections a peer can hold and for how long (see [`MAX_CONNECTIONS`]),
//! so that neither the answers to the load balancer nor the cycle's own
//! file descriptors depend on the peers' good manners.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

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

// ---- The server: limits against hostile peers ------------------------------
//
// Anyone who can reach the port can open connections, and every one is a
// file descriptor of the agent, the same budget a cycle needs for its
// repository connections, cache files and dpkg's pipes. So the server
// holds a bounded number of connections, each for a bounded time, and
// never lets them starve the cycle of descriptors.

/// Most connections the health server holds at once (fewer when the
/// process's soft RLIMIT_NOFILE is below 4 times this: a quarter of
/// that). A connection costs one descriptor, two while its
/// request runs the app probe; 256 of them leave about 500 of the usual
/// soft limit of 1024 for a cycle (a few dozen: S3 connections, cache
/// files, dpkg's pipes). A load balancer needs a handful.
///
/// When all are in use, a new connection takes the slot of the oldest
/// one that has no request in progress (silent, or idle between keep-alive
/// requests), which is closed at once; if every one is running a request,
/// the new connection is closed at once. Either way the count stays at the
/// cap, and a client that sends its request right after connecting, as a
/// load balancer's health check does, is served even while silent
/// connections fill every slot.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a client has to send a whole request head: from the accept,
/// and again from the end of each response, so this is also how long an
/// idle keep-alive connection is kept. Trickling the head a byte at a time
/// does not extend it. Load balancers send their request at once.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest any one connection is kept, however busy it is: then it is
/// closed gracefully (a request in progress is answered first, within
/// [`CLOSE_GRACE`]; the client reconnects for the next one).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// How long a request in progress at [`CONNECTION_LIFETIME`] may take to
/// finish before the connection is dropped (the app probe takes at most
/// [`PROBE_TIMEOUT`]).
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long a new connection waits for the idle one it replaces to close.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// After a failed accept (EMFILE and friends) the server pauses for this
/// long, doubling with every further failure up to [`ACCEPT_BACKOFF_MAX`],
/// instead of spinning on a listener whose backlog stays full.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// At most one warning line per this long about failed accepts, and one
/// about connections closed at the limit, each with how many happened:
/// a flood of connections must not become a flood of log lines.
const WARN_INTERVAL: Duration = Duration::from_secs(30);

// A quarter of the usual soft descriptor limit at most.
const _: () = assert!(MAX_CONNECTIONS * 4 <= 1024);

/// [`cap_for`] the process's soft RLIMIT_NOFILE.
fn connection_cap() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return MAX_CONNECTIONS;
    }
    cap_for(limit.rlim_cur)
}

/// [`MAX_CONNECTIONS`], or a quarter of the soft descriptor limit
/// `soft_nofile` when that is lower, so that the health server never holds
/// most of the agent's descriptors.
fn cap_for(soft_nofile: libc::rlim_t) -> usize {
    let quarter = usize::try_from(soft_nofile / 4).unwrap_or(usize::MAX);
    MAX_CONNECTIONS.min(quarter).max(1)
}

/// Counts events and says when to log them: the first at once, then at
/// most once per `interval`, with how many happened since the last line.
struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    count: u64,
}

impl Throttle {
    fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            last: None,
            count: 0,
        }
    }

    /// One more event at `now`; `Some(events since the last line)` when a
    /// line is due.
    fn event(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// The pause after the `failures`-th accept failure in a row (1-based).
fn accept_backoff(failures: u32) -> Duration {
    ACCEPT_BACKOFF_MIN
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1)))
        .min(ACCEPT_BACKOFF_MAX)
}

/// One open connection, as the accept loop sees it.
struct Conn {
    /// A request is in the handler: not to be closed for a newcomer.
    busy: AtomicBool,
    /// Close now: a new connection takes this one's place.
    evict: Notify,
}

/// The open connections by accept order (oldest first).
type Open = Arc<Mutex<BTreeMap<u64, Arc<Conn>>>>;

/// Takes the oldest connection without a request in progress out of `open`.
fn oldest_idle(open: &Open) -> Option<Arc<Conn>> {
    let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
    let id = open
        .iter()
        .find(|(_, conn)| !conn.busy.load(Ordering::SeqCst))
        .map(|(id, _)| *id)?;
    open.remove(&id)
}

/// Removes its connection from the open set when the connection ends.
struct Registered {
    open: Open,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Marks its connection busy while a request is in the handler.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Busy {
        conn.busy.store(true, Ordering::SeqCst);
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

/// Serves `/healthz` on `listener` until `shutdown` turns true, within the
/// limits above: at most [`MAX_CONNECTIONS`] connections (fewer under a low
/// descriptor limit), each closed after [`HEADER_READ_TIMEOUT`] without a
/// request and after 30 s in any case.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cap = connection_cap();
    if cap < MAX_CONNECTIONS {
        tracing::info!(
            max_connections = cap,
            "health server: connection limit lowered to a quarter of the descriptor limit"
        );
    }
    let permits = Arc::new(Semaphore::new(cap));
    let open: Open = Arc::default();
    let mut next_id: u64 = 0;
    let mut failures: u32 = 0;
    let mut accept_warnings = Throttle::new(WARN_INTERVAL);
    let mut shed_warnings = Throttle::new(WARN_INTERVAL);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                failures = 0;
                stream
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let pause = accept_backoff(failures);
                if let Some(errors) = accept_warnings.event(Instant::now()) {
                    tracing::warn!(error = %e, errors, retry_in = ?pause, "health server: accept failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                continue;
            }
        };
        // At the limit, the oldest connection without a request in
        // progress makes room for this one; without such, this one goes.
        let (permit, shed) = match permits.clone().try_acquire_owned() {
            Ok(permit) => (Some(permit), false),
            Err(_) => {
                let permit = match oldest_idle(&open) {
                    Some(victim) => {
                        victim.evict.notify_one();
                        tokio::time::timeout(EVICTION_WAIT, permits.clone().acquire_owned())
                            .await
                            .ok()
                            .and_then(Result::ok)
                    }
                    None => None,
                };
                (permit, true)
            }
        };
        if shed && let Some(closed) = shed_warnings.event(Instant::now()) {
            tracing::warn!(
                max_connections = cap,
                closed,
                "health server: at its connection limit; closed idle or new connections"
            );
        }
        let Some(permit) = permit else {
            drop(stream);
            continue;
        };
        next_id += 1;
        let conn = Arc::new(Conn {
            busy: AtomicBool::new(false),
            evict: Notify::new(),
        });
        open.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(next_id, conn.clone());
        let registered = Registered {
            open: open.clone(),
            id: next_id,
        };
        tokio::spawn(serve_connection(
            stream,
            health.clone(),
            conn,
            (permit, registered),
        ));
    }
}

/// One connection, until the client closes it, a timeout or the lifetime
/// ends it, or a newcomer takes its place; `_held` (its permit and its
/// entry in the open set) is released when it ends.
async fn serve_connection(
    stream: TcpStream,
    health: Arc<Health>,
    conn: Arc<Conn>,
    _held: (OwnedSemaphorePermit, Registered),
) {
    let handler = conn.clone();
    let service = hyper::service::service_fn(move |request| {
        let health = health.clone();
        // Busy from the moment the request head is parsed.
        let busy = Busy::new(handler.clone());
        async move {
            let response = health.respond(request).await;
            drop(busy);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = conn.evict.notified() => return,
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                finished = tokio::time::timeout(CLOSE_GRACE, connection) => match finished {
                    Ok(result) => result,
                    Err(_) => return,
                },
                () = conn.evict.notified() => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "health server: connection ended");
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
    fn throttled_warnings_come_once_per_interval_with_a_count() {
        let start = Instant::now();
        let mut throttle = Throttle::new(Duration::from_secs(30));
        assert_eq!(throttle.event(start), Some(1), "the first one at once");
        for i in 1..=1000u64 {
            assert_eq!(throttle.event(start + Duration::from_millis(i)), None);
        }
        assert_eq!(
            throttle.event(start + Duration::from_secs(30)),
            Some(1001),
            "then one line saying how many"
        );
        assert_eq!(throttle.event(start + Duration::from_secs(31)), None);
    }

    #[test]
    fn accept_backoff_doubles_up_to_its_maximum() {
        assert_eq!(accept_backoff(1), ACCEPT_BACKOFF_MIN);
        assert_eq!(accept_backoff(2), ACCEPT_BACKOFF_MIN * 2);
        assert_eq!(accept_backoff(4), ACCEPT_BACKOFF_MIN * 8);
        assert_eq!(accept_backoff(30), ACCEPT_BACKOFF_MAX);
        assert_eq!(accept_backoff(u32::MAX), ACCEPT_BACKOFF_MAX);
    }

    #[test]
    fn the_connection_cap_leaves_most_descriptors_to_the_cycle() {
        assert_eq!(cap_for(1024), MAX_CONNECTIONS);
        assert_eq!(cap_for(libc::RLIM_INFINITY), MAX_CONNECTIONS);
        assert_eq!(cap_for(256), 64, "a quarter of a lower limit");
        assert_eq!(cap_for(0), 1);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
