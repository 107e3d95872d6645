//! The long-running agent: a cycle every `interval` plus random jitter, the
//! health server beside it, SIGHUP reloads, systemd readiness and watchdog,
//! and a clean shutdown.
//!
//! Shutdown is honoured between steps: while the repository is being read
//! it cancels the cycle (nothing is committed before dpkg), but once dpkg
//! has started the install and the state commit run to the end.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::agent::{Agent, Outcome, committed_versions};
use crate::config::Config;
use crate::error::Error;
use crate::health::Health;
use crate::lifecycle::Turn;
use crate::notify;
use crate::state::State;

/// How long the health server may take to finish after shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// Runs until `shutdown` completes; each message on `reloads` (SIGHUP)
/// reads the config file again and, if it is valid, uses it from the next
/// cycle on. The health server keeps listening throughout.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    reloads: mpsc::Receiver<()>,
) -> Result<(), Error> {
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

    let result = cycles(config, &health, shutdown, reloads).await;

    notify::notify("STOPPING=1");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(DRAIN, server).await.is_err() {
        warn!(limit = ?DRAIN, "health server did not stop in time");
    }
    result
}

/// The loop's heartbeat: when it last made progress (seconds on the tokio
/// clock since start). The watchdog pings systemd only while it is recent.
struct Heartbeat {
    start: Instant,
    last: AtomicU64,
}

impl Heartbeat {
    fn beat(&self) {
        self.last
            .store(self.start.elapsed().as_secs(), Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        Duration::from_secs(
            self.start
                .elapsed()
                .as_secs()
                .saturating_sub(self.last.load(Ordering::Relaxed)),
        )
    }
}

/// The longest a healthy loop can go without a heartbeat: one whole cycle
/// (reading, waiting for the lock, draining, the health gate, rollback's
/// second gate) plus the sleep, plus a generous allowance for dpkg itself.
fn stall_limit(config: &Config) -> Duration {
    const DPKG_ALLOWANCE: Duration = Duration::from_secs(30 * 60);
    config.agent.cycle_timeout
        + config.install.lock_timeout
        + config.health.drain
        + 2 * config.health.health_timeout
        + config.agent.interval
        + config.agent.jitter
        + DPKG_ALLOWANCE
}

/// Pings systemd's watchdog every half period while the loop's heartbeat is
/// younger than `limit`: a wedged loop stops the pings and systemd restarts
/// the agent (a pending install is finished at the next start).
fn spawn_watchdog(
    heartbeat: Arc<Heartbeat>,
    limit: Duration,
) -> Option<tokio::task::JoinHandle<()>> {
    let period = notify::watchdog_period()?;
    // SIGTERM during an install: the install goes on (module doc), and
    // systemd is asked for one more period at a time, as long as the loop
    // is within `limit` (systemd/pulldeploy.service, TimeoutStopSec).
    let mut stop = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period / 2);
        let mut stopping = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                Some(()) = async { stop.as_mut()?.recv().await }, if !stopping => stopping = true,
            }
            if heartbeat.age() <= limit {
                notify::notify("WATCHDOG=1");
                if stopping {
                    notify::extend_timeout(period);
                }
            } else {
                warn!(age = ?heartbeat.age(), "cycle loop made no progress; not feeding the watchdog");
            }
        }
    }))
}

