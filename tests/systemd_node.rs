//! The agent's .deb under a real systemd (issue 12, items 1 and 2): a
//! minimal Debian booted with systemd as PID 1 in systemd-nspawn
//! (tests/common/nspawn.rs; the root file system is debootstrapped once and
//! cached by scripts/nspawn-root.sh), the package installed with dpkg, and
//! the unit as shipped, with only a test drop-in that shortens its timers.
//!
//! One container serves the node checks in sequence: READY only after the
//! config loaded and /healthz listens; the app installed and /healthz 200;
//! `systemctl reload` on an image without procps; STATUS= in `systemctl
//! status`; a stalled agent (SIGSTOP) killed and restarted by the watchdog;
//! `systemctl stop` during a slow postinst, which outlasts TimeoutStopSec
//! because the agent asks for more time (EXTEND_TIMEOUT_USEC), leaving dpkg
//! consistent and the install committed; and a self-update, where the agent
//! installs a newer pulldeploy .deb, its postinst queues a restart, and
//! systemd starts the new binary. A second, fresh container runs
//! examples/user-data.sh from a file:// repository and ends with the agent
//! running and the app healthy.
//!
//! Where containers cannot run (not root, no systemd-nspawn or debootstrap,
//! no permission), each test says so on stderr and skips.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod agent_deb;
    pub mod cmd;
    pub mod gpg;
    pub mod http;
    pub mod nspawn;
}

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::agent_deb::{BIN, binary_version};
use common::cmd::{describe_output, host_path, output_with_input, run};
use common::gpg::GpgKey;
use common::http::{http_request, parse_http_response};
use common::nspawn::{Container, skip};
use serde_json::Value;

const UNIT: &str = "pulldeploy.service";
/// Where the repository is inside the container (`file:///srv/apt`).
const REPO: &str = "/srv/apt";
/// The test's drop-in: the watchdog fires after 20 s without a ping (the
/// agent pings every 10 s: a loaded machine has 10 s to spare), a restart
/// comes 1 s after a failure, a stop may take 10 s unless the agent asks for
/// more, and no core dumps.
const DROP_IN: &str =
    "[Service]\nWatchdogSec=20s\nRestartSec=1s\nTimeoutStopSec=10s\nLimitCORE=0\n";
/// Generous: other builds may be loading the machine.
const LIMIT: Duration = Duration::from_secs(180);
/// How long the slow postinst of myapp 1.1 sleeps: well past TimeoutStopSec.
const SLOW_POSTINST_SECS: u64 = 25;

fn source(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Progress on the test's output, uncaptured, so a slow run shows where it is.
fn step(what: &str) {
    let _ = writeln!(std::io::stderr().lock(), "systemd_node: {what}");
}

/// The agent's .deb under its own version or `version`.
fn agent_deb(version: Option<&str>) -> PathBuf {
    common::agent_deb::build("systemd_node", version)
}

fn own_deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| agent_deb(None))
}

/// This machine's (and the container's) dpkg architecture.
fn architecture() -> String {
    let out = run(
        Command::new("dpkg").arg("--print-architecture"),
        "dpkg --print-architecture",
    );
    text(&out.stdout).trim().to_string()
}

/// Two different free ports on 127.0.0.1 (the container shares the host's
/// network): both held open while the second is picked.
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("a free port");
    let (first, second) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("local address").port();
    (port(&first), port(&second))
}

/// GET http://127.0.0.1:PORT/PATH: status and body, or None while nothing
/// answers.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let response = parse_http_response(&raw).ok()?;
    Some((response.status, response.text()))
}

