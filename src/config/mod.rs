//! The TOML configuration: schema, defaults and validation.
//!
//! `Config::from_file` either returns a `Config` in which every value has been
//! checked, or a [`ConfigError::Invalid`] listing every problem with its key:
//! unknown keys and tables, values of the wrong TOML type, values that do not
//! validate. The file is read key by key with [`Section`], so one problem
//! does not hide the next; only a file that is not TOML at all stops at its
//! first error ([`ConfigError::Syntax`]).

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use crate::error::ConfigError;
use crate::repo::names::{self, Architecture, Suite};

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
pub use crate::repo::names::PackageSpec;

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

// ---- defaults -------------------------------------------------------------

const DEFAULT_COMPONENT: &str = "main";
/// How far in the future a Release Date may be.
const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(300);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
const MIN_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_JITTER: Duration = Duration::from_secs(10);
const DEFAULT_CYCLE_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_STATE_DIR: &str = "/var/lib/pulldeploy";
const DEFAULT_CACHE_DIR: &str = "/var/cache/pulldeploy";
const DEFAULT_ROOT: &str = "/";
const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_LISTEN: &str = "0.0.0.0:9100";
const DEFAULT_HEALTHY_AFTER: u32 = 3;
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_DRAIN: Duration = Duration::ZERO;

// ---- reading the file key by key ------------------------------------------

/// Collects problems as `key: message` so all are reported at once.
#[derive(Default)]
struct Problems(Vec<String>);

/// One table of the file. Each `take_*` removes its key and checks its TOML
/// type; a problem is recorded under the key's full name (`agent.interval`)
/// and reading goes on. [`Section::finish`] reports the keys nobody took.
struct Section<'p> {
    /// `None` for the top level of the file.
    name: Option<&'static str>,
    table: Table,
    problems: &'p mut Problems,
}

impl<'p> Section<'p> {
    fn new(name: Option<&'static str>, table: Table, problems: &'p mut Problems) -> Self {
        Section {
            name,
            table,
            problems,
        }
    }

    fn problem(&mut self, key: &str, message: impl std::fmt::Display) {
        let problem = match self.name {
            Some(section) => format!("{section}.{key}: {message}"),
            None => format!("{key}: {message}"),
        };
        self.problems.0.push(problem);
    }

    /// `result`'s value, or `None` with its error recorded under `key`.
    fn check<T>(&mut self, key: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.problem(key, message)).ok()
    }

    /// Removes `key` and converts its value; a value of another type is
    /// recorded as "expected `expected`, found ...".
    fn take<T>(
        &mut self,
        key: &str,
        expected: &str,
        convert: impl FnOnce(Value) -> Result<T, Value>,
    ) -> Option<T> {
        let value = self.table.remove(key)?;
        match convert(value) {
            Ok(value) => Some(value),
            Err(other) => {
                self.problem(
                    key,
                    format!("expected {expected}, found {}", describe(&other)),
                );
                None
            }
        }
    }

    /// Reads `key` with `read`; its absence is a problem too.
    fn need<T>(&mut self, key: &str, read: impl FnOnce(&mut Self, &str) -> Option<T>) -> Option<T> {
        if self.table.contains_key(key) {
            read(self, key)
        } else {
            self.problem(key, "missing (required)");
            None
        }
    }

    fn take_str(&mut self, key: &str) -> Option<String> {
        self.take(key, "a string", string)
    }

    fn take_path(&mut self, key: &str) -> Option<PathBuf> {
        let text = self.take(key, "a path (a string)", string)?;
        if text.is_empty() {
            self.problem(key, "expected a path, found an empty string");
            return None;
        }
        Some(PathBuf::from(text))
    }

    fn take_duration(&mut self, key: &str) -> Option<Duration> {
        let text = self.take(key, "a string like \"60s\"", string)?;
        let parsed = humantime::parse_duration(&text)
            .map_err(|e| format!("{text:?} is not a duration like \"60s\" or \"5m\": {e}"));
        self.check(key, parsed)
    }

    fn take_u64(&mut self, key: &str) -> Option<u64> {
        self.take(key, "a whole number (0 or more)", |value| match value {
            Value::Integer(n) => u64::try_from(n).map_err(|_| value),
            other => Err(other),
        })
    }

    /// A list of strings. An element of another type is recorded under
    /// `key[i]` and comes back as `None`, so the others keep their index.
    fn take_str_list(&mut self, key: &str) -> Option<Vec<Option<String>>> {
        let items = self.take(
            key,
            "a list of strings like [\"myapp\"]",
            |value| match value {
                Value::Array(items) => Ok(items),
                other => Err(other),
            },
        )?;
        let list = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match string(item) {
                Ok(text) => Some(text),
                Err(other) => {
                    let found = describe(&other);
                    self.problem(
                        &format!("{key}[{i}]"),
                        format!("expected a string, found {found}"),
                    );
                    None
                }
            })
            .collect();
        Some(list)
    }

    /// A `[table]` of the top level.
    fn take_table(&mut self, key: &str) -> Option<Table> {
        self.take(key, "a table", |value| match value {
            Value::Table(table) => Ok(table),
            other => Err(other),
        })
    }

    /// Reports every key and table that no reader took.
    fn finish(mut self) {
        for (key, value) in std::mem::take(&mut self.table) {
            match value {
                Value::Table(_) => self.problem(&key, "unknown table"),
                _ => self.problem(&key, "unknown key"),
            }
        }
    }
}

