//! An EC2 Auto Scaling endpoint for tests: the two lifecycle-hook actions
//! of the Query protocol (`POST /`, a form body `Action=...&Version=2011-01-01&...`),
//! which moto's server lacks.
//!
//! It checks what AWS would: a SigV4 `Authorization` header whose
//! credential scope names the `autoscaling` service and whose signature
//! verifies with the expected secret key (the IMDS emulator's role), the
//! action, the version and the parameters. Like AWS it answers
//! `ValidationError` ("No active Lifecycle Action found") for a hook that
//! has no active lifecycle action for the instance: a test activates one
//! (as the group does when the instance enters `Pending:Wait` or
//! `Terminating:Wait`), and completing it deactivates it.
//!
//! Every call is recorded with what the test's observer saw when it
//! arrived (for example /healthz at that moment: the agent waits for the
//! answer, so the observation is taken while the call is in flight). It can
//! be told to fail: answer a status (500) or hang without answering.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::http::{ServerRequest, read_request};

/// A hung request is held at most this long, or until the client gives
/// up or the emulator is dropped.
const HANG_LIMIT: Duration = Duration::from_secs(60);

/// How the emulator answers the next calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// As AWS: 200, or 400 ValidationError without an active action.
    Normal,
    /// This HTTP status with an `InternalFailure` error body.
    Status(u16),
    /// Read the request and never answer.
    Hang,
}

/// One request as the emulator saw it.
#[derive(Clone, Debug)]
pub struct Call {
    /// `Action` of the form body.
    pub action: String,
    pub params: BTreeMap<String, String>,
    /// What was answered; `None` when the call was hung.
    pub status: Option<u16>,
    pub at: Instant,
    /// What the observer returned when the call arrived.
    pub seen: Option<String>,
    /// What was wrong with the request, if anything (it was answered 403
    /// for its signature, 400 otherwise).
    pub problem: Option<String>,
}

impl Call {
    pub fn param(&self, name: &str) -> &str {
        self.params.get(name).map(String::as_str).unwrap_or("")
    }

    /// An accepted CompleteLifecycleAction.
    pub fn is_completion(&self) -> bool {
        self.action == "CompleteLifecycleAction" && self.status == Some(200)
    }
}

type Observer = Box<dyn Fn() -> String + Send>;

struct Shared {
    answer: Mutex<Answer>,
    calls: Mutex<Vec<Call>>,
    /// Active lifecycle actions: (group, hook, instance).
    active: Mutex<Vec<(String, String, String)>>,
    observer: Mutex<Option<Observer>>,
    access_key_id: String,
    secret_access_key: String,
    stop: AtomicBool,
}

pub struct Asg {
    pub endpoint: String,
    shared: Arc<Shared>,
    port: u16,
    accept_loop: Option<thread::JoinHandle<()>>,
}

impl Asg {
    /// An endpoint that accepts requests signed with this key pair.
    pub fn start(access_key_id: &str, secret_access_key: &str) -> Asg {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind Auto Scaling emulator");
        let port = listener
            .local_addr()
            .expect("Auto Scaling local addr")
            .port();
        let shared = Arc::new(Shared {
            answer: Mutex::new(Answer::Normal),
            calls: Mutex::new(Vec::new()),
            active: Mutex::new(Vec::new()),
            observer: Mutex::new(None),
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        // Ends when the emulator is dropped (Drop sets `stop` and connects
        // once to wake `accept`).
        let accept_loop = thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let s = s.clone();
                thread::spawn(move || handle(stream, &s));
            }
        });
        Asg {
            endpoint: format!("http://127.0.0.1:{port}"),
            shared,
            port,
            accept_loop: Some(accept_loop),
        }
    }

    /// Environment for the agent: the SDK's endpoint override for Auto
    /// Scaling.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![(
            "AWS_ENDPOINT_URL_AUTO_SCALING".into(),
            self.endpoint.clone(),
        )]
    }

    /// Makes a lifecycle action of `hook` active for `instance` in `group`.
    pub fn activate(&self, group: &str, hook: &str, instance: &str) {
        self.shared.active.lock().expect("active actions").push((
            group.into(),
            hook.into(),
            instance.into(),
        ));
    }

    pub fn answer(&self, answer: Answer) {
        *self.shared.answer.lock().expect("answer") = answer;
    }

    /// Runs `observe` as each call arrives, before it is answered, and
    /// records what it returns.
    pub fn observe(&self, observe: impl Fn() -> String + Send + 'static) {
        *self.shared.observer.lock().expect("observer") = Some(Box::new(observe));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().expect("calls").clone()
    }

    /// The accepted CompleteLifecycleAction calls.
    pub fn completions(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(Call::is_completion)
            .collect()
    }

    /// Panics naming every request that was malformed or badly signed.
    #[track_caller]
    pub fn assert_well_formed(&self) {
        let bad: Vec<String> = self
            .calls()
            .iter()
            .filter_map(|c| c.problem.as_ref().map(|p| format!("{}: {p}", c.action)))
            .collect();
        assert!(
            bad.is_empty(),
            "malformed Auto Scaling requests:\n{}",
            bad.join("\n")
        );
    }
}

