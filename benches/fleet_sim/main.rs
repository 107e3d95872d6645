//! Fleet simulation: N agents in one process against moto's S3, run by
//! `scripts/fleet-sim.sh` (which starts moto and publishes with the real
//! `pulldeploy publish` and `pulldeploy rollout set`).
//!
//! Everything but dpkg is the agent's own code: `Agent::cycle` on the real
//! S3 source, Release and policy verification, and the real `Fleet`
//! (leases, halt markers, reports) on moto. dpkg is replaced by
//! [`SimInstaller`], which keeps versions in memory, "installs" in a few
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

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use pulldeploy::agent::{Agent, Outcome};
use pulldeploy::clock::SystemClock;
use pulldeploy::config::Config;
use pulldeploy::error::InstallError;
use pulldeploy::fleet::Fleet;
use pulldeploy::health::Health;
use pulldeploy::install::{DpkgStatus, InstallLock, Installer};
use pulldeploy::keyring::Keyring;
use pulldeploy::rollout::{Wave, parse_waves, position};
use pulldeploy::source::BoxFuture;
use pulldeploy::state::{FileStamp, State};
use rand::Rng;
use tokio::sync::watch;

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

// ---- the fake dpkg ---------------------------------------------------------

/// What every node's installer reports to.
struct Recorder {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    installs: Mutex<Vec<InstallEvent>>,
    cycles: AtomicU64,
    /// Unchanged cycles (a 304): count and total microseconds.
    unchanged: AtomicU64,
    unchanged_us: AtomicU64,
    unchanged_max_us: AtomicU64,
    /// Errors and waits, by their first words.
    errors: Mutex<BTreeMap<String, u64>>,
    waits: Mutex<BTreeMap<String, u64>>,
}

