//! A small EC2 instance metadata service (IMDSv2) for tests.
//!
//! moto's server answers the token PUT without the
//! `x-aws-ec2-metadata-token-ttl-seconds` header, which aws-config requires
//! ("token response did not contain a TTL header"), so the agent's tests use
//! this one instead. It speaks just enough HTTP/1.1 for the SDK's IMDS
//! client, records every request, and can be told to misbehave.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

pub const ROLE: &str = "pulldeploy-node";
const TOKEN: &str = "imds-session-token-for-tests";

/// What the emulator answers; tests change it while it runs.
#[derive(Clone, Debug)]
pub struct Behaviour {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// RFC 3339 expiry of the served credentials.
    pub expiration: String,
    /// Status for the token PUT (200 normally; 403 = IMDS disabled).
    pub token_status: u16,
    /// Status for every metadata GET that carries a valid token (200 normally).
    pub metadata_status: u16,
    /// Answer 404 on `security-credentials/` (no instance role attached).
    pub no_role: bool,
    /// Number of upcoming metadata GETs to fail with `burst_status`.
    pub burst_remaining: u32,
    pub burst_status: u16,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            access_key_id: "AKIAIMDSTESTKEY00001".into(),
            secret_access_key: "imds-secret-access-key-for-tests".into(),
            session_token: "imds-session-token".into(),
            expiration: "2099-01-01T00:00:00Z".into(),
            token_status: 200,
            metadata_status: 200,
            no_role: false,
            burst_remaining: 0,
            burst_status: 503,
        }
    }
}

pub struct Imds {
    pub endpoint: String,
    pub behaviour: Arc<Mutex<Behaviour>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Imds {
    pub fn start(behaviour: Behaviour) -> Imds {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind IMDS emulator");
        let port = listener.local_addr().expect("IMDS local addr").port();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (b, r) = (behaviour.clone(), requests.clone());
        // The accept loop ends with the test process; each test's emulator
        // is on its own port, so nothing leaks between tests.
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (b, r) = (b.clone(), r.clone());
                thread::spawn(move || handle(stream, &b, &r));
            }
        });
        Imds {
            endpoint: format!("http://127.0.0.1:{port}"),
            behaviour,
            requests,
        }
    }

    /// "METHOD path" of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("IMDS request log").clone()
    }

    pub fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.behaviour.lock().expect("IMDS behaviour"));
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

fn handle(stream: TcpStream, behaviour: &Mutex<Behaviour>, requests: &Mutex<Vec<String>>) {
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
        requests
            .lock()
            .expect("IMDS request log")
            .push(format!("{method} {path}"));
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let (status, extra, body) = answer(&method, &path, header, behaviour);
        let reason = match status {
            200 => "OK",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            429 => "Too Many Requests",
            _ => "Error",
        };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n{extra}\r\n",
            body.len()
        );
        if stream.write_all(response.as_bytes()).is_err()
            || stream.write_all(body.as_bytes()).is_err()
        {
            return;
        }
    }
}

fn answer<'a>(
    method: &str,
    path: &str,
    header: impl Fn(&str) -> Option<&'a str>,
    behaviour: &Mutex<Behaviour>,
) -> (u16, String, String) {
    let mut b = behaviour.lock().expect("IMDS behaviour");
    if method == "PUT" && path == "/latest/api/token" {
        let Some(ttl) = header("x-aws-ec2-metadata-token-ttl-seconds") else {
            return (400, String::new(), "missing TTL".into());
        };
        if b.token_status != 200 {
            return (b.token_status, String::new(), String::new());
        }
        return (
            200,
            format!("x-aws-ec2-metadata-token-ttl-seconds: {ttl}\r\n"),
            TOKEN.into(),
        );
    }
    if method != "GET" {
        return (405, String::new(), String::new());
    }
    // IMDSv2 only: a GET without the session token is refused, the way an
    // instance with HttpTokens=required answers.
    if header("x-aws-ec2-metadata-token") != Some(TOKEN) {
        return (401, String::new(), String::new());
    }
    if b.burst_remaining > 0 {
        b.burst_remaining -= 1;
        return (b.burst_status, String::new(), String::new());
    }
    if b.metadata_status != 200 {
        return (b.metadata_status, String::new(), String::new());
    }
    let base = "/latest/meta-data/iam/security-credentials/";
    match path {
        p if p == base => match b.no_role {
            true => (404, String::new(), String::new()),
            false => (200, String::new(), ROLE.into()),
        },
        p if p == format!("{base}{ROLE}") && !b.no_role => (
            200,
            String::new(),
            format!(
                r#"{{"Code":"Success","LastUpdated":"2026-01-01T00:00:00Z","Type":"AWS-HMAC","AccessKeyId":"{}","SecretAccessKey":"{}","Token":"{}","Expiration":"{}"}}"#,
                b.access_key_id, b.secret_access_key, b.session_token, b.expiration
            ),
        ),
        "/latest/meta-data/placement/region" => (200, String::new(), "us-east-1".into()),
        _ => (404, String::new(), String::new()),
    }
}
