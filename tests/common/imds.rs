//! A small EC2 instance metadata service (IMDSv2) for tests, with faults.
//!
//! moto's server answers the token PUT without the
//! `x-aws-ec2-metadata-token-ttl-seconds` header, which aws-config requires
//! ("token response did not contain a TTL header"), so the agent's tests use
//! this one instead. It speaks just enough HTTP/1.1 for the SDK's IMDS
//! client, records every request (with the token it carried, the answer and
//! when), and can be told to misbehave the ways a real IMDS does: disabled
//! (403 on the token PUT), a token PUT that is never answered, tokens that
//! expire or stop being accepted (401), throttling bursts, no instance role
//! (404), credentials near expiry, and a full outage.
//!
//! For the Auto Scaling lifecycle hooks it serves the instance ID, the
//! `aws:autoscaling:groupName` instance tag and the target lifecycle state,
//! each settable while a test runs.
//!
//! Like an instance with `HttpTokens=required`, it refuses every metadata GET
//! that does not carry a token it issued (401), so an IMDSv1 request (a GET
//! without a token) shows up in the log as `token: None`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const ROLE: &str = "pulldeploy-node";
/// The instance ID the emulator serves by default.
pub const INSTANCE_ID: &str = "i-0123456789abcdef0";

/// A connection whose token PUT is never answered is held open at most this
/// long (or until the emulator is dropped).
const HANG_LIMIT: Duration = Duration::from_secs(60);

/// What the emulator answers; tests change it while it runs.
#[derive(Clone, Debug)]
pub struct Behaviour {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// RFC 3339 expiry of the served credentials.
    pub expiration: String,
    /// When set, the served credentials expire this long after they are
    /// served (overrides `expiration`).
    pub expires_in: Option<Duration>,
    /// Status for the token PUT (200 normally; 403 = IMDS disabled).
    pub token_status: u16,
    /// Read the token PUT and never answer it (the connection stays open
    /// until the client gives up, the emulator is dropped, or 60 s).
    pub token_hang: bool,
    /// TTL in seconds put on issued tokens whatever the client asked for;
    /// `None` grants the requested TTL. A token is refused (401) after it.
    pub token_ttl: Option<u64>,
    /// Status for every metadata GET that carries a valid token (200 normally).
    pub metadata_status: u16,
    /// Answer 404 on `security-credentials/` (no instance role attached).
    pub no_role: bool,
    /// Number of upcoming metadata GETs to fail with `burst_status`.
    pub burst_remaining: u32,
    pub burst_status: u16,
    /// IMDS is down: every request is read, logged with no status, and the
    /// connection is reset without an answer.
    pub down: bool,
    /// `/latest/meta-data/instance-id`.
    pub instance_id: String,
    /// The instance tag `aws:autoscaling:groupName` under
    /// `/latest/meta-data/tags/instance/`; `None` answers 404, as IMDS does
    /// when instance metadata tags are not enabled.
    pub group_tag: Option<String>,
    /// `/latest/meta-data/autoscaling/target-lifecycle-state` (`InService`,
    /// `Terminated`, ...); `None` answers 404, as for an instance outside
    /// any Auto Scaling group.
    pub target_lifecycle_state: Option<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            access_key_id: "AKIAIMDSTESTKEY00001".into(),
            secret_access_key: "imds-secret-access-key-for-tests".into(),
            session_token: "imds-session-token".into(),
            expiration: "2099-01-01T00:00:00Z".into(),
            expires_in: None,
            token_status: 200,
            token_hang: false,
            token_ttl: None,
            metadata_status: 200,
            no_role: false,
            burst_remaining: 0,
            burst_status: 503,
            down: false,
            instance_id: INSTANCE_ID.into(),
            group_tag: None,
            target_lifecycle_state: None,
        }
    }
}

/// One request as the emulator saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The `x-aws-ec2-metadata-token` header, if any (`None` on a metadata
    /// GET means an IMDSv1 request).
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub token: Option<String>,
    /// What was answered; `None` when nothing was (hang, outage).
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub status: Option<u16>,
    /// For a successful token PUT, the token issued.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub issued: Option<String>,
    /// When the request was read.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub at: Instant,
}

impl Request {
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn is_token_put(&self) -> bool {
        self.method == "PUT" && self.path == "/latest/api/token"
    }

