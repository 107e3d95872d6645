//! Notifications to a chat webhook, end to end: the real agent (`run`,
//! dpkg into a sandbox root) and the real publisher (`publish`, `promote`,
//! `rollout`), a webhook receiver on 127.0.0.1. A rollback is told once,
//! naming the package and both versions; a failing streak once per streak;
//! a publish, a promote and a rollout change once each, naming who ran
//! them. A webhook that hangs or answers 500 delays no cycle and no
//! publish beyond its bounds, fails nothing, and shows in /metrics.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod cmd;
    pub mod dpkg;
    pub mod fixture;
    pub mod gpg;
    pub mod http;
    pub mod node;
    pub mod repo;
    pub mod webhook;
}

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cmd::host_path;
use common::fixture::{Fixture, LIMIT, Running, build, fixture, pkg, wait_for};
use common::gpg::GpgKey;
use common::webhook::{Answer, Webhook};

/// How long a message may take to arrive from a running daemon: one
/// message's whole retry schedule (3 x 5 s + 3 s of pauses) and room for
/// a loaded machine.
const DELIVERY: Duration = Duration::from_secs(60);

/// The `[notify]` table (and more TOML) a node's config ends with.
fn notify_table(hook: &Webhook, events: &[&str], failing_after: u32) -> String {
    let events: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "\n[notify]\nwebhook = {:?}\nevents = [{}]\nfailing_after = {failing_after}\n",
        hook.url(),
        events.join(", ")
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string()
}

// ---- /metrics ---------------------------------------------------------------

fn metrics(port: u16) -> String {
    let response = common::http::http_request(port, "GET", "/metrics", &[], &[]);
    assert_eq!(response.status, 200, "{}", response.text());
    response.text()
}

/// The value of the sample `name` (no labels).
#[track_caller]
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

fn webhook_counts(port: u16) -> (f64, f64, f64) {
    let text = metrics(port);
    (
        sample(&text, "pulldeploy_webhook_sent_total"),
        sample(&text, "pulldeploy_webhook_failed_total"),
        sample(&text, "pulldeploy_webhook_dropped_total"),
    )
}

/// (cycles, failed cycles) so far.
fn cycles(port: u16) -> (f64, f64) {
    let text = metrics(port);
    (
        sample(&text, "pulldeploy_cycles_total"),
        sample(&text, "pulldeploy_cycle_errors_total"),
    )
}

/// Waits until `more` cycles after `from` (failed ones when `failed`)
/// have run.
#[track_caller]
fn wait_for_cycles(port: u16, what: &str, more: f64, failed: bool) {
    let count = |(all, errors): (f64, f64)| if failed { errors } else { all - errors };
    let from = count(cycles(port));
    wait_for(what, LIMIT, || count(cycles(port)) >= from + more);
}

// ---- the node ---------------------------------------------------------------

/// A node with myapp 1.0 installed by its running daemon, telling `hook`.
fn running_node(notify: &str) -> (Fixture, Running, u16) {
    let mut f = fixture(&["myapp"], notify);
    f.publish(&[pkg("myapp", "1.0")]);
    let mut run = Running::start(f.node.command(&["run"]));
    let port = run.health_port();
    run.wait_for_line("installed and healthy package=myapp", LIMIT);
    (f, run, port)
}

/// Makes every cycle fail (an InRelease that is not a signed message)
/// until [`repair`].
fn break_repository(f: &Fixture) {
    std::fs::write(f.repo.dists("InRelease"), "not a signed message\n").expect("break InRelease");
}

fn repair(f: &Fixture) {
    f.repo
        .publish(&f.key, &common::repo::ReleaseFields::default());
}

