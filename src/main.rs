//! The `pulldeploy` binary: parse, set up logging, load the config, call the
//! library, map the result to a sysexits code.

use std::process::ExitCode;

use clap::Parser;
use pulldeploy::cli::{Cli, Command};
use pulldeploy::config::Config;
use pulldeploy::error::{Error, exit};
use pulldeploy::{commands, daemon, fleet, publish};

fn main() -> ExitCode {
    // Bad usage is EX_USAGE (64), as documented, not clap's own 2; --help
    // and --version print to stdout and exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(match e.use_stderr() {
                true => exit::USAGE,
                false => exit::OK,
            });
        }
    };
    pulldeploy::logging::init(cli.log_format);
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
    let config_path = match &cli.command {
        Command::Run(c) | Command::Once(c) | Command::CheckConfig(c) => &c.config,
        Command::Status { config, .. } => &config.config,
        // The repository side and the packaging helpers have no config file.
        Command::Publish(args) => return runtime()?.block_on(publish::publish(args.clone())),
        Command::Promote(args) => return runtime()?.block_on(publish::promote(args.clone())),
        Command::Refresh(args) => return runtime()?.block_on(publish::refresh(args.clone())),
        Command::Rollout(args) => {
            return runtime()?.block_on(publish::rollout::rollout(args.clone()));
        }
        Command::Fleet(args) => return runtime()?.block_on(fleet::run(args.clone())),
        Command::Completions { shell } => return commands::completions(*shell),
        Command::Manpage => return commands::manpage(),
    };
    let config = Config::from_file(config_path)?;
    match cli.command {
        Command::Run(_) => runtime()?.block_on(async {
            tracing::info!(version = env!("CARGO_PKG_VERSION"), repository = %config.repository.url, suite = %config.repository.suite, packages = config.agent.packages.len(), "pulldeploy starting");
            let (shutdown, reloads) = (daemon::shutdown_signal()?, daemon::reload_signal()?);
            daemon::run(config, shutdown, reloads).await
        }),
        Command::Once(_) => runtime()?.block_on(commands::once(config)),
        Command::Status { json, .. } => commands::status(&config, json),
        Command::CheckConfig(_) => commands::check_config(&config),
        _ => Ok(()),
    }
}
