//! EC2 Auto Scaling lifecycle hooks (`[lifecycle]`): the node tells its
//! group when it is ready to serve, and when it has drained before it goes.
//!
//! # Launch (`launch_hook`)
//!
//! The group holds a new instance in `Pending:Wait` until the hook is
//! completed. After every cycle the daemon reports how it ended
//! ([`Lifecycle::cycle_done`]); the launch is decided by the first report
//! that is conclusive ([`LaunchTracker::decide`]):
//!
//! * **CONTINUE** after the first cycle that leaves `/healthz` ready: every
//!   configured package committed, nothing being installed, `check_url`
//!   answering 2xx. That includes "up to date" or "unchanged" at start (a
//!   restarted agent on a node already in service; the group then answers
//!   that no lifecycle action is active, which is logged and ends it).
//! * **ABANDON** when the first install failed for good: the cycle ran dpkg
//!   and the health gate, they failed, and the version was marked bad (it
//!   is not tried again) with no healthy version to fall back on (a
//!   rollback to a healthy version leaves `/healthz` ready: CONTINUE).
//! * **ABANDON** after [`ABANDON_AFTER_CYCLES`] cycles in a row that ended
//!   without `/healthz` ready for any other reason (repository unreachable,
//!   verification failed, unmet Depends, no space, the app unhealthy).
//!   Deferred cycles (another package manager holds dpkg's lock) do not
//!   count: they are waits, not failures.
//!
//! The hook's HeartbeatTimeout is not known to the agent: reading it needs
//! `autoscaling:DescribeLifecycleHooks`, which IAM grants only on all
//! resources (`*`), not on one group. So the agent keeps the hook from
//! timing out instead: while the launch is undecided it sends
//! RecordLifecycleActionHeartbeat every poll interval, at most
//! [`HEARTBEAT_MAX`] apart (the first one interval after start, so a quick
//! launch costs one call). The hook's timeout therefore only needs to
//! cover the instance's boot plus one interval; the launch itself is
//! bounded by the rules above, and in the end by the group's global
//! timeout (100 heartbeat timeouts or 48 hours).
//!
//! # Termination (`terminate_hook`)
//!
//! The daemon reads IMDS `/latest/meta-data/autoscaling/target-lifecycle-state`
//! every [`TERMINATION_POLL`] (one small GET on the reused IMDSv2 session
//! token). When it says `Terminated`: `/healthz` answers 503 from then on,
//! no new cycle starts (one reading the repository is stopped before dpkg;
//! an install already in dpkg or its health gate finishes), and once
//! `health.drain` has passed and no install is running, `terminate_hook`
//! is completed with CONTINUE. The table without `terminate_hook` still
//! drains: the instance goes anyway.
//!
//! # Failures
//!
//! Nothing here blocks or fails a cycle: the requests run on their own
//! tasks. A failed request to IMDS or Auto Scaling is counted in
//! `/metrics` (`pulldeploy_lifecycle_errors_total`), logged at most once per
//! [`LOG_EVERY`] per kind with the number left out, and tried again
//! after [`backoff`]. A ValidationError from Auto Scaling (no active
//! lifecycle action for this instance and hook: completed already, timed
//! out, or a wrong hook name) is final and logged once.
//!
//! The instance ID comes from IMDS `/latest/meta-data/instance-id`; the
//! group from `[lifecycle] group`, else from the instance tag
//! `aws:autoscaling:groupName`, which IMDS serves only when instance
//! metadata tags are enabled. The Auto Scaling endpoint is the SDK's: the
//! instance's region, or `AWS_ENDPOINT_URL_AUTO_SCALING` (the SDK's own
//! override, used by the tests). Credentials are aws-config's default
//! chain (on an instance: its role through IMDSv2).
//!
//! `[lifecycle]` is read at start; a SIGHUP reload does not change it.

// Without the s3 feature (the fuzz targets' build) there is no Auto
// Scaling client: the launch decision and the helpers of the requests are
// then unused.
#![cfg_attr(not(feature = "s3"), allow(dead_code))]

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::agent::{Agent, Outcome};
use crate::config::Config;
use crate::error::{Error, InstallError};
use crate::health::Health;
use crate::state::State;

#[cfg(feature = "s3")]
mod aws;

