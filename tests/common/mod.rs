//! Integration-test harness for pulldeploy: real servers and real tools on loopback
//! (moto for S3 + IMDS, gpg, aptly, reprepro, dpkg-deb, dpkg, a sandboxed apt-get),
//! each in its own tempdir, removed (and its processes killed) on Drop.
//!
//! Integration tests include it with `mod common;`. Every helper panics with the failing
//! command, its exit status, stdout and stderr, so a broken fixture says what broke.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod cmd;
pub mod faulty;
pub mod fixture;
pub mod http;
pub mod imds;
pub mod node;
pub mod repo;

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

// Until every fixture has its own module, the old `common::X` names stay reachable.
pub use cmd::*;
pub use http::*;

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

// ---------------------------------------------------------------------------------------------
// moto: S3 + EC2 instance metadata (IMDSv2)
// ---------------------------------------------------------------------------------------------

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

    pub fn log_path(&self) -> &Path {
        &self.log
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
    pub fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let resp = self.s3("GET", &object_path(bucket, key), &[], &[], &[200, 404]);
        (resp.status == 200).then_some(resp.body)
    }

    pub fn delete_object(&self, bucket: &str, key: &str) {
        self.s3("DELETE", &object_path(bucket, key), &[], &[], &[204, 200]);
    }

    /// Every key under `prefix` (ListObjectsV2, following continuation tokens), in S3 order.
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
    pub fn request_count(&self) -> usize {
        self.settled_requests().len()
    }

    /// The requests logged after `mark` (a value of [`Moto::request_count`]), each as
    /// `"METHOD PATH STATUS"`, e.g. `"GET /bucket/dists/stable/InRelease 304"`.
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

// ---------------------------------------------------------------------------------------------
// gpg
// ---------------------------------------------------------------------------------------------

/// A signing key in its own GNUPGHOME (no passphrase); gpg-agent is stopped on Drop.
pub struct GpgKey {
    pub fingerprint: String,
    /// Armored public key (`gpg --export --armor`), usable as apt's `signed-by` and as a
    /// pulldeploy keyring.
    pub public_key: PathBuf,
    /// Armored secret key, unprotected.
    pub secret_key: PathBuf,
    /// GNUPGHOME holding the key.
    pub home: PathBuf,
    _dir: TempDir,
}

impl GpgKey {
    /// An ed25519 signing-only key that never expires.
    pub fn generate(uid: &str) -> GpgKey {
        Self::generate_with(uid, "ed25519")
    }

    /// An rsa3072 signing-only key that never expires.
    pub fn generate_rsa(uid: &str) -> GpgKey {
        Self::generate_with(uid, "rsa3072")
    }

    /// An ed25519 key created `days` ago (gpg's --faked-system-time), for
    /// tests that move the agent's clock back.
    pub fn generate_backdated(uid: &str, days: u64) -> GpgKey {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
            - days * 86400;
        Self::generate_full(uid, "ed25519", Some(created))
    }

    fn generate_with(uid: &str, algo: &str) -> GpgKey {
        Self::generate_full(uid, algo, None)
    }

    fn generate_full(uid: &str, algo: &str, created: Option<u64>) -> GpgKey {
        // Short path under /tmp: the agent socket lives in GNUPGHOME.
        let dir = fixture_dir("g");
        let home = dir.path().join("h");
        mkdir(&home);
        set_mode(&home, 0o700); // gpg warns about unsafe permissions otherwise
        let mut key = GpgKey {
            fingerprint: String::new(),
            public_key: dir.path().join("public.asc"),
            secret_key: dir.path().join("secret.asc"),
            home,
            _dir: dir,
        };
        let mut generate = key.gpg();
        if let Some(created) = created {
            generate.arg(format!("--faked-system-time={created}!"));
        }
        run(
            generate.args([
                "--passphrase",
                "",
                "--quick-gen-key",
                uid,
                algo,
                "sign",
                "never",
            ]),
            "gpg --quick-gen-key",
        );
        let listing = run(
            key.gpg().args(["--with-colons", "--list-secret-keys"]),
            "gpg --list-secret-keys",
        );
        let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
        key.fingerprint = listing
            .lines()
            .find(|l| l.starts_with("fpr:"))
            .and_then(|l| l.split(':').nth(9))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no fingerprint in gpg --list-secret-keys:\n{listing}"));
        let public = run(
            key.gpg().args(["--armor", "--export", &key.fingerprint]),
            "gpg --export",
        );
        write_file(&key.public_key, &public.stdout);
        let secret = run(
            key.gpg()
                .args(["--passphrase", "", "--armor", "--export-secret-keys"])
                .arg(&key.fingerprint),
            "gpg --export-secret-keys",
        );
        write_file(&key.secret_key, &secret.stdout);
        key
    }

