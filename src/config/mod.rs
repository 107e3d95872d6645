//! The TOML configuration: schema, defaults and validation.
//!
//! `Config::from_file` either returns a `Config` in which every value has been
//! checked, or a [`ConfigError::Invalid`] listing every problem with its key:
//! unknown keys and tables, values of the wrong TOML type, values that do not
//! validate. The file is read key by key with [`Section`], so one problem
//! does not hide the next; only a file that is not TOML at all stops at its
//! first error ([`ConfigError::Syntax`]).
//!
//! Each table has a `*Settings` type (`[agent]` is [`AgentSettings`]), so
//! it is not mistaken for the module it configures (`agent::Agent`).
//! [`read`] walks the file; `tests` holds the unit tests.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml::Table;

use crate::error::ConfigError;
use crate::repo::names::{self, Architecture, Suite};

mod read;
mod webhook_url;

pub(crate) use read::duration_in;

use read::{Problems, Section};

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
    pub repository: RepositorySettings,
    pub agent: AgentSettings,
    pub install: InstallSettings,
    pub health: HealthSettings,
    /// `[fleet]`: always present (every key has a default); without
    /// `url` the node writes nothing to S3.
    pub fleet: FleetSettings,
    pub lifecycle: Option<LifecycleSettings>,
    pub notify: Option<NotifySettings>,
}

/// `[repository]`: where the repository is, which suite of it, and the
/// key and limits its Release is checked with.
#[derive(Debug, Clone)]
pub struct RepositorySettings {
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

/// `[agent]`: the packages followed, how often, and the agent's own
/// directories.
#[derive(Debug, Clone)]
pub struct AgentSettings {
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
pub use webhook_url::{WebhookUrl, parse_webhook_url};

/// `[install]`: where dpkg installs, and how long it waits for dpkg's lock.
#[derive(Debug, Clone)]
pub struct InstallSettings {
    pub root: PathBuf,
    /// How long to wait for another package manager's dpkg lock before the
    /// cycle is deferred.
    pub lock_timeout: Duration,
}

/// `[health]`: the `/healthz` listener and the app probe that decides
/// whether a new version stays.
#[derive(Debug, Clone)]
pub struct HealthSettings {
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

/// `[fleet]`: where nodes coordinate a rollout (leases, halt markers,
/// reports), and who this node is in it.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// `s3://bucket[/prefix]` or `file:///dir`; `None`: the node follows
    /// the signed rollout policy but writes nothing (no leases, no halt
    /// markers, no reports). An s3:// url is reached through
    /// `repository.endpoint` and `repository.region`.
    pub url: Option<RepoUrl>,
    /// `None`: IMDS instance-id, else /etc/machine-id (see `fleet::node_id`).
    pub node_id: Option<String>,
    pub report_interval: Duration,
}

/// `[lifecycle]`: EC2 Auto Scaling lifecycle hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleSettings {
    /// Completed with CONTINUE after the first healthy commit, ABANDON
    /// when the first install fails for good.
    pub launch_hook: Option<String>,
    /// On target-lifecycle-state `Terminated`: drain, then CONTINUE.
    pub terminate_hook: Option<String>,
    /// `None`: the IMDS instance tag `aws:autoscaling:groupName`.
    pub group: Option<String>,
}

/// `[notify]`: an incoming webhook (Slack-compatible `{"text": ...}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifySettings {
    /// A credential: never printed (see [`WebhookUrl`]).
    pub webhook: WebhookUrl,
    pub events: Vec<NodeEvent>,
    /// Consecutive failed cycles that make a `failing` event (once per
    /// streak).
    pub failing_after: u32,
}

/// A node event `[notify] events` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeEvent {
    /// The node rolled a version back (failed health gate or dpkg).
    Rollback,
    /// The node wrote a halt marker for a version.
    Halt,
    /// `failing_after` consecutive cycles failed.
    Failing,
    /// Another node uses this node's `[fleet] node_id`.
    DuplicateId,
}

impl NodeEvent {
    pub const ALL: [NodeEvent; 4] = [
        NodeEvent::Rollback,
        NodeEvent::Halt,
        NodeEvent::Failing,
        NodeEvent::DuplicateId,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NodeEvent::Rollback => "rollback",
            NodeEvent::Halt => "halt",
            NodeEvent::Failing => "failing",
            NodeEvent::DuplicateId => "duplicate_id",
        }
    }

    pub fn parse(text: &str) -> Result<NodeEvent, String> {
        NodeEvent::ALL
            .into_iter()
            .find(|e| e.name() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = NodeEvent::ALL.iter().map(|e| e.name()).collect();
                format!(
                    "{text:?} is not a node event; one of {} (the publisher's \"published\", \"promoted\" and \"rollout\" are sent by the publish commands)",
                    names.join(", ")
                )
            })
    }
}