#[test]
fn a_rollback_is_told_once_naming_the_package_and_both_versions() {
    let hook = Webhook::start(Answer::Ok);
    let notify = notify_table(&hook, &["rollback", "failing"], 3);
    let (mut f, mut run, port) = running_node(&format!("{notify}\n[fleet]\nnode_id = \"web-7\"\n"));
    assert!(hook.received().is_empty(), "{:?}", hook.texts());

    f.publish(&[pkg("myapp", "1.1").postinst("echo 'myapp 1.1 cannot start' >&2\nexit 1")]);
    run.wait_for_line("rolling back", LIMIT);
    let received = hook.wait_for_requests(1, DELIVERY);
    let text = received[0].text();
    assert!(
        text.starts_with(&format!(
            "pulldeploy rollback on web-7 ({}) (suite production): myapp 1.0 to 1.1 failed: ",
            hostname()
        )),
        "{text}"
    );
    assert!(text.contains("rolled back to myapp 1.0"), "{text}");
    assert!(text.contains("myapp 1.1 failed to install"), "{text}");
    assert!(
        received[0]
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{}",
        received[0].head
    );

    // Later cycles skip the bad version: nothing more to tell.
    wait_for_cycles(port, "three more good cycles", 3.0, false);
    assert_eq!(hook.texts().len(), 1, "{:?}", hook.texts());
    assert_eq!(webhook_counts(port), (1.0, 0.0, 0.0));
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    // The webhook's URL is a credential: never in the log.
    run.drain_lines();
    assert!(
        !run.log.iter().any(|l| l.contains("s3cr3t")),
        "{}",
        run.log.join("\n")
    );
}

#[test]
fn failing_is_told_once_per_streak() {
    let hook = Webhook::start(Answer::Ok);
    let (f, _run, port) = running_node(&notify_table(&hook, &["failing"], 2));

    break_repository(&f);
    let received = hook.wait_for_requests(1, DELIVERY);
    let text = received[0].text();
    assert!(
        text.starts_with(&format!(
            "pulldeploy failing on {} (suite production): 2 cycles in a row failed (running myapp 1.0); last error: ",
            hostname()
        )),
        "{text}"
    );
    assert!(text.contains("InRelease"), "{text}");
    // The same streak goes on: told once.
    wait_for_cycles(port, "three more failed cycles", 3.0, true);
    assert_eq!(hook.texts().len(), 1, "{:?}", hook.texts());

    // A good cycle ends the streak; the next streak is told again.
    repair(&f);
    wait_for_cycles(port, "a good cycle", 1.0, false);
    assert_eq!(hook.texts().len(), 1, "{:?}", hook.texts());
    break_repository(&f);
    let received = hook.wait_for_requests(2, DELIVERY);
    assert!(
        received[1].text().contains("2 cycles in a row failed"),
        "{:?}",
        hook.texts()
    );
    wait_for_cycles(port, "two more failed cycles", 2.0, true);
    assert_eq!(hook.texts().len(), 2, "{:?}", hook.texts());
    assert_eq!(webhook_counts(port), (2.0, 0.0, 0.0));
}

#[test]
fn a_hanging_webhook_delays_no_cycle_and_its_failure_shows_in_metrics() {
    let hook = Webhook::start(Answer::Hang);
    let (f, _run, port) = running_node(&notify_table(&hook, &["failing"], 1));

    break_repository(&f);
    hook.wait_for_requests(1, DELIVERY);
    // The message hangs for at least 5 + 1 + 5 + 2 + 5 = 18 s before it
    // is given up. Cycles go on at their 1 s interval meanwhile: a loop
    // that waited for the webhook would run none until it gave up.
    wait_for_cycles(
        port,
        "three failed cycles while the webhook hangs",
        3.0,
        true,
    );
    assert_eq!(webhook_counts(port), (0.0, 0.0, 0.0), "still in flight");

    // The message is given up after its three tries, and counted.
    wait_for("the webhook message given up", DELIVERY, || {
        webhook_counts(port).1 >= 1.0
    });
    assert_eq!(webhook_counts(port), (0.0, 1.0, 0.0));
    assert_eq!(hook.received().len(), 3, "three tries");
}

