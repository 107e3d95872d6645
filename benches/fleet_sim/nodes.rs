//! Nodes: each a real `Agent` with a [`SimInstaller`] for dpkg, in the daemon's loop.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pulldeploy::agent::{Agent, Outcome};
use pulldeploy::clock::Clock;
use pulldeploy::config::Config;
use pulldeploy::fleet::Fleet;
use pulldeploy::health::Health;
use pulldeploy::keyring::Keyring;
use pulldeploy::rollout::{Wave, position};
use pulldeploy::state::State;
use rand::Rng;
use tokio::sync::watch;

use crate::installer::{Database, Recorder, SimInstaller};
use crate::{Args, BoxError, PACKAGE};

pub(crate) struct RunSpec {
    pub(crate) suite: String,
    pub(crate) waves: Vec<Wave>,
    pub(crate) limit: Option<u32>,
    /// Measure the steady windows (the policy run only).
    pub(crate) steady: bool,
}

/// A node clock that is `ahead` of the real one: an instance whose time
/// was never synced.
struct AheadClock {
    ahead: chrono::TimeDelta,
}

impl Clock for AheadClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + self.ahead
    }
}

pub(crate) struct Fleetwide {
    pub(crate) recorder: Arc<Recorder>,
    /// The node whose clock runs ahead (`--clock-ahead`), if any.
    pub(crate) fast_clock_node: Option<usize>,
    databases: Vec<Database>,
    pub(crate) waves: Vec<usize>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn node_id(run: &str, index: usize) -> String {
    format!("sim-{run}-{index:04}")
}

fn node_config(args: &Args, spec: &RunSpec, dir: &Path, id: &str) -> String {
    let endpoint = &args.endpoint;
    let bucket = &args.bucket;
    let suite = &spec.suite;
    let keyring = args.keyring.display();
    let dir = dir.display();
    let human = |d: Duration| format!("{}ms", d.as_millis());
    let (interval, jitter, report, drain) = (
        human(args.interval),
        human(args.jitter),
        human(args.report_interval),
        human(args.drain),
    );
    format!(
        "[repository]\nurl = \"s3://{bucket}/repo\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n\
         suite = \"{suite}\"\narchitecture = \"amd64\"\nkeyring = \"{keyring}\"\n\n\
         [agent]\npackages = [\"{PACKAGE}\"]\ninterval = \"{interval}\"\njitter = \"{jitter}\"\n\
         state_dir = \"{dir}/state\"\ncache_dir = \"{dir}/cache\"\n\n\
         [install]\nroot = \"{dir}\"\n\n\
         [health]\nlisten = \"127.0.0.1:0\"\ndrain = \"{drain}\"\n\n\
         [fleet]\nurl = \"s3://{bucket}/fleet\"\nnode_id = \"{id}\"\nreport_interval = \"{report}\"\n"
    )
}

async fn build_agent(
    args: &Args,
    spec: &RunSpec,
    index: usize,
    recorder: &Arc<Recorder>,
    ahead: Duration,
) -> Result<(Agent, Database, String), BoxError> {
    let id = node_id(&spec.suite, index);
    let dir = args.workdir.join(&spec.suite).join(&id);
    std::fs::create_dir_all(dir.join("state"))?;
    std::fs::create_dir_all(dir.join("cache").join(pulldeploy::agent::CACHE_SUBDIR))?;
    let path = dir.join("config.toml");
    std::fs::write(&path, node_config(args, spec, &dir, &id))?;
    let config = Config::from_file(&path)?;
    let keyring = Keyring::load(&config.repository.keyring)?;
    let source = pulldeploy::source::from_config(&config).await?;
    let fleet_url = config.fleet.url.clone().ok_or("no [fleet] url")?;
    let fleet = Fleet::open(
        &fleet_url,
        config.repository.endpoint.as_deref(),
        config.repository.region.as_deref(),
        &config.repository.suite,
        &id,
    )
    .await?;
    let database: Database = Arc::default();
    let installer = SimInstaller {
        node: index,
        database: database.clone(),
        install_time: args.install_time,
        recorder: recorder.clone(),
    };
    let health = Health::for_config(&config);
    let agent = Agent::from_parts(
        config,
        "amd64".into(),
        source,
        Box::new(installer),
        keyring,
        Box::new(AheadClock {
            ahead: chrono::TimeDelta::from_std(ahead)?,
        }),
        health,
    )
    .with_fleet(fleet);
    Ok((agent, database, id))
}

/// The daemon's loop (`daemon::cycles` without /healthz, reloads and
/// systemd): a cycle, then `interval` plus up to `jitter`. The first cycle
/// comes at a random point of the first period, as in a fleet whose nodes
/// did not all boot in the same second.
async fn node_loop(
    agent: Agent,
    recorder: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
    interval: Duration,
    jitter: Duration,
) {
    let period = interval + jitter;
    let first = Duration::from_millis(rand::rng().random_range(0..=period.as_millis() as u64));
    tokio::select! {
        _ = stop.wait_for(|s| *s) => return,
        () = tokio::time::sleep(first) => {}
    }
    let mut state = State::default();
    loop {
        let started = Instant::now();
        let mut shutdown = stop.clone();
        let cancelled = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        match agent.cycle(&mut state, cancelled).await {
            None => return,
            Some(Ok(Outcome::Unchanged)) => {
                let us = started.elapsed().as_micros() as u64;
                recorder.unchanged.fetch_add(1, Ordering::Relaxed);
                recorder.unchanged_us.fetch_add(us, Ordering::Relaxed);
                recorder.unchanged_max_us.fetch_max(us, Ordering::Relaxed);
            }
            Some(Ok(Outcome::Waiting(why))) => {
                let kind = why.split(':').next().unwrap_or("").to_string();
                Recorder::count(&recorder.waits, kind);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => Recorder::count(&recorder.errors, first_words(&e.to_string(), 6)),
        }
        recorder.cycles.fetch_add(1, Ordering::Relaxed);
        let delay = interval
            + Duration::from_millis(rand::rng().random_range(0..=jitter.as_millis() as u64));
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn first_words(text: &str, n: usize) -> String {
    text.split_whitespace()
        .take(n)
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(':')
        .to_string()
}

pub(crate) async fn start_fleet(args: &Args, spec: &RunSpec) -> Result<Fleetwide, BoxError> {
    let recorder = Arc::new(Recorder::new());
    let (stop, stopped) = watch::channel(false);
    let mut databases = Vec::new();
    let mut waves = Vec::new();
    let mut tasks = Vec::new();
    let policy = pulldeploy::rollout::Policy {
        waves: spec.waves.clone(),
        ..Default::default()
    };
    // The fast clock goes to the first node of the last wave: the one with
    // the longest signed delay to skip.
    let last_wave = spec.waves.len().saturating_sub(1);
    let fast_clock_node = match (spec.limit, args.clock_ahead.is_zero()) {
        (Some(_), false) => (0..args.nodes)
            .find(|index| policy.wave_of(position(&node_id(&spec.suite, *index))) == last_wave),
        _ => None,
    };
    for index in 0..args.nodes {
        let ahead = match fast_clock_node == Some(index) {
            true => args.clock_ahead,
            false => Duration::ZERO,
        };
        let (agent, database, id) = build_agent(args, spec, index, &recorder, ahead).await?;
        databases.push(database);
        waves.push(policy.wave_of(position(&id)));
        tasks.push(tokio::spawn(node_loop(
            agent,
            recorder.clone(),
            stopped.clone(),
            args.interval,
            args.jitter,
        )));
    }
    Ok(Fleetwide {
        recorder,
        fast_clock_node,
        databases,
        waves,
        stop,
        tasks,
    })
}

impl Fleetwide {
    pub(crate) fn on_version(&self, version: &str) -> usize {
        self.databases
            .iter()
            .filter(|db| {
                db.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(PACKAGE)
                    .is_some_and(|v| v == version)
            })
            .count()
    }

    /// Waits until every node has `version`, at most `limit`; how long it
    /// took, `None` on timeout.
    pub(crate) async fn converge(&self, version: &str, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut said = Instant::now();
        loop {
            let on = self.on_version(version);
            if on == self.databases.len() {
                return Some(start.elapsed());
            }
            if start.elapsed() > limit {
                return None;
            }
            if said.elapsed() > Duration::from_secs(5) {
                progress(&format!(
                    "  {on}/{} nodes on {version} after {:.0} s",
                    self.databases.len(),
                    start.elapsed().as_secs_f64()
                ));
                said = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn idle(&self) {
        while self.recorder.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

pub(crate) fn progress(text: &str) {
    eprintln!("fleet-sim: {text}");
}
