//! A chat webhook on 127.0.0.1 (the receiving end of `[notify] webhook`
//! and `--webhook`): records every request's body and answers as the test
//! says: 200, 500 a number of times first, or never (it reads the request
//! and holds the connection).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How the receiver answers.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// 200 to every request.
    Ok,
    /// 500 to the first N requests, then 200.
    FailFirst(usize),
    /// Reads each request and never answers (the connection stays open
    /// until the receiver is dropped).
    Hang,
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub head: String,
    pub body: String,
}

impl Received {
    /// The `text` of the JSON body (Slack's incoming-webhook format).
    pub fn text(&self) -> String {
        let json: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("webhook body is not JSON ({e}): {:?}", self.body));
        json["text"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"text\" string in {json}"))
            .to_string()
    }
}

pub struct Webhook {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
}

impl Webhook {
    pub fn start(answer: Answer) -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind webhook receiver");
        let addr = listener.local_addr().expect("webhook receiver addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let received = received.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let received = received.clone();
                    let stop = stop.clone();
                    thread::spawn(move || serve(stream, answer, &received, &stop));
                }
            });
        }
        Webhook {
            addr,
            received,
            stop,
        }
    }

    /// The webhook's URL, with a path like Slack's (a secret in real life).
    pub fn url(&self) -> String {
        format!("http://{}/services/T000/B000/s3cr3t", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("webhook records").clone()
    }

    /// The texts of the messages received so far.
    pub fn texts(&self) -> Vec<String> {
        self.received().iter().map(Received::text).collect()
    }

    /// Waits (at most `limit`) until at least `count` requests came in.
    #[track_caller]
    pub fn wait_for_requests(&self, count: usize, limit: Duration) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "the webhook got {} requests, not {count}, within {limit:?}: {received:?}",
                received.len()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads requests on one connection (keep-alive) and answers each.
fn serve(
    mut stream: TcpStream,
    answer: Answer,
    received: &Mutex<Vec<Received>>,
    stop: &AtomicBool,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buffer = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let Some((head, body)) = read_request(&mut stream, &mut buffer, stop) else {
            return;
        };
        let nth = {
            let mut received = received.lock().expect("webhook records");
            received.push(Received {
                at: Instant::now(),
                head,
                body,
            });
            received.len()
        };
        let status = match answer {
            Answer::Ok => 200,
            Answer::FailFirst(n) if nth <= n => 500,
            Answer::FailFirst(_) => 200,
            Answer::Hang => {
                while !stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(50));
                }
                return;
            }
        };
        let body = if status == 200 { "ok" } else { "server_error" };
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// One request (head and Content-Length body) from `stream`; `None` when
/// the peer closed the connection or the receiver stops.
fn read_request(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    stop: &AtomicBool,
) -> Option<(String, String)> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&buffer[end + 4..end + 4 + length]).into_owned();
                buffer.drain(..end + 4 + length);
                return Some((head, body));
            }
        }
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
}