#[test]
fn a_webhook_answering_500_is_tried_three_times_then_counted() {
    let hook = Webhook::start(Answer::FailFirst(usize::MAX));
    let (mut f, mut run, port) = running_node(&notify_table(&hook, &["rollback"], 3));

    f.publish(&[pkg("myapp", "1.1").postinst("exit 1")]);
    run.wait_for_line("rolling back", LIMIT);
    wait_for("the webhook message given up", DELIVERY, || {
        webhook_counts(port).1 >= 1.0
    });
    assert_eq!(webhook_counts(port), (0.0, 1.0, 0.0));
    let received = hook.received();
    assert_eq!(received.len(), 3, "three tries");
    // try / 1 s / try / 2 s / try
    let pauses: Vec<Duration> = received.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(
        pauses[0] >= Duration::from_millis(900) && pauses[1] >= Duration::from_millis(1900),
        "{pauses:?}"
    );
    run.wait_for_line("webhook message not delivered", LIMIT);
    // The cycles went on and the node is where the rollback left it.
    wait_for_cycles(port, "a good cycle", 1.0, false);
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
}

// ---- the publisher ----------------------------------------------------------

struct Publisher {
    key: GpgKey,
    repo: tempfile::TempDir,
    debs: tempfile::TempDir,
    home: tempfile::TempDir,
}

impl Publisher {
    fn new() -> Publisher {
        Publisher {
            key: GpgKey::generate("Acme Repository <repo@acme.test>"),
            repo: tempfile::Builder::new()
                .prefix("pd-pub-")
                .tempdir()
                .expect("repo dir"),
            debs: tempfile::tempdir().expect("debs dir"),
            home: tempfile::tempdir().expect("home"),
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.repo.path().display())
    }

    /// `pulldeploy SUBCOMMAND --repo … --signing-key …` plus `args`
    /// (SUBCOMMAND may be two words: `rollout pause`), with
    /// `env` (and nothing else but PATH and HOME).
    fn command(&self, subcommand: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pulldeploy"));
        command
            .env_clear()
            .env("PATH", host_path())
            .env("HOME", self.home.path())
            .env("PULLDEPLOY_LOG", "info")
            .envs(env.iter().copied())
            .args(subcommand.split(' '))
            .args(["--repo", &self.url()])
            .arg("--signing-key")
            .arg(&self.key.secret_key)
            .args(args)
            .stdin(Stdio::null());
        command
    }

    fn publish(&self, suite: &str, version: &str, args: &[&str], env: &[(&str, &str)]) -> Timed {
        let deb = build(
            &self.debs.path().join(format!("{suite}-{version}")),
            &pkg("myapp", version),
        );
        let mut command = self.command("publish", &["--suite", suite], env);
        command.args(args).arg(&deb);
        Timed::run(command)
    }
}

/// A command's output and how long it took.
struct Timed {
    out: Output,
    took: Duration,
}