/// Cycles in a row that end without `/healthz` ready, deferrals left out,
/// after which the launch is abandoned.
pub const ABANDON_AFTER_CYCLES: u32 = 5;
/// The longest time between two launch heartbeats.
pub const HEARTBEAT_MAX: Duration = Duration::from_secs(60);
/// How often IMDS is asked for the target lifecycle state.
pub const TERMINATION_POLL: Duration = Duration::from_secs(5);
/// Warnings about one kind of failure come at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(60);
/// The longest wait between two attempts of a request; see [`backoff`].
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The wait before attempt `failed + 1` of a request that failed `failed`
/// times: 1 s doubling up to [`BACKOFF_MAX`]:
///
/// try, 1 s, try, 2 s, try, 4 s, try, 8 s, try, 16 s, try, 32 s, try,
/// 60 s, try, 60 s, ...
///
/// Requests are tried until they succeed or get a final answer: a hook's
/// action that has timed out is answered with a final ValidationError.
pub fn backoff(failed: u32) -> Duration {
    Duration::from_secs(1u64 << failed.min(6)).min(BACKOFF_MAX)
}

/// How a lifecycle action is completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookResult {
    Continue,
    Abandon,
}

impl HookResult {
    /// The API's `LifecycleActionResult`.
    pub fn as_str(self) -> &'static str {
        match self {
            HookResult::Continue => "CONTINUE",
            HookResult::Abandon => "ABANDON",
        }
    }
}

/// Which of the two hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HookKind {
    Launch,
    Terminate,
}

impl HookKind {
    fn as_str(self) -> &'static str {
        match self {
            HookKind::Launch => "launch",
            HookKind::Terminate => "terminate",
        }
    }
}

/// How a cycle ended, as the launch decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CycleEnd {
    /// Installed, up to date or unchanged.
    Ok,
    /// dpkg or the health gate failed and the version was marked bad
    /// (rolled back, nothing to roll back to, or the rollback failed too).
    InstallFailed,
    /// Another package manager or runner held a lock: a wait.
    Deferred,
    /// Any other failure.
    Failed,
}

impl CycleEnd {
    fn of(result: &Result<Outcome, Error>) -> CycleEnd {
        match result {
            Ok(_) => CycleEnd::Ok,
            Err(Error::Install(
                InstallError::NoRollback { .. }
                | InstallError::RolledBack { .. }
                | InstallError::RollbackFailed { .. },
            )) => CycleEnd::InstallFailed,
            Err(Error::Deferred { .. } | Error::Busy { .. }) => CycleEnd::Deferred,
            Err(_) => CycleEnd::Failed,
        }
    }
}

/// The launch decision, one cycle at a time (see the module doc).
#[derive(Debug, Default)]
struct LaunchTracker {
    /// Cycles in a row that ended without /healthz ready (deferrals left out).
    not_ready: u32,
}

impl LaunchTracker {
    /// The hook's result and why, once a cycle that ended as `end`, with
    /// `/healthz` then `ready`, decides the launch.
    fn decide(&mut self, end: CycleEnd, ready: bool) -> Option<(HookResult, String)> {
        if ready {
            return Some((HookResult::Continue, "/healthz is ready".into()));
        }
        match end {
            CycleEnd::InstallFailed => Some((
                HookResult::Abandon,
                "the first install failed and no healthy version is installed".into(),
            )),
            CycleEnd::Deferred => None,
            CycleEnd::Ok | CycleEnd::Failed => {
                self.not_ready += 1;
                (self.not_ready >= ABANDON_AFTER_CYCLES).then(|| {
                    (
                        HookResult::Abandon,
                        format!(
                            "{} cycles in a row ended without /healthz ready",
                            self.not_ready
                        ),
                    )
                })
            }
        }
    }
}

