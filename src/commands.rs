//! What `once`, `status` and `check-config` do and print. `run` is
//! [`crate::daemon::run`].

use std::fmt::Write as _;
use std::io::Write;
use std::time::SystemTime;

use crate::agent::Agent;
use crate::config::Config;
use crate::error::Error;
use crate::keyring::Keyring;
use crate::state::State;

/// One cycle; prints its outcome on stdout. The cycle reads state under
/// the state directory's lock.
pub async fn once(config: Config) -> Result<(), Error> {
    let mut state = State::default();
    let health = crate::health::Health::for_config(&config);
    let notifier = crate::webhook::Notifier::for_node(&config, health.webhook_counters());
    let agent = Agent::new(config, health)
        .await?
        .with_notifier(notifier.clone());
    // Nothing cancels `once` but a signal's default action.
    let outcome = agent.cycle(&mut state, std::future::pending()).await;
    // A rollback's message, before the process ends (at most 10 s).
    notifier.flush(crate::webhook::CLI_DEADLINE).await;
    if let Some(outcome) = outcome {
        println!("{}", outcome?);
    }
    Ok(())
}

/// What is installed, the last poll and the last error, from state.json.
pub fn status(config: &Config, json: bool) -> Result<(), Error> {
    let state = State::load(&config.state_path())?;
    // Built whole, then written once: a closed pipe is an error to report,
    // not a half-printed status.
    let mut out = String::new();
    if json {
        let text = serde_json::to_string_pretty(&state).unwrap_or_default();
        return print(&format!("{text}\n"));
    }
    let _ = writeln!(
        out,
        "repository: {} suite {}",
        config.repository.url, config.repository.suite
    );
    for spec in &config.agent.packages {
        let current = match state.installed.get(&spec.name) {
            Some(p) => {
                let when = p
                    .installed_at
                    .map(|t| format!(" (installed {})", t.to_rfc3339()))
                    .unwrap_or_default();
                format!("{}{when}", p.version)
            }
            None => "not installed".into(),
        };
        let _ = writeln!(out, "{}: {current}", spec.name);
        if let Some(good) = state.last_known_good.get(&spec.name) {
            let _ = writeln!(out, "  last known good: {}", good.version);
        }
        if let Some(bad) = state.bad.get(&spec.name).filter(|b| !b.is_empty()) {
            let _ = writeln!(out, "  bad (not retried): {}", bad.join(", "));
        }
    }
    if let Some(pending) = &state.pending {
        let names: Vec<String> = pending
            .packages
            .iter()
            .map(|p| format!("{} {}", p.name, p.to.version))
            .collect();
        let _ = writeln!(
            out,
            "pending install (finished at the next start): {} since {}",
            names.join(", "),
            pending.started_at.to_rfc3339()
        );
    }
    match &state.release {
        Some(r) => {
            let _ = writeln!(
                out,
                "release: {} dated {} signed by {}",
                r.file,
                r.date.to_rfc3339(),
                r.signer
            );
        }
        None => {
            let _ = writeln!(out, "release: none accepted yet");
        }
    }
    match &state.last_poll {
        Some(p) => {
            let _ = writeln!(out, "last poll: {} {}", p.at.to_rfc3339(), p.outcome);
        }
        None => {
            let _ = writeln!(out, "last poll: never");
        }
    }
    if let Some(e) = &state.last_error {
        let _ = writeln!(out, "last error: {} {}", e.at.to_rfc3339(), e.message);
    }
    if let Some(waiting) = &state.waiting {
        let again = waiting
            .recheck_at
            .map(|at| format!(" (looks again at {})", at.to_rfc3339()))
            .unwrap_or_default();
        let _ = writeln!(out, "rollout: waiting: {}{again}", waiting.reason);
    }
    if let Some(offset) = state.clock_offset {
        let beyond = offset.unsigned_abs() > config.repository.clock_skew.as_secs();
        let _ = writeln!(
            out,
            "clock offset: this node {offset:+} s from the repository{}",
            if beyond {
                " (beyond clock_skew: check time sync; rollout times go by the repository's clock)"
            } else {
                ""
            }
        );
    }
    if let Some(what) = &state.duplicate_node_id {
        let _ = writeln!(
            out,
            "fleet: DUPLICATE NODE ID: another node uses this node's id ({what}); give each node its own [fleet] node_id"
        );
    }
    if !state.events.is_empty() {
        let _ = writeln!(out, "events (newest first):");
        for event in state.events.iter().rev().take(10) {
            let _ = writeln!(out, "  {} {}", event.at.to_rfc3339(), event.message);
        }
    }
    print(&out)
}