// ---- defaults -------------------------------------------------------------

const DEFAULT_COMPONENT: &str = "main";
/// How far in the future a Release Date may be.
const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(300);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
const MIN_INTERVAL: Duration = Duration::from_secs(1);

// ---- duration ranges ------------------------------------------------------
//
// Every duration key has a range, checked where it is parsed
// ([`Section::take_duration`]): the agent adds these to times (a Release
// Date, a lease expiry) and sleeps on them, and `"300000years"` must be a
// config error naming the key, not an overflow in every cycle.

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
/// humantime's year (365.25 days), so the range reads "10years".
const YEAR: Duration = Duration::from_secs(31_557_600);
/// The shortest positive duration a key that must be "greater than 0" takes.
const POSITIVE: Duration = Duration::from_millis(1);
/// `repository.max_age`: a Release may be up to 10 years old.
const MAX_AGE_RANGE: RangeInclusive<Duration> = Duration::from_secs(1)..=YEAR.saturating_mul(10);
/// `repository.clock_skew`: a Release Date at most a day ahead of the clock.
const CLOCK_SKEW_RANGE: RangeInclusive<Duration> = Duration::ZERO..=DAY;
const INTERVAL_RANGE: RangeInclusive<Duration> = MIN_INTERVAL..=DAY;
const JITTER_RANGE: RangeInclusive<Duration> = Duration::ZERO..=DAY;
const CYCLE_TIMEOUT_RANGE: RangeInclusive<Duration> = POSITIVE..=DAY;
const LOCK_TIMEOUT_RANGE: RangeInclusive<Duration> = Duration::ZERO..=DAY;
const HEALTH_TIMEOUT_RANGE: RangeInclusive<Duration> = Duration::ZERO..=DAY;
const CHECK_INTERVAL_RANGE: RangeInclusive<Duration> = POSITIVE..=HOUR;
const DRAIN_RANGE: RangeInclusive<Duration> = Duration::ZERO..=HOUR;
const REPORT_INTERVAL_RANGE: RangeInclusive<Duration> = MIN_REPORT_INTERVAL..=DAY;

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
const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(300);
const MIN_REPORT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_FAILING_AFTER: u32 = 3;
/// Longest node id: it is an S3 key segment (`nodes/<id>.json`).
const MAX_NODE_ID: usize = 128;

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

