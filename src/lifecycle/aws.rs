//! The lifecycle hooks' requests, to IMDS and to EC2 Auto Scaling, and the
//! two tasks that make them: the launch decision and the termination
//! watcher (see the parent module for when each request is made).

use std::error::Error as StdError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::imds::client::error::ImdsError;
use aws_sdk_autoscaling::config::http::HttpResponse;
use aws_sdk_autoscaling::config::retry::RetryConfig;
use aws_sdk_autoscaling::config::timeout::TimeoutConfig;
use aws_sdk_autoscaling::error::{ProvideErrorMetadata, SdkError};
use tokio::sync::{OnceCell, mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use super::{
    CycleEnd, Gate, HookKind, HookMetrics, HookResult, LaunchTracker, TERMINATION_POLL, Throttle,
    backoff,
};
use crate::config::LifecycleSettings;
use crate::health::Health;
use crate::source::s3::one_line;

const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";
const GROUP_TAG_PATH: &str = "/latest/meta-data/tags/instance/aws:autoscaling:groupName";
const TARGET_STATE_PATH: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";

/// IMDS answers in milliseconds; these are aws-config's own defaults. One
/// attempt per request: the callers' schedules are the retries.
const IMDS_TIMEOUT: Duration = Duration::from_secs(1);
/// Connecting to Auto Scaling (the SDK's default for current behavior
/// versions).
const ASG_CONNECT_TIMEOUT: Duration = Duration::from_millis(3100);
/// One request to Auto Scaling, until its response: the API answers in
/// well under a second; a hung one is given up after this and retried
/// after [`backoff`]. One attempt per request, for the same reason.
const ASG_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the tasks need from the daemon.
pub(super) struct Start {
    pub settings: LifecycleSettings,
    pub drain: Duration,
    pub heartbeat_every: Duration,
    pub health: Arc<Health>,
    pub metrics: HookMetrics,
    pub gate: Arc<watch::Sender<Gate>>,
    pub reports: mpsc::Receiver<CycleEnd>,
}

/// Starts the tasks: the lookup of the instance and its group (so that a
/// missing tag is reported at start, not when the hook is due), the launch
/// decision when there is a launch hook, and the termination watcher.
pub(super) fn spawn(start: Start) -> Vec<tokio::task::JoinHandle<()>> {
    let Start {
        settings,
        drain,
        heartbeat_every,
        health,
        metrics,
        gate,
        reports,
    } = start;
    let hooks = Arc::new(Hooks {
        group: settings.group.clone(),
        imds: Mutex::new(imds_client()),
        identity: OnceCell::new(),
        client: OnceCell::new(),
        metrics,
        throttle: Throttle::default(),
    });
    let mut tasks = Vec::new();
    let lookup = hooks.clone();
    tasks.push(tokio::spawn(async move {
        lookup.identity().await;
    }));
    if let Some(hook) = settings.launch_hook {
        tasks.push(tokio::spawn(launch(
            hooks.clone(),
            hook,
            health.clone(),
            reports,
            heartbeat_every,
        )));
    }
    tasks.push(tokio::spawn(watch_termination(
        hooks,
        settings.terminate_hook,
        drain,
        health,
        gate,
    )));
    tasks
}

/// Decides the launch from the daemon's reports, heartbeats until then,
/// and completes `hook` once.
async fn launch(
    hooks: Arc<Hooks>,
    hook: String,
    health: Arc<Health>,
    mut reports: mpsc::Receiver<CycleEnd>,
    heartbeat_every: Duration,
) {
    let mut tracker = LaunchTracker::default();
    let mut heartbeat = tokio::time::interval_at(Instant::now() + heartbeat_every, heartbeat_every);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (result, why) = loop {
        tokio::select! {
            report = reports.recv() => {
                let Some(end) = report else { return };
                let (ready, reason, _) = health.evaluate().await;
                match tracker.decide(end, ready) {
                    Some(decision) => break decision,
                    None => debug!(cycle = ?end, %reason, "launch not decided yet"),
                }
            }
            _ = heartbeat.tick() => hooks.heartbeat(&hook).await,
        }
    };
    // The daemon's further reports go nowhere.
    drop(reports);
    match result {
        HookResult::Continue => info!(
            hook,
            "launch: {why}; completing the launch hook with CONTINUE"
        ),
        HookResult::Abandon => error!(
            hook,
            "launch failed: {why}; completing the launch hook with ABANDON"
        ),
    }
    hooks.complete(HookKind::Launch, &hook, result).await;
}

/// Polls the target lifecycle state until it is `Terminated`, then drains
/// and completes `hook` (if any) with CONTINUE.
async fn watch_termination(
    hooks: Arc<Hooks>,
    hook: Option<String>,
    drain: Duration,
    health: Arc<Health>,
    gate: Arc<watch::Sender<Gate>>,
) {
    let mut poll = tokio::time::interval(TERMINATION_POLL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        poll.tick().await;
        match hooks.imds_get(TARGET_STATE_PATH).await {
            Ok(state) if state.trim() == "Terminated" => break,
            Ok(state) => debug!(state = state.trim(), "target lifecycle state"),
            Err(failure) => hooks.failed(
                "imds",
                &failure.describe(
                    TARGET_STATE_PATH,
                    "this instance is not in an Auto Scaling group",
                ),
            ),
        }
    }
    info!(
        drain = ?drain,
        "target lifecycle state is Terminated: /healthz answers 503, no new installs"
    );
    health.set_terminating();
    gate.send_modify(|g| g.terminating = true);
    let mut cycles = gate.subscribe();
    if cycles.borrow().cycle_running {
        info!("waiting for the running cycle to finish");
    }
    let idle = async {
        // The sender is `gate` itself, alive here: no error to handle.
        let _ = cycles.wait_for(|g| !g.cycle_running).await;
    };
    tokio::join!(tokio::time::sleep(drain), idle);
    match hook {
        Some(hook) => {
            info!(
                hook,
                "drained; completing the termination hook with CONTINUE"
            );
            hooks
                .complete(HookKind::Terminate, &hook, HookResult::Continue)
                .await;
        }
        None => info!("drained; no terminate_hook to complete"),
    }
}

/// This instance in its group.
#[derive(Debug)]
struct Identity {
    instance_id: String,
    group: String,
}

/// Why IMDS gave no answer.
enum ImdsFailure {
    /// 404: IMDS has no such item.
    NotFound,
    Other(String),
}

impl ImdsFailure {
    /// In words, for a GET of `path`; `absent` says what a 404 means.
    fn describe(&self, path: &str, absent: &str) -> String {
        match self {
            ImdsFailure::NotFound => format!("IMDS answered 404 Not Found to GET {path}: {absent}"),
            ImdsFailure::Other(reason) => reason.clone(),
        }
    }
}

/// A request's failure: final (a ValidationError, which a retry cannot
/// change) or worth another attempt.
enum Failure {
    Final(String),
    Retry(String),
}

/// The requests, and what they share: the IMDS session, the instance's
/// identity, the Auto Scaling client, the counters and the log throttle.
struct Hooks {
    /// `[lifecycle] group`, else the instance tag.
    group: Option<String>,
    /// Its session token is reused; replaced when IMDS refuses the token.
    imds: Mutex<aws_config::imds::Client>,
    identity: OnceCell<Identity>,
    client: OnceCell<aws_sdk_autoscaling::Client>,
    metrics: HookMetrics,
    throttle: Throttle,
}

impl Hooks {
    /// Counts a failed request and logs it, rate-limited per `kind`.
    fn failed(&self, kind: &'static str, reason: &str) {
        self.metrics.errors.inc();
        if let Some(suppressed) = self.throttle.allow(kind, Instant::now()) {
            warn!(error = %reason, suppressed, "lifecycle hooks: request failed; retrying");
        }
    }

    /// A GET of IMDS `path`, with a new session token when IMDS no longer
    /// accepts the one in use (401: IMDS restarted).
    async fn imds_get(&self, path: &str) -> Result<String, ImdsFailure> {
        let client = self.imds.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match client.get(path).await {
            Err(ImdsError::ErrorResponse(response))
                if response.response().status().as_u16() == 401 =>
            {
                info!("IMDS no longer accepts the session token (401); getting a new token");
                let fresh = imds_client();
                *self.imds.lock().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
                imds_answer(fresh.get(path).await, path)
            }
            answer => imds_answer(answer, path),
        }
    }

    /// The instance ID and its group, looked up once (retried until found).
    async fn identity(&self) -> &Identity {
        self.identity
            .get_or_init(|| async {
                let mut failed = 0;
                loop {
                    match self.look_up_identity().await {
                        Ok(identity) => {
                            info!(
                                instance = identity.instance_id,
                                group = identity.group,
                                "Auto Scaling lifecycle hooks for this instance"
                            );
                            return identity;
                        }
                        Err(reason) => {
                            self.failed("identity", &reason);
                            tokio::time::sleep(backoff(failed)).await;
                            failed = failed.saturating_add(1);
                        }
                    }
                }
            })
            .await
    }

    async fn look_up_identity(&self) -> Result<Identity, String> {
        let instance_id = self
            .imds_get(INSTANCE_ID_PATH)
            .await
            .map_err(|f| f.describe(INSTANCE_ID_PATH, "not an EC2 instance?"))?
            .trim()
            .to_string();
        if instance_id.is_empty() {
            return Err(format!("IMDS answered an empty {INSTANCE_ID_PATH}"));
        }
        let group = match &self.group {
            Some(group) => group.clone(),
            None => self
                .imds_get(GROUP_TAG_PATH)
                .await
                .map_err(|f| {
                    f.describe(
                        GROUP_TAG_PATH,
                        &format!(
                            "instance metadata tags are not enabled for this instance, or it is not in an \
                             Auto Scaling group. Enable them (InstanceMetadataTags=enabled in the launch \
                             template's metadata options, or aws ec2 modify-instance-metadata-options \
                             --instance-id {instance_id} --instance-metadata-tags enabled) or set [lifecycle] group"
                        ),
                    )
                })?
                .trim()
                .to_string(),
        };
        if group.is_empty() {
            return Err(format!("IMDS answered an empty {GROUP_TAG_PATH}"));
        }
        Ok(Identity { instance_id, group })
    }

    /// The Auto Scaling client, built once the region is known.
    async fn client(&self) -> Result<&aws_sdk_autoscaling::Client, String> {
        self.client
            .get_or_try_init(|| async {
                let shared = aws_config::defaults(BehaviorVersion::latest()).load().await;
                if shared.region().is_none() {
                    return Err("no AWS region for Auto Scaling: none in the environment, a profile or IMDS (/latest/meta-data/placement/region)".to_string());
                }
                let config = aws_sdk_autoscaling::config::Builder::from(&shared)
                    .retry_config(RetryConfig::standard().with_max_attempts(1))
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(ASG_CONNECT_TIMEOUT)
                            .operation_attempt_timeout(ASG_ATTEMPT_TIMEOUT)
                            .operation_timeout(ASG_ATTEMPT_TIMEOUT)
                            .build(),
                    )
                    .build();
                Ok(aws_sdk_autoscaling::Client::from_conf(config))
            })
            .await
    }

    /// Completes `hook` with `result`, retried after [`backoff`] until Auto
    /// Scaling accepts it or gives a final answer.
    async fn complete(&self, kind: HookKind, hook: &str, result: HookResult) {
        let identity = self.identity().await;
        let mut failed = 0;
        loop {
            match self.try_complete(identity, hook, result).await {
                Ok(()) => {
                    info!(
                        hook,
                        result = result.as_str(),
                        instance = identity.instance_id,
                        group = identity.group,
                        "lifecycle action completed"
                    );
                    self.metrics.completed(kind, result);
                    return;
                }
                Err(Failure::Final(reason)) => {
                    warn!(hook, result = result.as_str(), error = %reason, "lifecycle action not completed; not retried");
                    return;
                }
                Err(Failure::Retry(reason)) => {
                    self.failed("autoscaling", &reason);
                    tokio::time::sleep(backoff(failed)).await;
                    failed = failed.saturating_add(1);
                }
            }
        }
    }

    async fn try_complete(
        &self,
        identity: &Identity,
        hook: &str,
        result: HookResult,
    ) -> Result<(), Failure> {
        let what = format!("CompleteLifecycleAction {hook} {}", result.as_str());
        let client = self.client().await.map_err(Failure::Retry)?;
        client
            .complete_lifecycle_action()
            .auto_scaling_group_name(&identity.group)
            .lifecycle_hook_name(hook)
            .instance_id(&identity.instance_id)
            .lifecycle_action_result(result.as_str())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| failure(&e, &what, &identity.group))
    }

    /// One RecordLifecycleActionHeartbeat for `hook`, not retried (the next
    /// one is due an interval later). Skipped while the instance is not
    /// known yet.
    async fn heartbeat(&self, hook: &str) {
        let Some(identity) = self.identity.get() else {
            return;
        };
        let what = format!("RecordLifecycleActionHeartbeat {hook}");
        let sent = match self.client().await {
            Ok(client) => client
                .record_lifecycle_action_heartbeat()
                .auto_scaling_group_name(&identity.group)
                .lifecycle_hook_name(hook)
                .instance_id(&identity.instance_id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| failure(&e, &what, &identity.group)),
            Err(reason) => Err(Failure::Retry(reason)),
        };
        match sent {
            Ok(()) => debug!(hook, "launch heartbeat sent"),
            Err(Failure::Final(reason)) => {
                if let Some(suppressed) = self.throttle.allow("heartbeat", Instant::now()) {
                    info!(hook, error = %reason, suppressed, "launch heartbeat refused");
                }
            }
            Err(Failure::Retry(reason)) => self.failed("autoscaling", &reason),
        }
    }
}

