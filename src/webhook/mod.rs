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

mod deliver;
mod text;

pub use text::{hostname, rollback_text, suite_change_text};

use deliver::{chain, deliver};
use text::{slack_text, who_and_where};

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
        Notifier::start(
            notify.webhook.expose(),
            counters,
            Retry::default(),
            Some(node),
        )
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

/// Sends one publisher event to `webhook` (if given) and waits for it at
/// most [`CLI_DEADLINE`]: for a command, after it succeeded. Never fails;
/// a webhook that is down costs a warning.
pub async fn announce(webhook: Option<&str>, event: PublisherEvent, text: String) {
    let notifier = Notifier::for_publisher(webhook);
    notifier.publisher_event(event, text);
    notifier.flush(CLI_DEADLINE).await;
}

// The URL's type is configuration's (a validated value, like the other
// keys); the notifier and the command line take it from there.
pub use crate::config::{WebhookUrl, parse_webhook_url as parse_url};

/// clap's parser for `--webhook` and `PULLDEPLOY_WEBHOOK`. clap's own
/// "invalid value" error quotes the value; this one names the option and
/// the problem only.
#[derive(Clone, Copy, Debug, Default)]
pub struct WebhookArg;

impl clap::builder::TypedValueParser for WebhookArg {
    type Value = WebhookUrl;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<WebhookUrl, clap::Error> {
        let name = arg.map_or_else(|| "--webhook".to_string(), |a| a.to_string());
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                clap::error::ErrorKind::InvalidUtf8,
                format!("invalid value for '{name}': not UTF-8 (value hidden)\n"),
            )
            .with_cmd(cmd)
        })?;
        WebhookUrl::parse(text).map_err(|problem| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{name}': {problem}\n"),
            )
            .with_cmd(cmd)
        })
    }
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

#[cfg(test)]
mod tests;
