//! Command-line definitions (clap). The commands, their options and the
//! exit codes are a contract other tools are written against: extend them,
//! never break them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::repo::names::{Architecture, Component, PackageSpec, Suite};

/// Pull-based deployment agent: installs the newest signed version of your
/// packages from an apt repository in S3 or a local directory.
#[derive(Debug, Parser)]
#[command(name = "pulldeploy", version, about)]
pub struct Cli {
    /// Log format on stderr: text (timestamps left out under journald,
    /// which adds its own) or json (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: a cycle every interval (+ jitter), /healthz and /metrics, SIGHUP reload.
    Run(ConfigArg),
    /// Run one cycle and exit: 0 up to date or installed, non-zero on failure.
    Once(ConfigArg),
    /// Show what is installed, the last poll and the last error.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config and the keyring; reaches nothing on the network.
    CheckConfig(ConfigArg),
    /// Add .deb packages to a suite and publish it, signed (repository side).
    Publish(PublishArgs),
    /// Add the exact published .deb of PKG[=VER] in one suite to another.
    Promote(PromoteArgs),
    /// Sign a suite again with a new Date (and Valid-Until); same content.
    Refresh(RefreshArgs),
    /// The suite's signed rollout policy: waves, in-flight limit, pause,
    /// pins. Each change re-signs the suite (atomic, like publish).
    Rollout(RolloutArgs),
    /// The fleet of a suite (fleet prefix): status of the nodes, halted versions, leases; unhalt.
    Fleet(crate::fleet::FleetArgs),
    /// Print a shell completion script (for packaging).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page, roff (for packaging).
    Manpage,
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path to the TOML configuration.
    #[arg(long, short = 'c', default_value = "/etc/pulldeploy/config.toml")]
    pub config: PathBuf,
}

/// Where and how a publisher writes (publish, promote, refresh).
#[derive(Debug, Clone, clap::Args)]
pub struct RepoArgs {
    /// The repository: s3://bucket[/prefix] or file:///absolute/dir.
    #[arg(long, value_parser = crate::config::RepoUrl::parse)]
    pub repo: crate::config::RepoUrl,
    /// Any S3-compatible server (path-style requests).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// AWS region; else from the environment or profile (us-east-1 with --endpoint).
    #[arg(long)]
    pub region: Option<String>,
    /// The component the packages go to.
    #[arg(long, default_value = "main", value_parser = component)]
    pub component: String,
    /// OpenPGP secret key file (armored or binary, no passphrase) that signs the suite.
    #[arg(long)]
    pub signing_key: PathBuf,
    /// Write Valid-Until = Date + this (e.g. 7d, at most 1000 years); agents refuse
    /// the suite after it.
    /// Default: the period the suite already has (none for a new suite).
    #[arg(long, value_parser = valid_for)]
    pub valid_for: Option<std::time::Duration>,
    /// How long the suite's publish lock is held before others may break it.
    /// At most 1 day (0s: every holder's lock is stale at once).
    #[arg(long, default_value = "10m", value_parser = lock_ttl)]
    pub lock_ttl: std::time::Duration,
    /// How long to wait for another publisher's lock before giving up (exit 75);
    /// at most 1 day.
    #[arg(long, default_value = "5m", value_parser = lock_wait)]
    pub lock_wait: std::time::Duration,
    /// Incoming-webhook URL (Slack-compatible) told what the command changed;
    /// best effort, waited for at most 10 s, never fails the command.
    /// The URL is never printed, also not when it is refused.
    #[arg(long, env = "PULLDEPLOY_WEBHOOK", hide_env_values = true, value_parser = crate::webhook::WebhookArg)]
    pub webhook: Option<crate::webhook::WebhookUrl>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The suite (dists/SUITE).
    #[arg(long, value_parser = suite)]
    pub suite: String,
    /// Keep at most N versions of each package (per architecture); default: all.
    #[arg(long, value_parser = keep)]
    pub keep: Option<usize>,
    /// An architecture the suite must have an index for (repeatable); needed
    /// when only Architecture: all packages are published.
    #[arg(long, value_parser = index_architecture)]
    pub architecture: Vec<String>,
    /// The .deb files to add.
    #[arg(required = true, value_name = "PKG.deb")]
    pub debs: Vec<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The suite to take the packages from.
    #[arg(long, value_parser = suite)]
    pub from: String,
    /// The suite to add them to.
    #[arg(long, value_parser = suite)]
    pub to: String,
    /// Keep at most N versions of each package in the target suite; default: all.
    #[arg(long, value_parser = keep)]
    pub keep: Option<usize>,
    /// PACKAGE (its newest version) or PACKAGE=VERSION.
    #[arg(required = true, value_name = "PKG[=VER]", value_parser = package_spec)]
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RefreshArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The suite to sign again.
    #[arg(long, value_parser = suite)]
    pub suite: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub command: RolloutCommand,
}

