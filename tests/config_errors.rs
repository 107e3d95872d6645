//! Mistakes in the config file and the keyring, as an operator meets them:
//! the real binary, `check-config` and `once`, exit 64 and a message that
//! names what to fix.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod cmd;
    pub mod deb;
    pub mod dpkg;
    pub mod gpg;
    pub mod node;
    pub mod repo;
}

use std::path::Path;
use std::process::Output;

use common::cmd::describe_output;
use common::deb::{DebSpec, build_deb};
use common::gpg::GpgKey;
use common::node::Node;
use common::repo::{HandRepo, ReleaseFields};

const USAGE: i32 = 64;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_usage_error(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(USAGE),
        "{what}: expected exit {USAGE}\n{}",
        describe_output(out)
    );
}

/// A node reading a repository that is never reached: these tests stop at
/// the config or the keyring.
fn node_with_keyring(keyring: &Path) -> Node {
    Node::new("url = \"file:///nonexistent/apt\"", keyring, &["myapp"], "")
}

/// Replaces `from` by `to` in the node's config; panics if `from` is not
/// there (a replacement that does nothing would make the test vacuous).
fn edit_config(node: &Node, from: &str, to: &str) {
    let text = std::fs::read_to_string(&node.config).expect("read node config");
    assert!(text.contains(from), "{from:?} not in\n{text}");
    std::fs::write(&node.config, text.replace(from, to)).expect("write node config");
}

#[test]
fn config_errors_all_reported_at_once() {
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let node = node_with_keyring(&key.public_key);
    // A mistyped key, two wrong types, a bad suite name, a bad duration and
    // a mistyped table, each of which alone is enough to refuse the file.
    edit_config(&node, "suite = \"production\"", "suite = \"prod/../x\"");
    edit_config(
        &node,
        "packages = [\"myapp\"]\ninterval = \"1s\"\njitter = \"0s\"",
        "packages = \"myapp\"\nintervall = \"1s\"\ninterval = 60\njitter = \"soon\"",
    );
    edit_config(&node, "[health]", "[helth]\ndrain = \"1s\"\n[health]");

    let out = node
        .command(&["check-config"])
        .output()
        .expect("run check-config");
    assert_usage_error(&out, "check-config");
    let text = stderr(&out);
    for key in [
        "repository.suite:",
        "agent.packages:",
        "agent.intervall: unknown key",
        "agent.interval:",
        "agent.jitter:",
        "helth: unknown table",
    ] {
        assert!(text.contains(key), "{key} not reported:\n{text}");
    }
    // A type error says what was expected and what was found.
    assert!(text.contains("found integer 60"), "{text}");
    assert!(text.contains("found string \"myapp\""), "{text}");

    // Unparsable TOML is still refused with 64, naming the file.
    std::fs::write(&node.config, "[repository\nurl = ").expect("write config");
    let out = node
        .command(&["check-config"])
        .output()
        .expect("run check-config");
    assert_usage_error(&out, "check-config of unparsable TOML");
    assert!(
        stderr(&out).contains(&node.config.display().to_string()),
        "{}",
        describe_output(&out)
    );
}

#[test]
fn secret_key_in_keyring() {
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let secret = std::fs::read_to_string(&key.secret_key).expect("secret key export");
    assert!(
        secret.contains("BEGIN PGP PRIVATE KEY BLOCK"),
        "the fixture is not a secret key:\n{secret}"
    );
    let node = node_with_keyring(&key.secret_key);
    let command = format!("gpg --export --armor {}", key.fingerprint);
    for args in [&["check-config"][..], &["once"]] {
        let out = node.command(args).output().expect("run pulldeploy");
        assert_usage_error(&out, &args.join(" "));
        let text = stderr(&out);
        assert!(text.contains(&command), "{command} not in\n{text}");
        assert!(
            text.contains(&key.secret_key.display().to_string()),
            "the keyring file is not named:\n{text}"
        );
    }
    assert!(
        !node.dir.path().join("state/state.json").exists(),
        "once ran a cycle with a secret keyring"
    );

    // The public key alone, as the message says to export it, passes.
    let node = node_with_keyring(&key.public_key);
    let out = node
        .command(&["check-config"])
        .output()
        .expect("run check-config");
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&key.fingerprint),
        "{}",
        describe_output(&out)
    );
}

#[test]
fn cache_dir_holding_the_config_is_refused() {
    // A real repository with a package, so that an agent that did not
    // refuse the config would install it and then prune its cache.
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
    // The keyring travels with the config, and the cache is "." beside them.
    let keyring = node.dir.path().join("keyring.asc");
    std::fs::copy(&key.public_key, &keyring).expect("copy keyring");
    edit_config(
        &node,
        &format!("keyring = {:?}", key.public_key),
        "keyring = \"keyring.asc\"",
    );
    edit_config(&node, "cache_dir = \"cache\"", "cache_dir = \".\"");

    let once = node.once();
    assert!(
        node.config.exists() && keyring.exists(),
        "once deleted the config or the keyring\n{}",
        describe_output(&once)
    );
    assert_usage_error(&once, "once");
    assert!(
        stderr(&once).contains("agent.cache_dir:"),
        "{}",
        stderr(&once)
    );
    assert_eq!(node.installed("myapp"), None);

    let check = node
        .command(&["check-config"])
        .output()
        .expect("run check-config");
    assert_usage_error(&check, "check-config");
    assert!(
        stderr(&check).contains("agent.cache_dir:"),
        "{}",
        stderr(&check)
    );

    // The same node with a cache directory of its own installs: the
    // refusal above was for the directory, not for the fixture.
    edit_config(&node, "cache_dir = \".\"", "cache_dir = \"cache\"");
    let once = node.once();
    assert!(once.status.success(), "{}", describe_output(&once));
    assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
}

