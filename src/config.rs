//! The TOML configuration: schema, defaults and validation.
//!
//! `Config::from_file` either returns a `Config` in which every value has been
//! checked, or a [`ConfigError::Invalid`] listing every problem with its key
//! (DESIGN.md "Configuration"). Unknown keys are an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

/// Default cap on InRelease/Release: apt's own InRelease files are a few
/// hundred KiB even for Debian main; 16 MiB leaves room for thousands of
/// components and architectures.
pub const DEFAULT_MAX_RELEASE_BYTES: u64 = 16 << 20;
/// Default cap on a compressed or plain Packages index. A repository of
/// 100,000 packages has a Packages file of roughly 100-150 MiB uncompressed;
/// the cap applies to the file actually fetched and to what it inflates to.
pub const DEFAULT_MAX_INDEX_BYTES: u64 = 512 << 20;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub repository: Repository,
    pub agent: Agent,
    pub install: Install,
    pub health: Health,
}

#[derive(Debug, Clone)]
pub struct Repository {
    pub url: RepoUrl,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub suite: String,
    pub component: String,
    /// `None` means "ask dpkg --print-architecture" (see [`Config::architecture`]).
    pub architecture: Option<String>,
    pub keyring: PathBuf,
    pub max_age: Option<Duration>,
    pub clock_skew: Duration,
    pub max_release_bytes: u64,
    pub max_index_bytes: u64,
}

/// Where the repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoUrl {
    /// `s3://bucket[/prefix]`; the prefix has no leading or trailing slash.
    S3 { bucket: String, prefix: String },
    /// `file:///absolute/dir`.
    File(PathBuf),
}

impl std::fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepoUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RepoUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            RepoUrl::File(dir) => write!(f, "file://{}", dir.display()),
        }
    }
}

impl RepoUrl {
    pub fn parse(text: &str) -> Result<RepoUrl, String> {
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !valid_bucket(bucket) {
                return Err(format!("{bucket:?} is not a valid S3 bucket name"));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|part| part == ".." || part == ".") {
                return Err("the prefix must not contain '.' or '..' segments".into());
            }
            Ok(RepoUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            })
        } else if let Some(path) = text.strip_prefix("file://") {
            let path = Path::new(path);
            if !path.is_absolute() {
                return Err("file:// URLs need an absolute path (file:///srv/apt)".into());
            }
            Ok(RepoUrl::File(path.to_path_buf()))
        } else {
            Err("must start with s3:// or file://".into())
        }
    }
}

fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && !name.starts_with(['.', '-'])
        && !name.ends_with(['.', '-'])
}

#[derive(Debug, Clone)]
pub struct Agent {
    pub packages: Vec<PackageSpec>,
    pub interval: Duration,
    pub jitter: Duration,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Deadline for reading the repository in one cycle (dpkg is not under
    /// it: a started install always finishes).
    pub cycle_timeout: Duration,
}

/// One entry of `agent.packages`: `name` or `name=version` (a pin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSpec {
    pub name: String,
    pub pinned: Option<String>,
}

impl PackageSpec {
    pub fn parse(text: &str) -> Result<PackageSpec, String> {
        let (name, pinned) = match text.split_once('=') {
            Some((name, version)) => (name, Some(version)),
            None => (text, None),
        };
        if !valid_package_name(name) {
            return Err(format!(
                "{name:?} is not a Debian package name ([a-z0-9][a-z0-9+.-]+)"
            ));
        }
        if let Some(version) = pinned {
            version
                .parse::<debversion::Version>()
                .map_err(|e| format!("pinned version {version:?} of {name}: {e}"))?;
            // dpkg refuses an empty upstream part ("1:" or "1:-2").
            let upstream = version.split_once(':').map_or(version, |(_, rest)| rest);
            if !upstream.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(format!(
                    "pinned version {version:?} of {name}: the upstream version must start with a digit"
                ));
            }
        }
        Ok(PackageSpec {
            name: name.to_string(),
            pinned: pinned.map(str::to_string),
        })
    }
}

