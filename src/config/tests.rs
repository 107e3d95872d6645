//! Unit tests of the config: defaults, every problem reported with its
//! key, the agent's own directories, repository URLs and package specs.

use super::*;

const MINIMAL: &str = r#"
[repository]
url = "s3://acme-apt/repo"
suite = "production"
keyring = "keyring.asc"
[agent]
packages = ["myapp"]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("/etc/pulldeploy/config.toml"), text)
}

fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(
        config.repository.url,
        RepoUrl::S3 {
            bucket: "acme-apt".into(),
            prefix: "repo".into()
        }
    );
    assert_eq!(config.repository.component, "main");
    assert_eq!(
        config.repository.keyring,
        Path::new("/etc/pulldeploy/keyring.asc")
    );
    assert_eq!(config.agent.interval, Duration::from_secs(60));
    assert_eq!(config.agent.jitter, Duration::from_secs(10));
    assert_eq!(config.agent.state_dir, Path::new("/var/lib/pulldeploy"));
    assert_eq!(config.install.root, Path::new("/"));
    assert_eq!(config.health.listen, "0.0.0.0:9100".parse().unwrap());
    assert_eq!(config.repository.clock_skew, Duration::from_secs(300));
    assert_eq!(config.repository.max_age, None);
    assert_eq!(config.install.lock_timeout, Duration::from_secs(300));
    assert_eq!(config.health.healthy_after, 3);
    assert_eq!(config.health.health_timeout, Duration::from_secs(60));
    assert_eq!(config.health.drain, Duration::ZERO);
}

/// The example of README.md's "Configuration", every key set.
#[test]
fn readme_example_is_accepted() {
    let text = r#"
[repository]
url = "s3://acme-apt/repo"
endpoint = "http://127.0.0.1:9000"
region = "eu-west-1"
suite = "production"
component = "main"
architecture = "amd64"
keyring = "/etc/pulldeploy/keyring.asc"
max_age = "7d"
clock_skew = "5m"
max_release_bytes = 16777216
max_index_bytes = 536870912
[agent]
packages = ["myapp", "other=1.2-3"]
interval = "60s"
jitter = "10s"
state_dir = "/var/lib/pulldeploy"
cache_dir = "/var/cache/pulldeploy"
cycle_timeout = "10m"
[install]
root = "/"
lock_timeout = "5m"
[health]
listen = "0.0.0.0:9100"
check_url = "http://127.0.0.1:8080/health"
healthy_after = 3
health_timeout = "60s"
check_interval = "1s"
drain = "0s"
"#;
    let config = parse(text).unwrap();
    assert_eq!(
        config.repository.endpoint.as_deref(),
        Some("http://127.0.0.1:9000")
    );
    assert_eq!(
        config.health.check_url.as_deref(),
        Some("http://127.0.0.1:8080/health")
    );
    assert_eq!(
        config.repository.max_age,
        Some(Duration::from_secs(7 * 86400))
    );
    assert_eq!(config.agent.cycle_timeout, Duration::from_secs(600));
    assert_eq!(config.agent.packages[1].pinned.as_deref(), Some("1.2-3"));
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let text = MINIMAL.replace("[agent]", "[agent]\npackage = 1");
    assert_eq!(problems(&text), ["agent.package: unknown key"]);
}

#[test]
fn every_problem_is_reported_with_its_key() {
    let text = r#"
[repository]
url = "ftp://x"
suite = "a/b"
keyring = "k"
architecture = "AMD64"
[agent]
packages = ["Bad_Name", "ok=1:", "ok2", "ok2"]
interval = "soon"
[health]
listen = "nowhere"
check_url = "localhost"
"#;
    let found = problems(text);
    for key in [
        "repository.url",
        "repository.suite",
        "repository.architecture",
        "agent.packages[0]",
        "agent.packages[1]",
        "agent.packages[3]",
        "agent.interval",
        "health.listen",
        "health.check_url",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(&format!("{key}:"))),
            "{key} missing from {found:#?}"
        );
    }
}

#[test]
fn mistyped_key_wrong_type_bad_suite_and_bad_duration_are_reported_together() {
    let text = r#"
[repository]
url = "s3://acme-apt/repo"
suite = "prod/../x"
keyring = "keyring.asc"
[agent]
packages = "myapp"
intervall = "60s"
jitter = "soon"
"#;
    let found = problems(text);
    for (key, says) in [
        ("agent.intervall", "unknown key"),
        ("agent.packages", "found string \"myapp\""),
        ("repository.suite", "not a suite name"),
        ("agent.jitter", "not a duration"),
    ] {
        assert!(
            found
                .iter()
                .any(|p| p.starts_with(&format!("{key}:")) && p.contains(says)),
            "{key} ({says}) missing from {found:#?}"
        );
    }
    assert_eq!(found.len(), 4, "{found:#?}");
}

