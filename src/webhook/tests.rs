//! Tests of the notifier, its delivery and its texts, against a webhook
//! receiver on 127.0.0.1.

use std::sync::Mutex;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::deliver::{Undelivered, Verdict, post, verdict};
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
    let report =
        ["added myapp 1.1 (amd64) to staging: pool/main/m/myapp/myapp_1.1_amd64.deb".to_string()];
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

/// A refused URL is a credential all the same: the problem is named, no
/// part of the value is (nor by the `Debug` of an accepted one).
#[test]
fn a_refused_webhook_url_is_not_echoed() {
    for bad in [
        "htps://u:zzsecret@hooks.example.com/T0/zzsecret?t=zzsecret",
        "https://u:zzsecret@hooks.example.com:99999/zzsecret?t=zzsecret",
        "https://u:zzsecret@hooks.exa mple.com/zzsecret?t=zzsecret",
        "hooks.example.com/zzsecret?t=zzsecret",
    ] {
        let error = parse_url(bad).expect_err(bad);
        assert!(error.contains("value hidden"), "{error}");
        assert!(!error.contains("zzsecret"), "{error}");
    }
    let url = WebhookUrl::parse("https://u:zzsecret@hooks.example.com/zzsecret?t=zzsecret")
        .expect("valid");
    assert!(!format!("{url:?}").contains("zzsecret"), "{url:?}");
    assert!(url.expose().contains("zzsecret"));
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