impl Timed {
    fn run(mut command: Command) -> Timed {
        let started = Instant::now();
        let out = command.output().expect("run pulldeploy");
        Timed {
            out,
            took: started.elapsed(),
        }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    #[track_caller]
    fn assert_ok(&self) -> &Timed {
        assert!(
            self.out.status.success(),
            "{:?}\nstdout:\n{}\nstderr:\n{}",
            self.out.status,
            String::from_utf8_lossy(&self.out.stdout),
            self.stderr()
        );
        assert!(!self.stderr().contains("s3cr3t"), "{}", self.stderr());
        self
    }
}

#[test]
fn publish_promote_and_rollout_are_told_once_each_naming_who_ran_them() {
    let hook = Webhook::start(Answer::Ok);
    let publisher = Publisher::new();
    let ci = [
        ("USER", "ci-bot"),
        ("GITHUB_SERVER_URL", "https://github.com"),
        ("GITHUB_REPOSITORY", "acme/myapp"),
        ("GITHUB_RUN_ID", "42"),
    ];
    publisher
        .publish("staging", "1.0", &["--webhook", &hook.url()], &ci)
        .assert_ok();
    // The command waited for its message.
    let texts = hook.texts();
    assert_eq!(texts.len(), 1, "{texts:?}");
    let who = format!(
        "ci-bot@{} (https://github.com/acme/myapp/actions/runs/42)",
        hostname()
    );
    let expected = format!(
        "pulldeploy published by {who}: suite staging of {}\nadded myapp 1.0 (amd64) to staging: ",
        publisher.url()
    );
    assert!(
        texts[0].starts_with(&expected),
        "{:?}\nnot {expected:?}",
        texts[0]
    );
    assert!(
        texts[0].contains("InRelease of staging signed by"),
        "{}",
        texts[0]
    );

    // --webhook from the environment; promote names both suites.
    let promote = publisher.command(
        "promote",
        &["--from", "staging", "--to", "production", "myapp=1.0"],
        &[("USER", "ci-bot"), ("PULLDEPLOY_WEBHOOK", &hook.url())],
    );
    Timed::run(promote).assert_ok();
    let texts = hook.texts();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(
        texts[1].starts_with(&format!(
            "pulldeploy promoted by ci-bot@{}: suite production of {}\npromoted myapp 1.0 (amd64) from staging to production: ",
            hostname(),
            publisher.url()
        )),
        "{}",
        texts[1]
    );

    // A rollout command, the same way.
    let pause = publisher.command(
        "rollout pause",
        &["--suite", "production", "--webhook", &hook.url()],
        &[("USER", "ci-bot")],
    );
    Timed::run(pause).assert_ok();
    let texts = hook.texts();
    assert_eq!(texts.len(), 3, "{texts:?}");
    let expected = format!(
        "pulldeploy rollout by ci-bot@{}: suite production of {}\n",
        hostname(),
        publisher.url()
    );
    assert!(
        texts[2].starts_with(&expected),
        "{:?}\nnot {expected:?}",
        texts[2]
    );
    assert!(texts[2].contains("paused"), "{}", texts[2]);

    // Without a webhook nothing is sent, and a failed publish sends nothing.
    publisher.publish("staging", "1.1", &[], &[]).assert_ok();
    let other = build(
        &publisher.debs.path().join("other"),
        &pkg("myapp", "1.0").extra_file("usr/share/myapp/more", "other bytes"),
    );
    let mut command = publisher.command(
        "publish",
        &["--suite", "staging", "--webhook", &hook.url()],
        &[],
    );
    command.arg(&other);
    let refused = Timed::run(command);
    assert_eq!(refused.out.status.code(), Some(65), "{}", refused.stderr());
    assert_eq!(hook.texts().len(), 3, "{:?}", hook.texts());
}

#[test]
fn a_webhook_that_hangs_or_fails_never_fails_a_publish_and_delays_it_at_most_10_s() {
    let publisher = Publisher::new();
    // (One version per suite: the pool is shared, and a version is
    // immutable.) The same publish without a webhook, for comparison.
    let baseline = publisher.publish("base", "1.0", &[], &[]);
    baseline.assert_ok();

    // Hanging: the command gives its message 10 s, then goes.
    let hanging = Webhook::start(Answer::Hang);
    let out = publisher.publish("hang", "1.1", &["--webhook", &hanging.url()], &[]);
    out.assert_ok();
    assert!(
        out.stderr()
            .contains("webhook message not delivered in time"),
        "{}",
        out.stderr()
    );
    assert!(
        out.took >= Duration::from_millis(9500),
        "did not wait for the message: {:?}",
        out.took
    );
    assert!(
        out.took < baseline.took + Duration::from_secs(10 + 20),
        "{:?} with a hanging webhook, {:?} without",
        out.took,
        baseline.took
    );
    // Tried at 0 s and (after its 5 s timeout and 1 s) at 6 s.
    let tries = hanging.received().len();
    assert!((1..=2).contains(&tries), "{tries} tries within 10 s");
    assert!(
        String::from_utf8_lossy(&out.out.stdout).contains("added myapp 1.1 (amd64) to hang"),
        "published all the same"
    );

    // 500 on every try: three tries (1 s and 2 s apart), a warning, exit 0.
    let failing = Webhook::start(Answer::FailFirst(usize::MAX));
    let out = publisher.publish("fail", "1.2", &["--webhook", &failing.url()], &[]);
    out.assert_ok();
    assert_eq!(failing.received().len(), 3);
    assert!(
        out.stderr().contains("webhook message not delivered"),
        "{}",
        out.stderr()
    );
    assert!(out.stderr().contains("500"), "{}", out.stderr());
    assert!(
        out.took < baseline.took + Duration::from_secs(3 + 20),
        "{:?} with a failing webhook, {:?} without",
        out.took,
        baseline.took
    );

    // 500 twice, then 200: delivered on the third try, no warning.
    let flaky = Webhook::start(Answer::FailFirst(2));
    let out = publisher.publish("flaky", "1.3", &["--webhook", &flaky.url()], &[]);
    out.assert_ok();
    assert_eq!(flaky.received().len(), 3);
    assert!(!out.stderr().contains("not delivered"), "{}", out.stderr());
    let texts: Vec<String> = flaky.texts();
    assert!(
        texts.iter().all(|t| t == &texts[0]),
        "the same message each try"
    );
}

#[test]
fn a_bad_webhook_url_is_a_usage_error() {
    let publisher = Publisher::new();
    for bad in ["hooks.example/T000", "ftp://hooks.example/T000"] {
        let out = publisher.publish("staging", "1.0", &["--webhook", bad], &[]);
        assert_eq!(out.out.status.code(), Some(64), "{}", out.stderr());
        assert!(out.stderr().contains("--webhook"), "{}", out.stderr());
    }
    assert!(!publisher.repo.path().join("dists/staging").exists());
}

// ---- the webhook URL is a secret ----------------------------------------------

/// Every secret of the test's URLs starts with this; none may be printed.
const SECRET: &str = "zzsecret";

/// URLs carrying secret `n` in their userinfo, path and query: mistyped in
/// the ways an operator does (scheme, port, a space, no scheme).
fn malformed_urls() -> Vec<String> {
    [
        "htps://u:{s}@hooks.example.com/services/T0/B0/{s}?token={s}",
        "https://u:{s}@hooks.example.com:99999/services/T0/B0/{s}?token={s}",
        "https://u:{s}@hooks.exa mple.com/services/T0/B0/{s}?token={s}",
        "hooks.example.com/services/T0/B0/{s}?token={s}",
    ]
    .iter()
    .enumerate()
    .map(|(n, url)| url.replace("{s}", &format!("{SECRET}{n}")))
    .collect()
}

/// A URL that parses but is never answered (port 1 refuses), secret in
/// userinfo, path and query.
fn failing_url() -> String {
    format!("http://u:{SECRET}9@127.0.0.1:1/services/T0/B0/{SECRET}9?token={SECRET}9")
}

fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every file under `dir`, as text.
fn files_text(dir: &std::path::Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            text.push_str(&files_text(&path));
        } else {
            text.push_str(&String::from_utf8_lossy(
                &std::fs::read(&path).expect("read"),
            ));
        }
    }
    text
}

