//! Fleet rollouts end to end: several `pulldeploy run` nodes (distinct node
//! ids, real dpkg sandboxes) on one repository and one fleet prefix in
//! moto's S3, driven by the real `publish`, `rollout` and `fleet` commands.
//!
//! Waves are seconds long here. Every timing check compares times the
//! nodes recorded (state.json's installed_at, the start the publisher
//! stamped in rollout.toml, a postinst's own clock), never how long the
//! test waited, so a loaded machine makes the tests slower, not flaky.

mod common {
    pub mod app;
    pub mod cmd;
    pub mod dpkg;
    #[allow(dead_code, reason = "this binary only fails the fleet prefix")]
    pub mod faulty;
    // The package builder, the runners and the waits only: the rest of
    // the install fixture is other binaries' (and their lint's) business.
    #[allow(dead_code, reason = "this binary uses a part of the install fixture")]
    pub mod fixture;
    pub mod gpg;
    pub mod http;
    #[allow(dead_code, reason = "needed by the faulty proxy, not used here")]
    pub mod imds;
    pub mod moto;
    pub mod moto_iam;
    pub mod node;
    #[allow(dead_code, reason = "needed by the install fixture, not used here")]
    pub mod repo;
    #[allow(dead_code, reason = "this binary only records what nodes send")]
    pub mod webhook;
}

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::app::App;
use common::cmd::{host_path, under_faketime};
use common::faulty::{Fault, FaultyProxy};
use common::fixture::{Pkg, Running, build, dpkg_log, healthz, pkg, wait_for};
use common::gpg::GpgKey;
use common::moto::{Moto, static_aws_env};
use common::moto_iam::{enforce_iam, iam_user};
use common::node::Node;
use common::webhook::{Answer, Webhook};
use pulldeploy::rollout::{Policy, position};

const BUCKET: &str = "acme-apt";
const SUITE: &str = "production";
/// Generous: the suite runs with the machine loaded.
const LIMIT: Duration = Duration::from_secs(120);

/// moto's S3 holding the repository (`repo/`) and the fleet prefix
/// (`fleet/`), the publisher's key, and the .debs built for the test.
struct Rig {
    moto: Moto,
    /// The publisher's access key (moto's default until IAM is enforced).
    keys: (String, String),
    key: GpgKey,
    debs: tempfile::TempDir,
    home: tempfile::TempDir,
}