#[derive(Debug, Clone)]
struct InstallEvent {
    node: usize,
    version: String,
    ok: bool,
    at: Instant,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            installs: Mutex::new(Vec::new()),
            cycles: AtomicU64::new(0),
            unchanged: AtomicU64::new(0),
            unchanged_us: AtomicU64::new(0),
            unchanged_max_us: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            waits: Mutex::new(BTreeMap::new()),
        }
    }

    /// Starts a new maximum from the nodes in flight now.
    fn reset_max(&self) {
        self.max_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn events(&self) -> Vec<InstallEvent> {
        self.installs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn count(map: &Mutex<BTreeMap<String, u64>>, key: String) {
        *map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    fn take(map: &Mutex<BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
        std::mem::take(&mut *map.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A node in flight: from the install lock (before the drain) until the
/// lock is dropped (after commit or rollback). Only a node that serves
/// (has a version installed) counts, as only such a node needs a lease.
struct InFlight {
    recorder: Option<Arc<Recorder>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(recorder) = &self.recorder {
            recorder.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// dpkg in memory: `package -> version`, shared with the orchestrator.
type Database = Arc<Mutex<BTreeMap<String, String>>>;

struct SimInstaller {
    node: usize,
    database: Database,
    install_time: Duration,
    recorder: Arc<Recorder>,
}

impl SimInstaller {
    fn database(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.database.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, version: &str, ok: bool) {
        let event = InstallEvent {
            node: self.node,
            version: version.to_string(),
            ok,
            at: Instant::now(),
        };
        self.recorder
            .installs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }
}

impl Installer for SimInstaller {
    fn status(&self) -> Result<Arc<DpkgStatus>, InstallError> {
        let database = self.database();
        Ok(Arc::new(DpkgStatus::with_versions(
            database.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        )))
    }

    fn status_stamp(&self) -> Option<FileStamp> {
        None
    }

    fn forget_status(&self) {}

    fn needs_recovery(&self) -> Result<bool, InstallError> {
        Ok(false)
    }

    fn lock(&self, _timeout: Duration) -> BoxFuture<'_, Result<Option<InstallLock>, InstallError>> {
        let serving = !self.database().is_empty();
        let recorder = serving.then(|| {
            let now = self.recorder.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.recorder.max_in_flight.fetch_max(now, Ordering::SeqCst);
            self.recorder.clone()
        });
        Box::pin(async move { Ok(Some(Box::new(InFlight { recorder }) as InstallLock)) })
    }

    fn recover(&self) -> BoxFuture<'_, Result<(), InstallError>> {
        Box::pin(async { Ok(()) })
    }

    fn install<'a>(&'a self, debs: &'a [PathBuf]) -> BoxFuture<'a, Result<(), InstallError>> {
        Box::pin(async move {
            tokio::time::sleep(self.install_time).await;
            for deb in debs {
                let identity = pulldeploy::publish::deb::read_identity(deb).map_err(|e| {
                    InstallError::Dpkg {
                        packages: deb.display().to_string(),
                        status: "unreadable".into(),
                        stderr: format!("{e:?}"),
                    }
                })?;
                if identity.version.contains("bad") {
                    // A failed postinst: dpkg leaves the package
                    // half-configured, which is not installed.
                    self.database().remove(&identity.package);
                    self.record(&identity.version, false);
                    return Err(InstallError::Dpkg {
                        packages: format!("{} {}", identity.package, identity.version),
                        status: "exit status: 1".into(),
                        stderr: "postinst: simulated failure (a version named bad)".into(),
                    });
                }
                self.database()
                    .insert(identity.package.clone(), identity.version.clone());
                self.record(&identity.version, true);
            }
            Ok(())
        })
    }
}

// ---- moto's access log -----------------------------------------------------

/// One S3 request as werkzeug logged it.
struct Request {
    method: String,
    path: String,
    status: u16,
}

/// The requests moto logged between two byte offsets of its log (each
/// offset moved to the start of the next whole line).
fn requests_between(log: &Path, from: u64, to: u64) -> Vec<Request> {
    let mut text = Vec::new();
    if let Ok(mut file) = std::fs::File::open(log)
        && file.seek(SeekFrom::Start(from)).is_ok()
    {
        let _ = file.read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let span = (to.saturating_sub(from)) as usize;
    let skip = match from {
        0 => 0,
        _ => text.find('\n').map_or(text.len(), |i| i + 1),
    };
    let end = text[span.min(text.len())..]
        .find('\n')
        .map_or(text.len(), |i| span.min(text.len()) + i + 1);
    text.get(skip..end.max(skip))
        .unwrap_or("")
        .lines()
        .filter_map(parse_access_line)
        .collect()
}

/// `127.0.0.1 - - [date] "GET /b/k HTTP/1.1" 304 -` (ANSI colours allowed).
fn parse_access_line(line: &str) -> Option<Request> {
    let start = line.find("] \"")? + 3;
    let rest = &line[start..];
    let close = rest.find('"')?;
    let mut request = rest[..close].split_whitespace();
    let method = request.next()?.to_string();
    let path = request.next()?.to_string();
    let status = rest[close + 1..]
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .get(..3)?
        .parse()
        .ok()?;
    Some(Request {
        method,
        path,
        status,
    })
}

fn log_offset(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// What a request was for, in the agent's terms. The SDK adds
/// `?x-id=GetObject` and the like to object requests; a listing has
/// `list-type=2`.
fn classify(request: &Request) -> &'static str {
    let (p, query) = request
        .path
        .split_once('?')
        .unwrap_or((request.path.as_str(), ""));
    let m = request.method.as_str();
    if p.starts_with("/latest/") {
        "IMDS"
    } else if query.contains("list-type") {
        "LIST"
    } else if p.contains("/leases/") {
        match m {
            "PUT" => "lease PUT",
            "DELETE" => "lease DELETE",
            _ => "lease GET",
        }
    } else if p.contains("/halted/") {
        match (m, request.status) {
            ("PUT", _) => "halt PUT",
            (_, 200) => "halt GET 200",
            _ => "halt GET 404",
        }
    } else if p.contains("/nodes/") {
        "report PUT"
    } else if p.ends_with("/InRelease") {
        match request.status {
            304 => "InRelease 304",
            _ => "InRelease 200",
        }
    } else if p.contains("/pool/") {
        ".deb GET"
    } else if p.contains("/binary-") {
        "Packages GET"
    } else if p.ends_with("/rollout.toml") || p.contains("/by-hash/") {
        "rollout.toml GET"
    } else {
        "other"
    }
}

/// Billed as GET (GET, HEAD, other) or PUT (PUT, COPY, POST, LIST);
/// DELETE is free.
fn price_class(request: &Request) -> Option<bool> {
    match request.method.as_str() {
        "DELETE" => None,
        "PUT" | "POST" | "COPY" => Some(true),
        _ => Some(classify(request) == "LIST"),
    }
}

/// Requests of a window, by what they were for.
#[derive(Debug, Default, Clone)]
struct Tally {
    by_kind: BTreeMap<&'static str, u64>,
    statuses: BTreeMap<u16, u64>,
    gets: u64,
    puts: u64,
    deletes: u64,
    /// Lease slots granted twice (PUT 200) before a DELETE: moto's
    /// conditional writes are not atomic.
    double_grants: u64,
    total: u64,
}

fn tally(requests: &[Request], suite_marks: &[String]) -> Tally {
    let mut t = Tally::default();
    let mut held: BTreeMap<&str, bool> = BTreeMap::new();
    for r in requests {
        if !suite_marks.iter().any(|m| r.path.contains(m.as_str())) {
            continue;
        }
        t.total += 1;
        *t.by_kind.entry(classify(r)).or_default() += 1;
        *t.statuses.entry(r.status).or_default() += 1;
        match price_class(r) {
            Some(true) => t.puts += 1,
            Some(false) => t.gets += 1,
            None => t.deletes += 1,
        }
        if classify(r).starts_with("lease") {
            let slot = r.path.split_once('?').map_or(r.path.as_str(), |(p, _)| p);
            match (r.method.as_str(), r.status) {
                ("PUT", 200) if held.insert(slot, true) == Some(true) => {
                    t.double_grants += 1;
                }
                ("DELETE", 204) => {
                    held.insert(slot, false);
                }
                _ => {}
            }
        }
    }
    t
}

impl Tally {
    fn describe(&self) -> String {
        let kinds: Vec<String> = self
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect();
        format!(
            "{} requests ({}); statuses {}",
            self.total,
            kinds.join(", "),
            statuses.join(" ")
        )
    }

    fn kind(&self, kind: &str) -> u64 {
        self.by_kind.get(kind).copied().unwrap_or(0)
    }
}

// ---- nodes -----------------------------------------------------------------

struct RunSpec {
    suite: String,
    waves: Vec<Wave>,
    limit: Option<u32>,
    /// Measure the steady windows (the policy run only).
    steady: bool,
}

struct Fleetwide {
    recorder: Arc<Recorder>,
    databases: Vec<Database>,
    waves: Vec<usize>,
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
        Box::new(SystemClock),
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

async fn start_fleet(args: &Args, spec: &RunSpec) -> Result<Fleetwide, BoxError> {
    let recorder = Arc::new(Recorder::new());
    let (stop, stopped) = watch::channel(false);
    let mut databases = Vec::new();
    let mut waves = Vec::new();
    let mut tasks = Vec::new();
    let policy = pulldeploy::rollout::Policy {
        waves: spec.waves.clone(),
        ..Default::default()
    };
    for index in 0..args.nodes {
        let (agent, database, id) = build_agent(args, spec, index, &recorder).await?;
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
        databases,
        waves,
        stop,
        tasks,
    })
}

impl Fleetwide {
    fn on_version(&self, version: &str) -> usize {
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
    async fn converge(&self, version: &str, limit: Duration) -> Option<Duration> {
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

    async fn idle(&self) {
        while self.recorder.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn progress(text: &str) {
    eprintln!("fleet-sim: {text}");
}

// ---- the scenarios ---------------------------------------------------------

/// The figures of one run (one suite).
struct RunResult {
    suite: String,
    policy: String,
    steady: Option<Steady>,
    rollout: Option<Rollout>,
    bad: Option<BadVersion>,
    halted: Option<Steady>,
}

struct Rollout {
    converged: Option<Duration>,
    max_in_flight: usize,
    /// Per wave: nodes, first and last install after the publish.
    waves: Vec<(usize, Option<Duration>, Option<Duration>)>,
    requests: Tally,
}

struct BadVersion {
    ran: usize,
    first_failure: Option<Duration>,
    max_in_flight: usize,
}

async fn publish(args: &Args, suite: &str, deb: &str) -> Result<Duration, BoxError> {
    let started = Instant::now();
    let out = tokio::process::Command::new(&args.publish)
        .arg(suite)
        .arg(args.debs.join(deb))
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!(
            "publish {deb} to {suite} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(started.elapsed())
}

/// moto's CPU seconds so far (utime + stime from /proc/PID/stat).
fn moto_cpu(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// This process's CPU seconds.
fn own_cpu() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn opt_secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), secs)
}

async fn run(args: &Args, spec: &RunSpec) -> Result<RunResult, BoxError> {
    let waves_text: Vec<String> = spec.waves.iter().map(ToString::to_string).collect();
    let policy = match spec.limit {
        Some(limit) => format!("waves {}, max_in_flight {limit}", waves_text.join(",")),
        None => "the default policy: one wave, no in-flight limit".into(),
    };
    let marks = vec![
        format!("/dists/{}/", spec.suite),
        format!("/fleet/{}/", spec.suite),
        "/pool/".into(),
    ];
    let period = args.interval + args.jitter;
    let last_delay = spec.waves.last().map_or(Duration::ZERO, |w| w.delay);
    println!();
    println!("== suite {:?}: {policy} ==", spec.suite);

    // -- bootstrap: fresh nodes install 1.0 (no lease: they serve nothing yet)
    progress(&format!("{}: starting {} agents", spec.suite, args.nodes));
    let started = Instant::now();
    let fleet = start_fleet(args, spec).await?;
    let built = started.elapsed();
    let boot = fleet
        .converge("1.0", last_delay + 30 * period + Duration::from_secs(60))
        .await;
    println!(
        "bootstrap: {} agents built in {}; all on 1.0 after {} (fresh nodes need no lease)",
        args.nodes,
        secs(built),
        opt_secs(boot)
    );
    if boot.is_none() {
        report_trouble(&fleet);
        fleet.stop().await;
        return Err("the fleet did not converge on 1.0".into());
    }

    // -- steady state: 1 conditional GET per cycle, reports per report_interval
    let steady = match spec.steady {
        true => {
            // Let the reports that followed the install go out first.
            tokio::time::sleep(args.report_interval + period).await;
            let what = "steady state (all nodes on 1.0, nothing to do)";
            Some(steady_window(args, &fleet, &marks, what).await)
        }
        false => None,
    };

    // -- the rollout of 1.1
    let rollout = rollout_phase(args, spec, &fleet, &marks, last_delay, period).await?;

    // -- a bad version: halted by the first node that rolls it back
    let bad = bad_phase(args, spec, &fleet, &marks, last_delay, period).await?;
    let halted = match spec.steady {
        true => {
            let what = "steady state with 1.2~bad halted";
            Some(steady_window(args, &fleet, &marks, what).await)
        }
        false => None,
    };
    report_trouble(&fleet);
    fleet.stop().await;
    Ok(RunResult {
        suite: spec.suite.clone(),
        policy,
        steady,
        rollout: Some(rollout),
        bad: Some(bad),
        halted,
    })
}

/// A steady window's figures, per node.
struct Steady {
    requests_per_cycle: f64,
    report_puts_per_report_interval: f64,
    puts_per_report_interval: f64,
    monthly_cost: f64,
}

async fn steady_window(args: &Args, fleet: &Fleetwide, marks: &[String], what: &str) -> Steady {
    let window = (2 * args.report_interval).max(8 * args.interval);
    progress(&format!("measuring {what} for {}", secs(window)));
    let recorder = &fleet.recorder;
    let from = log_offset(&args.moto_log);
    let cycles0 = recorder.cycles.load(Ordering::Relaxed);
    let (n0, us0) = (
        recorder.unchanged.load(Ordering::Relaxed),
        recorder.unchanged_us.load(Ordering::Relaxed),
    );
    recorder.unchanged_max_us.store(0, Ordering::Relaxed);
    let (moto0, own0) = (moto_cpu(args.moto_pid), own_cpu());
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let (moto1, own1) = (moto_cpu(args.moto_pid), own_cpu());
    // werkzeug logs a request after answering it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let to = log_offset(&args.moto_log);
    let cycles = recorder.cycles.load(Ordering::Relaxed) - cycles0;
    let n = recorder.unchanged.load(Ordering::Relaxed) - n0;
    let us = recorder.unchanged_us.load(Ordering::Relaxed) - us0;
    let max_us = recorder.unchanged_max_us.load(Ordering::Relaxed);
    let t = tally(&requests_between(&args.moto_log, from, to), marks);
    let nodes = args.nodes as f64;
    let per_cycle = |x: u64| x as f64 / cycles.max(1) as f64;
    let report_intervals = elapsed / args.report_interval.as_secs_f64();
    println!("{what}, {elapsed:.0} s window:");
    println!(
        "  {} cycles ({:.2} per node per interval+jitter/2); {}",
        cycles,
        cycles as f64 / nodes / (elapsed / (args.interval + args.jitter / 2).as_secs_f64()),
        t.describe()
    );
    println!(
        "  per node per cycle: {:.3} requests = {:.3} InRelease 304 + {:.3} InRelease 200 + {:.3} report PUT + {:.3} other",
        per_cycle(t.total),
        per_cycle(t.kind("InRelease 304")),
        per_cycle(t.kind("InRelease 200")),
        per_cycle(t.kind("report PUT")),
        per_cycle(
            t.total - t.kind("InRelease 304") - t.kind("InRelease 200") - t.kind("report PUT")
        ),
    );
    let puts_per_report = t.puts as f64 / nodes / report_intervals;
    let reports_per_report = t.kind("report PUT") as f64 / nodes / report_intervals;
    println!(
        "  per node per report_interval ({}): {:.2} report PUTs, {:.2} PUT/LIST in all (goal: at most 1)",
        secs(args.report_interval),
        reports_per_report,
        puts_per_report
    );
    if n > 0 {
        println!(
            "  unchanged cycle (GET InRelease -> 304, in the agent): mean {:.1} ms, max {:.1} ms",
            us as f64 / n as f64 / 1000.0,
            max_us as f64 / 1000.0
        );
    }
    if let (Some(m0), Some(m1)) = (moto0, moto1) {
        println!(
            "  CPU: moto {:.0}% of one core ({:.0} requests/s), the {} agents {:.0}% of one core",
            (m1 - m0) / elapsed * 100.0,
            t.total as f64 / elapsed,
            args.nodes,
            (own1 - own0) / elapsed * 100.0
        );
    }
    // Cost at a 60 s interval and a 5 min report_interval, from the
    // measured shape: GET-class per cycle, PUT-class per report interval.
    let gets_per_cycle = t.gets as f64 / cycles.max(1) as f64;
    let month_gets = gets_per_cycle * MONTH_SECS / 60.0;
    let month_puts = puts_per_report * MONTH_SECS / 300.0;
    let cost = month_gets / 1000.0 * PRICE_GET + month_puts / 1000.0 * PRICE_PUT;
    println!(
        "  at interval 60 s, report_interval 5 min: {:.0} GET + {:.0} PUT per node per 30-day month = ${:.4} per node per month (${:.2} per 1,000 nodes)",
        month_gets,
        month_puts,
        cost,
        cost * 1000.0
    );
    Steady {
        requests_per_cycle: per_cycle(t.total),
        report_puts_per_report_interval: reports_per_report,
        puts_per_report_interval: puts_per_report,
        monthly_cost: cost,
    }
}

async fn rollout_phase(
    args: &Args,
    spec: &RunSpec,
    fleet: &Fleetwide,
    marks: &[String],
    last_delay: Duration,
    period: Duration,
) -> Result<Rollout, BoxError> {
    progress(&format!("{}: publishing 1.1", spec.suite));
    fleet.idle().await;
    let took = publish(args, &spec.suite, "myapp_1.1_amd64.deb").await?;
    let t0 = Instant::now();
    fleet.recorder.reset_max();
    Recorder::take(&fleet.recorder.waits);
    let from = log_offset(&args.moto_log);
    let limit = last_delay + Duration::from_secs(120) + 20 * period;
    let converged = fleet.converge("1.1", limit).await;
    fleet.idle().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let requests = tally(
        &requests_between(&args.moto_log, from, log_offset(&args.moto_log)),
        marks,
    );
    let max_in_flight = fleet.recorder.max_in_flight.load(Ordering::SeqCst);
    let events = fleet.recorder.events();
    let mut per_wave: Vec<(usize, Option<Duration>, Option<Duration>)> =
        vec![(0, None, None); spec.waves.len()];
    let mut first_ok: BTreeMap<usize, Duration> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.ok && e.version == "1.1" && e.at >= t0)
    {
        first_ok.entry(e.node).or_insert(e.at - t0);
    }
    for (node, wave) in fleet.waves.iter().enumerate() {
        per_wave[*wave].0 += 1;
        if let Some(at) = first_ok.get(&node) {
            let w = &mut per_wave[*wave];
            w.1 = Some(w.1.map_or(*at, |f: Duration| f.min(*at)));
            w.2 = Some(w.2.map_or(*at, |l: Duration| l.max(*at)));
        }
    }
    println!(
        "rollout of 1.1 (publish took {}; times from the end of the publish):",
        secs(took)
    );
    for (i, (nodes, first, last)) in per_wave.iter().enumerate() {
        println!(
            "  wave {} ({}, {nodes} nodes): first install {}, last install {}",
            i + 1,
            spec.waves[i],
            opt_secs(*first),
            opt_secs(*last)
        );
    }
    let limit_text = spec
        .limit
        .map_or("no limit".into(), |l| format!("limit {l}"));
    println!(
        "  100% converged: {}; max nodes in flight (drain..commit): {max_in_flight} ({limit_text})",
        opt_secs(converged)
    );
    let waits = Recorder::take(&fleet.recorder.waits);
    if !waits.is_empty() {
        let w: Vec<String> = waits.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        println!("  cycles that waited: {}", w.join(", "));
    }
    println!("  S3 during the rollout: {}", requests.describe());
    println!(
        "  per node: {:.1} requests ({:.1} lease, {:.1} halt checks)",
        requests.total as f64 / args.nodes as f64,
        (requests.kind("lease PUT") + requests.kind("lease GET") + requests.kind("lease DELETE"))
            as f64
            / args.nodes as f64,
        (requests.kind("halt GET 200") + requests.kind("halt GET 404")) as f64 / args.nodes as f64
    );
    if requests.double_grants > 0 {
        println!(
            "  moto's log shows a lease slot granted (PUT 200) again before its DELETE {} times (moto's If-None-Match is check-then-write; its log order is completion order)",
            requests.double_grants
        );
    }
    Ok(Rollout {
        converged,
        max_in_flight,
        waves: per_wave,
        requests,
    })
}

async fn bad_phase(
    args: &Args,
    spec: &RunSpec,
    fleet: &Fleetwide,
    marks: &[String],
    last_delay: Duration,
    period: Duration,
) -> Result<BadVersion, BoxError> {
    progress(&format!("{}: publishing 1.2~bad", spec.suite));
    fleet.idle().await;
    let took = publish(args, &spec.suite, "myapp_1.2~bad_amd64.deb").await?;
    let t0 = Instant::now();
    fleet.recorder.reset_max();
    let from = log_offset(&args.moto_log);
    // Every wave's time has come, and every node polled a few times since.
    tokio::time::sleep(last_delay + 3 * period).await;
    fleet.idle().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let requests = tally(
        &requests_between(&args.moto_log, from, log_offset(&args.moto_log)),
        marks,
    );
    let events = fleet.recorder.events();
    let bad: Vec<&InstallEvent> = events
        .iter()
        .filter(|e| e.at >= t0 && e.version.contains("bad"))
        .collect();
    let mut nodes: Vec<usize> = bad.iter().map(|e| e.node).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let first_failure = bad.iter().map(|e| e.at - t0).min();
    let last_failure = bad.iter().map(|e| e.at - t0).max();
    let by_wave = {
        let mut counts = vec![0; spec.waves.len()];
        for n in &nodes {
            counts[fleet.waves[*n]] += 1;
        }
        counts
    };
    let max_in_flight = fleet.recorder.max_in_flight.load(Ordering::SeqCst);
    let back = fleet.on_version("1.1");
    println!(
        "bad version 1.2~bad (install fails; publish took {}):",
        secs(took)
    );
    println!(
        "  {} nodes ran its install (per wave: {:?}), first failure at {}, last at {}; {} halt checks found the marker",
        nodes.len(),
        by_wave,
        opt_secs(first_failure),
        opt_secs(last_failure),
        requests.kind("halt GET 200")
    );
    println!(
        "  max nodes in flight {max_in_flight}; {back}/{} nodes on 1.1 afterwards (rolled back or never moved)",
        args.nodes
    );
    println!(
        "  S3 in the {:.0} s after the publish: {}",
        t0.elapsed().as_secs_f64(),
        requests.describe()
    );
    if requests.double_grants > 0 {
        println!(
            "  moto's log shows a lease slot granted (PUT 200) again before its DELETE {} times (moto's If-None-Match is check-then-write; its log order is completion order)",
            requests.double_grants
        );
    }
    Ok(BadVersion {
        ran: nodes.len(),
        first_failure,
        max_in_flight,
    })
}

fn report_trouble(fleet: &Fleetwide) {
    let errors = Recorder::take(&fleet.recorder.errors);
    if errors.is_empty() {
        println!("cycle errors: none");
        return;
    }
    println!("cycle errors (first words, count):");
    for (what, n) in errors {
        println!("  {n} x {what}");
    }
}

fn print_header(args: &Args) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    println!("pulldeploy fleet simulation");
    println!("machine: {cpus} CPUs ({model}), {mem_gib:.0} GiB RAM; moto and all agents share it");
    if !args.note.is_empty() {
        println!("{}", args.note);
    }
    println!(
        "nodes {}, interval {} + jitter up to {}, report_interval {}, drain {}, fake dpkg {} per install, one current-thread tokio runtime",
        args.nodes,
        secs(args.interval),
        secs(args.jitter),
        secs(args.report_interval),
        humantime::format_duration(args.drain),
        humantime::format_duration(args.install_time),
    );
    println!(
        "prices: S3 Standard us-east-1 list, GET/HEAD ${PRICE_GET} per 1,000, PUT/POST/LIST ${PRICE_PUT} per 1,000, DELETE free"
    );
}

fn print_comparison(args: &Args, with: &RunResult, without: &RunResult) {
    println!();
    println!("== summary ({} nodes) ==", args.nodes);
    for run in [with, without] {
        let (Some(r), Some(b)) = (&run.rollout, &run.bad) else {
            continue;
        };
        let waves: Vec<String> = r
            .waves
            .iter()
            .map(|(n, f, l)| format!("{n} nodes {}..{}", opt_secs(*f), opt_secs(*l)))
            .collect();
        println!("suite {:?} ({}):", run.suite, run.policy);
        println!(
            "  1.1 everywhere after {}; per wave {}; max in flight {}; {:.1} S3 requests per node for the rollout",
            opt_secs(r.converged),
            waves.join(" | "),
            r.max_in_flight,
            r.requests.total as f64 / args.nodes as f64
        );
        println!(
            "  bad version: {} of {} nodes ran it (first failure after {}), max in flight {}",
            b.ran,
            args.nodes,
            opt_secs(b.first_failure),
            b.max_in_flight
        );
        for (what, steady) in [("steady", &run.steady), ("halted", &run.halted)] {
            if let Some(st) = steady {
                println!(
                    "  {what}: {:.2} S3 requests per node per cycle, {:.2} report PUTs ({:.2} PUT/LIST) per node per report_interval; ${:.4} per node per month at 60 s / 5 min",
                    st.requests_per_cycle,
                    st.report_puts_per_report_interval,
                    st.puts_per_report_interval,
                    st.monthly_cost
                );
            }
        }
    }
}