async fn cycles(
    config: Config,
    health: &Arc<Health>,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<()>,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let config_path = config.path.clone();
    let listen = config.health.listen;
    let heartbeat = Arc::new(Heartbeat {
        start: Instant::now(),
        last: AtomicU64::new(0),
    });
    let watchdog = spawn_watchdog(heartbeat.clone(), stall_limit(&config));
    let notifier = crate::webhook::Notifier::for_node(&config, health.webhook_counters());
    let mut agent = Agent::new(config, health.clone())
        .await?
        .with_notifier(notifier);
    // Across reloads: a new config does not restart a failing streak.
    let mut failing = crate::webhook::FailingStreak::default();
    // Read without the lock, for /healthz until the first cycle; every
    // cycle reads it again under the lock when another process changed it.
    let mut state = State::load(&agent.config().state_path())?;
    health.update(|s| s.installed = committed_versions(&state));
    notify::notify("READY=1");
    let lifecycle = crate::lifecycle::Lifecycle::start(agent.config(), health);

    loop {
        heartbeat.beat();
        notify::status("polling the repository");
        let started = Instant::now();
        // Shutdown cancels the cycle while it waits for the state lock or
        // reads the repository; a started install goes to its end (see the
        // module doc).
        // So does the instance's termination (lifecycle hooks), after which
        // no cycle runs.
        let result = match lifecycle.cycle(&agent, &mut state, &mut shutdown).await {
            Turn::Done(result) => result,
            Turn::Shutdown => break,
            Turn::Held => tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = tokio::time::sleep(agent.config().agent.interval) => continue,
            },
        };
        heartbeat.beat();
        match &result {
            Ok(Outcome::Unchanged) => {}
            Ok(outcome) => info!(%outcome, "cycle done"),
            Err(e @ (Error::Deferred { .. } | Error::Busy { .. })) => {
                info!(reason = %e, "cycle deferred")
            }
            Err(e) => error!(error = %e, "cycle failed"),
        }
        let elapsed = started.elapsed().as_secs_f64();
        let key_expiry = agent.signing_key_expiry();
        health.update(|s| {
            s.installed = committed_versions(&state);
            s.last_poll = state
                .last_poll
                .as_ref()
                .map(|p| format!("{} {}", p.at.to_rfc3339(), p.outcome));
            s.last_error = result.as_ref().err().map(ToString::to_string);
        });
        health.record_cycle(&crate::health::Cycle {
            seconds: elapsed,
            ok: result.is_ok(),
            release_valid_until: state.release.as_ref().and_then(|r| r.valid_until),
            signing_key_expiry: key_expiry,
        });
        lifecycle.cycle_done(&result);
        failing.record(&result, &committed_versions(&state), agent.notifier());

        let interval = agent.config().agent.interval;
        let delay = interval + random_up_to(agent.config().agent.jitter);
        notify::status(&match &result {
            Ok(outcome) => format!("idle: {outcome}; next poll in {}s", delay.as_secs()),
            Err(e) => format!(
                "idle: last cycle failed: {e}; next poll in {}s",
                delay.as_secs()
            ),
        });
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(()) = reloads.recv() => {
                notify::notify("RELOADING=1");
                match reload(&config_path, listen, health).await {
                    Ok(reloaded) => {
                        agent = reloaded;
                        info!(config = %config_path.display(), "configuration reloaded");
                    }
                    Err(e) => error!(error = %e, "reload failed; keeping the running configuration"),
                }
                notify::notify("READY=1");
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    info!("shutting down");
    Ok(())
}

/// Reads the config again and builds the agent it describes. The health
/// server's address cannot change without a restart.
async fn reload(
    path: &std::path::Path,
    listen: std::net::SocketAddr,
    health: &Arc<Health>,
) -> Result<Agent, Error> {
    let config = Config::from_file(path)?;
    if config.health.listen != listen {
        warn!(old = %listen, new = %config.health.listen, "health.listen changes only at a restart");
    }
    let notifier = crate::webhook::Notifier::for_node(&config, health.webhook_counters());
    let agent = Agent::new(config, health.clone())
        .await?
        .with_notifier(notifier);
    health.reconfigure(agent.config());
    Ok(agent)
}

fn random_up_to(limit: Duration) -> Duration {
    if limit.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::rng().random_range(0..=limit.as_millis() as u64))
}

/// A future that completes on SIGTERM or SIGINT. The handlers are
/// installed here, at once, so that a signal during start-up (or while a
/// pending install is resumed) is not taken by the default action.
pub fn shutdown_signal() -> Result<impl Future<Output = ()>, Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = |kind| signal(kind).map_err(|source| Error::Signals { source });
    let mut term = signals(SignalKind::terminate())?;
    let mut int = signals(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    })
}

/// A channel that receives one message per SIGHUP.
pub fn reload_signal() -> Result<mpsc::Receiver<()>, Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).map_err(|source| Error::Signals { source })?;
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            info!("SIGHUP received");
            // A reload already queued covers this one too.
            let _ = sender.try_send(());
        }
    });
    Ok(receiver)
}
