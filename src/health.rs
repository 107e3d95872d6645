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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

use prometheus_client::encoding::{
    EncodeGaugeValue, EncodeLabelSet, EncodeMetric, MetricEncoder, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

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

/// One finished cycle, as `/metrics` counts it.
#[derive(Debug, Clone, Default)]
pub struct Cycle {
    /// How long the cycle took.
    pub seconds: f64,
    /// Whether it succeeded.
    pub ok: bool,
    /// The accepted Release's Valid-Until, if it has one.
    pub release_valid_until: Option<chrono::DateTime<chrono::Utc>>,
    /// When the first pinned signing key expires, if one does.
    pub signing_key_expiry: Option<chrono::DateTime<chrono::Utc>>,
}

/// The label set of `pulldeploy_package_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PackageLabels {
    package: String,
    version: String,
}

/// A gauge without a sample until it has a value: the time of something
/// that has not happened yet, a deadline that does not exist. (A plain
/// [`Gauge`] always has one, 0 by default, which would read as 1970 or as
/// "expired".) Without a value it is left out of the exposition.
#[derive(Debug, Clone, Default)]
struct OptionalGauge<N>(Arc<Mutex<Option<N>>>);

impl<N: Copy> OptionalGauge<N> {
    fn set(&self, value: Option<N>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }

    fn get(&self) -> Option<N> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<N: EncodeGaugeValue + Copy + std::fmt::Debug> EncodeMetric for OptionalGauge<N> {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        match self.get() {
            Some(value) => encoder.encode_gauge(&value),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    fn is_empty(&self) -> bool {
        self.get().is_none()
    }
}

/// The figures behind `/metrics`, registered once in a prometheus-client
/// [`Registry`] that encodes them in the Prometheus text format (0.0.4).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    cycles: Counter,
    errors: Counter,
    last_cycle: Gauge<f64, AtomicU64>,
    /// `_sum` and `_count` of all cycles' durations; no buckets of its own
    /// (only the implicit `+Inf`), like the summary without quantiles it
    /// replaces (the library has no summary type).
    durations: Histogram,
    last_success: OptionalGauge<i64>,
    last_error: OptionalGauge<i64>,
    packages: Family<PackageLabels, Gauge>,
    release_valid_until: OptionalGauge<f64>,
    signing_key_expiry: OptionalGauge<f64>,
    /// The times behind the last two, which count down to them at each
    /// scrape.
    valid_until_at: Option<chrono::DateTime<chrono::Utc>>,
    key_expiry_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// All metrics, registered under `pulldeploy_`: before the first cycle
    /// the counters read 0 and the timestamps are absent.
    pub fn new() -> Metrics {
        let cycles = Counter::default();
        let errors = Counter::default();
        let last_cycle = Gauge::<f64, AtomicU64>::default();
        let durations = Histogram::new(std::iter::empty());
        let last_success = OptionalGauge::default();
        let last_error = OptionalGauge::default();
        let packages = Family::default();
        let release_valid_until = OptionalGauge::default();
        let signing_key_expiry = OptionalGauge::default();
        // The registry adds the help texts' full stops, the counters'
        // `_total` and the units' `_seconds`.
        let mut registry = Registry::with_prefix("pulldeploy");
        registry.register(
            "package_info",
            "Committed (installed and healthy) version of each configured package",
            packages.clone(),
        );
        registry.register_with_unit(
            "last_success_timestamp",
            "When the last cycle succeeded (Unix time)",
            Unit::Seconds,
            last_success.clone(),
        );
        registry.register_with_unit(
            "last_error_timestamp",
            "When the last cycle failed (Unix time)",
            Unit::Seconds,
            last_error.clone(),
        );
        registry.register("cycles", "Cycles run", cycles.clone());
        registry.register("cycle_errors", "Cycles that failed", errors.clone());
        registry.register_with_unit(
            "last_cycle_duration",
            "Duration of the last cycle",
            Unit::Seconds,
            last_cycle.clone(),
        );
        registry.register_with_unit(
            "cycle_duration",
            "Durations of all cycles",
            Unit::Seconds,
            durations.clone(),
        );
        registry.register_with_unit(
            "release_valid_until",
            "Seconds until the accepted Release's Valid-Until (absent without one)",
            Unit::Seconds,
            release_valid_until.clone(),
        );
        registry.register_with_unit(
            "signing_key_expiry",
            "Seconds until the first pinned signing key expires (absent if none expires)",
            Unit::Seconds,
            signing_key_expiry.clone(),
        );
        Metrics {
            registry,
            cycles,
            errors,
            last_cycle,
            durations,
            last_success,
            last_error,
            packages,
            release_valid_until,
            signing_key_expiry,
            valid_until_at: None,
            key_expiry_at: None,
        }
    }

    /// Counts `cycle`, which ended at `at`.
    pub fn record(&mut self, cycle: &Cycle, at: chrono::DateTime<chrono::Utc>) {
        self.cycles.inc();
        self.last_cycle.set(cycle.seconds);
        self.durations.observe(cycle.seconds);
        if cycle.ok {
            self.last_success.set(Some(at.timestamp()));
        } else {
            self.errors.inc();
            self.last_error.set(Some(at.timestamp()));
        }
        self.valid_until_at = cycle.release_valid_until;
        self.key_expiry_at = cycle.signing_key_expiry;
    }

    /// The Prometheus text exposition at `now`, with the committed
    /// versions of `snapshot`'s wanted packages. Takes `&mut self`: the
    /// package and countdown gauges are set for this scrape, so scrapes
    /// must not interleave.
    pub fn render(&mut self, snapshot: &Snapshot, now: chrono::DateTime<chrono::Utc>) -> String {
        self.packages.clear();
        for package in &snapshot.wanted {
            if let Some(version) = snapshot.installed.get(package) {
                self.packages
                    .get_or_create(&PackageLabels {
                        package: package.clone(),
                        version: version.clone(),
                    })
                    .set(1);
            }
        }
        let until = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map(|t| (t - now).num_milliseconds() as f64 / 1000.0)
        };
        self.release_valid_until.set(until(self.valid_until_at));
        self.signing_key_expiry.set(until(self.key_expiry_at));
        let mut out = String::new();
        // Writing to a String cannot fail, and no metric here fails on
        // its own.
        let _ = prometheus_text::encode(&mut out, &self.registry);
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
    /// Behind a mutex: a scrape sets some gauges before encoding.
    metrics: Mutex<Metrics>,
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
            metrics: Mutex::new(Metrics::new()),
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

    /// Counts a finished cycle in `/metrics`.
    pub fn record_cycle(&self, cycle: &Cycle) {
        self.metrics().record(cycle, chrono::Utc::now());
    }

    /// The `/metrics` body at `now`.
    pub fn render_metrics(&self, now: chrono::DateTime<chrono::Utc>) -> String {
        let snapshot = self.snapshot();
        self.metrics().render(&snapshot, now)
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
            let body = self.render_metrics(chrono::Utc::now());
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
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

    fn snapshot(installed: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            wanted: vec!["myapp".into(), "other".into()],
            installed: installed
                .iter()
                .map(|(p, v)| (p.to_string(), v.to_string()))
                .collect(),
            ..Snapshot::default()
        }
    }

    /// The sample line of `name` (with its labels), if there is one.
    fn sample<'t>(text: &'t str, name: &str) -> Option<&'t str> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
    }

    #[test]
    fn metrics_render_in_prometheus_text_format() {
        let now = chrono::Utc::now();
        let mut metrics = Metrics::new();
        for (seconds, ok) in [(0.25, true), (0.5, false), (1.0, true)] {
            metrics.record(
                &Cycle {
                    seconds,
                    ok,
                    release_valid_until: Some(now + chrono::Duration::seconds(90)),
                    signing_key_expiry: None,
                },
                now - chrono::Duration::seconds(5),
            );
        }
        let text = metrics.render(&snapshot(&[("myapp", "1:2.0-1")]), now);
        for line in [
            "# HELP pulldeploy_package_info Committed (installed and healthy) version of each configured package.\n",
            "# TYPE pulldeploy_package_info gauge\n",
            "pulldeploy_package_info{package=\"myapp\",version=\"1:2.0-1\"} 1\n",
            "# HELP pulldeploy_cycles_total Cycles run.\n",
            "# TYPE pulldeploy_cycles_total counter\n",
            "pulldeploy_cycles_total 3\n",
            "# TYPE pulldeploy_cycle_errors_total counter\n",
            "pulldeploy_cycle_errors_total 1\n",
            "# TYPE pulldeploy_last_cycle_duration_seconds gauge\n",
            "pulldeploy_last_cycle_duration_seconds 1.0\n",
            "# TYPE pulldeploy_cycle_duration_seconds histogram\n",
            "pulldeploy_cycle_duration_seconds_bucket{le=\"+Inf\"} 3\n",
            "pulldeploy_cycle_duration_seconds_sum 1.75\n",
            "pulldeploy_cycle_duration_seconds_count 3\n",
            "# TYPE pulldeploy_release_valid_until_seconds gauge\n",
            "pulldeploy_release_valid_until_seconds 90.0\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        let at = (now - chrono::Duration::seconds(5)).timestamp().to_string();
        assert_eq!(
            sample(&text, "pulldeploy_last_success_timestamp_seconds"),
            Some(at.as_str())
        );
        assert_eq!(
            sample(&text, "pulldeploy_last_error_timestamp_seconds"),
            Some(at.as_str())
        );
        assert!(
            !text.contains("package=\"other\""),
            "not installed, no sample"
        );
        assert!(
            !text.contains("pulldeploy_signing_key_expiry_seconds"),
            "no expiry, no sample\n{text}"
        );
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");

        // The countdown is taken at each scrape.
        let later = metrics.render(
            &snapshot(&[("myapp", "1:2.0-1")]),
            now + chrono::Duration::milliseconds(30_500),
        );
        assert_eq!(
            sample(&later, "pulldeploy_release_valid_until_seconds"),
            Some("59.5")
        );
    }

    #[test]
    fn metrics_before_the_first_cycle_have_zero_counts_and_no_timestamps() {
        let text = Metrics::new().render(&snapshot(&[]), chrono::Utc::now());
        assert_eq!(sample(&text, "pulldeploy_cycles_total"), Some("0"));
        assert_eq!(sample(&text, "pulldeploy_cycle_errors_total"), Some("0"));
        assert_eq!(
            sample(&text, "pulldeploy_cycle_duration_seconds_count"),
            Some("0")
        );
        for absent in [
            "pulldeploy_package_info",
            "pulldeploy_last_success_timestamp_seconds",
            "pulldeploy_last_error_timestamp_seconds",
            "pulldeploy_release_valid_until_seconds",
            "pulldeploy_signing_key_expiry_seconds",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
    }

    #[test]
    fn package_info_follows_the_snapshot_at_each_scrape() {
        let mut metrics = Metrics::new();
        let now = chrono::Utc::now();
        let both = metrics.render(&snapshot(&[("myapp", "1.0"), ("other", "2.0")]), now);
        assert!(both.contains("pulldeploy_package_info{package=\"other\",version=\"2.0\"} 1\n"));
        let upgraded = metrics.render(&snapshot(&[("myapp", "1.1")]), now);
        assert!(
            upgraded.contains("pulldeploy_package_info{package=\"myapp\",version=\"1.1\"} 1\n")
        );
        assert!(!upgraded.contains("version=\"1.0\""), "{upgraded}");
        assert!(!upgraded.contains("package=\"other\""), "{upgraded}");
        // Installed but no longer wanted (the config dropped it): not shown.
        let mut unwanted = snapshot(&[("myapp", "1.1"), ("gone", "3.0")]);
        unwanted.wanted.retain(|p| p != "gone");
        assert!(!metrics.render(&unwanted, now).contains("gone"));
    }

    #[test]
    fn label_values_are_escaped() {
        let text = Metrics::new().render(&snapshot(&[("myapp", "a\"b\\c\nd")]), chrono::Utc::now());
        assert!(text.contains("version=\"a\\\"b\\\\c\\nd\"} 1\n"), "{text}");
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
}
