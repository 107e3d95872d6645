//! EC2 Auto Scaling lifecycle hooks, end to end: the real `pulldeploy run`
//! installing into a dpkg sandbox from a signed file:// repository, asking
//! the IMDS emulator (tests/common/imds.rs) for its instance, group and
//! target lifecycle state, and completing hooks at the Auto Scaling
//! emulator (tests/common/asg.rs), which checks each request's SigV4
//! signature, action and parameters, and records what /healthz and
//! state.json said while the call was in flight.
//!
//! Waits are bounded and wait for something (a recorded call, a log line,
//! a /healthz answer), never for a fixed time.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod app;
    pub mod asg;
    pub mod cmd;
    pub mod dpkg;
    pub mod fixture;
    pub mod gpg;
    pub mod http;
    pub mod imds;
    pub mod node;
    pub mod repo;
}

use std::time::{Duration, Instant};

use common::app::App;
use common::asg::{Answer, Asg, Call};
use common::fixture::{Fixture, LIMIT, Running, fixture, healthz, hold_at, pkg, wait_for};
use common::imds::{Behaviour, INSTANCE_ID, Imds};

const GROUP: &str = "web-asg";
const LAUNCH: &str = "pulldeploy-launch";
const TERMINATE: &str = "pulldeploy-terminate";

/// A node with `[lifecycle]` lines `lifecycle` (and `health` lines), on an
/// instance in service in its group, with both emulators.
struct Instance {
    f: Fixture,
    imds: Imds,
    asg: Asg,
}

fn instance(health: &str, lifecycle: &str, imds: Behaviour) -> Instance {
    let f = fixture(&["myapp"], &format!("{health}\n[lifecycle]\n{lifecycle}\n"));
    let imds = Imds::start(Behaviour {
        target_lifecycle_state: Some("InService".into()),
        ..imds
    });
    let credentials = Behaviour::default();
    let asg = Asg::start(&credentials.access_key_id, &credentials.secret_access_key);
    Instance { f, imds, asg }
}

impl Instance {
    /// `pulldeploy run` with IMDS and Auto Scaling pointed at the
    /// emulators, and the lifecycle module's debug lines.
    fn run(&self) -> Running {
        let mut command = self.f.node.command(&["run"]);
        command
            .envs(self.imds.env(&self.f.node.home()))
            .envs(self.asg.env())
            .env("PULLDEPLOY_LOG", "info,pulldeploy::lifecycle=debug");
        Running::start(command)
    }

    /// Records, with every Auto Scaling call, /healthz's status and the
    /// committed version of myapp at that moment.
    fn observe(&self, port: u16) {
        let state_path = self.f.state_dir().join("state.json");
        self.asg.observe(move || {
            let committed = pulldeploy::state::State::load(&state_path)
                .ok()
                .and_then(|s| s.installed.get("myapp").map(|p| p.version.clone()));
            format!(
                "healthz={} committed={}",
                healthz(port).0,
                committed.as_deref().unwrap_or("-")
            )
        });
    }