/// Writes `text` to stdout in one go.
fn print(text: &str) -> Result<(), Error> {
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|source| Error::Output { source })
}

/// Validates the keyring (the config was validated by loading it).
pub fn check_config(config: &Config) -> Result<(), Error> {
    let keyring = Keyring::load(&config.repository.keyring)?;
    let now = SystemTime::now();
    println!("config {}: ok", config.path.display());
    println!(
        "repository: {} suite {} component {}",
        config.repository.url, config.repository.suite, config.repository.component
    );
    for fingerprint in keyring.signing_fingerprints(now) {
        println!("signing key: {fingerprint}");
    }
    let packages: Vec<String> = config
        .agent
        .packages
        .iter()
        .map(ToString::to_string)
        .collect();
    println!("packages: {}", packages.join(", "));
    Ok(())
}

/// A completion script for `shell`, generated from the CLI definition.
pub fn completions(shell: clap_complete::Shell) -> Result<(), Error> {
    let mut command = <crate::cli::Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut command, "pulldeploy", &mut std::io::stdout());
    Ok(())
}

/// The man page (roff), generated from the CLI definition: one page with
/// every subcommand and its options (no dangling `pulldeploy-run(1)`
/// references), plus EXIT STATUS and FILES.
pub fn manpage() -> Result<(), Error> {
    let command = <crate::cli::Cli as clap::CommandFactory>::command();
    let man = clap_mangen::Man::new(command.clone());
    let mut page = Vec::new();
    let output = |source| Error::Output { source };
    man.render_title(&mut page).map_err(output)?;
    man.render_name_section(&mut page).map_err(output)?;
    man.render_synopsis_section(&mut page).map_err(output)?;
    man.render_description_section(&mut page).map_err(output)?;
    man.render_options_section(&mut page).map_err(output)?;
    let mut text = String::from(".SH COMMANDS\n");
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        text.push_str(&format!(".TP\n\\fB{}\\fR\n", roff(sub.get_name())));
        if let Some(about) = sub.get_about() {
            text.push_str(&format!("{}\n", roff(&about.to_string())));
        }
        for arg in sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !a.is_global_set())
        {
            let name = match (arg.get_long(), arg.get_value_names()) {
                (Some(long), _) => format!("--{long}"),
                (None, Some(names)) => names
                    .iter()
                    .map(|n| format!("<{n}>"))
                    .collect::<Vec<_>>()
                    .join(" "),
                (None, None) => arg.get_id().to_string(),
            };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            text.push_str(&format!(".br\n\\fI{}\\fR  {}\n", roff(&name), roff(&help)));
        }
    }
    text.push_str(
        ".SH \"EXIT STATUS\"\n0 up to date, installed or unchanged; 64 bad usage or configuration; \
         65 data failed verification; 69 repository unavailable; 70 install failed or rolled back; \
         74 local I/O error (state, cache); 75 deferred (another package manager holds the dpkg lock).\n\
         .SH FILES\n.TP\n/etc/pulldeploy/config.toml\nconfiguration\n.TP\n/etc/pulldeploy/keyring.asc\n\
         pinned signing certificates\n.TP\n/var/lib/pulldeploy/state.json\ninstalled versions, accepted Release, \
         bad versions, events\n.TP\n/var/cache/pulldeploy/\nverified .debs: current and last known good\n",
    );
    page.extend_from_slice(text.as_bytes());
    man.render_version_section(&mut page).map_err(output)?;
    std::io::stdout().write_all(&page).map_err(output)
}

/// Escapes text for roff: backslashes, hyphens (so they are not
/// hyphenation points), and a leading `.` or `'` (control characters).
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    escaped
        .lines()
        .map(|line| match line.starts_with(['.', '\'']) {
            true => format!("\\&{line}"),
            false => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