fn string(value: Value) -> Result<String, Value> {
    match value {
        Value::String(text) => Ok(text),
        other => Err(other),
    }
}

/// A value as a problem names it: its TOML type, and the value if scalar.
fn describe(value: &Value) -> String {
    match value {
        Value::String(text) => format!("string {text:?}"),
        Value::Integer(n) => format!("integer {n}"),
        Value::Float(x) => format!("float {x}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("datetime {d}"),
        Value::Array(_) => "an array".into(),
        Value::Table(_) => "a table".into(),
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

/// A path of the file, relative ones against the file's directory.
fn resolve(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

// ---- the sections ---------------------------------------------------------

/// `[repository]`, and its keyring apart: the agent's directories are
/// checked against the keyring even when another key here is wrong.
fn read_repository(mut s: Section, base: &Path) -> (Option<Repository>, Option<PathBuf>) {
    let url = s
        .need("url", Section::take_str)
        .and_then(|url| s.check("url", RepoUrl::parse(&url)));
    let endpoint = s
        .take_str("endpoint")
        .and_then(|endpoint| s.check("endpoint", http_url(&endpoint)));
    if endpoint.is_some() && matches!(url, Some(RepoUrl::File(_))) {
        s.problem("endpoint", "only meaningful with an s3:// url");
    }
    let region = s.take_str("region");
    let suite = s
        .need("suite", Section::take_str)
        .and_then(|suite| s.check("suite", Suite::parse(&suite)));
    let component = s
        .take_str("component")
        .unwrap_or_else(|| DEFAULT_COMPONENT.to_string());
    if let Err(message) = names::Component::parse(&component) {
        s.problem("component", message);
    }
    let architecture = s
        .take_str("architecture")
        .and_then(|arch| s.check("architecture", Architecture::parse(&arch)));
    let keyring = s
        .need("keyring", Section::take_path)
        .map(|path| resolve(base, path));
    let max_age = s.take_duration("max_age");
    let clock_skew = s.take_duration("clock_skew").unwrap_or(DEFAULT_CLOCK_SKEW);
    let mut positive = |key: &str, default: u64| match s.take_u64(key) {
        Some(0) => {
            s.problem(key, "must be greater than 0");
            default
        }
        value => value.unwrap_or(default),
    };
    let max_release_bytes = positive("max_release_bytes", DEFAULT_MAX_RELEASE_BYTES);
    let max_index_bytes = positive("max_index_bytes", DEFAULT_MAX_INDEX_BYTES);
    s.finish();

    let repository = match (url, suite, &keyring) {
        (Some(url), Some(suite), Some(keyring)) => Some(Repository {
            url,
            endpoint,
            region,
            suite: suite.into_string(),
            component,
            architecture: architecture.map(Architecture::into_string),
            keyring: keyring.clone(),
            max_age,
            clock_skew,
            max_release_bytes,
            max_index_bytes,
        }),
        _ => None,
    };
    (repository, keyring)
}

/// `[agent]`. Its directories must not hold any of the `protected` files
/// (what, path): see [`own_dir`].
fn read_agent(mut s: Section, base: &Path, protected: &[(&str, &Path)]) -> Option<Agent> {
    let packages = s
        .need("packages", Section::take_str_list)
        .map(|list| package_specs(&mut s, &list));
    let interval = s.take_duration("interval").unwrap_or(DEFAULT_INTERVAL);
    if interval < MIN_INTERVAL {
        s.problem(
            "interval",
            format!(
                "must be at least {}",
                humantime::format_duration(MIN_INTERVAL)
            ),
        );
    }
    let jitter = s.take_duration("jitter").unwrap_or(DEFAULT_JITTER);
    let cycle_timeout = s
        .take_duration("cycle_timeout")
        .unwrap_or(DEFAULT_CYCLE_TIMEOUT);
    if cycle_timeout.is_zero() {
        s.problem("cycle_timeout", "must be greater than 0");
    }
    let state_dir = own_dir(&mut s, "state_dir", DEFAULT_STATE_DIR, base, protected);
    let cache_dir = own_dir(&mut s, "cache_dir", DEFAULT_CACHE_DIR, base, protected);
    s.finish();
    Some(Agent {
        packages: packages?,
        interval,
        jitter,
        state_dir,
        cache_dir,
        cycle_timeout,
    })
}

/// The entries of `agent.packages` (`None`: of the wrong type, reported).
fn package_specs(s: &mut Section, list: &[Option<String>]) -> Vec<PackageSpec> {
    if list.is_empty() {
        s.problem("packages", "list at least one package");
    }
    let mut specs: Vec<PackageSpec> = Vec::new();
    for (i, text) in list.iter().enumerate() {
        let key = format!("packages[{i}]");
        let Some(spec) = text
            .as_deref()
            .and_then(|text| s.check(&key, PackageSpec::parse(text)))
        else {
            continue;
        };
        if specs.iter().any(|p| p.name == spec.name) {
            s.problem(&key, format!("{} is listed twice", spec.name));
        }
        specs.push(spec);
    }
    specs
}

/// `agent.state_dir` or `agent.cache_dir`: the agent creates, replaces and
/// removes files there, so the directory must be its own. Refused: `/`,
/// and a directory that holds (is, or is an ancestor of, the directory of)
/// one of the `protected` files. Compared as the file system resolves them
/// (see [`real_path`]); the directory need not exist.
fn own_dir(
    s: &mut Section,
    key: &str,
    default: &str,
    base: &Path,
    protected: &[(&str, &Path)],
) -> PathBuf {
    let written = s.take_path(key).unwrap_or_else(|| default.into());
    let dir = resolve(base, written.clone());
    let real = real_path(&dir);
    let shown = if written == real {
        format!("{written:?}")
    } else {
        format!("{written:?} ({})", real.display())
    };
    let own = format!("the agent needs a directory of its own (default {default})");
    if real.parent().is_none() {
        s.problem(key, format!("{shown} is the root directory; {own}"));
        return dir;
    }
    let held: Vec<String> = protected
        .iter()
        .filter(|(_, file)| {
            holding_dirs(file)
                .iter()
                .any(|holder| holder.starts_with(&real))
        })
        .map(|(what, file)| format!("the {what} {}", file.display()))
        .collect();
    if !held.is_empty() {
        s.problem(key, format!("{shown} holds {}; {own}", held.join(" and ")));
    }
    dir
}

/// The directories `file` is in: the one its path names, and the one it
/// really is in when the path leads through a symlink.
fn holding_dirs(file: &Path) -> [PathBuf; 2] {
    let named = real_path(file.parent().unwrap_or(Path::new(".")));
    let real = real_path(file);
    let real_dir = real
        .parent()
        .map_or_else(|| real.clone(), Path::to_path_buf);
    [named, real_dir]
}

/// `path` as the file system resolves it: absolute, and canonical (no
/// symlinks, `.` or `..`) as far as it exists; the part that does not
/// exist yet is normalized lexically.
fn real_path(path: &Path) -> PathBuf {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let components: Vec<Component> = absolute.components().collect();
    let mut real = PathBuf::new();
    let mut rest: &[Component] = &components;
    for existing in (1..=components.len()).rev() {
        let head: PathBuf = components[..existing].iter().collect();
        if let Ok(canonical) = head.canonicalize() {
            real = canonical;
            rest = &components[existing..];
            break;
        }
    }
    for component in rest {
        match component {
            Component::ParentDir => {
                real.pop();
            }
            Component::CurDir => {}
            other => real.push(other),
        }
    }
    real
}

fn read_install(mut s: Section, base: &Path) -> Install {
    let root = s.take_path("root").unwrap_or_else(|| DEFAULT_ROOT.into());
    let lock_timeout = s
        .take_duration("lock_timeout")
        .unwrap_or(DEFAULT_LOCK_TIMEOUT);
    s.finish();
    Install {
        root: resolve(base, root),
        lock_timeout,
    }
}

fn read_health(mut s: Section) -> Option<Health> {
    let listen = s
        .take_str("listen")
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen = s.check(
        "listen",
        listen
            .parse::<SocketAddr>()
            .map_err(|e| format!("{listen:?} is not ADDRESS:PORT: {e}")),
    );
    let check_url = s.take_str("check_url").and_then(|url| {
        let checked = http_url(&url).and_then(|url| match url.starts_with("http://") {
            true => Ok(url),
            false => Err("the app probe speaks plain http:// (it is meant for 127.0.0.1)".into()),
        });
        s.check("check_url", checked)
    });
    let healthy_after = s
        .take_u64("healthy_after")
        .and_then(|n| {
            let fits = u32::try_from(n).map_err(|_| format!("{n} is more than {}", u32::MAX));
            s.check("healthy_after", fits)
        })
        .unwrap_or(DEFAULT_HEALTHY_AFTER);
    if healthy_after == 0 {
        s.problem("healthy_after", "must be at least 1");
    }
    let health_timeout = s
        .take_duration("health_timeout")
        .unwrap_or(DEFAULT_HEALTH_TIMEOUT);
    let check_interval = s
        .take_duration("check_interval")
        .unwrap_or(DEFAULT_CHECK_INTERVAL);
    if check_interval.is_zero() {
        s.problem("check_interval", "must be greater than 0");
    }
    let drain = s.take_duration("drain").unwrap_or(DEFAULT_DRAIN);
    s.finish();
    Some(Health {
        listen: listen?,
        check_url,
        healthy_after,
        health_timeout,
        check_interval,
        drain,
    })
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

    /// Validates `text` as the config file `path`: every problem is
    /// collected, with its key, before the whole list is returned. Only
    /// text that is not TOML at all stops at its first error.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let table: Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut problems = Problems::default();
        // Unknown tables are listed after the problems inside known ones.
        let mut unknown = Problems::default();

        let mut top = Section::new(None, table, &mut unknown);
        let repository = top.need("repository", Section::take_table);
        let agent = top.need("agent", Section::take_table);
        let install = top.take_table("install").unwrap_or_default();
        let health = top.take_table("health").unwrap_or_default();
        top.finish();

        let (repository, keyring) = match repository {
            Some(table) => {
                read_repository(Section::new(Some("repository"), table, &mut problems), base)
            }
            None => (None, None),
        };
        let mut protected = vec![("config file", path)];
        if let Some(keyring) = &keyring {
            protected.push(("keyring", keyring.as_path()));
        }
        let agent = agent.and_then(|table| {
            read_agent(
                Section::new(Some("agent"), table, &mut problems),
                base,
                &protected,
            )
        });
        let install = read_install(Section::new(Some("install"), install, &mut problems), base);
        let health = read_health(Section::new(Some("health"), health, &mut problems));
        problems.0.extend(unknown.0);

        match (repository, agent, health) {
            (Some(repository), Some(agent), Some(health)) if problems.0.is_empty() => Ok(Config {
                path: path.to_path_buf(),
                repository,
                agent,
                install,
                health,
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
}