#[track_caller]
fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Rig {
    fn new() -> Rig {
        let moto = Moto::start();
        moto.create_bucket(BUCKET);
        Rig {
            moto,
            keys: ("test".into(), "test".into()),
            key: GpgKey::generate("Acme Repository <repo@acme.test>"),
            debs: tempfile::tempdir().expect("debs dir"),
            home: tempfile::tempdir().expect("home dir"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pulldeploy"));
        command
            .env_clear()
            .env("PATH", host_path())
            .env("HOME", self.home.path())
            .env("PULLDEPLOY_LOG", "warn")
            .envs(static_aws_env())
            .env("AWS_ACCESS_KEY_ID", &self.keys.0)
            .env("AWS_SECRET_ACCESS_KEY", &self.keys.1)
            .args(args)
            .args(["--endpoint", &self.moto.endpoint, "--region", "us-east-1"])
            .stdin(Stdio::null());
        command
    }

    /// `pulldeploy SUBCOMMAND... --repo --suite --signing-key` + `args`.
    fn repo_command(&self, subcommand: &[&str], args: &[&str]) -> Output {
        self.repo_command_line(subcommand, args)
            .output()
            .expect("run pulldeploy")
    }

    fn repo_command_line(&self, subcommand: &[&str], args: &[&str]) -> Command {
        let repo = format!("s3://{BUCKET}/repo");
        let key = self.key.secret_key.to_string_lossy().into_owned();
        let mut all: Vec<&str> = subcommand.to_vec();
        all.extend(["--repo", &repo, "--suite", SUITE, "--signing-key", &key]);
        all.extend(args);
        self.command(&all)
    }

    fn publish(&self, packages: &[Pkg]) {
        let dir = self
            .debs
            .path()
            .join(hex::encode(common::cmd::random_bytes(4)));
        let debs: Vec<PathBuf> = packages.iter().map(|p| build(&dir, p)).collect();
        let debs: Vec<&str> = debs
            .iter()
            .map(|d| d.to_str().expect("UTF-8 path"))
            .collect();
        assert_ok(&self.repo_command(&["publish"], &debs), "publish");
    }

    fn rollout(&self, args: &[&str]) -> String {
        let out = self.repo_command(&["rollout", args[0]], &args[1..]);
        assert_ok(&out, &format!("rollout {}", args.join(" ")))
    }

    /// The signed policy as published.
    fn policy(&self) -> Policy {
        let bytes = self
            .moto
            .get_object(BUCKET, &format!("repo/dists/{SUITE}/rollout.toml"))
            .expect("rollout.toml published");
        Policy::parse(&String::from_utf8(bytes).expect("UTF-8")).expect("policy parses")
    }

    fn started(&self, version: &str) -> DateTime<Utc> {
        self.policy()
            .started("myapp", version)
            .unwrap_or_else(|| panic!("no start time for myapp {version}"))
    }

    /// A node following myapp; `fleet`: with `[fleet] url` (else only its
    /// node id, so the signed policy still places it in a wave).
    fn node(&self, id: &str, fleet: bool, health: &str) -> Node {
        self.node_following(&["myapp"], id, fleet, health)
    }

    fn node_following(&self, packages: &[&str], id: &str, fleet: bool, health: &str) -> Node {
        self.node_at(&self.moto.endpoint, packages, id, fleet, health)
    }

    /// A node reaching S3 (repository and fleet prefix) at `endpoint`.
    fn node_at(
        &self,
        endpoint: &str,
        packages: &[&str],
        id: &str,
        fleet: bool,
        health: &str,
    ) -> Node {
        let repository = format!(
            "url = \"s3://{BUCKET}/repo\"\nendpoint = {endpoint:?}\nregion = \"us-east-1\""
        );
        let url = match fleet {
            true => format!("url = \"s3://{BUCKET}/fleet\"\n"),
            false => String::new(),
        };
        let extra = format!("{health}\n[fleet]\n{url}node_id = {id:?}\nreport_interval = \"2s\"\n");
        let key = &self.key.public_key;
        Node::new(&repository, key, packages, &extra).with_env(static_aws_env())
    }

    fn fleet_status(&self) -> serde_json::Value {
        let fleet = format!("s3://{BUCKET}/fleet");
        let out = self
            .command(&[
                "fleet", "status", "--fleet", &fleet, "--suite", SUITE, "--json",
            ])
            .output()
            .expect("run fleet status");
        serde_json::from_str(&assert_ok(&out, "fleet status")).expect("fleet status JSON")
    }
}

/// Node ids whose positions fall in [low, high) for each range: ids of
/// the form `PREFIX-N`, found by search (positions are a hash).
fn ids_in(prefix: &str, ranges: &[(f64, f64)]) -> Vec<String> {
    ranges
        .iter()
        .map(|(low, high)| {
            (0..10_000)
                .map(|n| format!("{prefix}-{n}"))
                .find(|id| (*low..*high).contains(&position(id)))
                .expect("an id in range")
        })
        .collect()
}

fn run(node: &Node) -> Running {
    Running::start(node.command(&["run"]))
}

/// Runs `nodes` until each has committed 1.0 and serves (/healthz 200):
/// the daemons and their health ports.
fn serve(nodes: &[Node]) -> (Vec<Running>, Vec<u16>) {
    let mut running: Vec<Running> = nodes.iter().map(run).collect();
    let ports: Vec<u16> = running.iter_mut().map(Running::health_port).collect();
    for node in nodes {
        wait_installed(node, "1.0");
    }
    for port in &ports {
        wait_for("/healthz 200", LIMIT, || healthz(*port).0 == 200);
    }
    (running, ports)
}

fn committed(node: &Node) -> Option<(String, DateTime<Utc>)> {
    let state = node.state();
    let p = state.installed.get("myapp")?;
    Some((p.version.clone(), p.installed_at?))
}

#[track_caller]
fn wait_installed(node: &Node, version: &str) -> DateTime<Utc> {
    let mut at = None;
    wait_for(&format!("myapp {version} committed"), LIMIT, || {
        at = committed(node)
            .filter(|(v, _)| v == version)
            .map(|(_, t)| t);
        at.is_some()
    });
    at.unwrap_or_default()
}

/// Versions dpkg was asked to install on `node` (the targets of its
/// dpkg.log's `install` and `upgrade` lines), in order: an attempt shows
/// even when its maintainer script failed.
fn attempted_versions(node: &Node) -> Vec<String> {
    let mut versions = Vec::new();
    for line in dpkg_log(node) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [_, _, "install" | "upgrade", package, _, version] = words[..]
            && package.starts_with("myapp:")
        {
            versions.push(version.to_string());
        }
    }
    versions
}

/// The value of the sample `name` (no labels) in a Prometheus text page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

#[test]
fn waves_install_in_order_and_a_fresh_node_follows_its_wave() {
    let rig = Rig::new();
    rig.publish(&[pkg("myapp", "1.0")]);
    // Positions: wave 1 below 34%, wave 2 below 67%, wave 3 the rest.
    let ids = ids_in("n", &[(0.0, 0.30), (0.40, 0.60), (0.75, 1.0), (0.80, 1.0)]);
    // The wave-2 node has no fleet url: it follows the signed policy alone.
    let nodes = [
        rig.node(&ids[0], true, ""),
        rig.node(&ids[1], false, ""),
        rig.node(&ids[2], true, ""),
    ];
    let mut running: Vec<Running> = nodes.iter().map(run).collect();
    for node in &nodes {
        wait_installed(node, "1.0");
    }

    rig.rollout(&["set", "--waves", "34%@0s,67%@10s,100%@20s"]);
    rig.publish(&[pkg("myapp", "1.1")]);
    let start = rig.started("1.1");
    // The last wave's node says on /metrics where it stands and that it
    // waits for its wave.
    let port = running[2].health_port();
    let mut metrics = String::new();
    wait_for("waiting for the wave on /metrics", LIMIT, || {
        metrics = common::http::http_request(port, "GET", "/metrics", &[], &[]).text();
        metric(&metrics, "pulldeploy_rollout_waiting_for_wave") == Some(1.0)
            || committed(&nodes[2]).is_some_and(|(v, _)| v == "1.1")
    });
    // (Unless the machine was so slow that the wave came first.)
    if metric(&metrics, "pulldeploy_rollout_waiting_for_wave") == Some(1.0) {
        let figures = [
            metric(&metrics, "pulldeploy_rollout_wave"),
            metric(&metrics, "pulldeploy_rollout_waiting_for_lease"),
            metric(&metrics, "pulldeploy_rollout_wave_position"),
        ];
        assert_eq!(
            figures,
            [Some(3.0), Some(0.0), Some(position(&ids[2]))],
            "{metrics}"
        );
    }
    // A node that boots now, in the last wave, installs what its wave has.
    let fresh = rig.node(&ids[3], true, "");
    let _fresh = run(&fresh);

    let times: Vec<DateTime<Utc>> = nodes.iter().map(|n| wait_installed(n, "1.1")).collect();
    let fresh_time = wait_installed(&fresh, "1.1");
    assert!(
        times[0] >= start,
        "wave 1 before the start: {times:?} {start}"
    );
    assert!(
        times[1] >= start + secs(10),
        "wave 2 early: {} < {start} + 10s",
        times[1]
    );
    assert!(
        times[2] >= start + secs(20),
        "wave 3 early: {} < {start} + 20s",
        times[2]
    );
    assert!(
        fresh_time >= start + secs(20),
        "fresh wave-3 node early: {fresh_time}"
    );
    assert!(times[0] <= times[1] && times[1] <= times[2], "{times:?}");
    assert_eq!(
        attempted_versions(&fresh),
        ["1.0", "1.1"],
        "the fresh node's first install is its wave's version"
    );

    // The fleet view matches what dpkg has: three reporting nodes on 1.1
    // (the node without a fleet url reports nothing).
    wait_for("reports of 1.1", LIMIT, || {
        let status = rig.fleet_status();
        let on: Vec<String> = status["packages"]["myapp"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["version"] == "1.1")
            .flat_map(|v| v["nodes"].as_array().cloned().unwrap_or_default())
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect();
        let mut expected = vec![ids[0].clone(), ids[2].clone(), ids[3].clone()];
        expected.sort();
        let mut on = on;
        on.sort();
        on == expected
    });
    let status = rig.fleet_status();
    let reporting = [
        (&ids[0], &nodes[0]),
        (&ids[2], &nodes[2]),
        (&ids[3], &fresh),
    ];
    for report in status["nodes"].as_array().expect("nodes") {
        let id = report["node_id"].as_str().expect("node id");
        let (_, node) = reporting
            .iter()
            .find(|(node_id, _)| node_id.as_str() == id)
            .unwrap_or_else(|| panic!("a report from an unknown node {id}"));
        assert_eq!(
            report["installed"]["myapp"].as_str(),
            node.installed("myapp").as_deref(),
            "{id}"
        );
    }
}

/// A node of a late wave whose clock runs 2 h ahead (libfaketime) does not
/// install before its signed delay: wave times go by the repository's
/// clock, which the node learns from the Date headers of moto's answers.
/// The install's time is taken by its postinst from the real clock (out
/// of libfaketime's reach), against the start the publisher stamped. The
/// node shows the offset in `status` and on /metrics.
#[test]
fn node_clock_ahead() {
    const DELAY: i64 = 40;
    let rig = Rig::new();
    let log = tempfile::NamedTempFile::new().expect("postinst log");
    let log_path = log.path().to_string_lossy().into_owned();
    rig.publish(&[pkg("myapp", "1.0")]);
    let id = &ids_in("late", &[(0.6, 1.0)])[0];
    let node = rig.node(id, true, "");
    let mut daemon = Running::start(under_faketime(&node.command(&["run"]), &["-f", "+2h"]));
    let port = daemon.health_port();
    wait_installed(&node, "1.0");

    rig.rollout(&["set", "--waves", &format!("50%@0s,100%@{DELAY}s")]);
    let postinst = format!("env -u LD_PRELOAD -u FAKETIME date +%s.%N > {log_path}\n");
    rig.publish(&[pkg("myapp", "1.1").postinst(&postinst)]);
    let start = rig.started("1.1");
    wait_installed(&node, "1.1");
    let text = std::fs::read_to_string(log.path()).expect("postinst log");
    let installed: f64 = text.trim().parse().expect("postinst time");
    let earliest = (start + secs(DELAY)).timestamp_millis() as f64 / 1000.0;
    assert!(
        installed >= earliest,
        "installed {:.1} s before its wave (start {start}, delay {DELAY} s)",
        earliest - installed
    );

    let near_two_hours = |seconds: f64| (seconds - 7200.0).abs() < 60.0;
    let page = common::http::http_request(port, "GET", "/metrics", &[], &[]).text();
    let gauge = metric(&page, "pulldeploy_clock_offset_seconds");
    assert!(gauge.is_some_and(near_two_hours), "{gauge:?}\n{page}");
    let out = node
        .command(&["status", "--json"])
        .output()
        .expect("status");
    let status: serde_json::Value =
        serde_json::from_str(&assert_ok(&out, "status --json")).expect("status JSON");
    let offset = status["clock_offset"].as_f64();
    assert!(offset.is_some_and(near_two_hours), "{status}");
    let out = node.command(&["status"]).output().expect("status");
    let text = assert_ok(&out, "status");
    assert!(
        text.contains("clock offset: this node +72") && text.contains("check time sync"),
        "{text}"
    );
    // Said once in the log, not at every poll.
    daemon.drain_lines();
    let warnings = daemon
        .log
        .iter()
        .filter(|l| l.contains("check time sync"))
        .count();
    assert_eq!(warnings, 1, "{:#?}", daemon.log);
}

#[test]
fn one_in_flight_drains_one_serving_node_at_a_time() {
    let rig = Rig::new();
    let log = tempfile::NamedTempFile::new().expect("postinst log");
    let log_path = log.path().to_string_lossy().into_owned();
    rig.publish(&[pkg("myapp", "1.0")]);
    let ids = ["f-0", "f-1", "f-2"];
    let nodes: Vec<Node> = ids
        .iter()
        .map(|id| rig.node(id, true, "drain = \"1s\""))
        .collect();
    let (_running, ports) = serve(&nodes);

    rig.rollout(&["set", "--max-in-flight", "1"]);
    // Each install is long enough to overlap with another's if the lease
    // did not keep them apart: 1 s of drain and 1 s of postinst.
    let postinst = format!(
        "echo \"start $(date +%s.%N)\" >> {log_path}\nsleep 1\necho \"end $(date +%s.%N)\" >> {log_path}\n"
    );
    rig.publish(&[pkg("myapp", "1.1").postinst(&postinst)]);

    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        let ports = ports.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                let draining = ports.iter().filter(|p| healthz(**p).0 == 503).count();
                most = most.max(draining);
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        })
    };
    for node in &nodes {
        wait_installed(node, "1.1");
    }
    done.store(true, Ordering::Relaxed);
    let most_draining = sampler.join().expect("sampler");
    assert!(
        most_draining <= 1,
        "{most_draining} nodes answered 503 at once"
    );

    // The postinsts ran one after the other.
    let text = std::fs::read_to_string(log.path()).expect("postinst log");
    let mut spans: Vec<(f64, f64)> = Vec::new();
    let mut open = None;
    for line in text.lines() {
        let (what, t) = line.split_once(' ').expect("log line");
        let t: f64 = t.parse().expect("time");
        match what {
            "start" => open = Some(t),
            _ => spans.push((open.take().expect("start before end"), t)),
        }
    }
    assert_eq!(spans.len(), 3, "{text}");
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "installs overlapped: {text}");
    }
    // Every lease was given back.
    wait_for("no lease held", LIMIT, || {
        rig.fleet_status()["leases"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
}

#[test]
fn a_bad_version_is_tried_by_the_first_wave_and_then_by_nobody() {
    let rig = Rig::new();
    rig.publish(&[pkg("myapp", "1.0")]);
    let ids = ids_in("h", &[(0.0, 0.30), (0.40, 0.60), (0.75, 1.0)]);
    // Every node tells one chat about rollbacks and halts.
    let hook = Webhook::start(Answer::Ok);
    let notify = format!(
        "[notify]\nwebhook = {:?}\nevents = [\"rollback\", \"halt\"]\n",
        hook.url()
    );
    let nodes: Vec<Node> = ids.iter().map(|id| rig.node(id, true, &notify)).collect();
    let _running: Vec<Running> = nodes.iter().map(run).collect();
    for node in &nodes {
        wait_installed(node, "1.0");
    }
    rig.rollout(&[
        "set",
        "--waves",
        "34%@0s,67%@4s,100%@8s",
        "--max-in-flight",
        "1",
    ]);
    rig.publish(&[pkg("myapp", "1.1").postinst("echo 'broken release' >&2\nexit 1\n")]);
    let start = rig.started("1.1");

    // Wave 1 tries it, fails, rolls back and halts it.
    wait_for("the halt marker", LIMIT, || {
        rig.fleet_status()["halted"]
            .as_array()
            .is_some_and(|h| h.iter().any(|m| m["version"] == "1.1"))
    });
    // The later waves reach their time, read the marker and stay.
    for node in &nodes[1..] {
        wait_for("the halt seen", LIMIT, || {
            node.state()
                .waiting
                .is_some_and(|w| w.reason.contains("halted: myapp 1.1"))
        });
    }
    assert!(Utc::now() >= start + secs(8));
    assert!(attempted_versions(&nodes[0]).contains(&"1.1".to_string()));
    for node in &nodes {
        assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
    }
    for node in &nodes[1..] {
        // The halt was read before anything was downloaded.
        let cached = node.cache_files();
        assert!(!cached.iter().any(|f| f.contains("_1.1_")), "{cached:?}");
        assert_eq!(
            attempted_versions(node),
            ["1.0"],
            "a later wave ran dpkg on 1.1"
        );
    }
    // The chat heard of it twice, from the wave-1 node by its fleet id:
    // the rollback and the halt.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let on = format!("on {} ({}) (suite {SUITE}): ", ids[0], host.trim());
    let received = hook.wait_for_requests(2, LIMIT);
    let mut texts: Vec<String> = received.iter().map(|r| r.text()).collect();
    texts.sort();
    assert_eq!(texts.len(), 2, "{texts:#?}");
    assert!(
        texts[0].starts_with(&format!(
            "pulldeploy halt {on}myapp 1.1 halted for the fleet: "
        )) && texts[0].contains(
            "post-installation script subprocess returned error exit status 1; before that: broken release"
        ),
        "{texts:#?}"
    );
    assert!(
        texts[1].starts_with(&format!(
            "pulldeploy rollback {on}myapp 1.0 to 1.1 failed: "
        )),
        "{texts:#?}"
    );

    // The fix: a newer version goes out; unhalting is for the record.
    rig.publish(&[pkg("myapp", "1.2")]);
    for node in &nodes {
        wait_installed(node, "1.2");
    }
    let fleet = format!("s3://{BUCKET}/fleet");
    let out = rig
        .command(&[
            "fleet",
            "unhalt",
            "myapp=1.1",
            "--fleet",
            &fleet,
            "--suite",
            SUITE,
        ])
        .output()
        .expect("run fleet unhalt");
    assert_ok(&out, "fleet unhalt");
    assert!(
        rig.fleet_status()["halted"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
}

/// Two serving nodes in one wave, one install in flight, an app behind
/// `check_url` (`healthy_after = 3`). The node that takes the lease
/// installs 1.1, whose postinst fails once the other node is seen waiting
/// for the lease (a hold the test lets go of, so the order does not rest
/// on timing); it rolls back, health-gated, halts 1.1 and gives the lease
/// back. The waiting node then takes the lease with a plan verified before
/// the halt: the check under the lease must stop it, and the lease must
/// be held through the whole install, rollback and gate, so it never
/// drains while the other does.
#[test]
fn a_node_waiting_for_the_lease_never_runs_the_version_its_holder_halted() {
    let rig = Rig::new();
    let gate = tempfile::tempdir().expect("gate dir");
    let release = gate.path().join("release");
    rig.publish(&[pkg("myapp", "1.0")]);
    let health =
        "drain = \"1s\"\nhealthy_after = 3\ncheck_interval = \"1s\"\nhealth_timeout = \"60s\"";
    let nodes: Vec<Node> = ["l-0", "l-1"]
        .iter()
        .map(|id| rig.node(id, true, health))
        .collect();
    let _apps: Vec<App> = nodes.iter().map(|n| App::start(n, |_, _| 200)).collect();
    let (_running, ports) = serve(&nodes);

    rig.rollout(&["set", "--max-in-flight", "1"]);
    // Fails once the test lets it (at most a minute later).
    let postinst = format!(
        "touch \"$DPKG_ROOT/bad-postinst-started\"\n\
         i=0\n\
         while [ ! -e {release:?} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done\n\
         echo 'broken release' >&2\nexit 1\n"
    );
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        let ports = ports.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                let draining = ports.iter().filter(|p| healthz(**p).0 == 503).count();
                most = most.max(draining);
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        })
    };
    rig.publish(&[pkg("myapp", "1.1").postinst(&postinst)]);

    // One node holds the lease and is in 1.1's postinst; the other waits.
    let mut holder = None;
    wait_for("a node in 1.1's postinst", LIMIT, || {
        holder = nodes
            .iter()
            .position(|n| n.root.path.join("bad-postinst-started").exists());
        holder.is_some()
    });
    let holder = holder.unwrap_or_default();
    let waiter = 1 - holder;
    wait_for("the other node waiting for the lease", LIMIT, || {
        nodes[waiter]
            .state()
            .waiting
            .is_some_and(|w| w.for_lease && w.reason.starts_with("lease: myapp 1.1"))
    });
    std::fs::write(&release, b"").expect("let the postinst fail");

    // The holder rolls back and halts 1.1; the waiter then takes the lease,
    // or runs dpkg on 1.1 (which the assertions below refuse).
    wait_for(
        "the waiter to see the halt, or to run dpkg on 1.1",
        LIMIT,
        || {
            attempted_versions(&nodes[waiter]).contains(&"1.1".to_string())
                || nodes[waiter]
                    .state()
                    .waiting
                    .is_some_and(|w| w.reason.contains("halted: myapp 1.1"))
        },
    );
    assert_eq!(
        attempted_versions(&nodes[waiter]),
        ["1.0"],
        "the node that waited for the lease ran dpkg on the version its holder halted"
    );
    assert!(attempted_versions(&nodes[holder]).contains(&"1.1".to_string()));
    let halted = rig.fleet_status()["halted"].clone();
    assert_eq!(
        halted[0]["node"].as_str(),
        Some(["l-0", "l-1"][holder]),
        "{halted}"
    );
    wait_for("no lease held", LIMIT, || {
        rig.fleet_status()["leases"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    done.store(true, Ordering::Relaxed);
    let most_draining = sampler.join().expect("sampler");
    assert!(
        most_draining <= 1,
        "{most_draining} nodes answered 503 at once"
    );
    for node in &nodes {
        assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
    }
}

#[test]
fn pause_resume_pin_and_unpin_move_the_fleet() {
    let rig = Rig::new();
    rig.publish(&[pkg("myapp", "1.0")]);
    let nodes: Vec<Node> = ["p-1", "p-2"]
        .iter()
        .map(|id| rig.node(id, true, ""))
        .collect();
    let _running: Vec<Running> = nodes.iter().map(run).collect();
    for node in &nodes {
        wait_installed(node, "1.0");
    }

    let said = rig.rollout(&["pause"]);
    assert!(said.contains("paused"), "{said}");
    assert!(rig.rollout(&["show"]).contains("paused"));
    rig.publish(&[pkg("myapp", "1.1")]);
    let date = rig.started("1.1");
    // Both nodes read the new suite (its Date is the start of 1.1) and stay.
    for node in &nodes {
        wait_for("the paused suite accepted", LIMIT, || {
            node.state().release.is_some_and(|r| r.date >= date)
        });
    }
    std::thread::sleep(Duration::from_secs(3));
    for node in &nodes {
        assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
    }

    rig.rollout(&["resume"]);
    for node in &nodes {
        wait_installed(node, "1.1");
    }

    // A signed fleet rollback, then forward again.
    let said = rig.rollout(&["pin", "myapp=1.0"]);
    assert!(said.contains("pinned myapp to 1.0"), "{said}");
    assert!(
        rig.rollout(&["show"])
            .contains("every wave on 1.0 (pinned)")
    );
    for node in &nodes {
        wait_installed(node, "1.0");
    }
    rig.rollout(&["unpin", "myapp"]);
    for node in &nodes {
        wait_installed(node, "1.1");
    }
    // Pinning to a version the suite does not have is refused (65).
    let out = rig.repo_command(&["rollout", "pin"], &["myapp=9.9"]);
    assert_eq!(out.status.code(), Some(65), "{out:?}");
}

/// A pause freezes the schedule: a version published while paused goes
/// nowhere, not even to a fresh node of the first wave (delay 0s), until
/// the resume; then the waves go on in order, and the paused time counts
/// toward no wave's delay.
#[test]
fn paused_then_published() {
    let rig = Rig::new();
    rig.publish(&[pkg("myapp", "1.0")]);
    rig.rollout(&["set", "--waves", "50%@0s,100%@10s"]);
    // Serving nodes in waves 1 and 2; a fresh wave-1 node comes later.
    let ids = ids_in("pp", &[(0.0, 0.2), (0.6, 1.0), (0.2, 0.4)]);
    let serving = [rig.node(&ids[0], true, ""), rig.node(&ids[1], false, "")];
    let _running: Vec<Running> = serving.iter().map(run).collect();
    for node in &serving {
        wait_installed(node, "1.0");
    }

    let said = rig.rollout(&["pause"]);
    assert!(said.contains("paused"), "{said}");
    rig.publish(&[pkg("myapp", "1.1")]);
    let published = rig.started("1.1");
    let fresh = rig.node(&ids[2], true, "");
    let _fresh = run(&fresh);
    let all = [&serving[0], &serving[1], &fresh];
    // Every node read the suite that has 1.1 (its Date is 1.1's start)...
    for node in all {
        wait_for("the paused suite with 1.1 accepted", LIMIT, || {
            node.state().release.is_some_and(|r| r.date >= published)
        });
    }
    // ...and the fresh node installed what wave 1 had when the pause began.
    assert_eq!(
        attempted_versions(&fresh),
        ["1.0"],
        "the fresh wave-1 node installed a version published while paused"
    );
    let show = rig.rollout(&["show"]);
    assert!(
        show.contains("wave 1 (50%@0s): 1.0; 1.1 held by the pause"),
        "{show}"
    );
    // Paused for longer than wave 2's delay, the nodes polling all along:
    // still nothing new anywhere.
    wait_for("the pause outlasts wave 2's delay", LIMIT, || {
        Utc::now() > published + secs(12)
    });
    for node in all {
        assert_eq!(attempted_versions(node), ["1.0"], "installed while paused");
    }
    for node in &serving {
        let waiting = node.state().waiting.map(|w| w.reason);
        assert!(
            waiting
                .as_deref()
                .is_some_and(|w| w.contains("paused: myapp")),
            "{waiting:?}"
        );
    }

    rig.rollout(&["resume"]);
    // 1.1 was published while paused: its rollout starts at the resume.
    let resumed = rig.started("1.1");
    assert!(
        resumed >= published + secs(12),
        "1.1's start did not move past the pause: {resumed} (published {published})"
    );
    let times: Vec<DateTime<Utc>> = all.iter().map(|n| wait_installed(n, "1.1")).collect();
    assert!(times[0] >= resumed, "wave 1 before the resume: {times:?}");
    assert!(
        times[2] >= resumed,
        "fresh node before the resume: {times:?}"
    );
    assert!(
        times[1] >= resumed + secs(10),
        "wave 2's delay was spent paused: {} < {resumed} + 10s",
        times[1]
    );
    for node in all {
        assert_eq!(attempted_versions(node), ["1.0", "1.1"]);
    }
}

#[test]
fn rollout_changes_racing_publishes_lose_nothing() {
    let rig = Rig::new();
    rig.publish(&[pkg("myapp", "1.0")]);
    let dir = rig.debs.path().join("race");
    // Three publishes and three policy changes, all started at once: each
    // is a signed re-publish of the whole suite, so every one must wait
    // for the others' flips and build on their result.
    let mut commands: Vec<(String, Command)> = Vec::new();
    for (name, version) in [("svc-a", "1.0"), ("svc-b", "2.0"), ("myapp", "1.1")] {
        let deb = build(&dir, &pkg(name, version));
        let deb = deb.to_str().expect("UTF-8 path");
        commands.push((
            format!("publish {name} {version}"),
            rig.repo_command_line(&["publish"], &[deb]),
        ));
    }
    let changes: [&[&str]; 3] = [
        &["set", "--waves", "10%@0s,100%@1h", "--max-in-flight", "2"],
        &["pause"],
        &["pin", "myapp=1.0"],
    ];
    for change in changes {
        commands.push((
            format!("rollout {}", change.join(" ")),
            rig.repo_command_line(&["rollout", change[0]], &change[1..]),
        ));
    }
    let children: Vec<(String, std::process::Child)> = commands
        .into_iter()
        .map(|(what, mut command)| {
            let child = command
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn pulldeploy");
            (what, child)
        })
        .collect();
    for (what, child) in children {
        assert_ok(
            &child.wait_with_output().expect("wait for pulldeploy"),
            &what,
        );
    }

    // Every change is in the signed policy...
    let policy = rig.policy();
    assert!(policy.paused, "the pause was lost");
    assert_eq!(policy.max_in_flight, Some(2), "the limit was lost");
    assert_eq!(policy.waves.len(), 2, "the waves were lost");
    assert_eq!(policy.pin("myapp"), Some("1.0"), "the pin was lost");
    // ...every published version is in the suite with its start time...
    for (name, version) in [
        ("myapp", "1.0"),
        ("svc-a", "1.0"),
        ("svc-b", "2.0"),
        ("myapp", "1.1"),
    ] {
        assert!(
            policy.started(name, version).is_some(),
            "{name} {version} has no start time"
        );
    }
    let packages = String::from_utf8(
        rig.moto
            .get_object(
                BUCKET,
                &format!("repo/dists/{SUITE}/main/binary-amd64/Packages"),
            )
            .expect("Packages"),
    )
    .expect("UTF-8");
    let mut listed: Vec<(&str, &str)> = packages
        .split("\n\n")
        .filter_map(|stanza| {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            };
            Some((field("Package")?, field("Version")?))
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("myapp", "1.0"),
            ("myapp", "1.1"),
            ("svc-a", "1.0"),
            ("svc-b", "2.0")
        ]
    );
    // ...and a node accepts the result: once resumed (a service published
    // after the pause goes nowhere until then), a fresh node in the first
    // wave installs the pinned myapp and the new services.
    rig.rollout(&["resume"]);
    let id = &ids_in("r", &[(0.0, 0.10)])[0];
    let node = rig.node_following(&["myapp", "svc-a", "svc-b"], id, false, "");
    assert_ok(&node.once(), "a fresh node after the race");
    assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
    assert_eq!(node.installed("svc-a").as_deref(), Some("1.0"));
    assert_eq!(node.installed("svc-b").as_deref(), Some("2.0"));
}

#[test]
fn a_policy_changed_without_signing_is_refused() {
    let rig = Rig::new();
    rig.publish(&[pkg("myapp", "1.0")]);
    let node = rig.node("t-1", false, "");
    assert_ok(&node.once(), "first once");
    let before = node.state();
    rig.publish(&[pkg("myapp", "1.1")]);

    // Pause the fleet behind the publisher's back: the canonical file and
    // the by-hash copy the Release names.
    let policy_key = format!("repo/dists/{SUITE}/rollout.toml");
    let text = String::from_utf8(rig.moto.get_object(BUCKET, &policy_key).expect("policy"))
        .expect("UTF-8");
    let forged = text.replace("paused = false", "paused = true");
    assert_ne!(forged, text);
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()));
    let by_hash = format!("repo/dists/{SUITE}/by-hash/SHA256/{hash}");
    assert!(rig.moto.get_object(BUCKET, &by_hash).is_some(), "{by_hash}");
    rig.moto.put_object(BUCKET, &by_hash, forged.as_bytes());
    rig.moto.put_object(BUCKET, &policy_key, forged.as_bytes());

    let out = node.once();
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rollout.toml"), "{stderr}");
    let after = node.state();
    assert_eq!(after.release, before.release, "the accepted Release moved");
    assert_eq!(after.installed, before.installed);
    assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
}

#[test]
fn a_node_without_write_access_follows_the_signed_policy_and_says_so_once() {
    let mut rig = Rig::new();
    let bucket = format!("arn:aws:s3:::{BUCKET}");
    let publisher = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:*","Resource":["{bucket}","{bucket}/*"]}}]}}"#
    );
    // Read-only: the repository and the fleet prefix, nothing written.
    let reader = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":["s3:GetObject","s3:ListBucket"],"Resource":["{bucket}","{bucket}/*"]}}]}}"#
    );
    rig.keys = iam_user(&rig.moto, "publisher", &publisher);
    let (id, secret) = iam_user(&rig.moto, "node", &reader);
    enforce_iam(&rig.moto);

    rig.publish(&[pkg("myapp", "1.0")]);
    rig.rollout(&["set", "--max-in-flight", "1", "--waves", "50%@0s,100%@2s"]);
    let node = rig.node("r-1", true, "").with_env(vec![
        ("AWS_ACCESS_KEY_ID".into(), id),
        ("AWS_SECRET_ACCESS_KEY".into(), secret),
    ]);
    let mut running = run(&node);
    wait_installed(&node, "1.0");
    // Serving now: 1.1 would need a lease it cannot write.
    rig.publish(&[pkg("myapp", "1.1")]);
    wait_installed(&node, "1.1");
    // A few more cycles (reports due every 2 s), then count the warnings.
    std::thread::sleep(Duration::from_secs(5));
    running.drain_lines();
    let warnings = running
        .log
        .iter()
        .filter(|l| l.contains("no write access to the fleet prefix"))
        .count();
    assert_eq!(warnings, 1, "{}", running.log.join("\n"));
    // And it wrote nothing: no report, no lease. (Listed with IAM lifted
    // again: moto's SigV4 check refuses some signed List requests.)
    let lifted = common::http::http_request(
        rig.moto.port,
        "POST",
        "/moto-api/reset-auth",
        &[],
        b"1000000",
    );
    assert_eq!(lifted.status, 200, "{}", lifted.text());
    assert_eq!(rig.moto.list_keys(BUCKET, "fleet/"), Vec::<String>::new());
}

/// Samples every node's /healthz until stopped: the most nodes that
/// answered 503 (draining) at once.
struct DrainSampler {
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl DrainSampler {
    fn start(ports: &[u16]) -> DrainSampler {
        let done = Arc::new(AtomicBool::new(false));
        let (stop, ports) = (done.clone(), ports.to_vec());
        let thread = std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(Ordering::Relaxed) {
                let draining = ports.iter().filter(|p| healthz(**p).0 == 503).count();
                most = most.max(draining);
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        });
        DrainSampler { done, thread }
    }

    fn most_draining(self) -> usize {
        self.done.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler")
    }
}

/// A postinst that stamps its start and end into `log` and takes 1 s.
fn timed_postinst(log: &std::path::Path) -> String {
    let log = log.display();
    format!(
        "echo \"start $(date +%s.%N)\" >> {log}\nsleep 1\necho \"end $(date +%s.%N)\" >> {log}\n"
    )
}

/// Asserts that the postinsts stamped in `log` ran one after the other,
/// `count` of them.
#[track_caller]
fn assert_one_at_a_time(log: &std::path::Path, count: usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut spans: Vec<(f64, f64)> = Vec::new();
    let mut open = None;
    for line in text.lines() {
        let (what, t) = line.split_once(' ').expect("log line");
        let t: f64 = t.parse().expect("time");
        match what {
            "start" => open = Some(t),
            _ => spans.push((open.take().expect("start before end"), t)),
        }
    }
    assert_eq!(spans.len(), count, "{text}");
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "installs overlapped: {text}");
    }
}

#[test]
fn lease_slot_garbage_any_size() {
    let rig = Rig::new();
    let logs = tempfile::tempdir().expect("postinst logs");
    rig.publish(&[pkg("myapp", "1.0")]);
    let ids = ["g-0", "g-1", "g-2"];
    let nodes: Vec<Node> = ids
        .iter()
        .map(|id| rig.node(id, true, "drain = \"1s\""))
        .collect();
    let (mut running, ports) = serve(&nodes);
    rig.rollout(&["set", "--max-in-flight", "1"]);
    let live = format!(
        "Owner: g-9\nAcquired: {}\nExpires: {}\n",
        Utc::now().to_rfc3339(),
        (Utc::now() + secs(600)).to_rfc3339()
    );
    let truncated = live.as_bytes()[..live.len() - 20].to_vec();
    let slot = "fleet/production/leases/0";
    for (version, garbage) in [
        ("1.1", vec![b'x'; 8 * 1024]),
        ("1.2", vec![0xff; 2 << 20]),
        ("1.3", truncated),
    ] {
        // Garbage in the only slot while every node serves.
        rig.moto.put_object(BUCKET, slot, &garbage);
        let log = logs.path().join(version);
        let sampler = DrainSampler::start(&ports);
        rig.publish(&[pkg("myapp", version).postinst(&timed_postinst(&log))]);
        for node in &nodes {
            wait_installed(node, version);
        }
        let most = sampler.most_draining();
        assert!(most <= 1, "{version}: {most} nodes answered 503 at once");
        assert_one_at_a_time(&log, nodes.len());
        // The garbage was broken (by its ETag) and every lease given back.
        wait_for("no lease held", LIMIT, || {
            rig.fleet_status()["leases"]
                .as_array()
                .is_some_and(Vec::is_empty)
        });
        assert_eq!(rig.moto.get_object(BUCKET, slot), None, "{version}");
    }
    let mut broken = 0;
    for node in &mut running {
        node.drain_lines();
        broken += node
            .log
            .iter()
            .filter(|l| l.contains("broke an expired lease"))
            .count();
    }
    // The two objects too large to be a lease broken unread, the truncated
    // one (no Expires) as expired: one break each, nothing else broken.
    assert_eq!(broken, 3, "one break per garbage object");
}

/// (status, S3 error code) answered for the fleet prefix's objects.
fn fleet_fault(status: u16, code: &'static str) -> Fault {
    Fault::Error {
        status,
        code,
        message: "injected by the test",
    }
}

#[test]
fn fleet_store_5xx_or_timeout() {
    let rig = Rig::new();
    let proxy = FaultyProxy::start(rig.moto.port);
    let logs = tempfile::tempdir().expect("postinst logs");
    rig.publish(&[pkg("myapp", "1.0")]);
    rig.rollout(&["set", "--max-in-flight", "1"]);
    let node = |id: &str| rig.node_at(&proxy.endpoint, &["myapp"], id, true, "drain = \"1s\"");
    let serving = [node("s-0"), node("s-1")];
    let mut running: Vec<Running> = serving.iter().map(run).collect();
    let ports: Vec<u16> = running.iter_mut().map(Running::health_port).collect();
    for node in &serving {
        wait_installed(node, "1.0");
    }
    let before: Vec<Vec<String>> = serving.iter().map(dpkg_log).collect();

    // The repository works; the fleet prefix fails: its halt markers with
    // 500, its leases with 503 SlowDown.
    proxy.inject("/halted/", fleet_fault(500, "InternalError"), None);
    proxy.inject("leases", Fault::slow_down(), None);
    let log = logs.path().join("1.1");
    let sampler = DrainSampler::start(&ports);
    rig.publish(&[pkg("myapp", "1.1").postinst(&timed_postinst(&log))]);
    let waits_for = |node: &Node, why: &str| {
        wait_for(why, LIMIT, || {
            node.state().waiting.is_some_and(|w| w.reason.contains(why))
        });
    };
    for node in &serving {
        waits_for(node, "fleet: halt markers unreadable");
    }
    // A fresh node drains nobody: it installs with the fleet store down.
    let fresh = node("f-0");
    let _fresh = run(&fresh);
    wait_installed(&fresh, "1.1");

    // Halt markers readable again, leases not: the serving nodes still wait.
    proxy.clear_path("/halted/");
    for node in &serving {
        waits_for(node, "fleet: no in-flight lease");
        let out = node.command(&["status"]).output().expect("status");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("rollout: waiting: fleet: no in-flight lease"),
            "{text}"
        );
    }
    for (node, before) in serving.iter().zip(&before) {
        assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
        assert_eq!(&dpkg_log(node), before, "dpkg ran while the fleet was down");
    }
    assert_eq!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count(),
        2,
        "only the fresh node installed"
    );

    // The fleet store hangs: every lease request's answer stalls after its
    // headers (a byte every 10 s). The serving nodes still wait.
    proxy.clear_path("leases");
    proxy.inject(
        "leases",
        Fault::Trickle {
            every: Duration::from_secs(10),
        },
        None,
    );
    // Each node's lease listing fails by the SDK's stalled-stream
    // protection (no byte for 5 s) and the node waits for the next poll.
    for node in &serving {
        waits_for(node, "fleet: no in-flight lease");
        wait_for("the stalled lease request given up", LIMIT, || {
            node.state()
                .waiting
                .is_some_and(|w| w.reason.contains("throughput"))
        });
    }
    for (node, before) in serving.iter().zip(&before) {
        assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
        assert_eq!(&dpkg_log(node), before, "dpkg ran while the fleet hung");
    }

    // The faults stop: one at a time, everyone converges.
    proxy.clear();
    for node in &serving {
        wait_installed(node, "1.1");
    }
    let most = sampler.most_draining();
    assert!(most <= 1, "{most} nodes answered 503 at once");
    assert_one_at_a_time(&log, 3);
}

#[test]
fn duplicate_node_id() {
    let rig = Rig::new();
    let logs = tempfile::tempdir().expect("postinst logs");
    rig.publish(&[pkg("myapp", "1.0")]);
    let hook = Webhook::start(Answer::Ok);
    let extra = format!(
        "drain = \"1s\"\n[notify]\nwebhook = {:?}\nevents = [\"duplicate_id\"]\n",
        hook.url()
    );
    // Two nodes configured with one id (a copied config) in the first
    // wave, so that they meet each other's lease first; a third node in
    // the second.
    let ids = ids_in("dup", &[(0.0, 0.5), (0.5, 1.0)]);
    let (dup, other) = (ids[0].as_str(), ids[1].as_str());
    let nodes = [
        rig.node(dup, true, &extra),
        rig.node(dup, true, &extra),
        rig.node(other, true, &extra),
    ];
    let (mut running, ports) = serve(&nodes);
    rig.rollout(&["set", "--max-in-flight", "1", "--waves", "50%@0s,100%@6s"]);
    // Slow enough that two installs would overlap if both took the lease.
    let log = logs.path().join("1.1");
    let postinst = format!("sleep 2\n{}", timed_postinst(&log));
    let sampler = DrainSampler::start(&ports);
    rig.publish(&[pkg("myapp", "1.1").postinst(&postinst)]);
    for node in &nodes {
        wait_installed(node, "1.1");
    }
    let most = sampler.most_draining();
    assert!(most <= 1, "{most} nodes answered 503 at once");
    assert_one_at_a_time(&log, 3);

    // Both say so: log, status, /metrics; the third does not.
    for (n, (node, running)) in nodes.iter().zip(&mut running).enumerate() {
        let duplicate = n < 2;
        let port = ports[n];
        let gauge = if duplicate { 1.0 } else { 0.0 };
        wait_for("the duplicate id on /metrics", LIMIT, || {
            let page = common::http::http_request(port, "GET", "/metrics", &[], &[]).text();
            metric(&page, "pulldeploy_fleet_duplicate_node_id") == Some(gauge)
        });
        let out = node.command(&["status"]).output().expect("status");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            text.contains("DUPLICATE NODE ID"),
            duplicate,
            "node {n}: {text}"
        );
        running.drain_lines();
        let warned = running
            .log
            .iter()
            .any(|l| l.contains("two nodes use this node id"));
        assert_eq!(warned, duplicate, "node {n}: {}", running.log.join("\n"));
    }
    // fleet status flags the id (text and JSON).
    wait_for("fleet status flags the id", LIMIT, || {
        rig.fleet_status()["duplicate_node_ids"] == serde_json::json!([dup])
    });
    let fleet = format!("s3://{BUCKET}/fleet");
    let out = rig
        .command(&["fleet", "status", "--fleet", &fleet, "--suite", SUITE])
        .output()
        .expect("run fleet status");
    assert!(
        assert_ok(&out, "fleet status").contains(&format!("DUPLICATE NODE ID {dup}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // And the webhook was told, by the duplicates only.
    let received = hook.wait_for_requests(2, LIMIT);
    for request in &received {
        let text = request.text();
        assert!(text.contains("two nodes use one fleet node id"), "{text}");
        assert!(!text.contains(other), "{text}");
    }
}