    /// The first accepted CompleteLifecycleAction of `hook`.
    #[track_caller]
    fn completed(&self, hook: &str, agent: &mut Running) -> Call {
        let deadline = Instant::now() + LIMIT * 2;
        loop {
            agent.drain_lines();
            let done = self.asg.completions();
            if let Some(call) = done.iter().find(|c| c.param("LifecycleHookName") == hook) {
                return call.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{hook} was not completed; calls: {:#?}\nagent log:\n{}",
                self.asg.calls(),
                agent.log.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[track_caller]
fn assert_completion(call: &Call, hook: &str, result: &str) {
    assert_eq!(call.param("LifecycleHookName"), hook, "{call:#?}");
    assert_eq!(call.param("LifecycleActionResult"), result, "{call:#?}");
    assert_eq!(call.param("AutoScalingGroupName"), GROUP, "{call:#?}");
    assert_eq!(call.param("InstanceId"), INSTANCE_ID, "{call:#?}");
    assert_eq!(call.param("Version"), "2011-01-01", "{call:#?}");
}

fn metrics(port: u16) -> String {
    common::http::http_request(port, "GET", "/metrics", &[], &[]).text()
}

/// `pulldeploy_cycles_total`.
fn cycles(port: u16) -> u64 {
    let metrics = metrics(port);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("pulldeploy_cycles_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cycle counter in\n{metrics}"))
}

#[test]
fn launch_continues_after_the_first_healthy_commit_and_not_before() {
    // The group comes from the instance tag; the app needs a few probes
    // before it is healthy, so the launch waits (with heartbeats) through
    // the health gate.
    let mut i = instance(
        "healthy_after = 2\nhealth_timeout = \"60s\"\ncheck_interval = \"500ms\"",
        &format!("launch_hook = \"{LAUNCH}\""),
        Behaviour {
            group_tag: Some(GROUP.into()),
            ..Behaviour::default()
        },
    );
    let _app = App::start(&i.f.node, |_version, nth| if nth < 6 { 503 } else { 200 });
    i.asg.activate(GROUP, LAUNCH, INSTANCE_ID);
    i.f.publish(&[pkg("myapp", "1.0")]);
    let mut agent = i.run();
    let port = agent.health_port();
    i.observe(port);

    let call = i.completed(LAUNCH, &mut agent);
    assert_completion(&call, LAUNCH, "CONTINUE");
    assert_eq!(
        call.seen.as_deref(),
        Some("healthz=200 committed=1.0"),
        "{call:#?}"
    );
    let heartbeats: Vec<Call> = i
        .asg
        .calls()
        .into_iter()
        .filter(|c| c.action == "RecordLifecycleActionHeartbeat" && c.at < call.at)
        .collect();
    assert!(
        !heartbeats.is_empty(),
        "no heartbeat while the launch waited for the health gate: {:#?}",
        i.asg.calls()
    );
    for heartbeat in &heartbeats {
        assert_eq!(heartbeat.status, Some(200), "{heartbeat:#?}");
        assert_eq!(heartbeat.param("LifecycleHookName"), LAUNCH);
        assert_eq!(heartbeat.param("AutoScalingGroupName"), GROUP);
        assert_eq!(heartbeat.param("InstanceId"), INSTANCE_ID);
    }

    // Once: a later install does not complete the hook again.
    i.f.publish(&[pkg("myapp", "1.1")]);
    agent.wait_for_line(
        "installed and healthy package=myapp from=\"1.0\" to=1.1",
        LIMIT,
    );
    let completions = i.asg.completions();
    assert_eq!(completions.len(), 1, "{completions:#?}");
    assert!(
        i.asg
            .calls()
            .iter()
            .all(|c| c.at <= call.at || c.action != "RecordLifecycleActionHeartbeat"),
        "heartbeats after the launch was decided: {:#?}",
        i.asg.calls()
    );
    let metrics = metrics(port);
    assert!(
        metrics
            .contains("pulldeploy_lifecycle_hook_completed{hook=\"launch\",result=\"CONTINUE\"} 1"),
        "{metrics}"
    );
    i.asg.assert_well_formed();
}

#[test]
fn launch_is_abandoned_when_the_first_install_fails() {
    // The group from the config: no instance metadata tags needed.
    let mut i = instance(
        "",
        &format!("launch_hook = \"{LAUNCH}\"\ngroup = \"{GROUP}\""),
        Behaviour::default(),
    );
    i.asg.activate(GROUP, LAUNCH, INSTANCE_ID);
    i.f.publish(&[pkg("myapp", "1.0").postinst("exit 1")]);
    let mut agent = i.run();
    let port = agent.health_port();
    i.observe(port);

    let call = i.completed(LAUNCH, &mut agent);
    assert_completion(&call, LAUNCH, "ABANDON");
    assert_eq!(
        call.seen.as_deref(),
        Some("healthz=503 committed=-"),
        "{call:#?}"
    );
    agent.wait_for_line("launch failed: the first install failed", LIMIT);
    // Later cycles (1.0 is bad now, nothing to install) do not complete it
    // again.
    let after = cycles(port);
    wait_for("two more cycles", LIMIT, || cycles(port) >= after + 2);
    assert_eq!(i.asg.completions().len(), 1, "{:#?}", i.asg.calls());
    assert_eq!(healthz(port).0, 503);
    i.asg.assert_well_formed();
}

#[test]
fn termination_drains_then_continues_and_installs_nothing_after() {
    let mut i = instance(
        "drain = \"3s\"",
        &format!(
            "launch_hook = \"{LAUNCH}\"\nterminate_hook = \"{TERMINATE}\"\ngroup = \"{GROUP}\""
        ),
        Behaviour::default(),
    );
    i.asg.activate(GROUP, LAUNCH, INSTANCE_ID);
    i.f.publish(&[pkg("myapp", "1.0")]);
    let mut agent = i.run();
    let port = agent.health_port();
    i.observe(port);
    assert_completion(&i.completed(LAUNCH, &mut agent), LAUNCH, "CONTINUE");
    assert_eq!(healthz(port).0, 200);

    // Scale-in: the group puts the instance in Terminating:Wait.
    i.asg.activate(GROUP, TERMINATE, INSTANCE_ID);
    let flipped = Instant::now();
    i.imds
        .set(|b| b.target_lifecycle_state = Some("Terminated".into()));
    wait_for("/healthz 503 after Terminated", LIMIT, || {
        healthz(port).0 == 503
    });
    let (_, body) = healthz(port);
    assert!(body.contains("terminating"), "{body}");

    let call = i.completed(TERMINATE, &mut agent);
    assert_completion(&call, TERMINATE, "CONTINUE");
    assert!(
        call.at.duration_since(flipped) >= Duration::from_secs(3),
        "completed {:?} after the flip, before the 3 s drain",
        call.at.duration_since(flipped)
    );
    assert_eq!(
        call.seen.as_deref(),
        Some("healthz=503 committed=1.0"),
        "{call:#?}"
    );

    // A new version is not installed: the loop goes round without a cycle.
    i.f.publish(&[pkg("myapp", "1.1")]);
    for _ in 0..3 {
        agent.wait_for_line("cycle skipped: the instance is terminating", LIMIT);
    }
    assert_eq!(i.f.node.installed("myapp").as_deref(), Some("1.0"));
    assert!(
        !agent.log.iter().any(|l| l.contains("to=1.1")),
        "{}",
        agent.log.join("\n")
    );
    assert_eq!(healthz(port).0, 503);
    assert_eq!(i.asg.completions().len(), 2, "{:#?}", i.asg.calls());
    let metrics = metrics(port);
    assert!(
        metrics.contains(
            "pulldeploy_lifecycle_hook_completed{hook=\"terminate\",result=\"CONTINUE\"} 1"
        ),
        "{metrics}"
    );
    i.asg.assert_well_formed();
}

#[test]
fn termination_waits_for_the_install_in_flight() {
    let mut i = instance(
        "",
        &format!("terminate_hook = \"{TERMINATE}\"\ngroup = \"{GROUP}\""),
        Behaviour::default(),
    );
    i.f.publish(&[pkg("myapp", "1.0")]);
    let mut agent = i.run();
    let port = agent.health_port();
    i.observe(port);
    agent.wait_for_line("installed and healthy package=myapp", LIMIT);

    // 1.1's postinst waits while `hold` exists: the install is in dpkg
    // when the instance starts terminating.
    std::fs::write(i.f.root().join("hold"), b"").expect("create hold");
    i.f.publish(&[pkg("myapp", "1.1").postinst(&hold_at("in-postinst"))]);
    wait_for("1.1's postinst", LIMIT, || {
        i.f.root().join("in-postinst").exists()
    });
    i.asg.activate(GROUP, TERMINATE, INSTANCE_ID);
    i.imds
        .set(|b| b.target_lifecycle_state = Some("Terminated".into()));
    agent.wait_for_line("waiting for the running cycle to finish", LIMIT);
    assert!(i.asg.completions().is_empty(), "{:#?}", i.asg.calls());

    std::fs::remove_file(i.f.root().join("hold")).expect("remove hold");
    let call = i.completed(TERMINATE, &mut agent);
    assert_completion(&call, TERMINATE, "CONTINUE");
    // The install finished and was committed before the hook was completed.
    assert_eq!(
        call.seen.as_deref(),
        Some("healthz=503 committed=1.1"),
        "{call:#?}"
    );
    assert_eq!(i.f.node.installed("myapp").as_deref(), Some("1.1"));
    i.asg.assert_well_formed();
}

#[test]
fn auto_scaling_failures_are_retried_and_cycles_go_on() {
    let mut i = instance(
        "",
        &format!("launch_hook = \"{LAUNCH}\"\ngroup = \"{GROUP}\""),
        Behaviour::default(),
    );
    i.asg.activate(GROUP, LAUNCH, INSTANCE_ID);
    i.asg.answer(Answer::Status(500));
    i.f.publish(&[pkg("myapp", "1.0")]);
    let mut agent = i.run();
    let port = agent.health_port();

    let failed = |i: &Instance, status: Option<u16>| {
        i.asg
            .calls()
            .iter()
            .filter(|c| c.action == "CompleteLifecycleAction" && c.status == status)
            .count()
    };
    wait_for("two CompleteLifecycleAction answered 500", LIMIT, || {
        failed(&i, Some(500)) >= 2
    });
    assert_eq!(healthz(port).0, 200);

    // Now it hangs: the agent gives the attempt up and tries again; the
    // cycles go on meanwhile and install a new version.
    i.asg.answer(Answer::Hang);
    wait_for("a hung CompleteLifecycleAction", LIMIT * 2, || {
        failed(&i, None) >= 1
    });
    i.f.publish(&[pkg("myapp", "1.1")]);
    wait_for("1.1 installed while Auto Scaling hangs", LIMIT, || {
        i.f.node
            .state()
            .installed
            .get("myapp")
            .is_some_and(|p| p.version == "1.1")
    });
    assert_eq!(healthz(port).0, 200);

    i.asg.answer(Answer::Normal);
    assert_completion(&i.completed(LAUNCH, &mut agent), LAUNCH, "CONTINUE");
    assert_eq!(i.asg.completions().len(), 1);
    agent.drain_lines();
    assert!(
        agent
            .log
            .iter()
            .any(|l| l.contains("lifecycle hooks: request failed; retrying")),
        "{}",
        agent.log.join("\n")
    );
    let metrics = metrics(port);
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pulldeploy_lifecycle_errors_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no lifecycle error counter in\n{metrics}"));
    assert!(errors >= 3, "{metrics}");
    i.asg.assert_well_formed();
}

#[test]
fn a_missing_group_tag_is_reported_and_looked_up_again() {
    // No group in the config and instance metadata tags disabled: the
    // agent says what to enable, and finds the group once they are.
    let mut i = instance(
        "",
        &format!("launch_hook = \"{LAUNCH}\""),
        Behaviour::default(),
    );
    i.asg.activate(GROUP, LAUNCH, INSTANCE_ID);
    i.f.publish(&[pkg("myapp", "1.0")]);
    let mut agent = i.run();
    let line = agent.wait_for_line("aws:autoscaling:groupName", LIMIT);
    assert!(
        line.contains("instance metadata tags are not enabled"),
        "{line}"
    );
    assert!(line.contains("[lifecycle] group"), "{line}");
    agent.wait_for_line("installed and healthy package=myapp", LIMIT);
    assert!(i.asg.calls().is_empty(), "{:#?}", i.asg.calls());

    i.imds.set(|b| b.group_tag = Some(GROUP.into()));
    assert_completion(&i.completed(LAUNCH, &mut agent), LAUNCH, "CONTINUE");
    i.asg.assert_well_formed();
}