impl std::fmt::Display for PackageSpec {
    /// As written in the config: `name` or `name=version`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pinned {
            Some(version) => write!(f, "{}={version}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Debian Policy 5.6.1: at least two characters, lower case letters, digits,
/// `+ - .`, starting with an alphanumeric.
pub fn valid_package_name(name: &str) -> bool {
    name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

#[derive(Debug, Clone)]
pub struct Install {
    pub root: PathBuf,
    /// How long to wait for another package manager's dpkg lock before the
    /// cycle is deferred.
    pub lock_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Health {
    pub listen: SocketAddr,
    pub check_url: Option<String>,
    /// Consecutive 2xx answers of `check_url` that make a new version healthy.
    pub healthy_after: u32,
    /// How long a new version has to become healthy before it is rolled back.
    pub health_timeout: Duration,
    /// Time between two probes of `check_url` while waiting.
    pub check_interval: Duration,
    /// How long `/healthz` answers 503 before dpkg starts, so the load
    /// balancer stops sending traffic first.
    pub drain: Duration,
}

// ---- the file as written ------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    repository: RawRepository,
    agent: RawAgent,
    #[serde(default)]
    install: RawInstall,
    #[serde(default)]
    health: RawHealth,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    url: String,
    endpoint: Option<String>,
    region: Option<String>,
    suite: String,
    component: Option<String>,
    architecture: Option<String>,
    keyring: PathBuf,
    max_age: Option<String>,
    clock_skew: Option<String>,
    max_release_bytes: Option<u64>,
    max_index_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    packages: Vec<String>,
    interval: Option<String>,
    jitter: Option<String>,
    state_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    cycle_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawInstall {
    root: Option<PathBuf>,
    lock_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    listen: Option<String>,
    check_url: Option<String>,
    healthy_after: Option<u32>,
    health_timeout: Option<String>,
    check_interval: Option<String>,
    drain: Option<String>,
}

/// Collects problems as `key: message` so all are reported at once.
struct Problems(Vec<String>);

impl Problems {
    fn check<T>(&mut self, key: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(message) => {
                self.0.push(format!("{key}: {message}"));
                None
            }
        }
    }
}

fn duration(text: Option<&str>, default: Duration) -> Result<Duration, String> {
    match text {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| format!("{text:?} is not a duration like \"60s\" or \"5m\": {e}")),
    }
}

fn http_url(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .ok_or_else(|| format!("{text:?} must start with http:// or https://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{text:?} has no host"));
    }
    Ok(text.trim_end_matches('/').to_string())
}

impl Config {
    /// Reads and validates `path`. Relative paths in the file are resolved
    /// against the file's directory, so a config can travel with its keyring.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(path, &text)
    }

    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let mut problems = Problems(Vec::new());

