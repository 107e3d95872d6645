//! Notifications to an incoming webhook (Slack-compatible JSON
//! `{"text": "..."}`): the node's rollbacks, halts and failing streaks
//! (`[notify]` in the config), and the publisher's publish, promote and
//! rollout commands (`--webhook`).
//!
//! Best effort, and never in the way of a cycle or a publish. A message
//! goes on a bounded queue ([`QUEUE_LEN`]) with `try_send`: a full queue
//! drops it and counts the drop. One background task posts the messages in
//! order, each request bounded by [`REQUEST_TIMEOUT`] and tried again on
//! the schedule of [`Retry`]. Nothing waits for it, except a command about
//! to exit, which gives its message up to [`CLI_DEADLINE`]
//! ([`Notifier::flush`]). What became of each message is counted in
//! `/metrics` ([`Counters`]).
//!
//! The webhook URL is a credential (whoever has it can post to the
//! channel): it is never logged, and errors are logged without it.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::config::{Config, NodeEvent};
use crate::error::Error;
use crate::state::Pending;

/// Messages waiting for the delivery task; one more is dropped.
pub const QUEUE_LEN: usize = 64;

/// How long one POST may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a command about to exit waits for its message.
pub const CLI_DEADLINE: Duration = Duration::from_secs(10);

/// Slack shows about 4,000 characters of a message's text (and cuts at
/// 40,000); a dpkg error can be longer. Longer texts are cut here.
const MAX_TEXT_CHARS: usize = 3000;

/// When a message is tried again:
///
/// ```text
/// try / 1 s / try / 2 s / try      (each try at most REQUEST_TIMEOUT)
/// ```
///
/// so a message is settled within 5 + 1 + 5 + 2 + 5 = 18 s. Tried again:
/// timeouts, connection errors, 5xx, and the two 4xx that mean "later"
/// (408 Request Timeout, 429 Too Many Requests, which Slack's rate limit
/// answers). Given up at once: any other status, e.g. 404 for a webhook
/// that was deleted (trying again cannot help, and would only hold up the
/// messages behind it).
#[derive(Debug, Clone)]
pub struct Retry {
    timeout: Duration,
    /// The pauses between tries; one try more than pauses.
    backoff: Vec<Duration>,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            timeout: REQUEST_TIMEOUT,
            backoff: vec![Duration::from_secs(1), Duration::from_secs(2)],
        }
    }
}

/// What became of the messages, for `/metrics` (registered by
/// `health::Metrics`). Clones count into the same counters.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub sent: Counter,
    pub failed: Counter,
    pub dropped: Counter,
}

impl Counters {
    /// Registers `pulldeploy_webhook_{sent,failed,dropped}_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "webhook_sent",
            "Webhook messages delivered (2xx)",
            self.sent.clone(),
        );
        registry.register(
            "webhook_failed",
            "Webhook messages given up: refused (4xx) or failing on every try",
            self.failed.clone(),
        );
        registry.register(
            "webhook_dropped",
            "Webhook messages dropped because the queue was full",
            self.dropped.clone(),
        );
    }
}

/// What a publisher command announces (every one, when `--webhook` is
/// given; the node's `[notify] events` do not apply to them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublisherEvent {
    /// `pulldeploy publish` added packages to a suite.
    Published,
    /// `pulldeploy promote` copied packages from one suite to another.
    Promoted,
    /// `pulldeploy rollout ...` changed a suite's rollout policy.
    Rollout,
}

impl PublisherEvent {
    pub fn name(self) -> &'static str {
        match self {
            PublisherEvent::Published => "published",
            PublisherEvent::Promoted => "promoted",
            PublisherEvent::Rollout => "rollout",
        }
    }
}

/// Sends notifications to the webhook, if one is configured. Cheap to
/// clone (clones share the queue); every method returns at once.
#[derive(Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    queue: mpsc::Sender<Message>,
    shared: Arc<Shared>,
    /// Whether the last message was dropped: one warning per run of drops.
    dropping: AtomicBool,
    /// Only for a node's notifier.
    node: Option<NodeSide>,
}

/// Between the notifier and its delivery task.
struct Shared {
    counters: Counters,
    /// Messages queued and not yet delivered or given up.
    outstanding: watch::Sender<usize>,
}

