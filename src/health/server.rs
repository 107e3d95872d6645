//! The HTTP server of `/healthz` and `/metrics`, and its limits: the port
//! is open to whoever can reach it, so the server bounds how many
//! connections a peer can hold and for how long (see [`MAX_CONNECTIONS`]),
//! so that neither the answers to the load balancer nor the cycle's own
//! file descriptors depend on the peers' good manners.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

use super::Health;

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