/// The suite a rollout command reads or changes.
#[derive(Debug, Clone, clap::Args)]
pub struct RolloutTarget {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(long, value_parser = suite)]
    pub suite: String,
}

#[derive(Debug, Clone, Subcommand)]
pub enum RolloutCommand {
    /// The policy in force and, per package, the version each wave is on.
    Show(RolloutTarget),
    /// Changes the waves and/or the in-flight limit.
    Set(RolloutSet),
    /// Freezes the schedule now: nothing is released to any wave after this
    /// moment; no node changes an installed version, a fresh node installs
    /// what its wave had now (health-gate rollbacks and pins still install).
    Pause(RolloutTarget),
    /// Lets the rollout continue where the waves were when paused: every
    /// start moves forward by the paused time, so no wave's delay was spent
    /// paused.
    Resume(RolloutTarget),
    /// Every node runs PKG=VER, at once (an older version is a signed fleet
    /// rollback).
    Pin {
        #[command(flatten)]
        target: RolloutTarget,
        #[arg(value_name = "PKG=VER", value_parser = pinned_spec)]
        pin: String,
    },
    /// Removes the pin of PKG: the waves decide again.
    Unpin {
        #[command(flatten)]
        target: RolloutTarget,
        #[arg(value_name = "PKG", value_parser = package_name)]
        package: String,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct RolloutSet {
    #[command(flatten)]
    pub target: RolloutTarget,
    /// Comma-separated SHARE%@DELAY, shares growing to 100%, e.g.
    /// "5%@0s,25%@10m,100%@30m".
    #[arg(long, value_parser = waves)]
    pub waves: Option<Waves>,
    /// At most N serving nodes between drain and commit at once; "none"
    /// for no limit.
    #[arg(long, value_parser = max_in_flight)]
    pub max_in_flight: Option<MaxInFlight>,
}

/// `--waves`: one value, a comma-separated list.
#[derive(Debug, Clone, PartialEq)]
pub struct Waves(pub Vec<crate::rollout::Wave>);

fn waves(text: &str) -> Result<Waves, String> {
    crate::rollout::parse_waves(text).map(Waves)
}

/// `--max-in-flight`: a limit, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxInFlight(pub Option<u32>);

fn max_in_flight(text: &str) -> Result<MaxInFlight, String> {
    if text == "none" {
        return Ok(MaxInFlight(None));
    }
    match text.parse::<u32>() {
        Ok(0) => Err("must be at least 1 (\"none\" for no limit)".into()),
        Ok(n) => Ok(MaxInFlight(Some(n))),
        Err(e) => Err(format!("{e} (a number, or \"none\")")),
    }
}

fn pinned_spec(text: &str) -> Result<String, String> {
    match PackageSpec::parse(text)?.pinned {
        Some(_) => Ok(text.to_string()),
        None => Err("name the version: PKG=VER".into()),
    }
}

fn package_name(text: &str) -> Result<String, String> {
    match PackageSpec::parse(text)?.pinned {
        None => Ok(text.to_string()),
        Some(_) => Err("a package name, without =VER".into()),
    }
}

// ---- value parsers: the names of crate::repo::names, kept as text ---------

fn suite(text: &str) -> Result<String, String> {
    Suite::parse(text).map(Suite::into_string)
}

fn component(text: &str) -> Result<String, String> {
    Component::parse(text).map(Component::into_string)
}

/// An architecture that has an index of its own: `all` has none (its
/// packages go into every architecture's index).
fn index_architecture(text: &str) -> Result<String, String> {
    let arch = Architecture::parse(text)?;
    if arch.as_str() == "all" {
        return Err(
            "\"all\" has no index of its own; name a machine architecture like amd64".into(),
        );
    }
    Ok(arch.into_string())
}

/// `PKG` or `PKG=VER`, checked as `agent.packages` is.
fn package_spec(text: &str) -> Result<String, String> {
    PackageSpec::parse(text)?;
    Ok(text.to_string())
}

// ---- value parsers: ranges ------------------------------------------------

/// `--keep N`: keeping no version at all would empty the suite.
fn keep(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// The longest `--valid-for`. Release dates have four-digit years, so
/// Valid-Until must stay before the year 10000: agents, and so the
/// publisher's own verify before flip, refuse a later one (all six
/// attempts failed), and past about 262,000 years the date arithmetic
/// overflowed (a panic, leaving the publish lock behind).
const MAX_VALID_FOR: std::time::Duration =
    std::time::Duration::from_secs(1000 * 365 * 24 * 60 * 60);

/// `--valid-for`: a duration (humantime: `7d`, `12h`), at most 1000 years.
fn valid_for(text: &str) -> Result<std::time::Duration, String> {
    let period = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if period > MAX_VALID_FOR {
        return Err("at most 1000 years (365000d)".into());
    }
    Ok(period)
}

const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// `--lock-ttl`: the publish lock's expiry is the time plus this, so it is
/// bounded where it is parsed, like every duration of the config.
fn lock_ttl(text: &str) -> Result<std::time::Duration, String> {
    crate::config::duration_in(text, &(std::time::Duration::ZERO..=DAY))
}

/// `--lock-wait`: at most a day.
fn lock_wait(text: &str) -> Result<std::time::Duration, String> {
    crate::config::duration_in(text, &(std::time::Duration::ZERO..=DAY))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(["pulldeploy"].iter().chain(args)).map_err(|e| e.to_string())
    }

    const PUBLISH: &[&str] = &[
        "publish",
        "--repo",
        "file:///srv/apt",
        "--signing-key",
        "k.asc",
    ];

    /// `publish` with `extra` options (and `--suite stable` unless they
    /// name one) and one .deb.
    fn publish_with(extra: &[&str]) -> Result<PublishArgs, String> {
        let suite: &[&str] = if extra.contains(&"--suite") {
            &[]
        } else {
            &["--suite", "stable"]
        };
        let args: Vec<&str> = PUBLISH
            .iter()
            .chain(suite)
            .chain(extra)
            .chain(&["a.deb"])
            .copied()
            .collect();
        match parse(&args)?.command {
            Command::Publish(args) => Ok(args),
            other => Err(format!("not publish: {other:?}")),
        }
    }

    fn promote_with(extra: &[&str]) -> Result<Cli, String> {
        let base = [
            "promote",
            "--repo",
            "file:///srv/apt",
            "--signing-key",
            "k.asc",
        ];
        let suites = ["--from", "a", "--to", "b"];
        let args: Vec<&str> = base.iter().chain(&suites).chain(extra).copied().collect();
        parse(&args)
    }

    #[test]
    fn publish_keep_is_at_least_one() {
        assert_eq!(publish_with(&["--keep", "1"]).map(|a| a.keep), Ok(Some(1)));
        assert_eq!(publish_with(&[]).map(|a| a.keep), Ok(None));
        for bad in ["0", "-1", "x"] {
            let option = format!("--keep={bad}");
            let error = publish_with(&[&option]).err().unwrap_or_default();
            assert!(error.contains("--keep"), "{bad}: {error}");
        }
        let error = publish_with(&["--keep", "0"]).err().unwrap_or_default();
        assert!(error.contains("must be at least 1"), "{error}");
        let promote = promote_with(&["--keep", "0", "myapp"]);
        assert!(
            promote
                .as_ref()
                .is_err_and(|e| e.contains("must be at least 1")),
            "{promote:?}"
        );
    }

    #[test]
    fn publish_valid_for_is_a_date_agents_read() {
        assert_eq!(
            publish_with(&["--valid-for", "7d"]).map(|a| a.repo.valid_for),
            Ok(Some(std::time::Duration::from_secs(7 * 86400)))
        );
        assert!(publish_with(&["--valid-for", "365000d"]).is_ok());
        for bad in ["365001d", "1000000years", "soon"] {
            let error = publish_with(&["--valid-for", bad])
                .err()
                .unwrap_or_default();
            assert!(error.contains("--valid-for"), "{bad}: {error}");
        }
    }

    #[test]
    fn publish_lock_durations_are_bounded() {
        let args = publish_with(&["--lock-ttl", "1d", "--lock-wait", "0s"]);
        assert!(args.is_ok(), "{args:?}");
        for (option, bad) in [
            ("--lock-ttl", "300000years"),
            ("--lock-ttl", "100000000000d"),
            ("--lock-wait", "9999999999d"),
        ] {
            let error = publish_with(&[option, bad]).err().unwrap_or_default();
            assert!(error.contains(option), "{option} {bad}: {error}");
            assert!(error.contains("out of range"), "{option} {bad}: {error}");
        }
    }

    #[test]
    fn publish_names_are_checked_by_clap() {
        for (option, bad) in [
            ("--suite", "../x"),
            ("--component", "a/b"),
            ("--architecture", "all"),
            ("--architecture", "AMD64"),
        ] {
            let error = publish_with(&[option, bad]).err().unwrap_or_default();
            assert!(error.contains(option), "{option} {bad}: {error}");
        }
        let promote = promote_with(&["My_App=1"]);
        assert!(promote.is_err(), "{promote:?}");
    }
}
