//! The long-running agent: a cycle every `interval` plus random jitter, the
//! health server beside it, and a clean shutdown.
//!
//! Shutdown is honoured between steps: while the repository is being read
//! it cancels the cycle (nothing is committed before dpkg), but once dpkg
//! has started the install and the state commit run to the end.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::agent::{Agent, Outcome, committed_versions};
use crate::config::Config;
use crate::error::Error;
use crate::health::Health;
use crate::state::State;

/// How long the health server may take to finish after shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// Runs until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let listener = TcpListener::bind(config.health.listen)
        .await
        .map_err(|source| Error::HealthListen {
            addr: config.health.listen,
            source,
        })?;
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /healthz");
    }
    let health = Health::for_config(&config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(crate::health::serve(listener, health.clone(), stop_rx));

    let result = cycles(config, &health, shutdown).await;

    let _ = stop_tx.send(true);
    if tokio::time::timeout(DRAIN, server).await.is_err() {
        warn!(limit = ?DRAIN, "health server did not stop in time");
    }
    result
}

async fn cycles(
    config: Config,
    health: &Arc<Health>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let state_path = config.state_path();
    let interval = config.agent.interval;
    let jitter = config.agent.jitter;
    let agent = Agent::new(config, health.clone()).await?;
    let mut state = State::load(&state_path)?;
    health.update(|s| s.installed = committed_versions(&state));

    loop {
        let limit = agent.config().agent.cycle_timeout;
        let result = if state.pending.is_some() {
            // An install interrupted by a restart is finished first, and,
            // like any started install, not cancelled.
            agent.resume(&mut state).await
        } else {
            // The repository half may be cancelled by shutdown; the install
            // half may not (see the module doc).
            let prepared = tokio::select! {
                biased;
                () = &mut shutdown => break,
                prepared = tokio::time::timeout(limit, agent.prepare(&state)) => prepared,
            };
            match prepared {
                Err(_elapsed) => Err(Error::CycleDeadline { limit }),
                Ok(Err(e)) => Err(e),
                Ok(Ok(None)) => Ok(Outcome::Unchanged),
                Ok(Ok(Some(plan))) => agent.apply(plan, &mut state).await,
            }
        };
        match &result {
            Ok(Outcome::Unchanged) => {}
            Ok(outcome) => info!(%outcome, "cycle done"),
            Err(e @ Error::Deferred { .. }) => info!(reason = %e, "cycle deferred"),
            Err(e) => error!(error = %e, "cycle failed"),
        }
        if let Err(e) = agent.record(&mut state, &result) {
            error!(error = %e, "cannot record the cycle in state");
        }
        health.update(|s| {
            s.installed = committed_versions(&state);
            s.last_poll = state
                .last_poll
                .as_ref()
                .map(|p| format!("{} {}", p.at.to_rfc3339(), p.outcome));
            s.last_error = match &result {
                Ok(_) => None,
                Err(e) => Some(e.to_string()),
            };
        });

        let delay = interval + random_up_to(jitter);
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    info!("shutting down");
    Ok(())
}

fn random_up_to(limit: Duration) -> Duration {
    if limit.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::rng().random_range(0..=limit.as_millis() as u64))
}

/// Completes on SIGTERM or SIGINT. If the handlers cannot be installed the
/// daemon still runs, and says so.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}
