//! A fault-injecting HTTP proxy in front of an S3 server (moto) for tests.
//!
//! The agent is pointed at the proxy (`repository.endpoint`); the proxy
//! forwards each request to the upstream server on a fresh connection and
//! relays the answer, unless a [`Fault`] rule matches the request's path:
//! then it answers an S3 error itself (503 SlowDown, 403 AccessDenied),
//! resets the connection after some body bytes, or trickles the body. It
//! logs every request with what it did (status, body bytes sent, the SigV4
//! access key the request was signed with, conditional and range headers),
//! so a test can assert exactly what the agent asked for.
//!
//! HTTP/1.1 with keep-alive towards the client (as the SDK pools
//! connections); only what the agent sends is supported (bodies by
//! Content-Length, no request trailers).

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::http::{HttpResponse, ServerRequest, parse_http_response, read_request};
use super::imds::reset;

/// A trickled answer gives up after this long (or when the proxy
/// is dropped), so no thread outlives a test by much.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// What to do instead of (or to) the upstream's answer.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer `status` with an S3 XML error body `<Code>code</Code>`,
    /// without asking upstream.
    Error {
        status: u16,
        code: &'static str,
        message: &'static str,
    },
    /// Relay the status line, headers (with the full Content-Length) and
    /// the first `bytes` body bytes, then reset the connection (RST).
    ResetAfter { bytes: usize },
    /// Relay the answer, one body byte every `every`.
    Trickle { every: Duration },
    /// Relay, except that a 404 becomes 403 AccessDenied: how S3 answers
    /// for a missing key when the caller may not list the bucket.
    DenyMissing,
}

impl Fault {
    /// S3's throttling answer: 503 SlowDown.
    pub fn slow_down() -> Fault {
        Fault::Error {
            status: 503,
            code: "SlowDown",
            message: "Please reduce your request rate.",
        }
    }
}

/// S3's 403 for a key the caller may not read (or that is missing).
const ACCESS_DENIED: (u16, &str, &str) = (403, "AccessDenied", "Access Denied");

struct Rule {
    path_contains: String,
    fault: Fault,
    /// How many more requests it applies to; `None` = until cleared.
    remaining: Option<u32>,
}

/// One request as the proxy handled it.
#[derive(Clone, Debug)]
pub struct Proxied {
    #[allow(dead_code, reason = "read through Debug, in failure messages")]
    pub method: String,
    /// Path and query, as sent (`/bucket/key?x-id=GetObject`).
    pub path: String,
    /// The status sent to the client; `None` when nothing was.
    pub status: Option<u16>,
    /// Body bytes sent to the client (for a reset: before the reset).
    pub body_bytes: usize,
    /// The full body length announced in Content-Length.
    pub declared_bytes: Option<usize>,
    /// For a relayed answer: the body bytes the client's connection took
    /// before the proxy stopped sending, because the body was all sent or
    /// because the client closed the connection. `None` while still
    /// sending, and for answers the proxy made up or faulted. The kernel
    /// buffers some bytes the client never reads, so a client that stops
    /// early shows a count a little above what it read, far below the body.
    pub written: Option<usize>,
    /// The access key id in the SigV4 `Authorization` header.
    pub access_key: Option<String>,
    pub if_none_match: Option<String>,
    pub range: Option<String>,
    /// The fault applied, if any (its Debug form).
    #[allow(dead_code, reason = "read through Debug, in failure messages")]
    pub fault: Option<String>,
    /// When the request was read.
    pub at: Instant,
}

impl Proxied {
    /// The object key part of a path-style path, without the query.
    pub fn key_path(&self) -> &str {
        self.path.split('?').next().unwrap_or(&self.path)
    }
}

#[derive(Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<Proxied>>,
    stop: AtomicBool,
}

/// The proxy, listening on 127.0.0.1; stops on Drop.
pub struct FaultyProxy {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub port: u16,
    shared: Arc<Shared>,
    accept_loop: Option<thread::JoinHandle<()>>,
}