fn imds_client() -> aws_config::imds::Client {
    aws_config::imds::Client::builder()
        .connect_timeout(IMDS_TIMEOUT)
        .read_timeout(IMDS_TIMEOUT)
        .max_attempts(1)
        .build()
}

fn imds_answer(
    answer: Result<aws_config::imds::client::SensitiveString, ImdsError>,
    path: &str,
) -> Result<String, ImdsFailure> {
    match answer {
        Ok(value) => Ok(value.into()),
        Err(ImdsError::ErrorResponse(response)) => match response.response().status().as_u16() {
            404 => Err(ImdsFailure::NotFound),
            status => Err(ImdsFailure::Other(format!(
                "IMDS answered {status} to GET {path}"
            ))),
        },
        Err(e) => Err(ImdsFailure::Other(format!(
            "IMDS GET {path}: {}",
            one_line(&e)
        ))),
    }
}

/// What a failed Auto Scaling request `what` means. A ValidationError is
/// final: AWS answers it when no lifecycle action of that hook is active
/// for the instance (already completed, timed out, a wrong name).
fn failure<E>(error: &SdkError<E, HttpResponse>, what: &str, group: &str) -> Failure
where
    E: ProvideErrorMetadata + StdError + 'static,
{
    let SdkError::ServiceError(service) = error else {
        return Failure::Retry(format!("{what}: {}", one_line(error)));
    };
    let status = service.raw().status().as_u16();
    let code = service.err().code().unwrap_or_default();
    let message = service.err().message().unwrap_or_default();
    let text = format!("{what}: HTTP {status} {code} {message}")
        .trim()
        .to_string();
    match code {
        "ValidationError" => Failure::Final(text),
        "AccessDenied" | "AccessDeniedException" => Failure::Retry(format!(
            "{text} (the instance role needs autoscaling:CompleteLifecycleAction and \
             autoscaling:RecordLifecycleActionHeartbeat on the group {group})"
        )),
        _ => Failure::Retry(text),
    }
}
