//! moto: S3 and EC2 instance metadata (IMDSv2) on loopback, for aptly to publish to and the
//! agent to read from.

use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::cmd::{fixture_dir, mkdir, write_file};
use super::http::{HttpResponse, http_request, percent_encode};

/// Started instead of the `moto_server` script: the same `moto.server.main`, after replacing
/// moto's instance-metadata handler (see the IMDS notes on [`Moto`]).
const MOTO_LAUNCHER: &str = include_str!("../../scripts/moto_server.py");

/// A moto server (S3 and EC2 instance metadata) on 127.0.0.1, killed on Drop.
///
/// S3 requests from the helpers carry an `Authorization` header of SigV4 shape whose signature
/// moto does not check (it only checks signatures when told to); requests without any
/// `Authorization` header are anonymous, and moto refuses anonymous `GetObject` unless a bucket
/// policy allows it ([`Moto::allow_anonymous_read`]).
///
/// # IMDS (observed with moto 5.2.1, aws-config 1.13.0, curl)
///
/// moto routes `/latest/api/*` and `/latest/meta-data/*` to its instance-metadata mock:
/// * `PUT /latest/api/token` answers 200 with the body `fake-imdsv2-token`, but WITHOUT the
///   `X-aws-ec2-metadata-token-ttl-seconds` response header. It also answers a GET, and no
///   request ever needs the token.
/// * `GET /latest/meta-data/iam/security-credentials/` answers `default-role`;
///   `.../security-credentials/default-role` answers
///   `{"AccessKeyId": "test-key", "SecretAccessKey": "test-secret-key", "Token":
///   "test-session-token", "Expiration": "<now + 1 day>"}` (no `Code`, which aws-config reads
///   as success). `placement/region` answers `us-east-1`. Any other path (another role name,
///   `security-credentials-extended/`) is a 500 with a Python traceback in the log. Metadata
///   responses echo the request's headers back as response headers.
/// * S3 side, for comparison: moto accepts unsigned (anonymous) PUTs but answers 403 to
///   anonymous GETs until a bucket policy allows them; signatures are never verified.
///
/// With plain `moto_server`, aws-config's IMDS client (IMDSv2 only, no v1 fallback) fails:
/// `FailedToLoadToken(... TokenError { kind: NoTtl })` ("token response did not contain a TTL
/// header") for both the credentials and the region provider. So [`Moto::start`] runs moto
/// through [`MOTO_LAUNCHER`], which replaces that handler with one that behaves like an
/// instance with `HttpTokens=required`:
/// * `PUT /latest/api/token` needs `X-aws-ec2-metadata-token-ttl-seconds: 1..=21600` (else 400;
///   a GET is 405) and answers a fresh random token plus that TTL header (tokens never expire);
/// * every metadata GET needs `X-aws-ec2-metadata-token` with an issued token, else 401;
/// * unknown paths are 404; the paths above answer moto's values, without the header echo.
///
/// Checked: with [`Moto::imds_env`] (and `PATH`) only, aws-config's default chain gets the
/// credentials `test-key` and region `us-east-1` from this server, and a signed S3 call succeeds.
pub struct Moto {
    pub port: u16,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    child: Child,
    log: PathBuf,
    imds_home: PathBuf,
    _dir: TempDir,
}

/// The SigV4-shaped header moto wants on non-anonymous requests (not verified by moto).
const FAKE_SIGV4: &str = "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, \
     SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=0000000000000000000000000000000000000000000000000000000000000000";