impl FaultyProxy {
    /// A proxy on a free port forwarding to 127.0.0.1:`upstream_port`.
    pub fn start(upstream_port: u16) -> FaultyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the faulty proxy");
        let port = listener.local_addr().expect("proxy local addr").port();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let accept_loop = thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let s = s.clone();
                thread::spawn(move || serve(stream, upstream_port, &s));
            }
        });
        FaultyProxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            shared,
            accept_loop: Some(accept_loop),
        }
    }

    /// Applies `fault` to the next `times` requests whose path contains
    /// `path_contains` (`None`: to all of them, until [`Self::clear`]).
    /// Rules are tried in the order they were added.
    pub fn inject(&self, path_contains: &str, fault: Fault, times: Option<u32>) {
        self.shared.rules.lock().expect("proxy rules").push(Rule {
            path_contains: path_contains.to_string(),
            fault,
            remaining: times,
        });
    }

    /// Removes every rule: from now on everything is relayed as is.
    pub fn clear(&self) {
        self.shared.rules.lock().expect("proxy rules").clear();
    }

    /// Removes the rules injected for `path_contains`; the others stay.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn clear_path(&self, path_contains: &str) {
        self.shared
            .rules
            .lock()
            .expect("proxy rules")
            .retain(|rule| rule.path_contains != path_contains);
    }

    /// Every request so far, in the order they were read.
    pub fn log(&self) -> Vec<Proxied> {
        self.shared.log.lock().expect("proxy log").clone()
    }

    /// A mark for [`Self::since`].
    pub fn mark(&self) -> usize {
        self.shared.log.lock().expect("proxy log").len()
    }

    /// The requests after `mark`.
    pub fn since(&self, mark: usize) -> Vec<Proxied> {
        self.log().into_iter().skip(mark).collect()
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(handle) = self.accept_loop.take() {
            let _ = handle.join();
        }
    }
}

/// `Credential=AKID/date/region/service/aws4_request` in a SigV4 header.
fn access_key(authorization: &str) -> Option<String> {
    let at = authorization.find("Credential=")? + "Credential=".len();
    let rest = &authorization[at..];
    Some(rest.split('/').next()?.to_string())
}