#[test]
fn type_errors_name_the_key_the_expected_and_the_found() {
    let text = MINIMAL.replace("[agent]", "[agent]\ninterval = 60\nstate_dir = false")
        + "[health]\nhealthy_after = \"3\"\n[repository.extra]\n[helth]\n";
    let found = problems(&text);
    for expected in [
        "agent.interval: expected a string like \"60s\", found integer 60",
        "agent.state_dir: expected a path (a string), found boolean false",
        "health.healthy_after: expected a whole number (0 or more), found string \"3\"",
        "repository.extra: unknown table",
        "helth: unknown table",
    ] {
        assert!(
            found.iter().any(|p| p == expected),
            "{expected:?} missing from {found:#?}"
        );
    }
}

#[test]
fn missing_required_keys_and_tables_are_named() {
    let found = problems("[repository]\nurl = \"s3://acme-apt\"\n");
    for key in ["repository.suite", "repository.keyring", "agent"] {
        assert!(
            found.iter().any(|p| p.starts_with(&format!("{key}:"))),
            "{key} missing from {found:#?}"
        );
    }
}

#[test]
fn list_elements_and_numbers_are_checked_one_by_one() {
    let text = MINIMAL.replace("packages = [\"myapp\"]", "packages = [\"myapp\", 7]")
        + "[health]\nhealthy_after = -1\n";
    let found = problems(&text);
    assert!(
        found
            .iter()
            .any(|p| p == "agent.packages[1]: expected a string, found integer 7"),
        "{found:#?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("health.healthy_after:") && p.contains("-1")),
        "{found:#?}"
    );
}

/// Parses `MINIMAL` with `agent_lines` added to [agent], from a config
/// at `config`.
fn agent_problems(config: &Path, agent_lines: &str) -> Vec<String> {
    let text = MINIMAL.replace("[agent]", &format!("[agent]\n{agent_lines}"));
    match Config::from_toml(config, &text) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Ok(_) => Vec::new(),
        Err(other) => panic!("expected Invalid, got {other:?}"),
    }
}

fn refused(found: &[String], key: &str) -> bool {
    found.iter().any(|p| p.starts_with(&format!("{key}:")))
}

#[test]
fn root_as_state_or_cache_dir_is_refused() {
    let config = Path::new("/etc/pulldeploy/config.toml");
    for key in ["state_dir", "cache_dir"] {
        for dir in ["/", "/var/..", "/./"] {
            let found = agent_problems(config, &format!("{key} = {dir:?}"));
            assert!(
                refused(&found, &format!("agent.{key}")),
                "{dir}: {found:#?}"
            );
        }
    }
}

#[test]
fn a_dir_holding_the_config_is_refused() {
    let config = Path::new("/etc/pulldeploy/config.toml");
    for key in ["state_dir", "cache_dir"] {
        for dir in [
            ".",
            "..",
            "/etc",
            "/etc/pulldeploy/",
            "sub/..",
            "/etc/x/../pulldeploy",
        ] {
            let found = agent_problems(config, &format!("{key} = {dir:?}"));
            assert!(
                refused(&found, &format!("agent.{key}")),
                "{dir}: {found:#?}"
            );
            assert!(
                found
                    .iter()
                    .any(|p| p.contains("/etc/pulldeploy/config.toml")),
                "the config is not named: {found:#?}"
            );
        }
    }
}

#[test]
fn a_dir_holding_the_keyring_is_refused() {
    let config = Path::new("/etc/pulldeploy/config.toml");
    let text = MINIMAL.replace("keyring.asc", "/srv/keys/keyring.asc");
    for key in ["state_dir", "cache_dir"] {
        for dir in ["/srv", "/srv/keys", "/srv/keys/."] {
            let text = text.replace("[agent]", &format!("[agent]\n{key} = {dir:?}"));
            let found = match Config::from_toml(config, &text) {
                Err(ConfigError::Invalid { problems, .. }) => problems,
                other => panic!("{key} = {dir}: expected Invalid, got {other:?}"),
            };
            assert!(refused(&found, &format!("agent.{key}")), "{found:#?}");
            assert!(
                found.iter().any(|p| p.contains("/srv/keys/keyring.asc")),
                "the keyring is not named: {found:#?}"
            );
        }
    }
}

#[test]
fn a_symlink_to_the_config_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).expect("mkdir");
    let link = dir.path().join("cache-link");
    std::os::unix::fs::symlink(&etc, &link).expect("symlink");
    let found = agent_problems(
        &etc.join("config.toml"),
        &format!("cache_dir = {link:?}\nstate_dir = \"state\""),
    );
    assert!(refused(&found, "agent.cache_dir"), "{found:#?}");
    assert!(!refused(&found, "agent.state_dir"), "{found:#?}");
}

