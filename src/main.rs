//! The `pulldeploy` binary: parse, set up logging, load the config, call the
//! library, map the result to a sysexits code.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use pulldeploy::cli::{Cli, Command};
use pulldeploy::config::Config;
use pulldeploy::error::{Error, exit};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The credential chain logs each failed provider with a Debug dump of
    // the raw response; our own error already names the cause once.
    let default_filter = "info,aws_config::meta::credentials::chain=error";
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PULLDEPLOY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("pulldeploy: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Runtime { source })
}

fn run(cli: Cli) -> Result<(), Error> {
    use pulldeploy::publish;
    let config_path = match &cli.command {
        Command::Run(c) | Command::Once(c) | Command::CheckConfig(c) => &c.config,
        Command::Status { config, .. } => &config.config,
        // The repository side has no config file.
        Command::Publish(args) => return runtime()?.block_on(publish::publish(args.clone())),
        Command::Promote(args) => return runtime()?.block_on(publish::promote(args.clone())),
        Command::Refresh(args) => return runtime()?.block_on(publish::refresh(args.clone())),
    };
    let config = Config::from_file(config_path)?;
    let runtime = runtime()?;
    match cli.command {
        Command::Run(_) => runtime.block_on(async {
            tracing::info!(version = env!("CARGO_PKG_VERSION"), repository = %config.repository.url, suite = %config.repository.suite, "pulldeploy starting");
            pulldeploy::daemon::run(config, pulldeploy::daemon::shutdown_signal()).await
        }),
        Command::Once(_) => runtime.block_on(pulldeploy::commands::once(config)),
        Command::Status { json, .. } => pulldeploy::commands::status(&config, json),
        Command::CheckConfig(_) => pulldeploy::commands::check_config(&config),
        // Returned above, before any config is read.
        Command::Publish(_) | Command::Promote(_) | Command::Refresh(_) => Ok(()),
    }
}