fn serve(client: TcpStream, upstream_port: u16, shared: &Shared) {
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut client = client;
    while let Some(request) = read_request(&mut reader) {
        let fault = take_fault(shared, &request.path);
        let mut record = Proxied {
            method: request.method.clone(),
            path: request.path.clone(),
            status: None,
            body_bytes: 0,
            declared_bytes: None,
            written: None,
            access_key: request.header("authorization").and_then(access_key),
            if_none_match: request.header("if-none-match").map(str::to_string),
            range: request.header("range").map(str::to_string),
            fault: fault.as_ref().map(|f| format!("{f:?}")),
            at: Instant::now(),
        };
        let keep_open = match fault {
            Some(Fault::Error {
                status,
                code,
                message,
            }) => send_error(&mut client, shared, record, status, code, message),
            relay => {
                let Some(HttpResponse {
                    status,
                    headers,
                    body,
                }) = forward(&request, upstream_port)
                else {
                    // Upstream unreachable: a 502, as a load balancer would.
                    record.status = Some(502);
                    push(shared, record);
                    let _ = client.write_all(
                        b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    return;
                };
                if status == 404 && matches!(relay, Some(Fault::DenyMissing)) {
                    let (status, code, message) = ACCESS_DENIED;
                    if !send_error(&mut client, shared, record, status, code, message) {
                        return;
                    }
                    continue;
                }
                let no_body = status == 304 || status == 204 || request.method == "HEAD";
                let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
                for (name, value) in &headers {
                    let hop = [
                        "connection",
                        "keep-alive",
                        "transfer-encoding",
                        "content-length",
                    ];
                    if !hop.iter().any(|h| name.eq_ignore_ascii_case(h)) {
                        head.push_str(&format!("{name}: {value}\r\n"));
                    }
                }
                if !no_body {
                    head.push_str(&format!("content-length: {}\r\n", body.len()));
                    record.declared_bytes = Some(body.len());
                }
                head.push_str("\r\n");
                record.status = Some(status);
                let body: &[u8] = if no_body { &[] } else { &body };
                match relay {
                    Some(Fault::ResetAfter { bytes }) => {
                        let sent = bytes.min(body.len());
                        record.body_bytes = sent;
                        push(shared, record);
                        let _ = client
                            .write_all(head.as_bytes())
                            .and_then(|()| client.write_all(&body[..sent]))
                            .and_then(|()| client.flush());
                        // Let the bytes leave before the RST discards them.
                        thread::sleep(Duration::from_millis(50));
                        reset(client);
                        return;
                    }
                    Some(Fault::Trickle { every }) => {
                        record.body_bytes = body.len();
                        push(shared, record);
                        if client.write_all(head.as_bytes()).is_err() {
                            return;
                        }
                        let started = Instant::now();
                        for byte in body {
                            if shared.stop.load(Ordering::SeqCst)
                                || started.elapsed() > STALL_LIMIT
                                || client.write_all(&[*byte]).is_err()
                            {
                                return;
                            }
                            thread::sleep(every);
                        }
                        true
                    }
                    _ => {
                        record.body_bytes = body.len();
                        let entry = push(shared, record);
                        let (written, whole) = if client.write_all(head.as_bytes()).is_ok() {
                            write_counted(&mut client, body)
                        } else {
                            (0, false)
                        };
                        shared.log.lock().expect("proxy log")[entry].written = Some(written);
                        whole
                    }
                }
            }
        };
        if !keep_open || request.version == "HTTP/1.0" {
            return;
        }
    }
}

/// Answers an S3 XML error; false when the client is gone.
fn send_error(
    client: &mut TcpStream,
    shared: &Shared,
    mut record: Proxied,
    status: u16,
    code: &str,
    message: &str,
) -> bool {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><Resource>{}</Resource><RequestId>faulty-proxy</RequestId></Error>",
        record.key_path()
    );
    record.status = Some(status);
    record.body_bytes = body.len();
    record.declared_bytes = Some(body.len());
    push(shared, record);
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nx-amz-request-id: faulty-proxy\r\n\r\n",
        reason(status),
        body.len()
    );
    client.write_all(head.as_bytes()).is_ok() && client.write_all(body.as_bytes()).is_ok()
}

/// Logs `record`; returns its index in the log.
fn push(shared: &Shared, record: Proxied) -> usize {
    let mut log = shared.log.lock().expect("proxy log");
    log.push(record);
    log.len() - 1
}

/// Writes `body`, counting the bytes the connection took; returns that
/// count and whether all of it was taken.
fn write_counted(client: &mut TcpStream, body: &[u8]) -> (usize, bool) {
    let mut written = 0;
    while written < body.len() {
        let end = body.len().min(written + 64 * 1024);
        match client.write(&body[written..end]) {
            Ok(0) => return (written, false),
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (written, false),
        }
    }
    (written, true)
}

fn take_fault(shared: &Shared, path: &str) -> Option<Fault> {
    let mut rules = shared.rules.lock().expect("proxy rules");
    let rule = rules
        .iter_mut()
        .find(|r| path.contains(&r.path_contains) && r.remaining != Some(0))?;
    if let Some(n) = &mut rule.remaining {
        *n -= 1;
    }
    Some(rule.fault.clone())
}

/// Sends `request` upstream on a new connection (`Connection: close`) and
/// reads the whole answer.
fn forward(request: &ServerRequest, port: u16) -> Option<HttpResponse> {
    let mut upstream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    upstream.set_read_timeout(Some(STALL_LIMIT)).ok()?;
    let mut head = format!("{} {} HTTP/1.1\r\n", request.method, request.path);
    for (name, value) in &request.headers {
        if !["connection", "keep-alive"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
        {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str("connection: close\r\n\r\n");
    upstream.write_all(head.as_bytes()).ok()?;
    upstream.write_all(&request.body).ok()?;
    let mut raw = Vec::new();
    upstream.read_to_end(&mut raw).ok()?;
    parse_http_response(&raw).ok()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        412 => "Precondition Failed",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}