    /// `gpg` in this key's home, non-interactive (loopback pinentry: no passphrase prompts).
    pub fn gpg(&self) -> Command {
        let mut cmd = Command::new("gpg");
        cmd.env("GNUPGHOME", &self.home).args([
            "--batch",
            "--no-tty",
            "--yes",
            "--pinentry-mode",
            "loopback",
        ]);
        cmd
    }

    /// `gpg --clearsign --digest-algo SHA256` (an InRelease-style signed text).
    pub fn clearsign(&self, input: &[u8]) -> Vec<u8> {
        let out = run_with_input(
            self.gpg()
                .args(["--digest-algo", "SHA256", "--local-user"])
                .arg(&self.fingerprint)
                .arg("--clearsign"),
            input,
            "gpg --clearsign",
        );
        out.stdout
    }

    /// Armored detached signature (a Release.gpg).
    pub fn detach_sign(&self, input: &[u8]) -> Vec<u8> {
        let out = run_with_input(
            self.gpg()
                .args(["--digest-algo", "SHA256", "--local-user"])
                .arg(&self.fingerprint)
                .args(["--armor", "--detach-sign"]),
            input,
            "gpg --detach-sign",
        );
        out.stdout
    }
}

impl Drop for GpgKey {
    fn drop(&mut self) {
        // Otherwise gpg-agent outlives the test until it notices its socket is gone.
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", &self.home)
            .args(["--kill", "all"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// .deb packages
// ---------------------------------------------------------------------------------------------

/// What [`build_deb`] builds.
#[derive(Debug, Clone, Copy)]
pub struct DebSpec<'a> {
    pub name: &'a str,
    pub version: &'a str,
    /// "amd64" or "all"
    pub arch: &'a str,
    /// Size of a random file shipped as /usr/share/NAME/payload; 0 = no payload.
    pub payload_bytes: usize,
    pub depends: Option<&'a str>,
    /// postinst body; `#!/bin/sh\nset -e\n` is prepended unless it starts with `#!`.
    /// dpkg runs it with `--force-script-chrootless`, i.e. on the host with `$DPKG_ROOT`
    /// set to the sandbox: write to `"$DPKG_ROOT/..."`.
    pub postinst: Option<&'a str>,
}

impl<'a> DebSpec<'a> {
    /// An amd64 package without payload, dependencies or scripts.
    pub fn new(name: &'a str, version: &'a str) -> DebSpec<'a> {
        DebSpec {
            name,
            version,
            arch: "amd64",
            payload_bytes: 0,
            depends: None,
            postinst: None,
        }
    }
}

/// Build `OUT_DIR/NAME_VERSION_ARCH.deb` (epoch left out of the file name) with dpkg-deb.
/// It ships /usr/share/NAME/VERSION (the version and a newline) and, when asked, a random
/// (incompressible) /usr/share/NAME/payload.
pub fn build_deb(out_dir: &Path, spec: &DebSpec) -> PathBuf {
    let tree = tempfile::tempdir().expect("creating a tempdir for a package tree");
    let root = tree.path();
    // dpkg-deb packs the tree root as ./ with its mode; a tempdir is 0700.
    set_mode(root, 0o755);
    let debian = root.join("DEBIAN");
    let share = root.join("usr/share").join(spec.name);
    for dir in [&debian, &share] {
        mkdir(dir);
    }
    for dir in [
        debian.clone(),
        root.join("usr"),
        root.join("usr/share"),
        share.clone(),
    ] {
        set_mode(&dir, 0o755);
    }
    let mut control = format!(
        "Package: {}\nVersion: {}\nArchitecture: {}\nMaintainer: pulldeploy tests <tests@example.invalid>\n\
         Section: misc\nPriority: optional\nInstalled-Size: {}\n",
        spec.name,
        spec.version,
        spec.arch,
        spec.payload_bytes.div_ceil(1024) + 1
    );
    if let Some(dep) = spec.depends {
        let _ = writeln!(control, "Depends: {dep}");
    }
    let _ = writeln!(
        control,
        "Description: pulldeploy test package {}\n test fixture built by tests/common",
        spec.name
    );
    write_file(&debian.join("control"), control);
    set_mode(&debian.join("control"), 0o644);
    if let Some(body) = spec.postinst {
        let script = if body.starts_with("#!") {
            body.to_string()
        } else {
            format!("#!/bin/sh\nset -e\n{body}\n")
        };
        write_file(&debian.join("postinst"), script);
        set_mode(&debian.join("postinst"), 0o755);
    }
    write_file(&share.join("VERSION"), format!("{}\n", spec.version));
    set_mode(&share.join("VERSION"), 0o644);
    if spec.payload_bytes > 0 {
        write_file(&share.join("payload"), random_bytes(spec.payload_bytes));
        set_mode(&share.join("payload"), 0o644);
    }
    mkdir(out_dir);
    let file_version = spec
        .version
        .split_once(':')
        .map_or(spec.version, |(_, v)| v);
    let deb = out_dir.join(format!("{}_{}_{}.deb", spec.name, file_version, spec.arch));
    run(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group", "-Zgzip"])
            .arg(root)
            .arg(&deb),
        "dpkg-deb --build",
    );
    deb
}

// ---------------------------------------------------------------------------------------------
// aptly: publishes straight to moto's S3, as in production
// ---------------------------------------------------------------------------------------------

/// An aptly instance with its own rootDir and one local repo, publishing to moto.
pub struct Aptly {
    config: PathBuf,
    home: PathBuf,
    gnupghome: PathBuf,
    fingerprint: String,
    prefix: String,
    published: RefCell<Vec<String>>,
    last_publish: Cell<Option<SystemTime>>,
    _dir: TempDir,
}

const APTLY_REPO: &str = "pulldeploy-test";

impl Aptly {
    /// aptly with its own rootDir and an S3PublishEndpoint "test" on `moto`'s `bucket`
    /// (region us-east-1, fake keys), publishing under `prefix` ("" = bucket root), signing
    /// with `key`. With `endpoint` set, aptly 1.5 uses path-style requests; the
    /// `forceVirtualHostedStyle: false` key is for newer aptly and ignored by 1.5.
    pub fn new(moto: &Moto, bucket: &str, prefix: &str, key: &GpgKey) -> Aptly {
        let dir = fixture_dir("aptly");
        let home = dir.path().join("home");
        mkdir(&home);
        let config = dir.path().join("aptly.conf");
        let root_dir = dir.path().join("root");
        let json = format!(
            r#"{{
  "rootDir": {root},
  "architectures": [],
  "dependencyFollowSuggests": false,
  "dependencyFollowRecommends": false,
  "gpgDisableSign": false,
  "gpgDisableVerify": false,
  "gpgProvider": "gpg",
  "downloadSourcePackages": false,
  "S3PublishEndpoints": {{
    "test": {{
      "region": "us-east-1",
      "bucket": {bucket},
      "endpoint": {endpoint},
      "awsAccessKeyID": "test",
      "awsSecretAccessKey": "test",
      "prefix": "",
      "acl": "private",
      "forceSigV2": false,
      "forceVirtualHostedStyle": false,
      "debug": false
    }}
  }}
}}
"#,
            root = json_string(&root_dir.display().to_string()),
            bucket = json_string(bucket),
            endpoint = json_string(&moto.endpoint),
        );
        write_file(&config, json);
        let aptly = Aptly {
            config,
            home,
            gnupghome: key.home.clone(),
            fingerprint: key.fingerprint.clone(),
            prefix: prefix.trim_matches('/').to_string(),
            published: RefCell::new(Vec::new()),
            last_publish: Cell::new(None),
            _dir: dir,
        };
        run(
            aptly
                .aptly()
                .args(["repo", "create", "-component=main", APTLY_REPO]),
            "aptly repo create",
        );
        aptly
    }