/// toml's error as "line L, column C: message", without the line of the
/// file toml quotes: a line may hold a credential (a mistyped `webhook`).
fn syntax_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    let Some(before) = error.span().and_then(|span| text.get(..span.start)) else {
        return message.to_string();
    };
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("line {line}, column {column}: {message}")
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
fn read_repository(mut s: Section, base: &Path) -> (Option<RepositorySettings>, Option<PathBuf>) {
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
    let max_age = s.take_duration("max_age", MAX_AGE_RANGE);
    let clock_skew = s
        .take_duration("clock_skew", CLOCK_SKEW_RANGE)
        .unwrap_or(DEFAULT_CLOCK_SKEW);
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
        (Some(url), Some(suite), Some(keyring)) => Some(RepositorySettings {
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
fn read_agent(mut s: Section, base: &Path, protected: &[(&str, &Path)]) -> Option<AgentSettings> {
    let packages = s
        .need("packages", Section::take_str_list)
        .map(|list| package_specs(&mut s, &list));
    let interval = s
        .take_duration("interval", INTERVAL_RANGE)
        .unwrap_or(DEFAULT_INTERVAL);
    let jitter = s
        .take_duration("jitter", JITTER_RANGE)
        .unwrap_or(DEFAULT_JITTER);
    let cycle_timeout = s
        .take_duration("cycle_timeout", CYCLE_TIMEOUT_RANGE)
        .unwrap_or(DEFAULT_CYCLE_TIMEOUT);
    let state_dir = own_dir(&mut s, "state_dir", DEFAULT_STATE_DIR, base, protected);
    let cache_dir = own_dir(&mut s, "cache_dir", DEFAULT_CACHE_DIR, base, protected);
    s.finish();
    Some(AgentSettings {
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

fn read_install(mut s: Section, base: &Path) -> InstallSettings {
    let root = s.take_path("root").unwrap_or_else(|| DEFAULT_ROOT.into());
    let lock_timeout = s
        .take_duration("lock_timeout", LOCK_TIMEOUT_RANGE)
        .unwrap_or(DEFAULT_LOCK_TIMEOUT);
    s.finish();
    InstallSettings {
        root: resolve(base, root),
        lock_timeout,
    }
}

fn read_health(mut s: Section) -> Option<HealthSettings> {
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
        .take_duration("health_timeout", HEALTH_TIMEOUT_RANGE)
        .unwrap_or(DEFAULT_HEALTH_TIMEOUT);
    let check_interval = s
        .take_duration("check_interval", CHECK_INTERVAL_RANGE)
        .unwrap_or(DEFAULT_CHECK_INTERVAL);
    let drain = s
        .take_duration("drain", DRAIN_RANGE)
        .unwrap_or(DEFAULT_DRAIN);
    s.finish();
    Some(HealthSettings {
        listen: listen?,
        check_url,
        healthy_after,
        health_timeout,
        check_interval,
        drain,
    })
}

fn read_fleet(mut s: Section, repository_url: Option<&RepoUrl>) -> FleetSettings {
    let url = s
        .take_str("url")
        .and_then(|url| s.check("url", RepoUrl::parse(&url)));
    if let (Some(url), Some(repository)) = (&url, repository_url)
        && url == repository
    {
        s.problem(
            "url",
            "is the repository itself; give the fleet a prefix of its own (nodes write there)",
        );
    }
    let node_id = s
        .take_str("node_id")
        .and_then(|id| s.check("node_id", node_id(&id)));
    let report_interval = s
        .take_duration("report_interval", REPORT_INTERVAL_RANGE)
        .unwrap_or(DEFAULT_REPORT_INTERVAL);
    s.finish();
    FleetSettings {
        url,
        node_id,
        report_interval,
    }
}

/// A node id as the fleet uses it: one S3 key segment, readable in a
/// report. Letters, digits, `.`, `_`, `-`; not `.` or `..`.
pub fn node_id(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= MAX_NODE_ID
        && text != "."
        && text != ".."
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    match ok {
        true => Ok(text.to_string()),
        false => Err(format!(
            "{text:?} is not a node id: 1 to {MAX_NODE_ID} letters, digits, '.', '_' or '-'"
        )),
    }
}

/// An Auto Scaling name (hook, group): 1 to 255 printable characters.
fn asg_name(text: &str) -> Result<String, String> {
    match !text.is_empty() && text.len() <= 255 && !text.chars().any(char::is_control) {
        true => Ok(text.to_string()),
        false => Err(format!(
            "{text:?} is not an Auto Scaling name (1 to 255 characters)"
        )),
    }
}

fn read_lifecycle(mut s: Section) -> LifecycleSettings {
    let name = |s: &mut Section, key: &str| {
        s.take_str(key)
            .and_then(|text| s.check(key, asg_name(&text)))
    };
    let launch_hook = name(&mut s, "launch_hook");
    let terminate_hook = name(&mut s, "terminate_hook");
    let group = name(&mut s, "group");
    if launch_hook.is_none() && terminate_hook.is_none() {
        s.problem(
            "launch_hook",
            "[lifecycle] names no hook; set launch_hook and/or terminate_hook, or remove the table",
        );
    }
    s.finish();
    LifecycleSettings {
        launch_hook,
        terminate_hook,
        group,
    }
}

fn read_notify(mut s: Section) -> Option<NotifySettings> {
    let webhook = s
        .need("webhook", Section::take_str)
        .and_then(|url| s.check("webhook", WebhookUrl::parse(&url)));
    let events = match s.take_str_list("events") {
        None => NodeEvent::ALL.to_vec(),
        Some(list) => {
            let mut events = Vec::new();
            for (i, text) in list.iter().enumerate() {
                let key = format!("events[{i}]");
                if let Some(event) = text
                    .as_deref()
                    .and_then(|text| s.check(&key, NodeEvent::parse(text)))
                    && !events.contains(&event)
                {
                    events.push(event);
                }
            }
            events
        }
    };
    let failing_after = s
        .take_u64("failing_after")
        .and_then(|n| {
            let fits = u32::try_from(n).map_err(|_| format!("{n} is more than {}", u32::MAX));
            s.check("failing_after", fits)
        })
        .unwrap_or(DEFAULT_FAILING_AFTER);
    if failing_after == 0 {
        s.problem("failing_after", "must be at least 1");
    }
    s.finish();
    Some(NotifySettings {
        webhook: webhook?,
        events,
        failing_after,
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
            message: syntax_message(text, &e),
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
        let fleet = top.take_table("fleet").unwrap_or_default();
        let lifecycle = top.take_table("lifecycle");
        let notify = top.take_table("notify");
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
        let fleet = read_fleet(
            Section::new(Some("fleet"), fleet, &mut problems),
            repository.as_ref().map(|r| &r.url),
        );
        let lifecycle = lifecycle
            .map(|table| read_lifecycle(Section::new(Some("lifecycle"), table, &mut problems)));
        let notify = notify
            .and_then(|table| read_notify(Section::new(Some("notify"), table, &mut problems)));
        problems.0.extend(unknown.0);

        match (repository, agent, health) {
            (Some(repository), Some(agent), Some(health)) if problems.0.is_empty() => Ok(Config {
                path: path.to_path_buf(),
                repository,
                agent,
                install,
                health,
                fleet,
                lifecycle,
                notify,
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
mod tests;