impl Moto {
    /// Start moto on a free port and wait until it answers HTTP.
    ///
    /// The port is chosen by the kernel (`-p 0`) and read from werkzeug's
    /// `Running on http://127.0.0.1:PORT` line, which avoids the race of probing a free port
    /// and handing it over. stdout and stderr (including the access log) go to `moto.log` in
    /// the fixture's tempdir.
    pub fn start() -> Moto {
        let dir = fixture_dir("moto");
        let log = dir.path().join("moto.log");
        let launcher = dir.path().join("moto_launcher.py");
        write_file(&launcher, MOTO_LAUNCHER);
        let imds_home = dir.path().join("imds-home");
        mkdir(&imds_home);
        let log_file =
            fs::File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let log_err = log_file
            .try_clone()
            .expect("duplicating the moto log handle");
        // The interpreter moto[server] is installed for; PULLDEPLOY_TEST_PYTHON overrides.
        let python = std::env::var("PULLDEPLOY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut cmd = Command::new(&python);
        cmd.arg(&launcher)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .current_dir(dir.path())
            // Unbuffered, so the access log reaches the file as soon as werkzeug writes it.
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("starting moto ({cmd:?}): {e}; is moto[server] installed for {python}?")
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if let Some(port) = parse_running_on(&text) {
                break port;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("moto exited during startup ({status}); log:\n{text}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("moto did not report its port within 60 s; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let moto = Moto {
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
            log,
            imds_home,
            _dir: dir,
        };
        // A real request, so "started" means "answers"; it shows up in the access log.
        let resp = http_request(port, "GET", "/moto-api/data.json", &[], &[]);
        assert_eq!(
            resp.status,
            200,
            "moto's first answer was not 200: {}\nlog:\n{}",
            resp.text(),
            moto.log()
        );
        moto
    }

    /// Everything moto printed so far (startup lines, access log, tracebacks).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One S3 request with the fake SigV4 header; panics with moto's answer unless the status
    /// is one of `ok`.
    fn s3(
        &self,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
        body: &[u8],
        ok: &[u16],
    ) -> HttpResponse {
        let mut headers = vec![
            ("Authorization", FAKE_SIGV4),
            ("x-amz-date", "20260101T000000Z"),
            ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
        ];
        headers.extend_from_slice(extra);
        let resp = http_request(self.port, method, path, &headers, body);
        assert!(
            ok.contains(&resp.status),
            "moto S3 {method} {path}: status {}\n{}\n--- moto log tail ---\n{}",
            resp.status,
            resp.text(),
            log_tail(&self.log(), 30)
        );
        resp
    }

    pub fn create_bucket(&self, bucket: &str) {
        self.s3(
            "PUT",
            &format!("/{}", percent_encode(bucket, false)),
            &[],
            &[],
            &[200],
        );
    }

    /// A bucket policy allowing anonymous `s3:GetObject` on every key, so apt's http method
    /// can read the bucket path-style.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn allow_anonymous_read(&self, bucket: &str) {
        let policy = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Sid":"AnonymousRead","Effect":"Allow","Principal":"*","Action":"s3:GetObject","Resource":"arn:aws:s3:::{bucket}/*"}}]}}"#
        );
        self.s3(
            "PUT",
            &format!("/{}?policy", percent_encode(bucket, false)),
            &[("Content-Type", "application/json")],
            policy.as_bytes(),
            &[200, 204],
        );
    }

    pub fn put_object(&self, bucket: &str, key: &str, body: &[u8]) {
        // The Content-Type matters: moto (Flask) consumes a body sent as
        // application/x-www-form-urlencoded and stores an empty object.
        self.s3(
            "PUT",
            &object_path(bucket, key),
            &[("Content-Type", "application/octet-stream")],
            body,
            &[200],
        );
    }

    /// The object's bytes, or None when moto answers 404.
    ///
    /// A GET that races a PUT of the same key can get a 500 from moto
    /// itself ("I/O operation on closed file": the overwritten object's
    /// buffer is closed under the read); S3 has no such answer, and the
    /// SDK retries 5xx, so the agent never sees it. This helper, a single
    /// request, tries again a few times instead.
    pub fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let path = object_path(bucket, key);
        for _ in 0..4 {
            let resp = self.s3("GET", &path, &[], &[], &[200, 404, 500]);
            if resp.status != 500 {
                return (resp.status == 200).then_some(resp.body);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let resp = self.s3("GET", &path, &[], &[], &[200, 404]);
        (resp.status == 200).then_some(resp.body)
    }

    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn delete_object(&self, bucket: &str, key: &str) {
        self.s3("DELETE", &object_path(bucket, key), &[], &[], &[204, 200]);
    }

    /// Every key under `prefix` (ListObjectsV2, following continuation tokens), in S3 order.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!(
                "/{}?list-type=2&prefix={}",
                percent_encode(bucket, false),
                percent_encode(prefix, false)
            );
            if let Some(t) = &token {
                let _ = write!(path, "&continuation-token={}", percent_encode(t, false));
            }
            let resp = self.s3("GET", &path, &[], &[], &[200]);
            let xml = resp.text();
            keys.extend(xml_elements(&xml, "Key"));
            let truncated = xml_elements(&xml, "IsTruncated")
                .first()
                .is_some_and(|t| t == "true");
            token = xml_elements(&xml, "NextContinuationToken")
                .into_iter()
                .next();
            if !truncated || token.is_none() {
                return keys;
            }
        }
    }

    /// Number of HTTP requests in moto's access log so far (includes the harness's own
    /// requests, e.g. the startup probe and `put_object`: take a mark, then compare).
    ///
    /// werkzeug logs a request when it sends the status line, before the body, so a request
    /// whose response the client has read is already in the file; this still re-reads the log
    /// until two reads 50 ms apart agree (at most 2 s), for requests still in flight.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn request_count(&self) -> usize {
        self.settled_requests().len()
    }

    /// The requests logged after `mark` (a value of [`Moto::request_count`]), each as
    /// `"METHOD PATH STATUS"`, e.g. `"GET /bucket/dists/stable/InRelease 304"`.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn requests_since(&self, mark: usize) -> Vec<String> {
        self.settled_requests().into_iter().skip(mark).collect()
    }

    fn settled_requests(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = parse_access_log(&self.log());
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = parse_access_log(&self.log());
            if now.len() == last.len() || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// Environment for a child that must get AWS credentials from this server's IMDS only.
    /// Use with `Command::env_clear()` plus `PATH`. The region also comes from IMDS
    /// (`placement/region` = us-east-1) unless the caller sets one.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn imds_env(&self) -> Vec<(String, String)> {
        let home = self.imds_home.display().to_string();
        vec![
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
                self.endpoint.clone(),
            ),
            ("AWS_EC2_METADATA_DISABLED".into(), "false".into()),
            ("HOME".into(), home.clone()),
            (
                "AWS_CONFIG_FILE".into(),
                format!("{home}/nonexistent-aws-config"),
            ),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                format!("{home}/nonexistent-aws-credentials"),
            ),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Then _dir (log, launcher, IMDS home) is removed.
    }
}

fn object_path(bucket: &str, key: &str) -> String {
    format!(
        "/{}/{}",
        percent_encode(bucket, false),
        percent_encode(key, true)
    )
}

fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn parse_running_on(log: &str) -> Option<u16> {
    let marker = "Running on http://127.0.0.1:";
    let at = log.find(marker)? + marker.len();
    let digits: String = log[at..].chars().take_while(char::is_ascii_digit).collect();
    // Only a complete line: the digits may still be arriving.
    log[at + digits.len()..].starts_with('\n').then_some(())?;
    digits.parse().ok()
}

/// werkzeug access-log lines, `127.0.0.1 - - [date] "GET /path HTTP/1.1" 200 -`, as
/// `"GET /path 200"`. Tracebacks and startup lines in the same file do not match.
fn parse_access_log(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| {
            let start = line.find("] \"")? + 3;
            let rest = &line[start..];
            let end = rest.rfind("\" ")?;
            let request = &rest[..end];
            let status = rest[end + 2..].split_whitespace().next()?;
            if status.len() != 3 || !status.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let mut parts = request.split(' ');
            let method = parts.next()?;
            let path = parts.next()?;
            Some(format!("{method} {path} {status}"))
        })
        .collect()
}

fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(j) = rest.find(';') else { break };
        let entity = &rest[1..j];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[j + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Text of every `<tag>…</tag>` in `xml`, unescaped.
fn xml_elements(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i + open.len()..];
        let Some(j) = rest.find(&close) else { break };
        out.push(xml_unescape(&rest[..j]));
        rest = &rest[j + close.len()..];
    }
    out
}

/// Static credentials for moto (which accepts any), nothing from the
/// host's AWS config, and no IMDS: the environment of a publisher or node
/// that talks to moto.
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn static_aws_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        ),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}