    /// A GET of `security-credentials/ROLE` (the credentials themselves).
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn is_credentials_get(&self) -> bool {
        self.method == "GET" && self.path == format!("{CREDENTIALS_PATH}{ROLE}")
    }
}

const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials/";

struct IssuedToken {
    value: String,
    expires: Instant,
    revoked: bool,
}

#[derive(Default)]
struct Shared {
    log: Mutex<Vec<Request>>,
    tokens: Mutex<Vec<IssuedToken>>,
    stop: AtomicBool,
}

pub struct Imds {
    pub endpoint: String,
    pub behaviour: Arc<Mutex<Behaviour>>,
    shared: Arc<Shared>,
    port: u16,
    accept_loop: Option<thread::JoinHandle<()>>,
}

impl Imds {
    pub fn start(behaviour: Behaviour) -> Imds {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind IMDS emulator");
        let port = listener.local_addr().expect("IMDS local addr").port();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let shared = Arc::new(Shared::default());
        let (b, s) = (behaviour.clone(), shared.clone());
        // Ends when the emulator is dropped (Drop sets `stop` and connects
        // once to wake `accept`).
        let accept_loop = thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (b, s) = (b.clone(), s.clone());
                thread::spawn(move || handle(stream, &b, &s));
            }
        });
        Imds {
            endpoint: format!("http://127.0.0.1:{port}"),
            behaviour,
            shared,
            port,
            accept_loop: Some(accept_loop),
        }
    }

    /// "METHOD path" of every request so far.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .into_iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    /// Every request so far, in order, with token, status and time.
    pub fn log(&self) -> Vec<Request> {
        self.shared.log.lock().expect("IMDS request log").clone()
    }

    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.behaviour.lock().expect("IMDS behaviour"));
    }

    /// Stops accepting every token issued so far (401 from now on), as an
    /// IMDS that restarted or rotated its token key would.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn revoke_tokens(&self) {
        for token in self.shared.tokens.lock().expect("IMDS tokens").iter_mut() {
            token.revoked = true;
        }
    }

    /// Environment for a child that must get credentials from this IMDS and
    /// from nowhere else (no AWS_* keys; empty profile files in `home`).
    pub fn env(&self, home: &std::path::Path) -> Vec<(String, String)> {
        for name in ["no-aws-config", "no-aws-credentials"] {
            std::fs::write(home.join(name), b"").expect("write empty AWS profile file");
        }
        vec![
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
                self.endpoint.clone(),
            ),
            ("AWS_EC2_METADATA_DISABLED".into(), "false".into()),
            ("HOME".into(), home.display().to_string()),
            (
                "AWS_CONFIG_FILE".into(),
                home.join("no-aws-config").display().to_string(),
            ),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                home.join("no-aws-credentials").display().to_string(),
            ),
        ]
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`; hanging handlers poll it.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(handle) = self.accept_loop.take() {
            let _ = handle.join();
        }
    }
}

/// Closes `stream` with a TCP RST instead of a FIN (SO_LINGER 0), the way a
/// crashed or firewalled service drops a connection.
pub fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// What `answer` decided.
enum Reply {
    Answer {
        status: u16,
        headers: String,
        body: String,
        issued: Option<String>,
    },
    Hang,
    Reset,
}

fn handle(stream: TcpStream, behaviour: &Mutex<Behaviour>, shared: &Shared) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut stream = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end().to_string();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let name = name.trim().to_ascii_lowercase();
                if name == "content-length" {
                    content_length = value.trim().parse().unwrap_or(0);
                }
                headers.push((name, value.trim().to_string()));
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let at = Instant::now();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let reply = answer(&method, &path, header, behaviour, shared);
        let (status, issued) = match &reply {
            Reply::Answer { status, issued, .. } => (Some(*status), issued.clone()),
            Reply::Hang | Reply::Reset => (None, None),
        };
        shared.log.lock().expect("IMDS request log").push(Request {
            method,
            path,
            token: header("x-aws-ec2-metadata-token").map(str::to_string),
            status,
            issued,
            at,
        });
        match reply {
            Reply::Answer {
                status,
                headers,
                body,
                ..
            } => {
                let reason = match status {
                    200 => "OK",
                    400 => "Bad Request",
                    401 => "Unauthorized",
                    403 => "Forbidden",
                    404 => "Not Found",
                    405 => "Method Not Allowed",
                    429 => "Too Many Requests",
                    503 => "Service Unavailable",
                    _ => "Error",
                };
                let response = format!(
                    "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n{headers}\r\n",
                    body.len()
                );
                if stream.write_all(response.as_bytes()).is_err()
                    || stream.write_all(body.as_bytes()).is_err()
                {
                    return;
                }
            }
            Reply::Reset => {
                reset(stream);
                return;
            }
            Reply::Hang => {
                let deadline = at + HANG_LIMIT;
                while Instant::now() < deadline && !shared.stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(50));
                }
                return;
            }
        }
    }
}

fn answer<'a>(
    method: &str,
    path: &str,
    header: impl Fn(&str) -> Option<&'a str>,
    behaviour: &Mutex<Behaviour>,
    shared: &Shared,
) -> Reply {
    let reply = |status: u16, headers: String, body: String| Reply::Answer {
        status,
        headers,
        body,
        issued: None,
    };
    let mut b = behaviour.lock().expect("IMDS behaviour");
    if b.down {
        return Reply::Reset;
    }
    if method == "PUT" && path == "/latest/api/token" {
        let Some(ttl) = header("x-aws-ec2-metadata-token-ttl-seconds") else {
            return reply(400, String::new(), "missing TTL".into());
        };
        let Ok(requested) = ttl.trim().parse::<u64>() else {
            return reply(400, String::new(), "bad TTL".into());
        };
        if !(1..=21600).contains(&requested) {
            return reply(400, String::new(), "TTL out of range".into());
        }
        if b.token_hang {
            return Reply::Hang;
        }
        if b.token_status != 200 {
            return reply(b.token_status, String::new(), String::new());
        }
        let ttl = b.token_ttl.unwrap_or(requested);
        let mut tokens = shared.tokens.lock().expect("IMDS tokens");
        let value = format!("imds-token-{}", tokens.len() + 1);
        tokens.push(IssuedToken {
            value: value.clone(),
            expires: Instant::now() + Duration::from_secs(ttl),
            revoked: false,
        });
        return Reply::Answer {
            status: 200,
            headers: format!("x-aws-ec2-metadata-token-ttl-seconds: {ttl}\r\n"),
            body: value.clone(),
            issued: Some(value),
        };
    }
    if method != "GET" {
        return reply(405, String::new(), String::new());
    }
    // IMDSv2 only: a GET without a valid session token is refused, the way
    // an instance with HttpTokens=required answers.
    let valid = header("x-aws-ec2-metadata-token").is_some_and(|t| {
        shared
            .tokens
            .lock()
            .expect("IMDS tokens")
            .iter()
            .any(|i| i.value == t && !i.revoked && Instant::now() < i.expires)
    });
    if !valid {
        return reply(401, String::new(), String::new());
    }
    if b.burst_remaining > 0 {
        b.burst_remaining -= 1;
        return reply(b.burst_status, String::new(), String::new());
    }
    if b.metadata_status != 200 {
        return reply(b.metadata_status, String::new(), String::new());
    }
    match path {
        p if p == CREDENTIALS_PATH => match b.no_role {
            true => reply(404, String::new(), String::new()),
            false => reply(200, String::new(), ROLE.into()),
        },
        p if p == format!("{CREDENTIALS_PATH}{ROLE}") && !b.no_role => {
            let expiration = match b.expires_in {
                Some(d) => (chrono::Utc::now()
                    + chrono::Duration::from_std(d).expect("expires_in fits chrono"))
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                None => b.expiration.clone(),
            };
            reply(
                200,
                String::new(),
                format!(
                    r#"{{"Code":"Success","LastUpdated":"2026-01-01T00:00:00Z","Type":"AWS-HMAC","AccessKeyId":"{}","SecretAccessKey":"{}","Token":"{}","Expiration":"{}"}}"#,
                    b.access_key_id, b.secret_access_key, b.session_token, expiration
                ),
            )
        }
        "/latest/meta-data/placement/region" => reply(200, String::new(), "us-east-1".into()),
        "/latest/meta-data/instance-id" => reply(200, String::new(), b.instance_id.clone()),
        "/latest/meta-data/tags/instance/aws:autoscaling:groupName" => match &b.group_tag {
            Some(group) => reply(200, String::new(), group.clone()),
            None => reply(404, String::new(), String::new()),
        },
        "/latest/meta-data/autoscaling/target-lifecycle-state" => match &b.target_lifecycle_state {
            Some(state) => reply(200, String::new(), state.clone()),
            None => reply(404, String::new(), String::new()),
        },
        _ => reply(404, String::new(), String::new()),
    }
}