    /// `aptly -config=…` with a clean environment (no host AWS_* or GNUPGHOME leaks in).
    pub fn aptly(&self) -> Command {
        let mut cmd = Command::new("aptly");
        cmd.env_clear()
            .env("PATH", host_path())
            .env("HOME", &self.home)
            .env("GNUPGHOME", &self.gnupghome)
            .env("LC_ALL", "C")
            .arg(format!("-config={}", self.config.display()));
        cmd
    }

    fn target(&self) -> String {
        format!("s3:test:{}", self.prefix)
    }

    /// Add `debs` to the repo and publish it as `suite`: `publish repo` the first time a suite
    /// is published, `publish update` after that.
    ///
    /// A publish never lands in the same wall-clock second as the previous one (it waits, up
    /// to 1 s): S3's (and moto's) Last-Modified has one-second resolution, and apt revalidates
    /// with If-Modified-Since only, so apt-get update would get 304 for an InRelease replaced
    /// within the same second and silently keep the old index.
    pub fn publish(&self, suite: &str, debs: &[PathBuf]) {
        if !debs.is_empty() {
            run(
                self.aptly().args(["repo", "add", APTLY_REPO]).args(debs),
                "aptly repo add",
            );
        }
        if let Some(previous) = self.last_publish.get() {
            wait_for_next_second(previous);
        }
        let gpg_key = format!("-gpg-key={}", self.fingerprint);
        let first = !self.published.borrow().iter().any(|s| s == suite);
        if first {
            run(
                self.aptly()
                    .args(["publish", "repo", "-batch", &gpg_key])
                    .arg(format!("-distribution={suite}"))
                    .args(["-component=main", "-architectures=amd64,all", APTLY_REPO])
                    .arg(self.target()),
                "aptly publish repo",
            );
            self.published.borrow_mut().push(suite.to_string());
        } else {
            run(
                self.aptly()
                    .args(["publish", "update", "-batch", &gpg_key, suite])
                    .arg(self.target()),
                "aptly publish update",
            );
        }
        self.last_publish.set(Some(SystemTime::now()));
    }

