//! Command-line definitions (clap). The commands are a contract: see
//! DESIGN.md "Command line".

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Pull-based deployment agent: installs the newest signed version of your
/// packages from an apt repository in S3 or a local directory.
#[derive(Debug, Parser)]
#[command(name = "pulldeploy", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: a cycle every interval (+ jitter), /healthz, signals.
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
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path to the TOML configuration.
    #[arg(long, short = 'c', default_value = "/etc/pulldeploy/config.toml")]
    pub config: PathBuf,
}
