//! The delivery task: posts the queued messages to the webhook over HTTP,
//! each tried again on the schedule of `Retry`.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Message, Retry, Shared};

/// The delivery task: posts the queued messages one after another until
/// every notifier sharing the queue is gone.
pub(super) async fn deliver(
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
pub(super) struct Undelivered {
    pub(super) tries: usize,
    pub(super) reason: String,
}

/// What one try says about the next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Delivered,
    TryAgain(String),
    GiveUp(String),
}

/// The verdict on a webhook's answer (see [`Retry`]).
pub(super) fn verdict(status: reqwest::StatusCode) -> Verdict {
    let answered = format!("answered {status}");
    match status.as_u16() {
        200..=299 => Verdict::Delivered,
        408 | 429 | 500..=599 => Verdict::TryAgain(answered),
        _ => Verdict::GiveUp(answered),
    }
}

/// Posts `body`, tried again on the schedule of `retry`; the number of
/// tries it took.
pub(super) async fn post(
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
pub(super) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