/// Bad usage on the command line is EX_USAGE (64), as for a bad config;
/// `--help` is not an error.
#[test]
fn bad_usage_exits_64() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pulldeploy"))
            .args(args)
            .output()
            .expect("run pulldeploy")
    };
    for args in [
        &["once"][..],
        &["no-such-command"],
        &[
            "publish",
            "--repo",
            "file:///tmp/none",
            "--suite",
            "bad/suite",
            "--signing-key",
            "/nonexistent",
            "x.deb",
        ],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?} said nothing");
    }
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("once"));
}

/// Durations past the calendar (`"300000years"`) passed check-config and
/// then aborted every cycle (`DateTime + TimeDelta` overflowed). Every
/// duration key has a range, checked where it is parsed: refused with 64,
/// the key and the range, by check-config and by `once` before any cycle;
/// nothing installed, no state written. The publisher's lock durations too.
#[test]
fn huge_values() {
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let no_state = |node: &Node, what: &str| {
        assert!(
            !node.dir.path().join("state/state.json").exists(),
            "{what}: a cycle ran"
        );
        assert_eq!(node.installed("myapp"), None, "{what}: installed");
    };

    // The three of the report, each alone: check-config and once.
    for (table_line, line, expected) in [
        (
            "suite = \"production\"",
            "clock_skew = \"300000years\"",
            "repository.clock_skew: \"300000years\" is out of range: 0s to 1day",
        ),
        (
            "suite = \"production\"",
            "clock_skew = \"100000000000d\"",
            "repository.clock_skew: \"100000000000d\" is out of range: 0s to 1day",
        ),
        (
            "suite = \"production\"",
            "max_age = \"9999999999d\"",
            "repository.max_age: \"9999999999d\" is out of range: 1s to 10years",
        ),
    ] {
        let node = node_with_keyring(&key.public_key);
        edit_config(&node, table_line, &format!("{table_line}\n{line}"));
        for args in [&["check-config"][..], &["once"]] {
            let out = node.command(args).output().expect("run pulldeploy");
            assert_usage_error(&out, &format!("{line}: {}", args.join(" ")));
            let text = stderr(&out);
            assert!(text.contains(expected), "{expected} not in\n{text}");
            assert!(!text.contains("panicked"), "{text}");
        }
        no_state(&node, line);
    }

    // Every duration key at once: each reported with its range.
    let node = node_with_keyring(&key.public_key);
    edit_config(
        &node,
        "suite = \"production\"",
        "suite = \"production\"\nmax_age = \"300000years\"\nclock_skew = \"25h\"",
    );
    edit_config(
        &node,
        "interval = \"1s\"\njitter = \"0s\"",
        "interval = \"100000000000d\"\njitter = \"2d\"\ncycle_timeout = \"9999999999d\"",
    );
    edit_config(
        &node,
        "[install]\n",
        "[install]\nlock_timeout = \"300000years\"\n",
    );
    edit_config(
        &node,
        "[health]\n",
        "[health]\nhealth_timeout = \"300000years\"\ncheck_interval = \"2h\"\ndrain = \"9999999999d\"\n",
    );
    let text = std::fs::read_to_string(&node.config).expect("read node config");
    std::fs::write(
        &node.config,
        format!("{text}\n[fleet]\nreport_interval = \"300000years\"\n"),
    )
    .expect("write node config");
    let out = node
        .command(&["check-config"])
        .output()
        .expect("run check-config");
    assert_usage_error(&out, "every duration out of range");
    let text = stderr(&out);
    for expected in [
        "repository.max_age: \"300000years\" is out of range: 1s to 10years",
        "repository.clock_skew: \"25h\" is out of range: 0s to 1day",
        "agent.interval: \"100000000000d\" is out of range: 1s to 1day",
        "agent.jitter: \"2d\" is out of range: 0s to 1day",
        "agent.cycle_timeout: \"9999999999d\" is out of range: 1ms to 1day",
        "install.lock_timeout: \"300000years\" is out of range: 0s to 1day",
        "health.health_timeout: \"300000years\" is out of range: 0s to 1day",
        "health.check_interval: \"2h\" is out of range: 1ms to 1h",
        "health.drain: \"9999999999d\" is out of range: 0s to 1h",
        "fleet.report_interval: \"300000years\" is out of range: 1s to 1day",
    ] {
        assert!(text.contains(expected), "{expected} not in\n{text}");
    }
    no_state(&node, "every duration");

    // The publisher's: --lock-ttl and --lock-wait.
    for (option, value) in [
        ("--lock-ttl", "300000years"),
        ("--lock-wait", "100000000000d"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pulldeploy"))
            .args([
                "publish",
                "--repo",
                "file:///nonexistent/apt",
                "--suite",
                "stable",
                "--signing-key",
                "/nonexistent",
                option,
                value,
                "x.deb",
            ])
            .output()
            .expect("run pulldeploy publish");
        assert_usage_error(&out, option);
        let text = stderr(&out);
        assert!(
            text.contains(option) && text.contains("out of range"),
            "{option} {value}: {text}"
        );
    }
}