/// Who a node is, and what it reports.
struct NodeSide {
    host: String,
    /// The id `fleet status` shows, once the agent knows it.
    id: std::sync::OnceLock<String>,
    suite: String,
    events: Vec<NodeEvent>,
    failing_after: u32,
}

impl NodeSide {
    fn name(&self) -> String {
        match self.id.get() {
            Some(id) if *id != self.host => format!("{id} ({})", self.host),
            Some(id) => id.clone(),
            None => self.host.clone(),
        }
    }
}

struct Message {
    event: &'static str,
    body: Bytes,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { inner: None }
    }

    /// The node's notifier: `[notify]` of `config` (disabled without it),
    /// counting into `counters` (the daemon's `/metrics`). The node is
    /// named by its host name and, once known (`fleet.node_id` or
    /// [`Notifier::set_node_id`]), its fleet id. Must be called
    /// within the tokio runtime (it starts the delivery task); outside one
    /// it warns and sends nothing.
    pub fn for_node(config: &Config, counters: Counters) -> Notifier {
        let Some(notify) = &config.notify else {
            return Notifier::disabled();
        };
        let node = NodeSide {
            host: hostname(),
            id: match &config.fleet.node_id {
                Some(id) => std::sync::OnceLock::from(id.clone()),
                None => std::sync::OnceLock::new(),
            },
            suite: config.repository.suite.clone(),
            events: notify.events.clone(),
            failing_after: notify.failing_after,
        };
        Notifier::start(&notify.webhook, counters, Retry::default(), Some(node))
    }

    /// A publisher command's notifier: `webhook` (`--webhook`), if given.
    pub fn for_publisher(webhook: Option<&str>) -> Notifier {
        match webhook {
            Some(url) => Notifier::start(url, Counters::default(), Retry::default(), None),
            None => Notifier::disabled(),
        }
    }

    fn start(url: &str, counters: Counters, retry: Retry, node: Option<NodeSide>) -> Notifier {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!("webhook notifications are off: no async runtime to deliver them");
            return Notifier::disabled();
        };
        let client = reqwest::Client::builder()
            .timeout(retry.timeout)
            .connect_timeout(retry.timeout)
            // A webhook that redirects is misconfigured; a POST must not
            // turn into a GET somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pulldeploy/", env!("CARGO_PKG_VERSION")))
            .build();
        let client = match client {
            Ok(client) => client,
            Err(e) => {
                warn!(error = %chain(&e.without_url()), "webhook notifications are off: cannot build an HTTP client");
                return Notifier::disabled();
            }
        };
        let (queue, messages) = mpsc::channel(QUEUE_LEN);
        let shared = Arc::new(Shared {
            counters,
            outstanding: watch::Sender::new(0),
        });
        runtime.spawn(deliver(
            client,
            url.to_string(),
            messages,
            shared.clone(),
            retry,
        ));
        Notifier {
            inner: Some(Arc::new(Inner {
                queue,
                shared,
                dropping: AtomicBool::new(false),
                node,
            })),
        }
    }

    /// Names the node by `id` too (the id in `fleet status`), so that a
    /// message can be matched to the fleet's view; the first id given stays.
    pub fn set_node_id(&self, id: &str) {
        if let Some(node) = self.inner.as_ref().and_then(|inner| inner.node.as_ref()) {
            let _ = node.id.set(id.to_string());
        }
    }

    /// A node event, if `[notify] events` lists it: "pulldeploy EVENT on
    /// NODE (suite SUITE): TEXT", NODE being "ID (HOST)", or one of them
    /// when they are the same or no id is known yet. Does nothing on a
    /// publisher's notifier.
    pub fn node_event(&self, event: NodeEvent, text: String) {
        let Some(inner) = &self.inner else { return };
        let Some(node) = &inner.node else {
            debug!(
                event = event.name(),
                "a publisher does not send node events"
            );
            return;
        };
        if !node.events.contains(&event) {
            return;
        }
        inner.enqueue(
            event.name(),
            &format!(
                "pulldeploy {} on {} (suite {}): {text}",
                event.name(),
                node.name(),
                node.suite
            ),
        );
    }

    /// A publisher event: "pulldeploy EVENT by USER@HOST: TEXT" (and the
    /// CI run, when the environment names one).
    pub fn publisher_event(&self, event: PublisherEvent, text: String) {
        let Some(inner) = &self.inner else { return };
        inner.enqueue(
            event.name(),
            &format!("pulldeploy {} by {}: {text}", event.name(), who_and_where()),
        );
    }

    /// `[notify] failing_after`, when node events are sent.
    fn failing_after(&self) -> Option<u32> {
        Some(self.inner.as_ref()?.node.as_ref()?.failing_after)
    }

    /// Waits until every queued message was delivered or given up, at
    /// most `limit`; says so (a warning) and returns `false` if that was
    /// not long enough. The messages left are not cancelled: they go on
    /// while the runtime runs.
    pub async fn flush(&self, limit: Duration) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let mut outstanding = inner.shared.outstanding.subscribe();
        let settled = tokio::time::timeout(limit, outstanding.wait_for(|n| *n == 0))
            .await
            .is_ok();
        if !settled {
            let pending = *inner.shared.outstanding.borrow();
            warn!(waited = ?limit, pending, "webhook message not delivered in time; going on without it");
        }
        settled
    }
}

