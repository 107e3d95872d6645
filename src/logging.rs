//! Logging set-up: tracing to stderr, as text or JSON.
//!
//! Under systemd, stderr goes to the journal (JOURNAL_STREAM is set), which
//! stamps every line itself: text logs then leave the time out, so it is
//! not there twice. Levels and structured fields stay in both formats.

use std::io::IsTerminal;

use crate::cli::LogFormat;

/// The credential chain logs each failed provider with a Debug dump of the
/// raw response; our own error already names the cause once.
const DEFAULT_FILTER: &str = "info,aws_config::meta::credentials::chain=error";

/// Installs the global subscriber; `PULLDEPLOY_LOG` overrides the filter
/// (same syntax as RUST_LOG).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PULLDEPLOY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, under_journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).init(),
        (LogFormat::Text, true) => builder.without_time().init(),
        (LogFormat::Text, false) => builder.init(),
    }
}
