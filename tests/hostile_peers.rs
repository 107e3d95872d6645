//! Peers of the health port that do not play by the rules (issue 9, item 6):
//! connections that never send a request (half-open, slowloris), clients
//! that send one keep-alive request and then sit idle, headers trickled a
//! line at a time.
//!
//! The real `pulldeploy run` daemon serves a hand-made signed file://
//! repository into a sandbox root, with the file descriptor limit a stock
//! shell or systemd unit gives it (soft 1024). The tests hold far more
//! connections than that and check what a load balancer and an operator
//! see: `/healthz` still answers at once, a publish is still installed,
//! the daemon's descriptors stay bounded, and the server closes every
//! connection that does not send a request in time.
//!
//! Every wait has a limit.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod cmd;
    pub mod deb;
    pub mod dpkg;
    pub mod gpg;
    pub mod node;
    pub mod repo;
}

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::deb::{DebSpec, build_deb};
use common::gpg::GpgKey;
use common::node::Node;
use common::repo::{HandRepo, ReleaseFields};
use pulldeploy::health::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS};

/// Upper bound for one wait: the daemon's start, an install.
const LIMIT: Duration = Duration::from_secs(30);

/// The soft RLIMIT_NOFILE of a process started by a stock shell or by
/// systemd without LimitNOFILE=.
const STOCK_NOFILE: u64 = 1024;

/// Connections that connect and then send nothing.
const SILENT: usize = 1100;

/// Connections that send one keep-alive request and then sit idle.
const KEEP_ALIVE: usize = 100;

/// Slack on top of the server's timeouts for a loaded test host.
const SLACK: Duration = Duration::from_secs(3);

// ---- The node and its repository -------------------------------------------

struct Setup {
    key: GpgKey,
    repo: HandRepo,
    debs: tempfile::TempDir,
    node: Node,
}

/// A node for `myapp` whose repository already has myapp 1.0.
fn setup() -> Setup {
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let mut repo = HandRepo::new();
    let debs = tempfile::tempdir().expect("debs tempdir");
    repo.add_deb(&build_deb(debs.path(), &DebSpec::new("myapp", "1.0")));
    repo.publish(&key, &ReleaseFields::default());
    let node = Node::new(
        &format!("url = {:?}", repo.url()),
        &key.public_key,
        &["myapp"],
        "",
    );
    Setup {
        key,
        repo,
        debs,
        node,
    }
}

impl Setup {
    /// Adds myapp `version` to the repository and signs a new Release.
    fn publish(&mut self, version: &str) {
        let deb = build_deb(self.debs.path(), &DebSpec::new("myapp", version));
        self.repo.add_deb(&deb);
        self.repo.publish(&self.key, &ReleaseFields::default());
    }
}