/// The webhook URL is a credential: mistyped (scheme, port, a space, no
/// scheme, a line TOML cannot parse) or valid but failing, none of its
/// userinfo, path or query reaches check-config, `once` or `run` (and a
/// SIGHUP reload to a bad URL), `publish --webhook` and
/// `PULLDEPLOY_WEBHOOK`, `status` and `status --json`, /metrics, or the
/// node's report in the fleet prefix. The errors name the key and the
/// problem.
#[test]
fn webhook_url_secret() {
    let fleet = tempfile::tempdir().expect("fleet dir");
    let notify = |url: &str| {
        format!(
            "\n[notify]\nwebhook = {url:?}\nevents = [\"failing\"]\nfailing_after = 1\n\
             \n[fleet]\nurl = \"file://{}\"\nnode_id = \"web-1\"\nreport_interval = \"1s\"\n",
            fleet.path().display()
        )
    };
    let mut printed = Vec::new();
    let mut f = fixture(&["myapp"], &notify(&failing_url()));
    f.publish(&[pkg("myapp", "1.0")]);
    let config = std::fs::read_to_string(&f.node.config).expect("config");
    // `webhook = VALUE`, VALUE as written in the file.
    let set_value = |value: &str| {
        let text = config.replace(&format!("{:?}", failing_url()), value);
        assert!(config.contains(&format!("{:?}", failing_url())), "{config}");
        std::fs::write(&f.node.config, text).expect("write config");
    };
    let set_url = |url: &str| set_value(&format!("{url:?}"));

    // A mistyped URL: check-config and once refuse it, naming the key.
    let mut bad_values: Vec<String> = malformed_urls().iter().map(|u| format!("{u:?}")).collect();
    // And a line TOML cannot parse (no closing quote).
    bad_values.push(format!("\"{}", failing_url()));
    for url in &bad_values {
        set_value(url);
        for args in [&["check-config"][..], &["once"]] {
            let out = f.node.command(args).output().expect("run pulldeploy");
            let text = text_of(&out);
            assert_eq!(out.status.code(), Some(64), "{url} {args:?}: {text}");
            assert!(
                text.contains("notify.webhook: not an http(s) URL") || text.contains("line "),
                "{url}: {text}"
            );
            printed.push(text);
        }
    }

    // The valid URL (that fails): once installs, and reports to the fleet.
    set_url(&failing_url());
    let out = f.once();
    assert!(out.status.success(), "{}", text_of(&out));
    printed.push(text_of(&out));

    // The daemon: a failing cycle's message, not delivered; then a reload
    // to a mistyped URL, refused.
    let mut run = Running::start(f.node.command(&["run"]));
    let port = run.health_port();
    break_repository(&f);
    run.wait_for_line("webhook message not delivered", DELIVERY);
    wait_for("the failure in /metrics", DELIVERY, || {
        webhook_counts(port).1 >= 1.0
    });
    printed.push(metrics(port));
    for url in malformed_urls() {
        set_url(&url);
        // SAFETY: kill(2) on our own running child.
        unsafe { libc::kill(run.pid() as i32, libc::SIGHUP) };
        run.wait_for_line("reload failed", LIMIT);
        run.wait_for_line("notify.webhook: not an http(s) URL", LIMIT);
    }
    printed.push(metrics(port));
    for args in [&["status"][..], &["status", "--json"]] {
        let out = f.node.command(args).output().expect("run status");
        printed.push(text_of(&out));
    }
    run.kill();
    printed.push(run_log(&mut run));
    let reports = files_text(fleet.path());
    assert!(reports.contains("web-1"), "no node report: {reports}");
    printed.push(reports);

    // The publisher: --webhook and PULLDEPLOY_WEBHOOK, mistyped and failing.
    let publisher = Publisher::new();
    for url in malformed_urls() {
        for (args, env) in [
            (vec!["--webhook", url.as_str()], vec![]),
            (vec![], vec![("PULLDEPLOY_WEBHOOK", url.as_str())]),
        ] {
            let out = publisher.publish("staging", "1.0", &args, &env);
            assert_eq!(out.out.status.code(), Some(64), "{}", out.stderr());
            assert!(out.stderr().contains("--webhook"), "{}", out.stderr());
            printed.push(text_of(&out.out));
        }
    }
    let failing = failing_url();
    let out = publisher.publish("staging", "1.0", &["--webhook", &failing], &[]);
    out.assert_ok();
    assert!(out.stderr().contains("not delivered"), "{}", out.stderr());
    printed.push(text_of(&out.out));

    for text in &printed {
        assert!(
            !text.contains(SECRET),
            "a webhook secret was printed:\n{text}"
        );
    }
}

/// Everything a finished daemon logged.
fn run_log(run: &mut Running) -> String {
    run.drain_lines();
    run.log.join("\n")
}
