//! The `pulldeploy fleet` commands (operator side): `status` and
//! `unhalt`. They read and write the fleet prefix only, never the
//! repository, and need no signing key.

use std::io::Write;

use chrono::Utc;

use super::{Fleet, FleetError, Status};
use crate::config::RepoUrl;
use crate::error::Error;
use crate::repo::names::{PackageSpec, Suite};

/// `pulldeploy fleet ...`
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum FleetCommand {
    /// Nodes per version, wave progress, failing and stale nodes, halted versions, leases held.
    Status {
        #[command(flatten)]
        fleet: FleetStoreArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove the halt marker of PKG=VER, so nodes may install that version again.
    ///
    /// VER is compared by Debian version equality: myapp=1.1 also clears
    /// the marker a node wrote for 0:1.1.
    Unhalt {
        #[command(flatten)]
        fleet: FleetStoreArgs,
        /// The halted version.
        #[arg(value_name = "PKG=VER", value_parser = pinned)]
        target: (String, String),
    },
}

/// Where the fleet's objects are (`[fleet] url` of the nodes).
#[derive(Debug, Clone, clap::Args)]
pub struct FleetStoreArgs {
    /// The fleet prefix: s3://bucket[/prefix] or file:///absolute/dir.
    #[arg(long = "fleet", value_name = "URL", value_parser = RepoUrl::parse)]
    pub url: RepoUrl,
    /// The suite whose fleet to read.
    #[arg(long, value_parser = suite)]
    pub suite: String,
    /// Any S3-compatible server (path-style requests).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// AWS region; else from the environment or profile (us-east-1 with --endpoint).
    #[arg(long)]
    pub region: Option<String>,
}

fn suite(text: &str) -> Result<String, String> {
    Suite::parse(text).map(Suite::into_string)
}

/// `PKG=VER`, both checked as `agent.packages` checks them.
fn pinned(text: &str) -> Result<(String, String), String> {
    let spec = PackageSpec::parse(text)?;
    match spec.pinned {
        Some(version) => Ok((spec.name, version)),
        None => Err(format!("{text:?}: give the version too, PKG=VER")),
    }
}

/// The operator is nobody's node: a node id that no node has (a node id
/// has no `@`), for the store's messages only.
const OPERATOR: &str = "operator";

async fn open(args: &FleetStoreArgs) -> Result<Fleet, FleetError> {
    Fleet::open(
        &args.url,
        args.endpoint.as_deref(),
        args.region.as_deref(),
        &args.suite,
        OPERATOR,
    )
    .await
}

/// Runs a `fleet` subcommand.
pub async fn run(args: FleetArgs) -> Result<(), Error> {
    let text = match args.command {
        FleetCommand::Status { fleet, json } => {
            let fleet = open(&fleet).await?;
            let status = status(&fleet).await?;
            match json {
                true => status.to_json(),
                false => status.to_text(),
            }
        }
        FleetCommand::Unhalt {
            fleet,
            target: (package, version),
        } => {
            let fleet = open(&fleet).await?;
            let removed = fleet.unhalt(&package, &version).await?;
            match removed.is_empty() {
                false => format!(
                    "unhalted {package} {} in {}\n",
                    removed.join(", "),
                    fleet.url()
                ),
                true => format!("{package} {version} was not halted in {}\n", fleet.url()),
            }
        }
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|source| Error::Output { source })
}

/// Reads everything `fleet status` shows.
pub async fn status(fleet: &Fleet) -> Result<Status, FleetError> {
    let reports = fleet.reports().await?;
    let halted = fleet.halts().await?;
    let leases = fleet.leases().await?;
    Ok(Status::new(
        fleet.url(),
        fleet.suite().to_string(),
        Utc::now(),
        reports,
        halted,
        leases,
    ))
}