/// Polls `done` every 20 ms until it holds or `limit` passes.
fn within(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---- File descriptor limits ------------------------------------------------

/// Raises this test process's soft RLIMIT_NOFILE to at least `wanted`, so
/// that it can hold the attacking connections itself.
fn raise_own_nofile(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit),
            0,
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
        if limit.rlim_cur >= wanted {
            return;
        }
        assert!(
            limit.rlim_max >= wanted,
            "this test holds {wanted} sockets, but the hard RLIMIT_NOFILE is {}",
            limit.rlim_max
        );
        limit.rlim_cur = wanted;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
            0,
            "setrlimit(RLIMIT_NOFILE, {wanted}): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Number of open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

// ---- The daemon ------------------------------------------------------------

/// `pulldeploy run` in its own process group with a soft RLIMIT_NOFILE of
/// [`STOCK_NOFILE`]; stderr read line by line; the group is killed on drop.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Daemon {
    fn start(node: &Node) -> Daemon {
        let mut command = node.command(&["run"]);
        command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: the closure only calls getrlimit/setrlimit, which are
        // async-signal-safe, and allocates nothing.
        unsafe {
            command.pre_exec(|| {
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                limit.rlim_cur = STOCK_NOFILE.min(limit.rlim_max);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawn pulldeploy run");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            lines,
            log: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it logged so far.
    fn log(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        self.log.join("\n")
    }

    /// The first line containing `needle`, within [`LIMIT`].
    fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(line) = self.log.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {needle:?} in the daemon's log within {LIMIT:?}:\n{}",
                self.log.join("\n")
            );
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) => self.log.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "the daemon exited before logging {needle:?}:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// The port of "serving /healthz addr=127.0.0.1:PORT".
    fn health_port(&mut self) -> u16 {
        let line = self.wait_for_line("serving /healthz");
        line.rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group our unreaped child leads.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

// ---- Clients ---------------------------------------------------------------

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Up to `count` TCP connections to the health port, sending nothing. The
/// handshake is the kernel's: it completes while the listen backlog has
/// room, whether the server accepts or not. A server that has stopped
/// accepting fills its backlog; then a connect times out, and this stops
/// there: the error says how far it got.
fn connect_many(port: u16, count: usize) -> (Vec<TcpStream>, Option<String>) {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        match TcpStream::connect_timeout(&addr(port), Duration::from_secs(2)) {
            Ok(stream) => streams.push(stream),
            Err(e) => {
                let error = format!(
                    "connection {} of {count} to the health port failed: {e}",
                    streams.len() + 1
                );
                return (streams, Some(error));
            }
        }
    }
    (streams, None)
}

/// Reads one HTTP/1.1 response (head and Content-Length body) from
/// `stream` before `deadline`; returns its status code.
fn read_response(stream: &mut TcpStream, deadline: Instant) -> Result<u16, String> {
    let mut raw = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).into_owned();
            let length: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + length {
                return head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("bad status line in {head:?}"));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no whole response in time (got {} bytes)",
                raw.len()
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buffer) {
            Ok(0) => return Err(format!("closed after {} bytes", raw.len())),
            Ok(n) => raw.extend_from_slice(&buffer[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A keep-alive `GET /healthz` on `stream` (HTTP/1.1 keeps the connection).
fn send_healthz(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

/// A fresh connection, `GET /healthz`, the response: its status and how
/// long it took, or what went wrong within `limit`.
fn timed_healthz(port: u16, limit: Duration) -> (Result<u16, String>, Duration) {
    let start = Instant::now();
    let result = TcpStream::connect_timeout(&addr(port), limit)
        .map_err(|e| format!("connect: {e}"))
        .and_then(|mut stream| {
            send_healthz(&mut stream).map_err(|e| format!("send: {e}"))?;
            read_response(&mut stream, start + limit)
        });
    (result, start.elapsed())
}

/// Whether the server has closed `stream`: a read that returns end of file
/// or an error (a reset), rather than "nothing yet". Bytes the server
/// sends first (an error response) are read past.
fn closed_by_server(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut reader = stream;
    let mut buffer = [0u8; 4096];
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// How many of `streams` the server has not closed.
fn still_open(streams: &[TcpStream]) -> usize {
    streams.iter().filter(|s| !closed_by_server(s)).count()
}

// ---- Tests -----------------------------------------------------------------

/// The reported defect: 1,100 silent connections and 100 idle keep-alive
/// clients against a daemon with the stock descriptor limit. A fresh
/// `/healthz` must still answer within 1 s, a publish must still be
/// installed, the daemon must stay far below its descriptor limit, and the
/// server must have closed every one of those connections once the
/// header-read timeout has passed.
///
/// Everything that goes wrong is collected and reported at the end, so a
/// failure shows the whole picture (the daemon's log included).
#[test]
fn health_port_flood_does_not_take_the_node_out() {
    raise_own_nofile(4 * (SILENT + KEEP_ALIVE) as u64);
    let mut s = setup();
    let mut daemon = Daemon::start(&s.node);
    let port = daemon.health_port();
    assert!(
        within(LIMIT, || s.node.installed("myapp").as_deref()
            == Some("1.0")),
        "myapp 1.0 was not installed within {LIMIT:?}:\n{}",
        daemon.log()
    );
    assert!(
        within(LIMIT, || timed_healthz(port, Duration::from_secs(2)).0
            == Ok(200)),
        "/healthz did not turn 200 after the install:\n{}",
        daemon.log()
    );
    let idle_fds = open_fds(daemon.pid());

    let mut failures: Vec<String> = Vec::new();
    let mut max_fds = idle_fds;
    let (mut attack, error) = connect_many(port, SILENT);
    failures.extend(error);
    let (mut keep_alive, error) = connect_many(port, KEEP_ALIVE);
    failures.extend(error);
    for stream in &mut keep_alive {
        if let Err(e) = send_healthz(stream) {
            failures.push(format!(
                "a keep-alive client could not send its request: {e}"
            ));
        }
    }
    let flooded = Instant::now();

    // What the load balancer sees while all of them are held.
    let (answer, took) = timed_healthz(port, Duration::from_secs(2));
    if answer != Ok(200) || took >= Duration::from_secs(1) {
        failures.push(format!(
            "a fresh /healthz during the flood: {answer:?} after {took:?} (wanted 200 within 1 s)"
        ));
    }
    max_fds = max_fds.max(open_fds(daemon.pid()));

    // Clients that sent a request got their answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    let unanswered: Vec<String> = keep_alive
        .iter_mut()
        .filter_map(|stream| read_response(stream, deadline).err())
        .collect();
    if !unanswered.is_empty() {
        failures.push(format!(
            "{} of {KEEP_ALIVE} keep-alive requests were not answered, e.g. {:?}",
            unanswered.len(),
            unanswered[0]
        ));
    }
    let answered = Instant::now();

    // A publish is installed while every connection is still held.
    s.publish("2.0");
    let published = Instant::now();
    let installed = within(LIMIT, || {
        max_fds = max_fds.max(open_fds(daemon.pid()));
        s.node.installed("myapp").as_deref() == Some("2.0")
    });
    if !installed {
        failures.push(format!(
            "myapp 2.0 was not installed within {LIMIT:?} of its publish (dpkg has {:?})",
            s.node.installed("myapp")
        ));
    } else {
        eprintln!(
            "myapp 2.0 installed {:?} after its publish, {:?} into the flood",
            published.elapsed(),
            flooded.elapsed()
        );
    }

    // The health server holds at most MAX_CONNECTIONS of them; a cycle
    // needs a few dozen descriptors more (dpkg's pipes, cache files).
    let fd_bound = idle_fds + MAX_CONNECTIONS + 64;
    eprintln!(
        "fresh /healthz during the flood: {answer:?} in {took:?}; daemon descriptors: \
         {idle_fds} idle, at most {max_fds} during the flood"
    );
    if max_fds > fd_bound {
        failures.push(format!(
            "the daemon had {max_fds} descriptors open (idle: {idle_fds}; bound \
             {fd_bound}, limit {STOCK_NOFILE})"
        ));
    }

    // Nobody sent a (further) request in time: the server closes them all.
    let all: &mut Vec<TcpStream> = &mut attack;
    all.append(&mut keep_alive);
    let close_limit =
        (answered + HEADER_READ_TIMEOUT + SLACK).saturating_duration_since(Instant::now());
    let all_closed = within(close_limit, || still_open(all) == 0);
    eprintln!(
        "{} of {} connections still open {:?} after the last request",
        still_open(all),
        all.len(),
        answered.elapsed()
    );
    if !all_closed {
        failures.push(format!(
            "{} of {} idle connections were still open {:?} after the last request \
             (header-read timeout {HEADER_READ_TIMEOUT:?})",
            still_open(all),
            all.len(),
            answered.elapsed()
        ));
    }

    // And the node is still in service afterwards.
    let (answer, took) = timed_healthz(port, Duration::from_secs(2));
    if answer.is_err() || took >= Duration::from_secs(1) {
        failures.push(format!(
            "a fresh /healthz after the flood: {answer:?} after {took:?}"
        ));
    }

    // Warnings about it come throttled, not a line per connection.
    let log = daemon.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("health server"))
        .collect();
    eprintln!("the health server logged:\n{}", warnings.join("\n"));
    if warnings.len() > 5 {
        failures.push(format!(
            "{} log lines from the health server: its warnings must be rate-limited",
            warnings.len()
        ));
    }
    assert!(
        failures.is_empty(),
        "the health port flood took the node out:\n- {}\n\nthe daemon's log (last 40 lines):\n{}",
        failures.join("\n- "),
        log.lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A keep-alive connection can be used again while it is fresh, and is
/// closed by the server once it has been idle for the header-read timeout;
/// so is a connection that sends nothing and one that trickles a header a
/// line at a time (the timeout bounds the whole request head, not the gap
/// between two bytes).
#[test]
fn idle_keepalive_connections_are_closed() {
    let s = setup();
    let mut daemon = Daemon::start(&s.node);
    let port = daemon.health_port();

    let deadline = Instant::now() + LIMIT;
    let (mut keep_alive, error) = connect_many(port, 10);
    assert_eq!(error, None);
    for stream in &mut keep_alive {
        send_healthz(stream).expect("send a keep-alive request");
        let status = read_response(stream, deadline)
            .unwrap_or_else(|e| panic!("keep-alive request: {e}\n{}", daemon.log()));
        assert!(status == 200 || status == 503, "/healthz answered {status}");
    }
    let (silent, error) = connect_many(port, 10);
    assert_eq!(error, None);
    let (mut trickle, error) = connect_many(port, 1);
    assert_eq!(error, None);
    let mut trickle = trickle.remove(0);
    trickle
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .expect("start a request head");
    let opened = Instant::now();

    // Reused within the idle window: still served (keep-alive works).
    thread::sleep(Duration::from_secs(1));
    send_healthz(&mut keep_alive[0]).expect("second request on a kept-alive connection");
    read_response(&mut keep_alive[0], Instant::now() + Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("second request on a kept-alive connection: {e}"));
    let reused = Instant::now();
    assert_eq!(
        still_open(&silent),
        silent.len(),
        "silent connections must not be closed before the header-read timeout ({:?} in)",
        opened.elapsed()
    );

    // The trickler keeps sending a header line every 200 ms; the server
    // closes it anyway once the head has taken HEADER_READ_TIMEOUT.
    let mut trickle_closed = None;
    let bound = HEADER_READ_TIMEOUT + SLACK;
    while trickle_closed.is_none() && opened.elapsed() < bound {
        if trickle.write_all(b"X-Slow: 1\r\n").is_err() || closed_by_server(&trickle) {
            trickle_closed = Some(opened.elapsed());
        }
        let _ = trickle.set_nonblocking(false);
        thread::sleep(Duration::from_millis(200));
    }
    let trickle_closed = trickle_closed.unwrap_or_else(|| {
        panic!(
            "a request head trickled a line every 200 ms was still open after {bound:?}\n{}",
            daemon.log()
        )
    });
    assert!(
        trickle_closed >= HEADER_READ_TIMEOUT - Duration::from_millis(500),
        "the trickling request was closed after {trickle_closed:?}, before the \
         header-read timeout {HEADER_READ_TIMEOUT:?}"
    );

    let idle: Vec<TcpStream> = keep_alive.into_iter().chain(silent).collect();
    let close_limit =
        (reused + HEADER_READ_TIMEOUT + SLACK).saturating_duration_since(Instant::now());
    assert!(
        within(close_limit, || still_open(&idle) == 0),
        "{} of {} idle connections still open {:?} after the last request \
         (header-read timeout {HEADER_READ_TIMEOUT:?})\n{}",
        still_open(&idle),
        idle.len(),
        reused.elapsed(),
        daemon.log()
    );

    // The server still answers new clients.
    let (answer, took) = timed_healthz(port, Duration::from_secs(2));
    assert!(
        matches!(answer, Ok(200 | 503)) && took < Duration::from_secs(1),
        "/healthz after the idle connections were closed: {answer:?} after {took:?}"
    );
}
