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
    /// Write Valid-Until = Date + this (e.g. 7d); agents refuse the suite after it.
    /// Default: the period the suite already has (none for a new suite).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub valid_for: Option<std::time::Duration>,
    /// How long the suite's publish lock is held before others may break it.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub lock_ttl: std::time::Duration,
    /// How long to wait for another publisher's lock before giving up (exit 75).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub lock_wait: std::time::Duration,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The suite (dists/SUITE).
    #[arg(long, value_parser = suite)]
    pub suite: String,
    /// Keep at most N versions of each package (per architecture); default: all.
    #[arg(long)]
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
    #[arg(long)]
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