impl Inner {
    fn enqueue(&self, event: &'static str, text: &str) {
        let body = serde_json::json!({ "text": slack_text(text) }).to_string();
        let message = Message {
            event,
            body: Bytes::from(body),
        };
        // Counted before the task can see it, taken back if it never will.
        self.shared.outstanding.send_modify(|n| *n += 1);
        match self.queue.try_send(message) {
            Ok(()) => self.dropping.store(false, Ordering::Relaxed),
            Err(e) => {
                self.shared
                    .outstanding
                    .send_modify(|n| *n = n.saturating_sub(1));
                self.shared.counters.dropped.inc();
                if !self.dropping.swap(true, Ordering::Relaxed) {
                    let reason = match e {
                        mpsc::error::TrySendError::Full(_) => "queue full",
                        mpsc::error::TrySendError::Closed(_) => "delivery task gone",
                    };
                    warn!(
                        event,
                        reason,
                        "webhook message dropped (and any more until one fits; see pulldeploy_webhook_dropped_total)"
                    );
                }
            }
        }
    }
}

/// The delivery task: posts the queued messages one after another until
/// every notifier sharing the queue is gone.
async fn deliver(
    client: reqwest::Client,
    url: String,
    mut messages: mpsc::Receiver<Message>,
    shared: Arc<Shared>,
    retry: Retry,
) {
    while let Some(message) = messages.recv().await {
        match post(&client, &url, &message.body, &retry).await {
            Ok(tries) => {
                shared.counters.sent.inc();
                debug!(event = message.event, tries, "webhook message delivered");
            }
            Err(Undelivered { tries, reason }) => {
                shared.counters.failed.inc();
                warn!(
                    event = message.event,
                    tries,
                    error = %reason,
                    "webhook message not delivered"
                );
            }
        }
        shared.outstanding.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Why a message was given up, after how many tries.
#[derive(Debug)]
struct Undelivered {
    tries: usize,
    reason: String,
}

/// What one try says about the next.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Delivered,
    TryAgain(String),
    GiveUp(String),
}

/// The verdict on a webhook's answer (see [`Retry`]).
fn verdict(status: reqwest::StatusCode) -> Verdict {
    let answered = format!("answered {status}");
    match status.as_u16() {
        200..=299 => Verdict::Delivered,
        408 | 429 | 500..=599 => Verdict::TryAgain(answered),
        _ => Verdict::GiveUp(answered),
    }
}

/// Posts `body`, tried again on the schedule of `retry`; the number of
/// tries it took.
async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &Bytes,
    retry: &Retry,
) -> Result<usize, Undelivered> {
    let mut tries = 0;
    loop {
        tries += 1;
        let sent = client
            .post(url)
            .timeout(retry.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let verdict = match sent {
            Ok(response) => verdict(response.status()),
            // A URL reqwest cannot use: no try will do better.
            Err(e) if e.is_builder() => Verdict::GiveUp(chain(&e.without_url())),
            Err(e) if e.is_timeout() => {
                Verdict::TryAgain(format!("no answer within {:?}", retry.timeout))
            }
            Err(e) => Verdict::TryAgain(chain(&e.without_url())),
        };
        let reason = match verdict {
            Verdict::Delivered => return Ok(tries),
            Verdict::GiveUp(reason) => return Err(Undelivered { tries, reason }),
            Verdict::TryAgain(reason) => reason,
        };
        let Some(pause) = retry.backoff.get(tries - 1) else {
            return Err(Undelivered { tries, reason });
        };
        debug!(tries, error = %reason, ?pause, "webhook try failed; trying again");
        tokio::time::sleep(*pause).await;
    }
}

/// An error and its sources, "a: b: c" (reqwest's own Display says only
/// the outermost, e.g. "error sending request").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// `text` as Slack wants it: `&`, `<` and `>` escaped (they start links
/// and mentions in its markup), and cut at [`MAX_TEXT_CHARS`].
fn slack_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_TEXT_CHARS + 16));
    for (i, c) in text.chars().enumerate() {
        if i == MAX_TEXT_CHARS {
            out.push_str(" [cut]");
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

// ---- what the messages say -------------------------------------------------

/// The text of a `rollback` event: "myapp 1.0 to 1.1 failed: ERROR", where
/// ERROR (the install error) says whether the old version is back.
pub fn rollback_text(pending: &Pending, error: &impl Display) -> String {
    let changes: Vec<String> = pending
        .packages
        .iter()
        .map(|p| match &p.from {
            Some(from) => format!("{} {} to {}", p.name, from.version, p.to.version),
            None => format!("{} {} (first install)", p.name, p.to.version),
        })
        .collect();
    format!("{} failed: {error}", changes.join(", "))
}

/// The text of a publish or promote: the suite, the repository, and the
/// command's report (what was added, promoted or dropped, and the new
/// InRelease).
pub fn suite_change_text(repository: &impl Display, suite: &str, report: &[String]) -> String {
    format!("suite {suite} of {repository}\n{}", report.join("\n"))
}

/// Sends one publisher event to `webhook` (if given) and waits for it at
/// most [`CLI_DEADLINE`]: for a command, after it succeeded. Never fails;
/// a webhook that is down costs a warning.
pub async fn announce(webhook: Option<&str>, event: PublisherEvent, text: String) {
    let notifier = Notifier::for_publisher(webhook);
    notifier.publisher_event(event, text);
    notifier.flush(CLI_DEADLINE).await;
}

/// `--webhook`: an http:// or https:// URL with a host.
pub fn parse_url(text: &str) -> Result<String, String> {
    // Not echoed back: the URL is a credential.
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err("must be an http:// or https:// URL with a host".into());
    }
    Ok(text.to_string())
}

// ---- the failing streak ----------------------------------------------------

/// Consecutive failed cycles, for the `failing` event: sent when the
/// streak reaches `[notify] failing_after`, once per streak; a successful
/// cycle ends the streak. A deferred cycle (another package manager or
/// another pulldeploy held a lock) neither counts nor ends it. Kept by the
/// daemon's loop, so it lasts across config reloads.
#[derive(Debug, Default)]
pub struct FailingStreak {
    failed: u32,
}

impl FailingStreak {
    /// Counts a finished cycle (its result) and tells `notifier` when the
    /// streak reaches its `failing_after`. `installed`: the committed
    /// versions, for the message.
    pub fn record<T>(
        &mut self,
        result: &Result<T, Error>,
        installed: &BTreeMap<String, String>,
        notifier: &Notifier,
    ) {
        let failed = match result {
            Ok(_) => Some(false),
            Err(Error::Deferred { .. } | Error::Busy { .. }) => None,
            Err(_) => Some(true),
        };
        let Some(after) = notifier.failing_after() else {
            self.count(failed, u32::MAX);
            return;
        };
        if self.count(failed, after)
            && let Err(e) = result
        {
            let running: Vec<String> = installed
                .iter()
                .map(|(package, version)| format!("{package} {version}"))
                .collect();
            let running = match running.is_empty() {
                true => "no version committed".to_string(),
                false => format!("running {}", running.join(", ")),
            };
            notifier.node_event(
                NodeEvent::Failing,
                format!(
                    "{} cycles in a row failed ({running}); last error: {e}",
                    self.failed
                ),
            );
        }
    }

    /// `failed`: whether the cycle failed (`None`: deferred). True when
    /// this cycle makes the streak `after` long.
    fn count(&mut self, failed: Option<bool>, after: u32) -> bool {
        match failed {
            Some(false) => self.failed = 0,
            Some(true) => self.failed = self.failed.saturating_add(1),
            None => return false,
        }
        failed == Some(true) && self.failed == after
    }
}

// ---- who and where ---------------------------------------------------------

/// This machine's name (`/proc/sys/kernel/hostname`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// "USER@HOST", and the CI run when the environment names one (GitHub
/// Actions, GitLab CI, Jenkins): who ran a publisher command, and where.
fn who_and_where() -> String {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let user = env("USER")
        .or_else(|| env("LOGNAME"))
        .unwrap_or_else(user_of_process);
    let mut who = format!("{user}@{}", hostname());
    let github = match (
        env("GITHUB_SERVER_URL"),
        env("GITHUB_REPOSITORY"),
        env("GITHUB_RUN_ID"),
    ) {
        (Some(server), Some(repository), Some(run)) => {
            Some(format!("{server}/{repository}/actions/runs/{run}"))
        }
        _ => None,
    };
    if let Some(run) = github
        .or_else(|| env("CI_JOB_URL"))
        .or_else(|| env("BUILD_URL"))
    {
        who.push_str(&format!(" ({run})"));
    }
    who
}

/// The name of the process's user from /etc/passwd, else "uid N".
fn user_of_process() -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown-user".into();
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id = fields.nth(1)?;
            (id.parse() == Ok(uid)).then(|| name.to_string())
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// How the test receiver answers the n-th request.
    #[derive(Clone, Copy)]
    enum Answer {
        Status(u16),
        /// Reads the request and never answers.
        Hang,
    }

    /// A webhook receiver on 127.0.0.1: answers by `script` (the last
    /// entry for every request after), records the bodies.
    struct Receiver {
        url: String,
        bodies: Arc<Mutex<Vec<String>>>,
    }

    impl Receiver {
        async fn start(script: Vec<Answer>) -> Receiver {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/hook/T0/SECRET", listener.local_addr().unwrap());
            let bodies = Arc::new(Mutex::new(Vec::new()));
            let recorded = bodies.clone();
            tokio::spawn(async move {
                let mut held = Vec::new();
                for n in 0.. {
                    let Ok((mut stream, _)) = listener.accept().await else {
                        return;
                    };
                    let body = read_request(&mut stream).await;
                    recorded.lock().unwrap().push(body);
                    match script[n.min(script.len() - 1)] {
                        Answer::Status(status) => {
                            let head = format!(
                                "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            );
                            let _ = stream.write_all(head.as_bytes()).await;
                        }
                        Answer::Hang => held.push(stream),
                    }
                }
            });
            Receiver { url, bodies }
        }

        fn bodies(&self) -> Vec<String> {
            self.bodies.lock().unwrap().clone()
        }
    }

    async fn read_request(stream: &mut tokio::net::TcpStream) -> String {
        let mut bytes = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if bytes.len() >= end + 4 + length {
                    return String::from_utf8_lossy(&bytes[end + 4..end + 4 + length]).into_owned();
                }
            }
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&bytes).into_owned(),
                Ok(n) => bytes.extend_from_slice(&buffer[..n]),
            }
        }
    }

    fn quick() -> Retry {
        Retry {
            timeout: Duration::from_millis(300),
            backoff: vec![Duration::from_millis(10), Duration::from_millis(20)],
        }
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder().build().unwrap()
    }

    async fn post_to(receiver: &Receiver) -> Result<usize, Undelivered> {
        post(
            &client(),
            &receiver.url,
            &Bytes::from_static(b"{}"),
            &quick(),
        )
        .await
    }

    #[test]
    fn only_later_statuses_are_tried_again() {
        for ok in [200, 201, 204] {
            assert_eq!(
                verdict(reqwest::StatusCode::from_u16(ok).unwrap()),
                Verdict::Delivered
            );
        }
        for later in [408, 429, 500, 502, 503, 504] {
            let v = verdict(reqwest::StatusCode::from_u16(later).unwrap());
            assert!(matches!(v, Verdict::TryAgain(_)), "{later}: {v:?}");
        }
        for never in [301, 400, 403, 404, 410] {
            let v = verdict(reqwest::StatusCode::from_u16(never).unwrap());
            assert!(matches!(v, Verdict::GiveUp(_)), "{never}: {v:?}");
        }
    }

    #[tokio::test]
    async fn server_errors_are_tried_again_until_one_succeeds() {
        let receiver = Receiver::start(vec![
            Answer::Status(500),
            Answer::Status(503),
            Answer::Status(200),
        ])
        .await;
        assert_eq!(post_to(&receiver).await.map_err(|e| e.reason), Ok(3));
        assert_eq!(receiver.bodies().len(), 3);
    }

    #[tokio::test]
    async fn three_tries_at_most() {
        let receiver = Receiver::start(vec![Answer::Status(500)]).await;
        let failed = post_to(&receiver).await.unwrap_err();
        assert_eq!(failed.tries, 3);
        assert!(failed.reason.contains("500"), "{}", failed.reason);
        assert_eq!(receiver.bodies().len(), 3);
    }

    #[tokio::test]
    async fn a_client_error_is_not_tried_again() {
        let receiver = Receiver::start(vec![Answer::Status(404), Answer::Status(200)]).await;
        let failed = post_to(&receiver).await.unwrap_err();
        assert_eq!(failed.tries, 1);
        assert!(failed.reason.contains("404"), "{}", failed.reason);
        assert_eq!(receiver.bodies().len(), 1);
    }

    #[tokio::test]
    async fn a_hanging_webhook_is_given_up_within_the_tries_timeouts() {
        let receiver = Receiver::start(vec![Answer::Hang]).await;
        let started = Instant::now();
        let failed = post_to(&receiver).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(failed.tries, 3);
        assert!(
            failed.reason.contains("no answer within"),
            "{}",
            failed.reason
        );
        // 3 x 300 ms + 30 ms of pauses, with room for a loaded machine.
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }

    #[tokio::test]
    async fn connection_refused_is_tried_again_and_the_url_is_not_in_the_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook/SECRET", listener.local_addr().unwrap());
        drop(listener);
        let body = Bytes::from_static(b"{}");
        let failed = post(&client(), &url, &body, &quick()).await.unwrap_err();
        assert_eq!(failed.tries, 3);
        assert!(!failed.reason.contains("SECRET"), "{}", failed.reason);
    }

    fn node_notifier(url: &str, events: Vec<NodeEvent>, counters: Counters) -> Notifier {
        let node = NodeSide {
            host: "web-1".into(),
            id: std::sync::OnceLock::new(),
            suite: "production".into(),
            events,
            failing_after: 3,
        };
        Notifier::start(url, counters, quick(), Some(node))
    }

    #[tokio::test]
    async fn the_queue_holds_64_and_counts_what_it_drops() {
        let receiver = Receiver::start(vec![Answer::Hang]).await;
        let counters = Counters::default();
        let notifier = node_notifier(&receiver.url, NodeEvent::ALL.to_vec(), counters.clone());
        // The delivery task does not run before this test yields (one
        // thread): exactly QUEUE_LEN fit.
        let started = Instant::now();
        for n in 0..QUEUE_LEN + 10 {
            notifier.node_event(NodeEvent::Rollback, format!("message {n}"));
        }
        assert!(started.elapsed() < Duration::from_secs(1), "sending waited");
        assert_eq!(counters.dropped.get(), 10);
        assert!(!notifier.flush(Duration::from_millis(50)).await);
        assert_eq!(counters.sent.get(), 0);
    }

    #[tokio::test]
    async fn flush_waits_for_delivery_and_only_listed_events_are_sent() {
        let receiver = Receiver::start(vec![Answer::Status(200)]).await;
        let counters = Counters::default();
        let notifier = node_notifier(&receiver.url, vec![NodeEvent::Rollback], counters.clone());
        notifier.node_event(NodeEvent::Failing, "not listed".into());
        notifier.node_event(
            NodeEvent::Rollback,
            "myapp 1.0 to 1.1 failed: <bad> & worse".into(),
        );
        // Once the fleet id is known, it names the node, the host in brackets.
        notifier.set_node_id("i-0abc");
        notifier.set_node_id("i-other");
        notifier.node_event(NodeEvent::Rollback, "again".into());
        assert!(notifier.flush(Duration::from_secs(20)).await);
        assert_eq!(counters.sent.get(), 2);
        let bodies = receiver.bodies();
        assert_eq!(bodies.len(), 2, "{bodies:?}");
        let json: Vec<serde_json::Value> = bodies
            .iter()
            .map(|b| serde_json::from_str(b).unwrap())
            .collect();
        assert_eq!(
            json,
            [
                serde_json::json!({
                    "text": "pulldeploy rollback on web-1 (suite production): myapp 1.0 to 1.1 failed: &lt;bad&gt; &amp; worse"
                }),
                serde_json::json!({
                    "text": "pulldeploy rollback on i-0abc (web-1) (suite production): again"
                }),
            ]
        );
    }

    #[tokio::test]
    async fn failures_are_counted() {
        let receiver = Receiver::start(vec![Answer::Status(500)]).await;
        let counters = Counters::default();
        let notifier = node_notifier(&receiver.url, NodeEvent::ALL.to_vec(), counters.clone());
        notifier.node_event(NodeEvent::Halt, "halted".into());
        assert!(notifier.flush(Duration::from_secs(20)).await);
        assert_eq!((counters.sent.get(), counters.failed.get()), (0, 1));
    }

    #[tokio::test]
    async fn a_publisher_sends_who_ran_it_and_no_node_events() {
        let receiver = Receiver::start(vec![Answer::Status(200)]).await;
        let notifier = Notifier::for_publisher(Some(&receiver.url));
        notifier.node_event(NodeEvent::Rollback, "not for a publisher".into());
        let report = [
            "added myapp 1.1 (amd64) to staging: pool/main/m/myapp/myapp_1.1_amd64.deb".to_string(),
        ];
        notifier.publisher_event(
            PublisherEvent::Published,
            suite_change_text(&"file:///srv/apt", "staging", &report),
        );
        assert!(notifier.flush(Duration::from_secs(20)).await);
        let bodies = receiver.bodies();
        assert_eq!(bodies.len(), 1, "{bodies:?}");
        let json: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
        let text = json["text"].as_str().unwrap();
        assert!(text.starts_with("pulldeploy published by "), "{text}");
        assert!(text.contains(&format!("@{}", hostname())), "{text}");
        assert!(
            text.contains(": suite staging of file:///srv/apt\nadded myapp 1.1 (amd64)"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_https_webhook_gets_a_client() {
        // TLS is compiled in and a client builds (reqwest panics on a
        // missing crypto provider).
        let notifier = Notifier::for_publisher(Some("https://hooks.example.invalid/T0/B0/X"));
        assert!(notifier.inner.is_some());
    }

    #[test]
    fn outside_a_runtime_nothing_is_sent_and_nothing_panics() {
        let notifier = Notifier::for_publisher(Some("http://127.0.0.1:9/hook"));
        assert!(notifier.inner.is_none());
        notifier.publisher_event(PublisherEvent::Promoted, "x".into());
        Notifier::disabled().node_event(NodeEvent::Rollback, "x".into());
    }

    #[test]
    fn failing_is_told_once_per_streak() {
        let mut streak = FailingStreak::default();
        let told: Vec<bool> = [
            Some(true),
            Some(true),
            None,
            Some(true), // third failure: told
            Some(true),
            Some(true),
            Some(false), // the streak ends
            Some(true),
            Some(true),
            Some(true), // a new streak: told again
        ]
        .into_iter()
        .map(|failed| streak.count(failed, 3))
        .collect();
        assert_eq!(
            told,
            [
                false, false, false, true, false, false, false, false, false, true
            ]
        );
        let mut once = FailingStreak::default();
        assert!(once.count(Some(true), 1));
        assert!(!once.count(Some(true), 1));
    }

    #[test]
    fn slack_text_is_escaped_and_cut() {
        assert_eq!(slack_text("a <b> & c"), "a &lt;b&gt; &amp; c");
        let long = "é".repeat(MAX_TEXT_CHARS + 5);
        let cut = slack_text(&long);
        assert!(cut.ends_with(" [cut]"));
        assert_eq!(cut.chars().count(), MAX_TEXT_CHARS + " [cut]".len());
    }

    #[test]
    fn webhook_urls_are_http_with_a_host() {
        assert!(parse_url("https://hooks.slack.com/services/T0/B0/X").is_ok());
        assert!(parse_url("http://127.0.0.1:8080/hook").is_ok());
        for bad in [
            "hooks.slack.com/x",
            "ftp://host/x",
            "https://",
            "file:///tmp/x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_counters_are_in_metrics() {
        let counters = Counters::default();
        let mut registry = Registry::with_prefix("pulldeploy");
        counters.register(&mut registry);
        counters.dropped.inc();
        counters.failed.inc();
        counters.failed.inc();
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        for line in [
            "pulldeploy_webhook_sent_total 0\n",
            "pulldeploy_webhook_failed_total 2\n",
            "pulldeploy_webhook_dropped_total 1\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }
}