/// Rate limit for warnings: one per kind per [`LOG_EVERY`].
#[derive(Debug, Default)]
struct Throttle {
    /// Per kind: when one was last let through, and how many were held
    /// back since.
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl Throttle {
    /// `Some(held back since the last one)` when a warning of `kind` may be
    /// logged at `now`.
    fn allow(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.get_mut(kind) {
            Some((at, held)) if now.saturating_duration_since(*at) < LOG_EVERY => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let suppressed = *held;
                *at = now;
                *held = 0;
                Some(suppressed)
            }
            None => {
                last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

/// The labels of `pulldeploy_lifecycle_hook_completed`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    hook: &'static str,
    result: &'static str,
}

/// The hooks' figures in `/metrics`.
#[derive(Debug, Clone, Default)]
struct HookMetrics {
    errors: Counter,
    completed: Family<HookLabels, Gauge>,
}

impl HookMetrics {
    fn register(health: &Health) -> HookMetrics {
        let metrics = HookMetrics::default();
        health.register_metric(
            "lifecycle_errors",
            "Requests to IMDS or EC2 Auto Scaling for the lifecycle hooks that failed",
            metrics.errors.clone(),
        );
        health.register_metric(
            "lifecycle_hook_completed",
            "Lifecycle hooks this agent completed, by hook and result",
            metrics.completed.clone(),
        );
        metrics
    }

    fn completed(&self, kind: HookKind, result: HookResult) {
        self.completed
            .get_or_create(&HookLabels {
                hook: kind.as_str(),
                result: result.as_str(),
            })
            .set(1);
    }
}

/// Whether cycles may run: shared by the daemon's loop and the
/// termination watcher.
#[derive(Debug, Clone, Copy, Default)]
struct Gate {
    /// The instance is terminating: no new cycle starts.
    terminating: bool,
    /// A cycle is running (it may be installing).
    cycle_running: bool,
}

/// What [`Lifecycle::cycle`] did.
pub enum Turn {
    /// Shutdown came first: stop.
    Shutdown,
    /// The instance is terminating: no cycle ran, or the one that was
    /// reading the repository was stopped before dpkg.
    Held,
    /// The cycle ran to its end.
    Done(Result<Outcome, Error>),
}

/// The daemon's side of the lifecycle hooks: whether a cycle may run, and
/// how each one ended. Without `[lifecycle]` every cycle runs and nothing
/// is asked of IMDS or Auto Scaling.
pub struct Lifecycle {
    gate: Arc<watch::Sender<Gate>>,
    /// To the launch task while the launch is undecided.
    reports: Option<mpsc::Sender<CycleEnd>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    held_logged: AtomicBool,
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Lifecycle {
    /// Starts the hooks `config` names, on tasks of their own.
    pub fn start(config: &Config, health: &Arc<Health>) -> Lifecycle {
        let gate = Arc::new(watch::Sender::new(Gate::default()));
        let idle = |gate| Lifecycle {
            gate,
            reports: None,
            tasks: Vec::new(),
            held_logged: AtomicBool::new(false),
        };
        let Some(settings) = &config.lifecycle else {
            return idle(gate);
        };
        #[cfg(feature = "s3")]
        {
            // Room for a few reports while the launch task waits on a
            // heartbeat request; more are dropped (try_send), not queued.
            let (reports, receiver) = mpsc::channel(16);
            let heartbeat_every = config
                .agent
                .interval
                .clamp(Duration::from_secs(1), HEARTBEAT_MAX);
            let tasks = aws::spawn(aws::Start {
                settings: settings.clone(),
                drain: config.health.drain,
                heartbeat_every,
                health: health.clone(),
                metrics: HookMetrics::register(health),
                gate: gate.clone(),
                reports: receiver,
            });
            Lifecycle {
                gate,
                reports: settings.launch_hook.is_some().then_some(reports),
                tasks,
                held_logged: AtomicBool::new(false),
            }
        }
        #[cfg(not(feature = "s3"))]
        {
            let _ = (settings, health);
            tracing::error!(
                "[lifecycle] is configured, but this pulldeploy was built without the s3 feature (aws-sdk-autoscaling); the hooks are not completed"
            );
            idle(gate)
        }
    }

    /// Runs `agent`'s cycle unless the instance is terminating. Shutdown
    /// and termination stop the cycle while it waits for the state lock or
    /// reads the repository; a started install goes to its end either way.
    pub async fn cycle<S>(&self, agent: &Agent, state: &mut State, shutdown: &mut S) -> Turn
    where
        S: Future<Output = ()> + Unpin,
    {
        let may_run = self.gate.send_if_modified(|gate| {
            if gate.terminating {
                return false;
            }
            gate.cycle_running = true;
            true
        });
        if !may_run {
            self.log_held();
            return Turn::Held;
        }
        let shut_down = AtomicBool::new(false);
        let mut gate = self.gate.subscribe();
        let stop = async {
            tokio::select! {
                biased;
                () = &mut *shutdown => shut_down.store(true, Ordering::Relaxed),
                changed = gate.wait_for(|g| g.terminating) => {
                    // The sender lives as long as `self`: an error cannot
                    // happen; if it did, only shutdown would stop the cycle.
                    if changed.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        let result = agent.cycle(state, stop).await;
        self.gate.send_modify(|gate| gate.cycle_running = false);
        match result {
            Some(result) => Turn::Done(result),
            None if shut_down.load(Ordering::Relaxed) => Turn::Shutdown,
            None => {
                self.log_held();
                Turn::Held
            }
        }
    }

    fn log_held(&self) {
        if !self.held_logged.swap(true, Ordering::Relaxed) {
            info!("the instance is terminating: no new cycles");
        } else {
            debug!("cycle skipped: the instance is terminating");
        }
    }

    /// Tells the launch hook how a cycle ended. Call it after `/healthz`
    /// shows the cycle's result. Never waits.
    pub fn cycle_done(&self, result: &Result<Outcome, Error>) {
        if let Some(reports) = &self.reports {
            // Full: the launch task is busy with a request and has reports
            // to read. Closed: the launch is decided.
            let _ = reports.try_send(CycleEnd::of(result));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute() {
        let waits: Vec<u64> = (0..9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn launch_continues_on_the_first_ready_cycle_whatever_it_did() {
        for end in [
            CycleEnd::Ok,
            CycleEnd::InstallFailed,
            CycleEnd::Failed,
            CycleEnd::Deferred,
        ] {
            let decision = LaunchTracker::default().decide(end, true);
            assert_eq!(decision.map(|d| d.0), Some(HookResult::Continue), "{end:?}");
        }
    }

    #[test]
    fn launch_is_abandoned_when_the_first_install_fails_for_good() {
        let mut tracker = LaunchTracker::default();
        assert_eq!(tracker.decide(CycleEnd::Failed, false), None);
        let (result, why) = tracker.decide(CycleEnd::InstallFailed, false).unwrap();
        assert_eq!(result, HookResult::Abandon);
        assert!(why.contains("first install failed"), "{why}");
    }

    #[test]
    fn launch_is_abandoned_after_cycles_in_a_row_not_ready_but_deferrals_wait() {
        let mut tracker = LaunchTracker::default();
        for _ in 1..ABANDON_AFTER_CYCLES {
            assert_eq!(tracker.decide(CycleEnd::Failed, false), None);
            assert_eq!(tracker.decide(CycleEnd::Deferred, false), None);
        }
        let (result, why) = tracker.decide(CycleEnd::Ok, false).unwrap();
        assert_eq!(result, HookResult::Abandon);
        assert!(
            why.starts_with(&format!("{ABANDON_AFTER_CYCLES} cycles")),
            "{why}"
        );
    }

    #[test]
    fn cycle_ends_are_classified_by_error() {
        let deferred = Err(Error::Deferred {
            reason: "dpkg lock".into(),
        });
        assert_eq!(CycleEnd::of(&deferred), CycleEnd::Deferred);
        let unavailable = Err(Error::CycleDeadline {
            limit: Duration::from_secs(1),
        });
        assert_eq!(CycleEnd::of(&unavailable), CycleEnd::Failed);
        let rolled_back = Err(Error::Install(InstallError::NoRollback {
            package: "myapp".into(),
            version: "1.0".into(),
            reason: crate::error::Failure::Unhealthy("503".into()),
        }));
        assert_eq!(CycleEnd::of(&rolled_back), CycleEnd::InstallFailed);
        assert_eq!(CycleEnd::of(&Ok(Outcome::UpToDate)), CycleEnd::Ok);
    }

    #[test]
    fn warnings_are_let_through_once_a_minute_per_kind_with_a_count() {
        let throttle = Throttle::default();
        let start = Instant::now();
        assert_eq!(throttle.allow("imds", start), Some(0));
        assert_eq!(throttle.allow("autoscaling", start), Some(0));
        assert_eq!(throttle.allow("imds", start + Duration::from_secs(5)), None);
        assert_eq!(
            throttle.allow("imds", start + Duration::from_secs(59)),
            None
        );
        assert_eq!(throttle.allow("imds", start + LOG_EVERY), Some(2));
        assert_eq!(throttle.allow("imds", start + LOG_EVERY), None);
    }

    #[test]
    fn hook_results_are_the_api_words() {
        assert_eq!(HookResult::Continue.as_str(), "CONTINUE");
        assert_eq!(HookResult::Abandon.as_str(), "ABANDON");
    }
}