    /// The published prefix inside the bucket ("" = root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// Sleep until the wall clock is in a later whole second than `t`.
fn wait_for_next_second(t: SystemTime) {
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let target = secs(t) + 1;
    while secs(SystemTime::now()) < target {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let left = Duration::from_secs(target).saturating_sub(now);
        std::thread::sleep(left + Duration::from_millis(5));
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// reprepro: a local (file://) repository
// ---------------------------------------------------------------------------------------------

/// A reprepro repository in a tempdir, one suite, signed by a [`GpgKey`].
pub struct Reprepro {
    pub base: PathBuf,
    suite: String,
    gnupghome: PathBuf,
    _dir: TempDir,
}

impl Reprepro {
    /// conf/distributions with Codename = Suite = `suite`, amd64, main, `SignWith` the key's
    /// fingerprint (InRelease and Release.gpg). No conf/options: the defaults do (`-b` names
    /// the base; Packages and Packages.gz are exported).
    pub fn new(key: &GpgKey, suite: &str) -> Reprepro {
        let dir = fixture_dir("reprepro");
        let base = dir.path().join("repo");
        let conf = base.join("conf");
        mkdir(&conf);
        write_file(
            &conf.join("distributions"),
            format!(
                "Origin: pulldeploy-test\nLabel: pulldeploy-test\nCodename: {suite}\nSuite: {suite}\n\
                 Architectures: amd64\nComponents: main\nDescription: pulldeploy test repository\n\
                 SignWith: {fpr}\n",
                fpr = key.fingerprint
            ),
        );
        Reprepro {
            base,
            suite: suite.to_string(),
            gnupghome: key.home.clone(),
            _dir: dir,
        }
    }

    /// `reprepro -b BASE` with the signing key's GNUPGHOME.
    pub fn reprepro(&self) -> Command {
        let mut cmd = Command::new("reprepro");
        cmd.env("GNUPGHOME", &self.gnupghome)
            .arg("-b")
            .arg(&self.base);
        cmd
    }

    /// `reprepro -b BASE includedeb SUITE DEB` (re-signs the suite).
    pub fn include(&self, deb: &Path) {
        run(
            self.reprepro().args(["includedeb", &self.suite]).arg(deb),
            "reprepro includedeb",
        );
    }

    /// `file:///abs/path/to/base`
    pub fn url(&self) -> String {
        format!("file://{}", self.base.display())
    }
}

// ---------------------------------------------------------------------------------------------
// dpkg into a sandbox root
// ---------------------------------------------------------------------------------------------

/// A directory to install into with `dpkg --root`, with its own dpkg database and log.
pub struct SandboxRoot {
    pub path: PathBuf,
    _dir: TempDir,
}

impl SandboxRoot {
    pub fn new() -> SandboxRoot {
        let dir = fixture_dir("root");
        let path = dir.path().to_path_buf();
        // Packages unpack ./ onto this directory: make it look like a root.
        set_mode(&path, 0o755);
        let admin = path.join("var/lib/dpkg");
        for sub in ["info", "updates", "triggers"] {
            mkdir(&admin.join(sub));
        }
        mkdir(&path.join("var/log"));
        write_file(&admin.join("status"), "");
        SandboxRoot { path, _dir: dir }
    }

    /// DIR/var/lib/dpkg
    pub fn admindir(&self) -> PathBuf {
        self.path.join("var/lib/dpkg")
    }

    /// DIR/var/log/dpkg.log
    pub fn dpkg_log(&self) -> PathBuf {
        self.path.join("var/log/dpkg.log")
    }

    /// The installed version of `pkg`, only when dpkg's status is "ii" (installed, no error).
    pub fn installed_version(&self, pkg: &str) -> Option<String> {
        let out = output_with_input(
            Command::new("dpkg-query")
                .arg(format!("--admindir={}", self.admindir().display()))
                .args(["-W", "-f=${Version} ${db:Status-Abbrev}", pkg]),
            &[],
            "dpkg-query",
        );
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Exit 1 with "no packages found matching" is the expected "not installed".
            assert!(
                out.status.code() == Some(1) && stderr.contains("no packages found"),
                "dpkg-query -W {pkg} failed\n{}",
                describe_output(&out)
            );
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut fields = text.split_whitespace();
        let version = fields.next()?;
        (fields.next() == Some("ii")).then(|| version.to_string())
    }

    /// dpkg pointed at this root, with the options every sandboxed dpkg call needs:
    /// `--force-not-root` (the harness may not be root), `--force-script-chrootless` (run
    /// maintainer scripts without chroot, which needs no /bin/sh inside the sandbox) and
    /// `--log` (without it dpkg appends to the host's /var/log/dpkg.log even with `--root`).
    pub fn dpkg(&self) -> Command {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", self.path.display()))
            .args(["--force-not-root", "--force-script-chrootless"])
            .arg(format!("--log={}", self.dpkg_log().display()));
        cmd
    }

    /// `dpkg -i DEB` into this root.
    pub fn dpkg_install(&self, deb: &Path) {
        run(self.dpkg().arg("-i").arg(deb), "dpkg -i");
    }
}

impl Default for SandboxRoot {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// A sandboxed apt-get
// ---------------------------------------------------------------------------------------------

/// apt-get with all its state under a node tempdir (APT_CONFIG), installing into a
/// [`SandboxRoot`], trusting only the given key for its one source.
pub struct AptSandbox {
    /// The node directory holding apt's config, lists, cache and logs.
    pub node: PathBuf,
    /// The file passed as APT_CONFIG.
    pub apt_config: PathBuf,
    _dir: TempDir,
}

impl AptSandbox {
    pub fn new(root: &SandboxRoot, source_url: &str, suite: &str, keyring: &Path) -> AptSandbox {
        let dir = fixture_dir("apt");
        let node = dir.path().to_path_buf();
        for sub in [
            "etc/apt.conf.d",
            "empty",
            "state/lists/partial",
            "cache/archives/partial",
            "log",
        ] {
            mkdir(&node.join(sub));
        }
        let arch_out = run(
            Command::new("dpkg").arg("--print-architecture"),
            "dpkg --print-architecture",
        );
        let arch = String::from_utf8_lossy(&arch_out.stdout).trim().to_string();
        let n = node.display();
        let r = root.path.display();
        let conf = format!(
            r#"// pulldeploy test harness: apt confined to {n}, installing into {r}.
// Read first (APT_CONFIG), so the host's apt.conf.d, sources, preferences and keys are never read.
Dir::Etc::main "{n}/empty/apt.conf";
Dir::Etc::Parts "{n}/etc/apt.conf.d";
Dir::Etc::SourceList "{n}/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::Etc::Preferences "/nonexistent";
Dir::Etc::PreferencesParts "{n}/empty";
Dir::Etc::Trusted "/nonexistent";
Dir::Etc::TrustedParts "{n}/empty";
Dir::Etc::netrc "/nonexistent";
Dir::Etc::netrcparts "{n}/empty";
Dir::State "{n}/state/";
Dir::State::Lists "{n}/state/lists/";
Dir::State::status "{r}/var/lib/dpkg/status";
Dir::Cache "{n}/cache/";
Dir::Log "{n}/log/";
// The host's foreign architectures (from its dpkg database) must not leak in.
APT::Architecture "{arch}";
APT::Architectures {{ "{arch}"; }};
// Running as root, apt would drop to _apt for downloads, which cannot enter the 0700 tempdirs
// (it falls back to root with a warning on every run).
APT::Sandbox::User "root";
// No translations: fewer requests, and nothing tests them.
Acquire::Languages "none";
// Fail at once instead of retrying with back-off: tests want a deterministic answer.
Acquire::Retries "0";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
// Plain output: no pty, no progress bar in captured logs.
Dpkg::Use-Pty "false";
Dpkg::Progress-Fancy "false";
// The same dpkg options as SandboxRoot::dpkg (see there for why each is needed).
DPkg::Options {{ "--root={r}"; "--log={r}/var/log/dpkg.log"; "--force-script-chrootless"; "--force-not-root"; }};
"#
        );
        let apt_config = node.join("apt.conf");
        write_file(&apt_config, conf);
        write_file(
            &node.join("sources.list"),
            format!(
                "deb [signed-by={}] {source_url} {suite} main\n",
                keyring.display()
            ),
        );
        AptSandbox {
            node,
            apt_config,
            _dir: dir,
        }
    }

    /// `program` (apt-get, apt-cache, …) with a clean environment: PATH, APT_CONFIG, LC_ALL=C,
    /// DEBIAN_FRONTEND=noninteractive. No http_proxy and the like from the host.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", host_path())
            .env("APT_CONFIG", &self.apt_config)
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("HOME", &self.node);
        cmd
    }

    /// `apt-get update`; the caller checks the status.
    ///
    /// apt revalidates indexes it has with If-Modified-Since only (no ETag), and moto, like S3,
    /// keeps Last-Modified in whole seconds: an InRelease replaced within the second apt last
    /// fetched it is answered 304 and the old lists are kept. [`Aptly::publish`] waits for the
    /// next second for this reason; a test that rewrites a repository with `put_object` must too.
    pub fn update(&self) -> Output {
        output_with_input(
            self.command("apt-get").args(["-q", "update"]),
            &[],
            "apt-get update",
        )
    }

    /// `apt-get -y install PKG` (PKG may be `name=version`); the caller checks the status.
    pub fn install(&self, pkg: &str) -> Output {
        output_with_input(
            self.command("apt-get").args(["-q", "-y", "install", pkg]),
            &[],
            "apt-get install",
        )
    }
}