        let r = raw.repository;
        let url = problems.check("repository.url", RepoUrl::parse(&r.url));
        let endpoint = r
            .endpoint
            .as_deref()
            .and_then(|e| problems.check("repository.endpoint", http_url(e)));
        if endpoint.is_some() && matches!(url, Some(RepoUrl::File(_))) {
            problems
                .0
                .push("repository.endpoint: only meaningful with an s3:// url".into());
        }
        if r.suite.is_empty() || r.suite.contains(['/', ' ']) || r.suite.contains("..") {
            problems.0.push(format!(
                "repository.suite: {:?} is not a suite name",
                r.suite
            ));
        }
        let component = r.component.unwrap_or_else(|| "main".to_string());
        if component.is_empty() || component.contains(['/', ' ']) || component.contains("..") {
            problems.0.push(format!(
                "repository.component: {component:?} is not a component name"
            ));
        }
        if let Some(arch) = &r.architecture
            && (arch.is_empty()
                || !arch
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
        {
            problems.0.push(format!(
                "repository.architecture: {arch:?} is not a Debian architecture"
            ));
        }
        let max_age = match r.max_age.as_deref() {
            None => None,
            Some(text) => {
                problems.check("repository.max_age", duration(Some(text), Duration::ZERO))
            }
        };
        let clock_skew = problems
            .check(
                "repository.clock_skew",
                duration(r.clock_skew.as_deref(), Duration::from_secs(300)),
            )
            .unwrap_or_default();
        for (key, value) in [
            ("repository.max_release_bytes", r.max_release_bytes),
            ("repository.max_index_bytes", r.max_index_bytes),
        ] {
            if value == Some(0) {
                problems.0.push(format!("{key}: must be greater than 0"));
            }
        }

        let a = raw.agent;
        if a.packages.is_empty() {
            problems
                .0
                .push("agent.packages: list at least one package".into());
        }
        let mut packages = Vec::new();
        for (i, text) in a.packages.iter().enumerate() {
            if let Some(spec) =
                problems.check(&format!("agent.packages[{i}]"), PackageSpec::parse(text))
            {
                if packages.iter().any(|p: &PackageSpec| p.name == spec.name) {
                    problems.0.push(format!(
                        "agent.packages[{i}]: {} is listed twice",
                        spec.name
                    ));
                }
                packages.push(spec);
            }
        }
        let interval = problems
            .check(
                "agent.interval",
                duration(a.interval.as_deref(), Duration::from_secs(60)),
            )
            .unwrap_or(Duration::from_secs(60));
        if interval < Duration::from_secs(1) {
            problems
                .0
                .push("agent.interval: must be at least 1s".into());
        }
        let jitter = problems
            .check(
                "agent.jitter",
                duration(a.jitter.as_deref(), Duration::from_secs(10)),
            )
            .unwrap_or_default();
        let cycle_timeout = problems
            .check(
                "agent.cycle_timeout",
                duration(a.cycle_timeout.as_deref(), Duration::from_secs(600)),
            )
            .unwrap_or_default();
        if cycle_timeout.is_zero() {
            problems
                .0
                .push("agent.cycle_timeout: must be greater than 0".into());
        }

        let listen = raw.health.listen.as_deref().unwrap_or("0.0.0.0:9100");
        let listen = problems.check(
            "health.listen",
            listen
                .parse::<SocketAddr>()
                .map_err(|e| format!("{listen:?} is not ADDRESS:PORT: {e}")),
        );
        let check_url = raw.health.check_url.as_deref().and_then(|u| {
            let checked = http_url(u).and_then(|u| match u.starts_with("http://") {
                true => Ok(u),
                false => {
                    Err("the app probe speaks plain http:// (it is meant for 127.0.0.1)".into())
                }
            });
            problems.check("health.check_url", checked)
        });

        let lock_timeout = problems
            .check(
                "install.lock_timeout",
                duration(
                    raw.install.lock_timeout.as_deref(),
                    Duration::from_secs(300),
                ),
            )
            .unwrap_or_default();
        let healthy_after = raw.health.healthy_after.unwrap_or(3);
        if healthy_after == 0 {
            problems
                .0
                .push("health.healthy_after: must be at least 1".into());
        }
        let health_timeout = problems
            .check(
                "health.health_timeout",
                duration(
                    raw.health.health_timeout.as_deref(),
                    Duration::from_secs(60),
                ),
            )
            .unwrap_or_default();
        let check_interval = problems
            .check(
                "health.check_interval",
                duration(raw.health.check_interval.as_deref(), Duration::from_secs(1)),
            )
            .unwrap_or(Duration::from_secs(1));
        if check_interval.is_zero() {
            problems
                .0
                .push("health.check_interval: must be greater than 0".into());
        }
        let drain = problems
            .check(
                "health.drain",
                duration(raw.health.drain.as_deref(), Duration::ZERO),
            )
            .unwrap_or_default();

        match (url, listen, problems.0.is_empty()) {
            (Some(url), Some(listen), true) => Ok(Config {
                path: path.to_path_buf(),
                repository: Repository {
                    url,
                    endpoint,
                    region: r.region,
                    suite: r.suite,
                    component,
                    architecture: r.architecture,
                    keyring: resolve(r.keyring),
                    max_age,
                    clock_skew,
                    max_release_bytes: r.max_release_bytes.unwrap_or(DEFAULT_MAX_RELEASE_BYTES),
                    max_index_bytes: r.max_index_bytes.unwrap_or(DEFAULT_MAX_INDEX_BYTES),
                },
                agent: Agent {
                    packages,
                    interval,
                    jitter,
                    state_dir: resolve(a.state_dir.unwrap_or_else(|| "/var/lib/pulldeploy".into())),
                    cache_dir: resolve(
                        a.cache_dir
                            .unwrap_or_else(|| "/var/cache/pulldeploy".into()),
                    ),
                    cycle_timeout,
                },
                install: Install {
                    root: resolve(raw.install.root.unwrap_or_else(|| "/".into())),
                    lock_timeout,
                },
                health: Health {
                    listen,
                    check_url,
                    healthy_after,
                    health_timeout,
                    check_interval,
                    drain,
                },
            }),
            _ => Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems: problems.0,
            }),
        }
    }

    /// The configured architecture, or the node's (`dpkg --print-architecture`).
    pub fn architecture(&self) -> Result<String, ConfigError> {
        if let Some(arch) = &self.repository.architecture {
            return Ok(arch.clone());
        }
        let output = std::process::Command::new("dpkg")
            .arg("--print-architecture")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| ConfigError::Architecture(e.to_string()))?;
        let arch = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if !output.status.success() || arch.is_empty() {
            return Err(ConfigError::Architecture(format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(arch)
    }

    /// The state file, `state_dir/state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.agent.state_dir.join("state.json")
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn design_md_example_is_accepted() {
        let text = r#"
[repository]
url = "s3://acme-apt/repo"
endpoint = "http://127.0.0.1:9000"
region = "eu-west-1"
suite = "production"
component = "main"
architecture = "amd64"
keyring = "/etc/pulldeploy/keyring.asc"
[agent]
packages = ["myapp"]
interval = "60s"
jitter = "10s"
state_dir = "/var/lib/pulldeploy"
cache_dir = "/var/cache/pulldeploy"
[install]
root = "/"
[health]
listen = "0.0.0.0:9100"
check_url = "http://127.0.0.1:8080/health"
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
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let text = MINIMAL.replace("[agent]", "[agent]\npackage = 1");
        match parse(&text) {
            Err(ConfigError::Syntax { message, .. }) => {
                assert!(message.contains("package"), "{message}")
            }
            other => panic!("expected Syntax, got {other:?}"),
        }
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
}