impl Drop for Asg {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(handle) = self.accept_loop.take() {
            let _ = handle.join();
        }
    }
}

fn handle(stream: TcpStream, shared: &Shared) {
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(clone);
    let mut stream = stream;
    while let Some(request) = read_request(&mut reader) {
        let at = Instant::now();
        let params = form(&String::from_utf8_lossy(&request.body));
        // As AWS: 403 for a request it cannot authenticate, 400 for a bad one.
        let problem = check_signature(&request, shared)
            .map_err(|p| (403, "SignatureDoesNotMatch", p))
            .and_then(|()| check(&request, &params).map_err(|p| (400, "ValidationError", p)))
            .err();
        let seen = shared
            .observer
            .lock()
            .expect("observer")
            .as_ref()
            .map(|f| f());
        let answer = *shared.answer.lock().expect("answer");
        let action = params.get("Action").cloned().unwrap_or_default();
        let (status, body) = match (&problem, answer) {
            (Some((status, code, problem)), _) => (*status, error_body("Sender", code, problem)),
            (None, Answer::Hang) => {
                record(shared, &action, &params, None, at, seen, None);
                hang(&stream, at, shared);
                return;
            }
            (None, Answer::Status(status)) => (
                status,
                error_body("Receiver", "InternalFailure", "emulated failure"),
            ),
            (None, Answer::Normal) => act(&action, &params, shared),
        };
        let problem = problem.map(|(_, _, problem)| problem);
        record(shared, &action, &params, Some(status), at, seen, problem);
        let response = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: text/xml\r\ncontent-length: {}\r\nx-amzn-requestid: 00000000-0000-0000-0000-000000000000\r\n\r\n{body}",
            reason(status),
            body.len()
        );
        if stream.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn record(
    shared: &Shared,
    action: &str,
    params: &BTreeMap<String, String>,
    status: Option<u16>,
    at: Instant,
    seen: Option<String>,
    problem: Option<String>,
) {
    shared.calls.lock().expect("calls").push(Call {
        action: action.into(),
        params: params.clone(),
        status,
        at,
        seen,
        problem,
    });
}

/// Holds the connection without answering until the client closes it, the
/// emulator is dropped, or [`HANG_LIMIT`].
fn hang(stream: &TcpStream, at: Instant, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut byte = [0u8; 1];
    while at.elapsed() < HANG_LIMIT && !shared.stop.load(Ordering::SeqCst) {
        match (&*stream).read(&mut byte) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// What AWS answers to a well-formed request.
fn act(action: &str, params: &BTreeMap<String, String>, shared: &Shared) -> (u16, String) {
    let key = (
        params["AutoScalingGroupName"].clone(),
        params["LifecycleHookName"].clone(),
        params["InstanceId"].clone(),
    );
    let mut active = shared.active.lock().expect("active actions");
    let Some(position) = active.iter().position(|a| *a == key) else {
        return (
            400,
            error_body(
                "Sender",
                "ValidationError",
                &format!(
                    "No active Lifecycle Action found with instance ID {}",
                    key.2
                ),
            ),
        );
    };
    if action == "CompleteLifecycleAction" {
        active.remove(position);
    }
    (
        200,
        format!(
            "<{action}Response xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\">\
             <{action}Result/><ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000000\
             </RequestId></ResponseMetadata></{action}Response>"
        ),
    )
}

/// The request as AWS would check it once signed: action, parameters.
fn check(request: &ServerRequest, params: &BTreeMap<String, String>) -> Result<(), String> {
    if request.method != "POST" || request.path != "/" {
        return Err(format!(
            "{} {}: expected POST /",
            request.method, request.path
        ));
    }
    if request.header("content-type") != Some("application/x-www-form-urlencoded") {
        return Err(format!("content-type {:?}", request.header("content-type")));
    }
    let required: &[&str] = match params.get("Action").map(String::as_str) {
        Some("CompleteLifecycleAction") => &[
            "AutoScalingGroupName",
            "LifecycleHookName",
            "InstanceId",
            "LifecycleActionResult",
        ],
        Some("RecordLifecycleActionHeartbeat") => {
            &["AutoScalingGroupName", "LifecycleHookName", "InstanceId"]
        }
        other => return Err(format!("unexpected Action {other:?}")),
    };
    if params.get("Version").map(String::as_str) != Some("2011-01-01") {
        return Err(format!("Version {:?}", params.get("Version")));
    }
    for name in required {
        if params.get(*name).is_none_or(|v| v.is_empty()) {
            return Err(format!("missing {name}"));
        }
    }
    if let Some(result) = params.get("LifecycleActionResult")
        && !["CONTINUE", "ABANDON"].contains(&result.as_str())
    {
        return Err(format!("LifecycleActionResult {result:?}"));
    }
    Ok(())
}

/// SigV4 (AWS General Reference, "Signature Version 4 signing process"):
/// the credential scope must be `DATE/REGION/autoscaling/aws4_request` for
/// the expected access key, and the signature must be the one the secret
/// key gives for the canonical request.
fn check_signature(request: &ServerRequest, shared: &Shared) -> Result<(), String> {
    let authorization = request
        .header("authorization")
        .ok_or("no Authorization header")?;
    let fields = authorization
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| format!("not SigV4: {authorization}"))?;
    let field = |name: &str| {
        fields
            .split(',')
            .map(str::trim)
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .ok_or_else(|| format!("no {name} in {authorization}"))
    };
    let credential = field("Credential")?;
    let signed_headers = field("SignedHeaders")?;
    let signature = field("Signature")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [key_id, date, region, service, "aws4_request"] = scope[..] else {
        return Err(format!("credential scope {credential}"));
    };
    if service != "autoscaling" {
        return Err(format!("credential scope names service {service:?}"));
    }
    if key_id != shared.access_key_id {
        return Err(format!("signed with access key {key_id}"));
    }
    let amz_date = request.header("x-amz-date").ok_or("no x-amz-date")?;
    let mut canonical_headers = String::new();
    for name in signed_headers.split(';') {
        let value = request
            .header(name)
            .ok_or_else(|| format!("signed header {name} missing"))?;
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        canonical_headers.push_str(&format!("{name}:{value}\n"));
    }
    let canonical_request = format!(
        "POST\n/\n\n{canonical_headers}\n{signed_headers}\n{}",
        hex::encode(Sha256::digest(&request.body))
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let mut key = hmac(
        format!("AWS4{}", shared.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    for part in [region, service, "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let expected = hex::encode(hmac(&key, string_to_sign.as_bytes()));
    if signature != expected {
        return Err(format!(
            "signature {signature} does not verify (expected {expected}; canonical request:\n{canonical_request})"
        ));
    }
    Ok(())
}

/// HMAC-SHA256 (RFC 2104).
fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(data);
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// An `application/x-www-form-urlencoded` body.
fn form(body: &str) -> BTreeMap<String, String> {
    body.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn error_body(kind: &str, code: &str, message: &str) -> String {
    format!(
        "<ErrorResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\">\
         <Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error>\
         <RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    )
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}
