//! The scenarios: a run per suite (bootstrap, steady state, 1.1, a bad version) and its figures.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::access_log::{Tally, log_offset, requests_between, tally};
use crate::installer::{InstallEvent, Recorder};
use crate::nodes::{Fleetwide, RunSpec, progress, start_fleet};
use crate::{Args, BoxError, MONTH_SECS, PRICE_GET, PRICE_PUT};

/// The figures of one run (one suite).
pub(crate) struct RunResult {
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

pub(crate) async fn run(args: &Args, spec: &RunSpec) -> Result<RunResult, BoxError> {
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
    if args.garbage_lease_bytes > 0 && spec.limit.is_some() {
        plant_garbage_lease(args, spec).await?;
    }
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
    if args.garbage_lease_bytes > 0 && spec.limit.is_some() {
        println!(
            "  with {} bytes of garbage in lease slot 0 before the publish",
            args.garbage_lease_bytes
        );
    }
    if let Some(node) = fleet.fast_clock_node {
        let wave = fleet.waves[node];
        let delay = spec.waves[wave].delay;
        let first = first_ok.get(&node).copied();
        println!(
            "  node {node} (wave {}, clock {} ahead): first install of 1.1 at {}; its wave opens {} after the publish: {}",
            wave + 1,
            humantime::format_duration(args.clock_ahead),
            opt_secs(first),
            secs(delay),
            match first {
                Some(at) if at + took < delay => "EARLY (ran ahead of its wave)",
                Some(_) => "held to its wave",
                None => "never installed",
            }
        );
    }
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

/// `--garbage-lease-bytes` of junk at `leases/0` of the suite's fleet
/// prefix, written as any node with write access could.
async fn plant_garbage_lease(args: &Args, spec: &RunSpec) -> Result<(), BoxError> {
    use pulldeploy::publish::store::{Body, Condition, S3Store, Store};
    let store = S3Store::new(
        args.bucket.clone(),
        "fleet".into(),
        Some(&args.endpoint),
        Some("us-east-1"),
    )
    .await?;
    let junk: Vec<u8> = (0..args.garbage_lease_bytes)
        .map(|i| b"garbage lease \x00\xff"[i % 16])
        .collect();
    let path = format!("{}/leases/0", spec.suite);
    store
        .put(&path, Body::Bytes(&junk), Condition::Always)
        .await?;
    progress(&format!(
        "{}: wrote {} bytes of garbage to fleet/{path}",
        spec.suite,
        junk.len()
    ));
    Ok(())
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

pub(crate) fn print_header(args: &Args) {
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

pub(crate) fn print_comparison(args: &Args, with: &RunResult, without: &RunResult) {
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