#[test]
fn own_dirs_beside_the_config_are_accepted_even_when_equal() {
    let config = Path::new("/etc/pulldeploy/config.toml");
    for lines in [
        "state_dir = \"state\"\ncache_dir = \"cache\"",
        "state_dir = \"/var/lib/pd\"\ncache_dir = \"/var/lib/pd\"",
        "state_dir = \"agent\"\ncache_dir = \"agent/.\"",
    ] {
        assert_eq!(
            agent_problems(config, lines),
            Vec::<String>::new(),
            "{lines}"
        );
    }
}

#[test]
fn repo_urls() {
    assert_eq!(
        RepoUrl::parse("s3://bucket").unwrap(),
        RepoUrl::S3 {
            bucket: "bucket".into(),
            prefix: "".into()
        }
    );
    assert_eq!(
        RepoUrl::parse("s3://bucket/a/b/").unwrap(),
        RepoUrl::S3 {
            bucket: "bucket".into(),
            prefix: "a/b".into()
        }
    );
    assert_eq!(
        RepoUrl::parse("file:///srv/apt").unwrap(),
        RepoUrl::File("/srv/apt".into())
    );
    assert!(RepoUrl::parse("file://relative").is_err());
    assert!(RepoUrl::parse("s3://Bad_Bucket").is_err());
    assert!(RepoUrl::parse("s3://bucket/../x").is_err());
    assert!(RepoUrl::parse("http://x").is_err());
}

#[test]
fn package_specs() {
    assert_eq!(
        PackageSpec::parse("myapp=1.2-3").unwrap(),
        PackageSpec {
            name: "myapp".into(),
            pinned: Some("1.2-3".into())
        }
    );
    assert!(PackageSpec::parse("a").is_err());
    assert!(PackageSpec::parse("../x").is_err());
    assert!(PackageSpec::parse("myapp=").is_err());
}

#[test]
fn fleet_lifecycle_notify_defaults_and_values() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.fleet.url, None);
    assert_eq!(config.fleet.node_id, None);
    assert_eq!(config.fleet.report_interval, Duration::from_secs(300));
    assert_eq!(config.lifecycle, None);
    assert_eq!(config.notify, None);

    let text = format!(
        "{MINIMAL}\n[fleet]\nurl = \"s3://acme-apt/fleet\"\nnode_id = \"i-0abc\"\nreport_interval = \"10s\"\n\
         [lifecycle]\nlaunch_hook = \"pulldeploy-launch\"\n\
         [notify]\nwebhook = \"https://hooks.example.com/T0/B0/X\"\nevents = [\"halt\", \"rollback\"]\n"
    );
    let config = parse(&text).unwrap();
    assert_eq!(
        config.fleet.url,
        Some(RepoUrl::S3 {
            bucket: "acme-apt".into(),
            prefix: "fleet".into()
        })
    );
    assert_eq!(config.fleet.node_id.as_deref(), Some("i-0abc"));
    assert_eq!(config.fleet.report_interval, Duration::from_secs(10));
    let lifecycle = config.lifecycle.unwrap();
    assert_eq!(lifecycle.launch_hook.as_deref(), Some("pulldeploy-launch"));
    assert_eq!(lifecycle.terminate_hook, None);
    let notify = config.notify.unwrap();
    assert_eq!(notify.events, [NodeEvent::Halt, NodeEvent::Rollback]);
    assert_eq!(notify.failing_after, 3);
}

#[test]
fn fleet_lifecycle_notify_problems_are_all_reported() {
    let text = format!(
        "{MINIMAL}\n[fleet]\nurl = \"s3://acme-apt/repo\"\nnode_id = \"../etc\"\nreport_interval = \"0s\"\nextra = 1\n\
         [lifecycle]\ngroup = \"web\"\n\
         [notify]\nevents = [\"published\", 3]\nfailing_after = 0\n"
    );
    let found = problems(&text);
    for expected in [
        "fleet.url: is the repository itself",
        "fleet.node_id: \"../etc\" is not a node id",
        "fleet.report_interval: \"0s\" is out of range: 1s to 1day",
        "fleet.extra: unknown key",
        "lifecycle.launch_hook: [lifecycle] names no hook",
        "notify.webhook: missing (required)",
        "notify.events[0]: \"published\" is not a node event",
        "notify.events[1]: expected a string, found integer 3",
        "notify.failing_after: must be at least 1",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(expected)),
            "{expected:?} not in {found:#?}"
        );
    }
}

#[test]
fn node_ids_are_one_key_segment() {
    for good in ["i-0abc123", "web-1.example", "a_b"] {
        assert_eq!(node_id(good).as_deref(), Ok(good));
    }
    for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129), "é"] {
        assert!(node_id(bad).is_err(), "{bad:?}");
    }
}
