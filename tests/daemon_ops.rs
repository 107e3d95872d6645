//! Operating the daemon on a node: systemd readiness and watchdog
//! notifications, SIGHUP reload without dropping the health server,
//! /metrics, log formats, and the packaging helpers (completions, man page).

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod cmd;
    pub mod deb;
    pub mod dpkg;
    pub mod gpg;
    pub mod http;
    pub mod node;
    pub mod repo;
}

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::deb::{DebSpec, build_deb};
use common::gpg::GpgKey;
use common::node::Node;
use common::repo::{HandRepo, ReleaseFields};

struct Setup {
    key: GpgKey,
    repo: HandRepo,
    _debs: tempfile::TempDir,
}

fn setup() -> Setup {
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let mut repo = HandRepo::new();
    let debs = tempfile::tempdir().expect("tempdir");
    repo.add_deb(&build_deb(debs.path(), &DebSpec::new("myapp", "1.0")));
    repo.add_deb(&build_deb(debs.path(), &DebSpec::new("helper", "2.0")));
    repo.publish(
        &key,
        &ReleaseFields {
            valid_until: Some(chrono::Utc::now() + chrono::Duration::days(7)),
            ..ReleaseFields::default()
        },
    );
    Setup {
        key,
        repo,
        _debs: debs,
    }
}

/// Lines of the daemon's stderr, read on a thread.
struct Log {
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Log {
    fn of(child: &mut std::process::Child) -> Log {
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Log {
            lines,
            seen: Vec::new(),
        }
    }

    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
        }
        panic!(
            "no {needle:?} in the daemon's log:\n{}",
            self.seen.join("\n")
        );
    }
}

fn port_of(line: &str) -> u16 {
    line.rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("port in the log line")
}

fn get(port: u16, path: &str) -> (u16, String) {
    let response = common::http::http_request(port, "GET", path, &[], &[]);
    (response.status, response.text())
}

fn signal(child: &std::process::Child, signal: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

#[test]
fn systemd_notify_ready_and_watchdog() {
    let s = setup();
    let node = Node::new(
        &format!("url = {:?}", s.repo.url()),
        &s.key.public_key,
        &["myapp"],
        "",
    );
    let socket_path = node.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let node = node.with_env(vec![
        ("NOTIFY_SOCKET".into(), socket_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "1000000".into()),
    ]);
    let mut child = node.spawn_run();
    let mut log = Log::of(&mut child);
    let port = port_of(&log.wait_for("serving /healthz"));

    let mut messages = Vec::new();
    let mut buffer = [0u8; 256];
    while !(messages.iter().any(|m| m == "READY=1")
        && messages.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2)
    {
        let n = socket
            .recv(&mut buffer)
            .expect("a notification within 10 s");
        messages.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
    }
    // READY comes after the health server listens.
    assert_eq!(get(port, "/healthz").0 / 100, 2, "ready means serving");
    signal(&child, libc::SIGTERM);
    assert!(child.wait().expect("wait").success());
    let n = socket.recv(&mut buffer).expect("STOPPING");
    let mut rest = vec![String::from_utf8_lossy(&buffer[..n]).into_owned()];
    while let Ok(n) = socket.recv(&mut buffer) {
        rest.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
        if rest.last().is_some_and(|m| m == "STOPPING=1") {
            break;
        }
    }
    assert!(rest.iter().any(|m| m == "STOPPING=1"), "{rest:?}");
}

#[test]
fn sighup_reloads_config_and_keeps_serving() {
    let s = setup();
    let node = Node::new(
        &format!("url = {:?}", s.repo.url()),
        &s.key.public_key,
        &["myapp"],
        "",
    );
    let mut child = node.spawn_run();
    let mut log = Log::of(&mut child);
    let port = port_of(&log.wait_for("serving /healthz"));
    log.wait_for("installed and healthy package=myapp");
    assert_eq!(get(port, "/healthz").0, 200);

    // A broken config is refused; the running one stays.
    let good = std::fs::read_to_string(&node.config).expect("config");
    std::fs::write(&node.config, good.replace("[agent]", "[agent]\nbogus = 1")).expect("config");
    signal(&child, libc::SIGHUP);
    log.wait_for("reload failed");
    assert_eq!(get(port, "/healthz").0, 200);

    // A good one with another package takes effect without a restart, on
    // the same health server.
    std::fs::write(
        &node.config,
        good.replace(
            "packages = [\"myapp\"]",
            "packages = [\"myapp\", \"helper\"]",
        ),
    )
    .expect("config");
    signal(&child, libc::SIGHUP);
    log.wait_for("configuration reloaded");
    log.wait_for("installed and healthy package=helper");
    let (status, body) = get(port, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"helper\": \"2.0\""), "{body}");

    // Metrics, scraped from the running daemon.
    let (status, metrics) = get(port, "/metrics");
    assert_eq!(status, 200);
    for expected in [
        "pulldeploy_package_info{package=\"myapp\",version=\"1.0\"} 1",
        "pulldeploy_package_info{package=\"helper\",version=\"2.0\"} 1",
        "# TYPE pulldeploy_cycles_total counter",
        "pulldeploy_last_success_timestamp_seconds ",
        "pulldeploy_release_valid_until_seconds ",
        "pulldeploy_cycle_duration_seconds_count ",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected:?} missing from\n{metrics}"
        );
    }
    let valid_for: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pulldeploy_release_valid_until_seconds "))
        .and_then(|v| v.parse().ok())
        .expect("valid-until sample");
    assert!(
        (6.9 * 86400.0..7.0 * 86400.0).contains(&valid_for),
        "{valid_for}"
    );
    signal(&child, libc::SIGTERM);
    assert!(child.wait().expect("wait").success());
}

#[test]
fn log_formats_fit_journald_and_json() {
    let s = setup();
    let node = Node::new(
        &format!("url = {:?}", s.repo.url()),
        &s.key.public_key,
        &["myapp"],
        "",
    );
    let out = node
        .command(&["--log-format", "json", "once"])
        .output()
        .expect("once");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let installed = stderr
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON: {l}: {e}"))
        })
        .find(|v| v["message"] == "installed and healthy")
        .expect("an 'installed and healthy' event");
    assert_eq!(installed["level"], "INFO");
    assert_eq!(installed["package"], "myapp");
    assert_eq!(installed["to"], "1.0");

    // Under journald (JOURNAL_STREAM set) text lines carry no timestamp.
    let out = node.command(&["status"]).output().expect("status");
    assert!(out.status.success());
    std::fs::remove_dir_all(node.dir.path().join("state")).expect("reset state");
    common::cmd::assert_success(
        &node
            .root
            .dpkg()
            .args(["--purge", "myapp"])
            .output()
            .expect("purge"),
        "purge",
    );
    let out = node
        .command(&["once"])
        .env("JOURNAL_STREAM", "8:12345")
        .output()
        .expect("once");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("installed and healthy"))
        .expect("log line");
    assert!(line.trim_start().starts_with("INFO"), "{line}");
}

#[test]
fn version_completions_and_man_page_come_from_the_cli() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pulldeploy"))
            .args(args)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        run(&["--version"]).trim(),
        format!("pulldeploy {}", env!("CARGO_PKG_VERSION"))
    );
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("_pulldeploy()") && bash.contains("check-config"),
        "{bash}"
    );
    assert!(run(&["completions", "zsh"]).contains("#compdef pulldeploy"));
    assert!(run(&["completions", "fish"]).contains("complete -c pulldeploy"));
    let man = run(&["manpage"]);
    assert!(
        man.contains(".TH pulldeploy") && man.contains("check\\-config"),
        "{man}"
    );
}