/// Polls `check` every 250 ms until it holds; panics with `what` and the
/// container's view after `LIMIT`.
#[track_caller]
fn wait_until(node: &Container, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !check() {
        if Instant::now() > deadline {
            panic!(
                "{what}: not within {LIMIT:?}\n--- systemctl status ---\n{}\n--- journal ---\n{}",
                text(
                    &node
                        .exec(&["systemctl", "status", "--no-pager", UNIT])
                        .stdout
                ),
                node.journal(UNIT)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The app: a package with a systemd unit serving /health with busybox
/// httpd on 127.0.0.1:`port` (the body names the version). Its postinst
/// writes /var/lib/myapp/postinst-VERSION when it starts, then sleeps
/// `postinst_sleep` seconds, then (re)starts the service. Only a first
/// install reloads systemd and enables the unit: a daemon-reload during a
/// stop re-arms the stop timeout from the start of the stop and forgets
/// the agent's extensions (see TimeoutStopSec in the unit), and the stop
/// check below is about the extensions.
fn app_deb(dir: &Path, version: &str, port: u16, postinst_sleep: u64) -> PathBuf {
    let tree = dir.join(format!("myapp-{version}"));
    for sub in ["DEBIAN", "lib/systemd/system", "usr/share/myapp/www"] {
        fs::create_dir_all(tree.join(sub)).expect("mkdir package tree");
    }
    let write = |path: &str, contents: String, mode: u32| {
        let path = tree.join(path);
        fs::write(&path, contents).expect("write package file");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    };
    write(
        "DEBIAN/control",
        format!(
            "Package: myapp\nVersion: {version}\nArchitecture: all\nMaintainer: Test <t@example.com>\n\
             Depends: busybox\nDescription: test app for pulldeploy under systemd\n"
        ),
        0o644,
    );
    write(
        "DEBIAN/postinst",
        format!(
            "#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n\
             mkdir -p /var/lib/myapp\necho \"$$\" >/var/lib/myapp/postinst-{version}\n\
             sleep {postinst_sleep}\n\
             if [ -z \"$2\" ]; then systemctl daemon-reload; systemctl enable myapp.service; fi\n\
             systemctl restart myapp.service\nfi\n"
        ),
        0o755,
    );
    write(
        "lib/systemd/system/myapp.service",
        format!(
            "[Unit]\nDescription=test app\n[Service]\n\
             ExecStart=/bin/busybox httpd -f -p 127.0.0.1:{port} -h /usr/share/myapp/www\n\
             [Install]\nWantedBy=multi-user.target\n"
        ),
        0o644,
    );
    write(
        "usr/share/myapp/www/health",
        format!("myapp {version}\n"),
        0o644,
    );
    let deb = dir.join(format!("myapp_{version}_all.deb"));
    run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zgzip", "--build"])
            .arg(&tree)
            .arg(&deb),
        "dpkg-deb --build myapp",
    );
    deb
}

/// A node: the booted container, the repository's signing key, the ports.
struct Node {
    c: Container,
    key: GpgKey,
    health_port: u16,
    app_port: u16,
    work: tempfile::TempDir,
}

impl Node {
    fn boot(test: &str) -> Option<Node> {
        let c = match Container::boot() {
            Ok(c) => c,
            Err(reason) => {
                skip(test, &reason);
                return None;
            }
        };
        fs::create_dir_all(c.path(REPO)).expect("repository directory");
        let (health_port, app_port) = free_ports();
        Some(Node {
            c,
            key: GpgKey::generate("Acme Repository <repo@acme.test>"),
            health_port,
            app_port,
            work: tempfile::tempdir().expect("tempdir"),
        })
    }

    /// `pulldeploy publish` of `debs` to the container's /srv/apt, from the host.
    fn publish(&self, debs: &[&Path]) {
        run(
            Command::new(BIN)
                .env_clear()
                .env("PATH", host_path())
                .env("HOME", self.work.path())
                .arg("publish")
                .arg("--repo")
                .arg(format!("file://{}", self.c.path(REPO).display()))
                .args(["--suite", "production", "--architecture", &architecture()])
                .arg("--signing-key")
                .arg(&self.key.secret_key)
                .args(debs)
                .stdin(Stdio::null()),
            "pulldeploy publish",
        );
    }

    fn app(&self, version: &str, postinst_sleep: u64) -> PathBuf {
        app_deb(self.work.path(), version, self.app_port, postinst_sleep)
    }

    /// Copies `deb` into the container's /root and returns its path there.
    fn copy_in(&self, deb: &Path) -> String {
        let name = deb.file_name().expect("file name").to_string_lossy();
        fs::copy(deb, self.c.path(&format!("/root/{name}"))).expect("copy .deb into container");
        format!("/root/{name}")
    }

    fn config(&self, packages: &str) -> String {
        format!(
            "[repository]\nurl = \"file://{REPO}\"\nsuite = \"production\"\nkeyring = \"keyring.asc\"\n\n\
             [agent]\npackages = [{packages}]\ninterval = \"2s\"\njitter = \"0s\"\n\n\
             [health]\nlisten = \"127.0.0.1:{}\"\ncheck_url = \"http://127.0.0.1:{}/health\"\n\
             healthy_after = 2\ncheck_interval = \"1s\"\n",
            self.health_port, self.app_port
        )
    }

    fn write_config(&self, config: &str) {
        fs::write(self.c.path("/etc/pulldeploy/config.toml"), config).expect("write config");
    }

    fn healthz(&self) -> Option<u16> {
        get(self.health_port, "/healthz").map(|(status, _)| status)
    }

    fn app_health(&self) -> Option<String> {
        get(self.app_port, "/health")
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body.trim().to_string())
    }

    fn state(&self) -> Value {
        fs::read(self.c.path("/var/lib/pulldeploy/state.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or(Value::Null)
    }

    fn committed(&self, package: &str) -> Option<String> {
        self.state()["installed"][package]["version"]
            .as_str()
            .map(String::from)
    }

    fn main_pid(&self) -> String {
        self.c.show(UNIT, "MainPID")
    }

    /// The app at `version`: dpkg has it, the agent committed it with
    /// nothing pending, the app answers as that version, /healthz is 200.
    fn wait_app(&self, version: &str) {
        wait_until(
            &self.c,
            &format!("myapp {version} installed and healthy"),
            || {
                self.c.installed_version("myapp").as_deref() == Some(version)
                    && self.committed("myapp").as_deref() == Some(version)
                    && self.state()["pending"].is_null()
                    && self.app_health() == Some(format!("myapp {version}"))
                    && self.healthz() == Some(200)
            },
        );
    }
}

/// `systemd-analyze security`'s overall exposure for the unit, e.g. 8.2.
fn exposure(c: &Container) -> f64 {
    let out = c.exec(&["systemd-analyze", "security", "--no-pager", UNIT]);
    let report = text(&out.stdout);
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level\n{}", describe_output(&out)));
    line.split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure in {line}"))
}

#[test]
fn agent_under_systemd_ready_watchdog_stop_reload_and_self_update() {
    let Some(node) = Node::boot("agent_under_systemd_ready_watchdog_stop_reload_and_self_update")
    else {
        return;
    };
    let c = &node.c;
    let version = binary_version();

    step("installing the agent's .deb with dpkg");
    let deb = node.copy_in(own_deb());
    c.run(&["dpkg", "-i", &deb]);
    // A fresh install enables the unit and does not start it (no config yet).
    assert_eq!(c.show(UNIT, "UnitFileState"), "enabled");
    assert_eq!(c.show(UNIT, "ActiveState"), "inactive");
    assert!(
        c.exec(&["test", "-e", "/bin/kill"]).status.code() == Some(1),
        "the minimal image must not have /bin/kill (procps): the reload check would prove nothing"
    );

    let score = exposure(c);
    step(&format!("systemd-analyze security {UNIT}: {score}"));
    assert!(
        score <= 8.2,
        "exposure {score} is above 8.2: a protection was lost"
    );
    // A system service running as root gets no implied NoNewPrivileges from
    // its seccomp filter (maintainer scripts need setuid helpers).
    assert_eq!(c.show(UNIT, "NoNewPrivileges"), "no");

    fs::create_dir_all(c.path("/etc/systemd/system/pulldeploy.service.d")).expect("drop-in dir");
    fs::write(
        c.path("/etc/systemd/system/pulldeploy.service.d/test.conf"),
        DROP_IN,
    )
    .expect("drop-in");
    c.run(&["systemctl", "daemon-reload"]);
    fs::copy(&node.key.public_key, c.path("/etc/pulldeploy/keyring.asc")).expect("keyring");
    node.publish(&[&node.app("1.0", 0)]);

    step("READY only after the config loads: a bad config never becomes ready");
    node.write_config(&format!("{}\nno_such_key = 1\n", node.config("\"myapp\"")));
    let start = c.exec(&["systemctl", "start", UNIT]);
    assert!(
        !start.status.success(),
        "started with a bad config\n{}",
        describe_output(&start)
    );
    assert!(
        node.healthz().is_none(),
        "/healthz answered with a config that does not load"
    );
    c.run(&["systemctl", "stop", UNIT]);
    c.run(&["systemctl", "reset-failed", UNIT]);

    step("start: ready means /healthz listens");
    node.write_config(&node.config("\"myapp\""));
    c.run(&["systemctl", "start", UNIT]);
    assert!(
        TcpStream::connect(("127.0.0.1", node.health_port)).is_ok(),
        "systemctl start returned but /healthz does not listen"
    );
    node.wait_app("1.0");
    wait_until(c, "STATUS= shows the agent idle", || {
        c.show(UNIT, "StatusText").starts_with("idle: ")
    });
    let status = text(&c.run(&["systemctl", "status", "--no-pager", UNIT]).stdout);
    assert!(status.contains("Status: \"idle: "), "{status}");

    step("systemctl reload on an image without /bin/kill");
    let pid = node.main_pid();
    c.run(&["systemctl", "reload", UNIT]);
    wait_until(c, "the agent reloaded its config", || {
        node.c.journal(UNIT).contains("configuration reloaded")
    });
    assert_eq!(node.main_pid(), pid, "reload restarted the agent");

    step("a stalled agent (SIGSTOP) is killed by the watchdog and restarted");
    let restarts = c.show(UNIT, "NRestarts");
    c.run(&[
        "systemctl",
        "kill",
        "--kill-who=main",
        "--signal=SIGSTOP",
        UNIT,
    ]);
    wait_until(c, "the watchdog restarted the agent", || {
        c.show(UNIT, "NRestarts") != restarts
            && c.show(UNIT, "ActiveState") == "active"
            && node.main_pid() != pid
            && node.main_pid() != "0"
    });
    assert!(
        node.c.journal(UNIT).contains("Watchdog timeout"),
        "{}",
        node.c.journal(UNIT)
    );
    wait_until(c, "/healthz 200 after the restart", || {
        node.healthz() == Some(200)
    });

    step("systemctl stop during a slow postinst outlasts TimeoutStopSec and commits");
    node.publish(&[&node.app("1.1", SLOW_POSTINST_SECS)]);
    let marker = c.path("/var/lib/myapp/postinst-1.1");
    wait_until(c, "the postinst of myapp 1.1 started", || marker.exists());
    // What `systemctl status` says while dpkg runs.
    assert_eq!(c.show(UNIT, "StatusText"), "installing myapp 1.1");
    let stopping = Instant::now();
    let stop = c.exec(&["systemctl", "stop", UNIT]);
    let took = stopping.elapsed();
    step(&format!("the stop took {took:?} (TimeoutStopSec=10s)"));
    assert!(stop.status.success(), "{}", describe_output(&stop));
    let journal = c.journal(UNIT);
    assert_eq!(c.show(UNIT, "Result"), "success", "{journal}");
    assert!(!journal.contains("timed out"), "{journal}");
    assert!(
        took > Duration::from_secs(10),
        "the stop took {took:?}, not longer than TimeoutStopSec=10s: the slow postinst was not waited for"
    );
    let audit = c.run(&["dpkg", "--audit"]);
    assert!(
        audit.stdout.is_empty(),
        "dpkg --audit\n{}",
        describe_output(&audit)
    );
    assert_eq!(c.installed_version("myapp").as_deref(), Some("1.1"));
    assert_eq!(node.committed("myapp").as_deref(), Some("1.1"));
    assert!(node.state()["pending"].is_null(), "{}", node.state());

    step("self-update: a newer pulldeploy is installed and systemd runs it");
    let newer = format!("{version}+selfupdate1");
    node.publish(&[own_deb(), &agent_deb(Some(&newer))]);
    node.write_config(&node.config("\"myapp\", \"pulldeploy\""));
    c.run(&["systemctl", "start", UNIT]);
    let old_pid = node.main_pid();
    let updating = Instant::now();
    wait_until(
        c,
        "the agent updated itself and systemd runs the new one",
        || {
            let pid = node.main_pid();
            c.installed_version("pulldeploy").as_deref() == Some(newer.as_str())
            && node.committed("pulldeploy").as_deref() == Some(newer.as_str())
            && node.state()["pending"].is_null()
            && c.show(UNIT, "ActiveState") == "active"
            && pid != old_pid
            && pid != "0"
            // The process runs the file dpkg installed, not a deleted one.
            && text(&c.exec(&["readlink", &format!("/proc/{pid}/exe")]).stdout).trim()
                == "/usr/bin/pulldeploy"
        },
    );
    step(&format!(
        "pulldeploy {newer} runs as PID {} after {:?}",
        node.main_pid(),
        updating.elapsed()
    ));
    let journal = c.journal(UNIT);
    assert_eq!(c.show(UNIT, "Result"), "success", "{journal}");
    assert!(!journal.contains("timed out"), "{journal}");
    wait_until(c, "/healthz 200 from the new agent", || {
        node.healthz() == Some(200)
    });
}

#[test]
fn user_data_brings_up_a_fresh_node_under_systemd() {
    let Some(node) = Node::boot("user_data_brings_up_a_fresh_node_under_systemd") else {
        return;
    };
    let c = &node.c;
    // The repository as CI publishes it: the agent's own .deb and the app.
    node.publish(&[own_deb(), &node.app("1.0", 0)]);
    let version = binary_version();
    let pool_deb = format!(
        "pool/main/p/pulldeploy/pulldeploy_{version}_{}.deb",
        architecture()
    );
    assert!(
        c.path(REPO).join(&pool_deb).is_file(),
        "{pool_deb} not published"
    );
    let sha256 = text(&run(Command::new("sha256sum").arg(own_deb()), "sha256sum").stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string();
    let keyring = fs::read(&node.key.public_key).expect("public key");
    let keyring_b64 =
        text(&output_with_input(Command::new("base64").arg("-w0"), &keyring, "base64").stdout);
    fs::copy(
        source("examples/user-data.sh"),
        c.path("/root/user-data.sh"),
    )
    .expect("copy user-data");

    step("running examples/user-data.sh in a fresh container");
    let settings = [
        ("PULLDEPLOY_REPO_URL", format!("file://{REPO}")),
        ("PULLDEPLOY_PACKAGES", "myapp pulldeploy".to_string()),
        ("PULLDEPLOY_KEYRING_B64", keyring_b64),
        ("PULLDEPLOY_DEB", pool_deb),
        ("PULLDEPLOY_DEB_SHA256", sha256),
        (
            "PULLDEPLOY_CHECK_URL",
            format!("http://127.0.0.1:{}/health", node.app_port),
        ),
        (
            "PULLDEPLOY_HEALTH_LISTEN",
            format!("127.0.0.1:{}", node.health_port),
        ),
    ];
    let mut args = vec!["env".to_string()];
    args.extend(settings.iter().map(|(k, v)| format!("{k}={v}")));
    args.extend(["sh".to_string(), "/root/user-data.sh".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.exec(&args);
    assert!(
        out.status.success(),
        "user-data.sh\n{}",
        describe_output(&out)
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("installed pulldeploy {version}")),
        "{stdout}"
    );
    assert!(stdout.contains("pulldeploy.service is active"), "{stdout}");

    assert_eq!(c.show(UNIT, "UnitFileState"), "enabled");
    assert_eq!(c.show(UNIT, "ActiveState"), "active");
    node.wait_app("1.0");
    let healthz = http_request(node.health_port, "GET", "/healthz", &[], &[]);
    assert_eq!(healthz.status, 200, "{}", healthz.text());
    assert_eq!(c.installed_version("pulldeploy"), Some(version));
}
