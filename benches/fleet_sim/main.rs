//! Fleet simulation: N agents in one process against moto's S3, run by
//! `scripts/fleet-sim.sh` (which starts moto and publishes with the real
//! `pulldeploy publish` and `pulldeploy rollout set`).
//!
//! Everything but dpkg is the agent's own code: `Agent::cycle` on the real
//! S3 source, Release and policy verification, and the real `Fleet`
//! (leases, halt markers, reports) on moto. dpkg is replaced by
//! [`SimInstaller`](installer::SimInstaller), which keeps versions in memory, "installs" in a few
//! milliseconds, fails any version whose name contains `bad` (as a
//! postinst that exits 1 would), and counts the nodes between the install
//! lock (taken before the drain) and its release (after commit or
//! rollback): the nodes in flight. S3 requests are counted in moto's own
//! access log.
//!
//! A run per suite: `--policy-suite` (waves and an in-flight limit, set by
//! the script) and `--direct-suite` (the default policy `publish` writes:
//! one wave, no limit). Each run: bootstrap N fresh nodes on 1.0, a steady
//! window (requests per node per cycle), the rollout of 1.1, then a bad
//! version and what its halt marker stopped. The figures go to stdout,
//! progress to stderr.

mod access_log;
mod installer;
mod nodes;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use pulldeploy::rollout::parse_waves;

use nodes::RunSpec;
use scenarios::{print_comparison, print_header, run};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The package every node follows.
const PACKAGE: &str = "myapp";
/// AWS list prices, S3 Standard, us-east-1, per 1,000 requests.
const PRICE_GET: f64 = 0.0004;
const PRICE_PUT: f64 = 0.005;
/// A month, for the cost figure: 30 days.
const MONTH_SECS: f64 = 30.0 * 86400.0;

#[derive(Parser, Debug)]
#[command(about = "pulldeploy fleet simulation (run by scripts/fleet-sim.sh)")]
struct Args {
    /// moto's endpoint, http://127.0.0.1:PORT.
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    bucket: String,
    /// The repository's public key (armored).
    #[arg(long)]
    keyring: PathBuf,
    /// moto's stderr, where werkzeug logs every request.
    #[arg(long)]
    moto_log: PathBuf,
    /// moto's pid, for its CPU time.
    #[arg(long)]
    moto_pid: Option<u32>,
    /// `PROGRAM SUITE DEB`: publishes DEB to SUITE with `pulldeploy publish`.
    #[arg(long)]
    publish: PathBuf,
    /// Holds myapp_1.1_amd64.deb and myapp_1.2~bad_amd64.deb.
    #[arg(long)]
    debs: PathBuf,
    /// Where the nodes' state and cache directories go.
    #[arg(long)]
    workdir: PathBuf,
    #[arg(long, default_value_t = 200)]
    nodes: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    interval: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    jitter: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    report_interval: Duration,
    /// `[health] drain`: how long a node is in flight before dpkg.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    drain: Duration,
    /// How long the fake dpkg takes per install.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5ms")]
    install_time: Duration,
    /// The suite with the rollout policy (as set by the script).
    #[arg(long, default_value = "production")]
    policy_suite: String,
    /// Its waves and limit, as given to `pulldeploy rollout set`.
    #[arg(long)]
    waves: String,
    #[arg(long)]
    max_in_flight: u32,
    /// The suite without a policy of its own (the default: everyone at once).
    #[arg(long, default_value = "direct")]
    direct_suite: String,
    /// Before the rollout of 1.1 (the policy run): this many bytes of
    /// garbage in lease slot 0, as a broken or hostile node could write
    /// there (0: none). The in-flight limit must hold anyway.
    #[arg(long, default_value_t = 0)]
    garbage_lease_bytes: usize,
    /// One node of the last wave runs with its clock this far ahead
    /// (0: none). It must not install before its wave's delay.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    clock_ahead: Duration,
    /// Free text for the header (moto version, disk).
    #[arg(long, default_value = "")]
    note: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    if let Ok(filter) = std::env::var("FLEET_SIM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    // One current-thread runtime for every agent: the library's tokio has
    // no multi-thread scheduler, and a 304 poll is well under a millisecond
    // of CPU. State goes to tmpfs (the script), so no fsync stalls it.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(simulate(args))
}

async fn simulate(args: Args) -> Result<(), BoxError> {
    print_header(&args);
    let waves = parse_waves(&args.waves)?;
    let policy = RunSpec {
        suite: args.policy_suite.clone(),
        waves,
        limit: Some(args.max_in_flight),
        steady: true,
    };
    let direct = RunSpec {
        suite: args.direct_suite.clone(),
        waves: parse_waves("100%@0s")?,
        limit: None,
        steady: false,
    };
    let with_policy = run(&args, &policy).await?;
    let without = run(&args, &direct).await?;
    print_comparison(&args, &with_policy, &without);
    Ok(())
}
