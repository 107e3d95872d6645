//! The credentials (IMDS), S3 and network rows of the attack matrix in
//! README ("What pulldeploy verifies"): one test per attack, named after it.
//!
//! Every test builds its hostile input itself: a repository published by
//! aptly to moto's S3, reached through a fault-injecting proxy
//! ([`common::faulty`]), with credentials from a fault-injecting IMDSv2
//! emulator ([`common::imds`]); `sigv4_from_imds` uses s3s-fs, an S3 server
//! that checks signatures. Each asserts the named error (exit code and the
//! last stderr line), that nothing was installed (or, for a fault the agent
//! must ride out, that the install converges), and that the last accepted
//! state (Release and installed versions) did not move on failure.
//!
//! Rows that need credentials cached across cycles (`imds_token_401`,
//! `imds_throttled`, `imds_outage_near_expiry`, `no_change_poll`) run the
//! daemon (`pulldeploy run`) and read its log.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod aptly;
    pub mod cmd;
    pub mod deb;
    pub mod dpkg;
    pub mod faulty;
    pub mod gpg;
    pub mod http;
    pub mod imds;
    pub mod moto;
    pub mod node;
}

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::aptly::Aptly;
use common::deb::{DebSpec, build_deb};
use common::faulty::{Fault, FaultyProxy, Proxied};
use common::gpg::GpgKey;
use common::imds::{Behaviour, Imds, Request};
use common::moto::Moto;
use common::node::{Node, failure};
use pulldeploy::state::State;

const BUCKET: &str = "acme-apt";
const PREFIX: &str = "repo";

/// Exit codes of the agent's contract (sysexits; README, "Commands").
const EX_UNAVAILABLE: i32 = 69;

/// Credentials IMDS serves in the daemon tests expire this soon. The agent
/// refreshes credentials 5 minutes before they expire, but never sooner than
/// 5 s after the last refresh (src/source/s3creds.rs, `REFRESH_BEFORE_EXPIRY`,
/// `MIN_REFRESH_INTERVAL`): these are refreshed 5 s after they were
/// fetched, while they are still valid for most of a minute.
const NEAR_EXPIRY: Duration = Duration::from_secs(60);

/// After a failed refresh the agent waits this long before asking IMDS
/// again (src/source/s3creds.rs, `RETRY_FAILED_REFRESH`).
const RETRY_FAILED_REFRESH: Duration = Duration::from_secs(30);

/// IMDS attempts per request (src/source/s3creds.rs, `IMDS_ATTEMPTS`).
const IMDS_ATTEMPTS: usize = 3;

// ---------------------------------------------------------------------------------------------
// Fixture: aptly -> moto, a faulty proxy in front, an IMDS emulator
// ---------------------------------------------------------------------------------------------

struct Fixture {
    moto: Moto,
    proxy: FaultyProxy,
    key: GpgKey,
    aptly: Aptly,
    imds: Imds,
    debs: tempfile::TempDir,
}

impl Fixture {
    fn new(behaviour: Behaviour) -> Fixture {
        let moto = Moto::start();
        moto.create_bucket(BUCKET);
        let key = GpgKey::generate("Acme Repository <repo@acme.test>");
        let aptly = Aptly::new(&moto, BUCKET, PREFIX, &key);
        Fixture {
            proxy: FaultyProxy::start(moto.port),
            moto,
            key,
            aptly,
            imds: Imds::start(behaviour),
            debs: tempfile::tempdir().expect("debs tempdir"),
        }
    }

    /// Builds `spec` with dpkg-deb and publishes it (aptly -> moto).
    fn publish(&self, spec: &DebSpec) -> PathBuf {
        let deb = build_deb(self.debs.path(), spec);
        self.aptly.publish("production", std::slice::from_ref(&deb));
        deb
    }

    /// A node reading the bucket through the proxy, with credentials only
    /// from the IMDS emulator.
    fn node(&self) -> Node {
        let repository = format!(
            "url = \"s3://{BUCKET}/{PREFIX}\"\nendpoint = {:?}\nregion = \"us-east-1\"",
            self.proxy.endpoint
        );
        let node = Node::new(&repository, &self.key.public_key, &["myapp"], "");
        let env = self.imds.env(&node.home());
        node.with_env(env)
    }

    /// A node that already installed `version` (published here first).
    fn node_with(&self, version: &str) -> (Node, State) {
        self.publish(&DebSpec::new("myapp", version));
        let node = self.node();
        let out = node.once();
        assert_ok(&out);
        assert_eq!(node.installed("myapp").as_deref(), Some(version));
        let state = node.state();
        assert!(state.release.is_some(), "no accepted release after install");
        (node, state)
    }
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "pulldeploy failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts exit `code` and a last stderr line containing every one of
/// `needles` (case-insensitive); returns that line.
#[track_caller]
fn assert_failed(out: &Output, code: i32, needles: &[&str]) -> String {
    let (status, line) = failure(out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("agent failed as expected: {line}");
    assert_eq!(status, Some(code), "exit code; stderr:\n{stderr}");
    let lower = line.to_lowercase();
    for needle in needles {
        assert!(
            lower.contains(&needle.to_lowercase()),
            "the last stderr line does not name {needle:?}:\n{line}\nfull stderr:\n{stderr}"
        );
    }
    line
}

/// Nothing was installed and the last accepted state did not move: dpkg
/// still has `version`, state.json has the same Release and installed
/// versions as `before`, and the cache holds no partial download and no
/// .deb of another version.
#[track_caller]
fn assert_unmoved(node: &Node, before: &State, version: &str) {
    assert_eq!(node.installed("myapp").as_deref(), Some(version));
    let after = node.state();
    assert_eq!(after.release, before.release, "the accepted Release moved");
    assert_eq!(
        after.installed, before.installed,
        "installed versions moved"
    );
    assert!(after.last_error.is_some(), "the failure is not in state");
    let cache = node.cache_files();
    assert!(
        cache.iter().all(|f| !f.ends_with(".partial")),
        "partial download left in the cache: {cache:?}"
    );
    let ours = format!("myapp_{version}_");
    assert!(
        cache
            .iter()
            .filter(|f| f.ends_with(".deb"))
            .all(|f| f.starts_with(&ours)),
        "a .deb other than {version} in the cache: {cache:?}"
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// IMDS requests after `mark`.
fn imds_since(imds: &Imds, mark: usize) -> Vec<Request> {
    imds.log().into_iter().skip(mark).collect()
}

/// No metadata GET ever went out without an IMDSv2 session token.
#[track_caller]
fn assert_never_imdsv1(imds: &Imds) {
    let log = imds.log();
    assert!(
        log.iter().all(|r| r.method != "GET" || r.token.is_some()),
        "an IMDSv1 request (GET without a session token): {log:#?}"
    );
}

fn is_deb(r: &Proxied, version: &str) -> bool {
    r.key_path()
        .ends_with(&format!("myapp_{version}_amd64.deb"))
}

fn is_inrelease(r: &Proxied) -> bool {
    r.key_path().ends_with("/dists/production/InRelease")
}

// ---------------------------------------------------------------------------------------------
// The daemon, with its log
// ---------------------------------------------------------------------------------------------

/// `pulldeploy run` with its stderr collected; SIGTERM (then SIGKILL) on Drop.
struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(node: &Node) -> Daemon {
        let mut child = node.spawn_run();
        let stderr = child.stderr.take().expect("daemon stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("daemon log").push(line);
            }
        });
        Daemon { child, lines }
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().expect("daemon log").clone()
    }

    /// Waits (at most `limit`) until `done` holds; panics with the log.
    #[track_caller]
    fn wait_until(&self, what: &str, limit: Duration, mut done: impl FnMut(&[String]) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if done(&self.log()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon: {what} did not happen within {limit:?}; log:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until myapp `version` is installed (dpkg) and committed
    /// (state.json).
    #[track_caller]
    fn wait_installed(&self, node: &Node, version: &str, limit: Duration) {
        self.wait_until(&format!("install of {version}"), limit, |_| {
            node.installed("myapp").as_deref() == Some(version)
                && node
                    .state()
                    .installed
                    .get("myapp")
                    .is_some_and(|p| p.version == version)
        });
    }

    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials (IMDS)
// ---------------------------------------------------------------------------------------------

/// Token PUT unanswered: a clear error, never IMDSv1. The hostile IMDS reads
/// the PUT and never answers (as with HttpPutResponseHopLimit=1 in a
/// container, where the answer is dropped on the way back).
#[test]
fn imdsv2_only() {
    let fx = Fixture::new(Behaviour::default());
    let (node, before) = fx.node_with("1.0");
    fx.publish(&DebSpec::new("myapp", "1.1"));
    fx.imds.set(|b| b.token_hang = true);
    let (imds_mark, s3_mark) = (fx.imds.log().len(), fx.proxy.mark());

    let started = Instant::now();
    let out = node.once();
    let took = started.elapsed();

    assert_failed(
        &out,
        EX_UNAVAILABLE,
        &[
            "IMDS",
            "token",
            "PUT /latest/api/token",
            "no answer",
            "IMDSv1",
        ],
    );
    let asked = imds_since(&fx.imds, imds_mark);
    assert!(
        !asked.is_empty() && asked.iter().all(Request::is_token_put),
        "only token PUTs may follow an unanswered token PUT: {asked:#?}"
    );
    assert_eq!(asked.len(), 1, "one token PUT, not retried: {asked:#?}");
    assert_never_imdsv1(&fx.imds);
    let s3 = fx.proxy.since(s3_mark);
    assert!(
        s3.is_empty(),
        "S3 was asked without credentials (unsigned?): {s3:#?}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_unmoved(&node, &before, "1.0");
}

/// 401 mid-session: new token, retry. The daemon holds an IMDSv2 session
/// token and credentials near expiry; IMDS then stops accepting the token
/// (as after its restart) and serves new keys. The refresh must get a new
/// token after a single 401, fetch the new keys with it, and S3 must see
/// them.
#[test]
fn imds_token_401() {
    let fx = Fixture::new(Behaviour {
        expires_in: Some(NEAR_EXPIRY),
        ..Behaviour::default()
    });
    fx.publish(&DebSpec::new("myapp", "1.0"));
    let node = fx.node();
    let daemon = Daemon::start(&node);
    daemon.wait_until("the first credentials", Duration::from_secs(20), |_| {
        fx.imds.log().iter().any(Request::is_credentials_get)
    });
    fx.imds.revoke_tokens();
    fx.imds
        .set(|b| b.access_key_id = "AKIAROTATEDKEY000002".into());
    let first_token = fx
        .imds
        .log()
        .iter()
        .find_map(|r| r.issued.clone())
        .expect("a token was issued");
    let imds_mark = fx.imds.log().len();
    daemon.wait_installed(&node, "1.0", Duration::from_secs(20));

    // The refresh (due 5 s after the first fetch) meets the 401.
    daemon.wait_until(
        "a refresh with a new token",
        Duration::from_secs(20),
        |_| {
            imds_since(&fx.imds, imds_mark)
                .iter()
                .any(|r| r.is_credentials_get() && r.status == Some(200))
        },
    );
    let s3_mark = fx.proxy.mark();
    fx.publish(&DebSpec::new("myapp", "1.1"));
    daemon.wait_installed(&node, "1.1", Duration::from_secs(20));
    let log = daemon.log();
    daemon.stop();

    let asked = imds_since(&fx.imds, imds_mark);
    let refused = asked
        .iter()
        .position(|r| r.status == Some(401))
        .unwrap_or_else(|| panic!("the revoked token was never refused: {asked:#?}"));
    assert_eq!(asked[refused].token.as_deref(), Some(first_token.as_str()));
    assert_eq!(
        asked.iter().filter(|r| r.status == Some(401)).count(),
        1,
        "the refused token was sent again: {asked:#?}"
    );
    let put = &asked[refused + 1];
    assert!(
        put.is_token_put() && put.status == Some(200),
        "no new token right after the 401: {asked:#?}"
    );
    let new_token = put.issued.clone().expect("a token was issued");
    assert!(
        asked[refused + 1..].iter().any(|r| r.is_credentials_get()
            && r.status == Some(200)
            && r.token.as_deref() == Some(new_token.as_str())),
        "credentials not fetched with the new token: {asked:#?}"
    );
    assert_never_imdsv1(&fx.imds);
    assert!(
        log.iter()
            .any(|l| l.contains("401") && l.contains("new token")),
        "the new token is not logged:\n{}",
        log.join("\n")
    );
    // S3 saw the rotated keys: the new credentials were used.
    let deb = fx
        .proxy
        .since(s3_mark)
        .into_iter()
        .find(|r| is_deb(r, "1.1"))
        .expect("the 1.1 .deb was fetched");
    assert_eq!(deb.access_key.as_deref(), Some("AKIAROTATEDKEY000002"));
    assert_eq!(node.installed("myapp").as_deref(), Some("1.1"));
    assert_eq!(node.state().installed["myapp"].version, "1.1");
}

/// IMDS answers 403 (disabled for the instance): one token request, no
/// retry storm, and an error saying what to do.
#[test]
fn imds_disabled_403() {
    let fx = Fixture::new(Behaviour::default());
    let (node, before) = fx.node_with("1.0");
    fx.publish(&DebSpec::new("myapp", "1.1"));
    fx.imds.set(|b| b.token_status = 403);
    let (imds_mark, s3_mark) = (fx.imds.log().len(), fx.proxy.mark());

    let out = node.once();

    assert_failed(
        &out,
        EX_UNAVAILABLE,
        &["IMDS", "403", "disabled", "http-endpoint enabled"],
    );
    let asked = imds_since(&fx.imds, imds_mark);
    assert_eq!(
        asked.len(),
        1,
        "exactly one token PUT, nothing else: {asked:#?}"
    );
    assert!(asked[0].is_token_put() && asked[0].status == Some(403));
    assert!(
        fx.proxy.since(s3_mark).is_empty(),
        "S3 asked without credentials"
    );
    assert_unmoved(&node, &before, "1.0");
}

/// IMDS requests a refresh may make while failing over `window`: one
/// refresh (up to `IMDS_ATTEMPTS` requests) per `RETRY_FAILED_REFRESH`.
fn refresh_budget(window: Duration) -> usize {
    IMDS_ATTEMPTS * (1 + (window.as_secs_f64() / RETRY_FAILED_REFRESH.as_secs_f64()) as usize)
}

/// Bursts of 429/5xx: retried with backoff when nothing is cached; cached
/// credentials used (and IMDS not hammered) when a refresh meets throttling.
#[test]
fn imds_throttled() {
    // A cold start (nothing cached) meets a burst of 503s: the IMDS client
    // retries with backoff, within its attempt budget, and the install
    // goes through.
    let fx = Fixture::new(Behaviour {
        burst_remaining: 2,
        burst_status: 503,
        expires_in: Some(NEAR_EXPIRY),
        ..Behaviour::default()
    });
    fx.publish(&DebSpec::new("myapp", "1.0"));
    let node = fx.node();
    let out = node.once();
    assert_ok(&out);
    assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
    let log = fx.imds.log();
    let gets: Vec<&Request> = log.iter().filter(|r| r.method == "GET").collect();
    let statuses: Vec<Option<u16>> = gets.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [Some(503), Some(503), Some(200), Some(200)],
        "the burst was not retried: {log:#?}"
    );
    // Backoff: random waits in 0..1 s, then 0..2 s; both under 5 ms has a
    // probability of about 1e-5.
    let waited = gets[2].at - gets[0].at;
    assert!(
        waited >= Duration::from_millis(5) && waited < Duration::from_secs(4),
        "retries {waited:?} apart"
    );

    // The daemon holds credentials near expiry; from its first refresh on,
    // IMDS throttles every metadata request (429). The refresh fails, the
    // last credentials (still valid) are used with a warning, and IMDS is
    // asked once per retry period, not per S3 request.
    let start = fx.imds.log().len();
    let daemon = Daemon::start(&node);
    daemon.wait_until("the first credentials", Duration::from_secs(20), |_| {
        imds_since(&fx.imds, start)
            .iter()
            .any(Request::is_credentials_get)
    });
    fx.imds.set(|b| {
        b.burst_remaining = u32::MAX;
        b.burst_status = 429;
        b.access_key_id = "AKIANEVERSERVED00003".into();
    });
    let imds_mark = fx.imds.log().len();
    let s3_mark = fx.proxy.mark();
    let throttled_from = Instant::now();
    daemon.wait_until("a throttled refresh", Duration::from_secs(20), |_| {
        imds_since(&fx.imds, imds_mark)
            .iter()
            .any(|r| r.status == Some(429))
    });
    fx.publish(&DebSpec::new("myapp", "1.1"));
    daemon.wait_installed(&node, "1.1", Duration::from_secs(20));
    daemon.wait_until("three more polls", Duration::from_secs(20), |_| {
        fx.proxy
            .since(s3_mark)
            .iter()
            .filter(|r| is_inrelease(r) && r.status == Some(304))
            .count()
            >= 3
    });
    let window = throttled_from.elapsed();
    let log = daemon.log();
    daemon.stop();

    let s3 = fx.proxy.since(s3_mark);
    let throttled = imds_since(&fx.imds, imds_mark);
    assert!(
        throttled.iter().all(|r| r.status == Some(429)),
        "{throttled:#?}"
    );
    assert!(
        throttled.len() <= refresh_budget(window) && throttled.len() < s3.len(),
        "IMDS asked {} times in {window:?} for {} S3 requests: {throttled:#?}",
        throttled.len(),
        s3.len()
    );
    assert!(
        s3.iter()
            .all(|r| r.access_key.as_deref() == Some("AKIAIMDSTESTKEY00001")),
        "S3 requests not signed with the cached credentials: {s3:#?}"
    );
    let warning = log
        .iter()
        .find(|l| l.contains("WARN") && l.contains("last credentials"))
        .unwrap_or_else(|| panic!("no warning logged:\n{}", log.join("\n")));
    assert!(warning.contains("429"), "{warning}");
    assert_never_imdsv1(&fx.imds);
    assert_eq!(node.installed("myapp").as_deref(), Some("1.1"));
    assert_eq!(node.state().installed["myapp"].version, "1.1");
}

/// IMDS down as credentials near expiry: the last credentials are used
/// while still valid, with a warning, and the install converges.
#[test]
fn imds_outage_near_expiry() {
    let fx = Fixture::new(Behaviour {
        expires_in: Some(NEAR_EXPIRY),
        ..Behaviour::default()
    });
    fx.publish(&DebSpec::new("myapp", "1.0"));
    let node = fx.node();
    let daemon = Daemon::start(&node);
    daemon.wait_until("the first credentials", Duration::from_secs(20), |_| {
        fx.imds.log().iter().any(Request::is_credentials_get)
    });
    fx.imds.set(|b| {
        b.down = true;
        b.access_key_id = "AKIANEVERSERVED00004".into();
    });
    let imds_mark = fx.imds.log().len();
    let s3_mark = fx.proxy.mark();
    let down_from = Instant::now();
    daemon.wait_installed(&node, "1.0", Duration::from_secs(20));
    daemon.wait_until(
        "a refresh during the outage",
        Duration::from_secs(20),
        |_| !imds_since(&fx.imds, imds_mark).is_empty(),
    );
    fx.publish(&DebSpec::new("myapp", "1.1"));
    daemon.wait_installed(&node, "1.1", Duration::from_secs(20));
    let window = down_from.elapsed();
    let log = daemon.log();
    daemon.stop();

    let asked = imds_since(&fx.imds, imds_mark);
    assert!(
        asked.iter().all(|r| r.status.is_none()),
        "answered during the outage: {asked:#?}"
    );
    let s3 = fx.proxy.since(s3_mark);
    assert!(
        asked.len() <= refresh_budget(window) && asked.len() < s3.len(),
        "IMDS asked {} times in {window:?} for {} S3 requests: {asked:#?}",
        asked.len(),
        s3.len()
    );
    assert!(
        s3.iter()
            .all(|r| r.access_key.as_deref() == Some("AKIAIMDSTESTKEY00001")),
        "S3 requests not signed with the last credentials: {s3:#?}"
    );
    let warning = log
        .iter()
        .find(|l| l.contains("WARN") && l.contains("last credentials"))
        .unwrap_or_else(|| panic!("no warning logged:\n{}", log.join("\n")));
    assert!(
        warning.contains("until they expire") && warning.contains("cannot reach IMDS"),
        "{warning}"
    );
    assert_never_imdsv1(&fx.imds);
    assert_eq!(node.installed("myapp").as_deref(), Some("1.1"));
    assert_eq!(node.state().installed["myapp"].version, "1.1");
}

/// 404 on security-credentials/: no instance role; the error names it.
#[test]
fn no_instance_role() {
    let fx = Fixture::new(Behaviour::default());
    let (node, before) = fx.node_with("1.0");
    fx.publish(&DebSpec::new("myapp", "1.1"));
    fx.imds.set(|b| b.no_role = true);
    let (imds_mark, s3_mark) = (fx.imds.log().len(), fx.proxy.mark());

    let out = node.once();

    assert_failed(
        &out,
        EX_UNAVAILABLE,
        &[
            "no IAM role",
            "404",
            "security-credentials/",
            "instance profile",
        ],
    );
    // A token, the role lookup answered 404, and nothing more: no retry,
    // no guessed role name.
    let asked: Vec<String> = imds_since(&fx.imds, imds_mark)
        .iter()
        .map(|r| format!("{} {} {:?}", r.method, r.path, r.status))
        .collect();
    assert_eq!(
        asked,
        [
            "PUT /latest/api/token Some(200)",
            "GET /latest/meta-data/iam/security-credentials/ Some(404)",
        ]
    );
    assert!(
        fx.proxy.since(s3_mark).is_empty(),
        "S3 asked without credentials"
    );
    assert_never_imdsv1(&fx.imds);
    assert_unmoved(&node, &before, "1.0");
}

/// s3s-fs on 127.0.0.1, checking SigV4 signatures against one key pair.
struct S3sFs {
    child: Child,
    endpoint: String,
    root: tempfile::TempDir,
}

impl S3sFs {
    fn start(access_key: &str, secret_key: &str) -> S3sFs {
        let found = Command::new("s3s-fs")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            found.is_ok_and(|s| s.success()),
            "s3s-fs is not on PATH: run scripts/deps.sh (cargo install s3s-fs@0.14.1 \
             --features binary --locked) to run sigv4_from_imds"
        );
        let root = tempfile::tempdir().expect("s3s-fs root");
        let log = root.path().join("s3s-fs.log");
        let data = root.path().join("data");
        std::fs::create_dir_all(data.join(BUCKET)).expect("s3s-fs bucket dir");
        let log_file = std::fs::File::create(&log).expect("s3s-fs log");
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", access_key, "--secret-key", secret_key])
            .arg(&data)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("start s3s-fs");
        let mut server = S3sFs {
            child,
            endpoint: String::new(),
            root,
        };
        let marker = "server is running at http://127.0.0.1:";
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(at) = text.find(marker) {
                let digits: String = text[at + marker.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if text[at + marker.len() + digits.len()..].starts_with(char::is_whitespace) {
                    server.endpoint = format!("http://127.0.0.1:{digits}");
                    return server;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("s3s-fs exited ({status}):\n{text}");
            }
            assert!(Instant::now() < deadline, "s3s-fs did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Copies every object under `prefix` in moto's `bucket` into the same
    /// key here (a bucket is a directory, a key a path under it).
    fn mirror(&self, moto: &Moto, prefix: &str) {
        for key in moto.list_keys(BUCKET, prefix) {
            let bytes = moto
                .get_object(BUCKET, &key)
                .unwrap_or_else(|| panic!("{key} listed but missing"));
            let path = self.root.path().join("data").join(BUCKET).join(&key);
            std::fs::create_dir_all(path.parent().expect("key has a parent"))
                .expect("mkdir for key");
            std::fs::write(&path, bytes).expect("write object");
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("s3s-fs.log")).unwrap_or_default()
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An S3 server that checks signatures, with keys only IMDS knows: objects
/// are fetched when IMDS serves those keys; with a wrong secret from IMDS
/// the server refuses (403) and the agent fails naming the 403.
#[test]
fn sigv4_from_imds() {
    const ACCESS_KEY: &str = "AKIASIGV4CHECKED0001";
    const SECRET_KEY: &str = "sigv4-secret-only-imds-knows";
    let s3s = S3sFs::start(ACCESS_KEY, SECRET_KEY);
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let key = GpgKey::generate("Acme Repository <repo@acme.test>");
    let aptly = Aptly::new(&moto, BUCKET, PREFIX, &key);
    let debs = tempfile::tempdir().expect("debs");
    aptly.publish(
        "production",
        &[build_deb(debs.path(), &DebSpec::new("myapp", "1.0"))],
    );
    s3s.mirror(&moto, PREFIX);
    let imds = Imds::start(Behaviour {
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: SECRET_KEY.into(),
        ..Behaviour::default()
    });
    let repository = format!(
        "url = \"s3://{BUCKET}/{PREFIX}\"\nendpoint = {:?}\nregion = \"us-east-1\"",
        s3s.endpoint
    );
    let node = Node::new(&repository, &key.public_key, &["myapp"], "");
    let env = imds.env(&node.home());
    let node = node.with_env(env);

    // The right keys, from IMDS only: the server accepts the signatures.
    let out = node.once();
    assert!(
        out.status.success(),
        "pulldeploy failed: {}\n--- s3s-fs log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        s3s.log()
    );
    assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
    assert!(
        imds.log().iter().any(Request::is_credentials_get),
        "credentials did not come from IMDS"
    );
    let before = node.state();

    // A new version, and IMDS now serves a wrong secret: refused by the
    // server, nothing installed, nothing moved.
    aptly.publish(
        "production",
        &[build_deb(debs.path(), &DebSpec::new("myapp", "1.1"))],
    );
    s3s.mirror(&moto, PREFIX);
    imds.set(|b| b.secret_access_key = "not-the-secret-s3s-fs-knows".into());
    let out = node.once();
    assert_failed(
        &out,
        EX_UNAVAILABLE,
        &["InRelease", "403", "SignatureDoesNotMatch"],
    );
    assert_unmoved(&node, &before, "1.0");
}

// ---------------------------------------------------------------------------------------------
// S3 and network
// ---------------------------------------------------------------------------------------------

/// 503 SlowDown bursts: backoff and retry, no partial state. A burst longer
/// than the retry budget fails the cycle cleanly; a shorter one is ridden
/// out.
#[test]
fn s3_slowdown() {
    let fx = Fixture::new(Behaviour::default());
    let (node, before) = fx.node_with("1.0");
    fx.publish(&DebSpec {
        payload_bytes: 64 * 1024,
        ..DebSpec::new("myapp", "1.1")
    });

    // The .deb is throttled longer than the agent retries.
    fx.proxy
        .inject("myapp_1.1_amd64.deb", Fault::slow_down(), None);
    let mark = fx.proxy.mark();
    let out = node.once();
    assert_failed(
        &out,
        EX_UNAVAILABLE,
        &["myapp_1.1_amd64.deb", "503", "SlowDown", "4 attempts"],
    );
    let tries: Vec<Proxied> = fx
        .proxy
        .since(mark)
        .into_iter()
        .filter(|r| is_deb(r, "1.1"))
        .collect();
    assert_eq!(tries.len(), 4, "attempts at the .deb: {tries:#?}");
    assert!(tries.iter().all(|r| r.status == Some(503)));
    // Backed off, not hammered: the waits are drawn from 0..250 ms,
    // 0..500 ms, 0..1 s (full jitter); all three under 20 ms has a
    // probability below 1e-4.
    let spread = tries[3].at - tries[0].at;
    assert!(
        spread >= Duration::from_millis(20),
        "4 attempts within {spread:?}"
    );
    assert!(
        spread <= Duration::from_secs(3),
        "backoff too long: {spread:?}"
    );
    assert_unmoved(&node, &before, "1.0");

    // Short bursts on the Release and the .deb: retried, then installed.
    fx.proxy.clear();
    fx.proxy.inject("/InRelease", Fault::slow_down(), Some(2));
    fx.proxy
        .inject("myapp_1.1_amd64.deb", Fault::slow_down(), Some(2));
    let mark = fx.proxy.mark();
    let out = node.once();
    assert_ok(&out);
    assert_eq!(node.installed("myapp").as_deref(), Some("1.1"));
    let seen = fx.proxy.since(mark);
    for (what, matches) in [
        ("InRelease", &is_inrelease as &dyn Fn(&Proxied) -> bool),
        (".deb", &|r: &Proxied| is_deb(r, "1.1")),
    ] {
        let statuses: Vec<Option<u16>> = seen
            .iter()
            .filter(|r| matches(r))
            .map(|r| r.status)
            .collect();
        assert_eq!(
            statuses,
            [Some(503), Some(503), Some(200)],
            "{what}: {seen:#?}"
        );
    }
    let state = node.state();
    assert_eq!(state.installed["myapp"].version, "1.1");
    assert!(state.release.as_ref().map(|r| r.date) >= before.release.as_ref().map(|r| r.date));
}

/// 403 for a missing key (S3 without s3:ListBucket): "unavailable", never
/// an unsigned fallback. The bucket answers 403 for every missing key; the
/// repository loses its signatures (InRelease and Release.gpg deleted, the
/// unsigned Release stays), then, signed again, a .deb.
#[test]
fn s3_403_missing() {
    let fx = Fixture::new(Behaviour::default());
    let (node, before) = fx.node_with("1.0");
    fx.proxy
        .inject(&format!("/{BUCKET}/"), Fault::DenyMissing, None);
    fx.publish(&DebSpec::new("myapp", "1.1"));
    for file in ["InRelease", "Release.gpg"] {
        fx.moto
            .delete_object(BUCKET, &format!("{PREFIX}/dists/production/{file}"));
    }
    let mark = fx.proxy.mark();

    let out = node.once();

    assert_failed(
        &out,
        EX_UNAVAILABLE,
        &["Release.gpg", "access denied", "403"],
    );
    let seen: Vec<String> = fx
        .proxy
        .since(mark)
        .iter()
        .map(|r| format!("{} {:?}", r.key_path(), r.status))
        .collect();
    assert_eq!(
        seen,
        [
            format!("/{BUCKET}/{PREFIX}/dists/production/InRelease Some(403)"),
            format!("/{BUCKET}/{PREFIX}/dists/production/Release Some(200)"),
            format!("/{BUCKET}/{PREFIX}/dists/production/Release.gpg Some(403)"),
        ],
        "nothing may be read past an unsigned Release"
    );
    assert_unmoved(&node, &before, "1.0");

    // Signed again (the next publish), but the new .deb is missing: 403,
    // "unavailable" too.
    fx.publish(&DebSpec::new("myapp", "1.2"));
    fx.moto.delete_object(
        BUCKET,
        &format!("{PREFIX}/pool/main/m/myapp/myapp_1.2_amd64.deb"),
    );
    let out = node.once();
    assert_failed(
        &out,
        EX_UNAVAILABLE,
        &["myapp_1.2_amd64.deb", "access denied", "403"],
    );
    assert_unmoved(&node, &before, "1.0");
}

/// Connection reset mid-.deb: the cycle fails without a corrupt cache
/// entry; the next one downloads the whole file again (no resume) and its
/// full hash is checked.
#[test]
fn partial_download() {
    let fx = Fixture::new(Behaviour::default());
    let (node, before) = fx.node_with("1.0");
    let deb = fx.publish(&DebSpec {
        payload_bytes: 512 * 1024,
        ..DebSpec::new("myapp", "1.1")
    });
    let deb_bytes = std::fs::read(&deb).expect("read the .deb");
    let cut = deb_bytes.len() / 2;
    fx.proxy.inject(
        "myapp_1.1_amd64.deb",
        Fault::ResetAfter { bytes: cut },
        Some(1),
    );
    let mark = fx.proxy.mark();

    let out = node.once();

    let line = assert_failed(
        &out,
        EX_UNAVAILABLE,
        &["reading", "myapp_1.1_amd64.deb", "broke off after"],
    );
    // "... broke off after N of LEN bytes: ...", N short of LEN.
    let after = line
        .split("broke off after ")
        .nth(1)
        .and_then(|rest| rest.split(" bytes").next())
        .unwrap_or_default();
    let (got, of) = after.split_once(" of ").unwrap_or_else(|| panic!("{line}"));
    assert_eq!(of, deb_bytes.len().to_string(), "{line}");
    assert!(got.parse::<usize>().is_ok_and(|n| n <= cut), "{line}");
    let cut_short: Vec<Proxied> = fx
        .proxy
        .since(mark)
        .into_iter()
        .filter(|r| is_deb(r, "1.1"))
        .collect();
    assert_eq!(cut_short.len(), 1, "{cut_short:#?}");
    assert_eq!(cut_short[0].body_bytes, cut);
    assert_eq!(cut_short[0].declared_bytes, Some(deb_bytes.len()));
    assert_unmoved(&node, &before, "1.0");

    // The next cycle fetches the whole file again and installs it.
    let mark = fx.proxy.mark();
    let out = node.once();
    assert_ok(&out);
    assert_eq!(node.installed("myapp").as_deref(), Some("1.1"));
    let fetched: Vec<Proxied> = fx
        .proxy
        .since(mark)
        .into_iter()
        .filter(|r| is_deb(r, "1.1"))
        .collect();
    assert_eq!(fetched.len(), 1, "{fetched:#?}");
    assert_eq!(fetched[0].range, None, "resumed with a Range request");
    assert_eq!(fetched[0].body_bytes, deb_bytes.len());
    let cached = node.dir.path().join("cache/pulldeploy/myapp_1.1_amd64.deb");
    let cached_bytes = std::fs::read(&cached).expect("the .deb is in the cache");
    assert_eq!(sha256_hex(&cached_bytes), sha256_hex(&deb_bytes));
    assert_eq!(
        node.state().installed["myapp"].sha256.as_deref(),
        Some(sha256_hex(&deb_bytes).as_str())
    );
}

/// Nothing published since the last poll: one conditional request
/// answered 304, nothing else fetched, in `once` and across daemon cycles
/// (which also must not ask IMDS again: credentials are cached).
#[test]
fn no_change_poll() {
    let fx = Fixture::new(Behaviour::default());
    let (node, before) = fx.node_with("1.0");
    let etag = before
        .release
        .as_ref()
        .and_then(|r| r.etag.clone())
        .expect("an ETag was recorded");

    let mark = fx.proxy.mark();
    let out = node.once();
    assert_ok(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "unchanged");
    let seen = fx.proxy.since(mark);
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(is_inrelease(&seen[0]), "{seen:#?}");
    assert_eq!(seen[0].if_none_match.as_deref(), Some(etag.as_str()));
    assert_eq!(seen[0].status, Some(304));
    assert_eq!(node.state().release, before.release);
    assert_eq!(node.state().installed, before.installed);

    // The daemon: every poll is that one request; IMDS is asked once.
    let imds_mark = fx.imds.log().len();
    let mark = fx.proxy.mark();
    let daemon = Daemon::start(&node);
    daemon.wait_until("four polls", Duration::from_secs(20), |_| {
        fx.proxy.since(mark).len() >= 4
    });
    daemon.stop();
    let seen = fx.proxy.since(mark);
    assert!(
        seen.iter().all(|r| is_inrelease(r)
            && r.status == Some(304)
            && r.if_none_match.as_deref() == Some(etag.as_str())),
        "{seen:#?}"
    );
    let asked: Vec<Request> = imds_since(&fx.imds, imds_mark)
        .into_iter()
        .filter(Request::is_credentials_get)
        .collect();
    assert_eq!(asked.len(), 1, "credentials fetched per poll: {asked:#?}");
    assert_eq!(node.state().release, before.release);
    assert_eq!(node.state().installed, before.installed);
    assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
}

/// A server that sends one byte a second (integrity and size).
/// The cycle's overall deadline (`agent.cycle_timeout`) ends it; nothing
/// moves, and the next cycle, against a healthy server, installs.
#[test]
fn slow_trickle() {
    let fx = Fixture::new(Behaviour::default());
    let (node, before) = fx.node_with("1.0");
    let config = std::fs::read_to_string(&node.config).expect("read config");
    std::fs::write(
        &node.config,
        config.replacen("[agent]\n", "[agent]\ncycle_timeout = \"3s\"\n", 1),
    )
    .expect("write config");
    fx.publish(&DebSpec::new("myapp", "1.1"));
    fx.proxy.inject(
        "myapp_1.1",
        Fault::Trickle {
            every: Duration::from_secs(1),
        },
        None,
    );

    let started = std::time::Instant::now();
    let out = node.once();
    let elapsed = started.elapsed();

    assert_failed(&out, EX_UNAVAILABLE, &["deadline", "3s"]);
    assert!(
        elapsed < Duration::from_secs(10),
        "the deadline did not bound the cycle: {elapsed:?}"
    );
    assert_unmoved(&node, &before, "1.0");

    fx.proxy.clear();
    let out = node.once();
    assert_ok(&out);
    assert_eq!(node.installed("myapp").as_deref(), Some("1.1"));
}

/// Bytes behind each endless object below: far more than any cap.
const ENDLESS_BYTES: usize = 64 << 20;

/// The S3 key, under the published prefix, that ends with `suffix`.
fn object_key(fx: &Fixture, suffix: &str) -> String {
    let keys = fx.moto.list_keys(BUCKET, PREFIX);
    keys.iter()
        .find(|k| k.ends_with(suffix))
        .unwrap_or_else(|| panic!("no key ends with {suffix}: {keys:?}"))
        .clone()
}

/// The one request after `mark` that `matches`, once the proxy stopped
/// sending its body (all of it, or the agent closed the connection).
#[track_caller]
fn finished_request(
    proxy: &FaultyProxy,
    mark: usize,
    matches: impl Fn(&Proxied) -> bool,
) -> Proxied {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: Vec<Proxied> = proxy.since(mark).into_iter().filter(&matches).collect();
        assert!(seen.len() <= 1, "asked more than once: {seen:#?}");
        if let Some(request) = seen.into_iter().next().filter(|r| r.written.is_some()) {
            return request;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not finish the request: {:#?}",
            proxy.since(mark)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that the agent took only a small part of an endless body of
/// `total` bytes: reading stopped near the cap and the connection was
/// closed, rather than the whole body being read and refused afterwards.
#[track_caller]
fn assert_stopped_early(request: &Proxied, total: usize) {
    assert_eq!(request.status, Some(200), "{request:#?}");
    assert_eq!(request.declared_bytes, Some(total), "{request:#?}");
    let written = request.written.unwrap_or(total);
    eprintln!(
        "{}: the proxy sent {written} of {total} bytes",
        request.key_path()
    );
    assert!(
        written < total / 4,
        "the agent read {written} of {total} bytes of {}; it should stop at the cap",
        request.key_path()
    );
}

/// A .deb object far longer than the Size its signed index declares (some
/// 11 KiB declared, 64 MiB served): the download stops at Size + 1 bytes
/// and the connection is dropped, so the server sends a small part of the
/// object (the agent does not read it all and refuse it afterwards), and
/// nothing is kept or installed.
#[test]
fn endless_deb_stops_at_size_plus_one() {
    let fx = Fixture::new(Behaviour::default());
    let (node, before) = fx.node_with("1.0");
    let deb = fx.publish(&DebSpec {
        payload_bytes: 10 * 1024,
        ..DebSpec::new("myapp", "1.1")
    });
    let mut endless = std::fs::read(&deb).expect("read the .deb");
    let declared = endless.len();
    endless.resize(ENDLESS_BYTES, 0);
    fx.moto
        .put_object(BUCKET, &object_key(&fx, "/myapp_1.1_amd64.deb"), &endless);
    let mark = fx.proxy.mark();

    let out = node.once();

    assert_stopped_early(
        &finished_request(&fx.proxy, mark, |r| is_deb(r, "1.1")),
        ENDLESS_BYTES,
    );
    assert_failed(
        &out,
        65,
        &[
            "myapp_1.1_amd64.deb",
            &format!("longer than the declared {declared} bytes"),
        ],
    );
    assert_unmoved(&node, &before, "1.0");
}

/// A validly signed InRelease padded far past `repository.max_release_bytes`
/// (64 KiB allowed, 64 MiB served): reading stops at the cap and the
/// connection is dropped, so the server sends a small part of it. Read
/// whole, it would verify and install 1.1.
#[test]
fn endless_inrelease_stops_at_the_cap() {
    let fx = Fixture::new(Behaviour::default());
    let (node, before) = fx.node_with("1.0");
    let config = std::fs::read_to_string(&node.config).expect("read config");
    std::fs::write(
        &node.config,
        config.replacen(
            "[repository]\n",
            "[repository]\nmax_release_bytes = 65536\n",
            1,
        ),
    )
    .expect("write config");
    fx.publish(&DebSpec::new("myapp", "1.1"));
    let release = fx
        .moto
        .get_object(BUCKET, &format!("{PREFIX}/dists/production/Release"))
        .expect("the published Release");
    let line = format!(" {}\n", "p".repeat(1023));
    let mut padded = String::from_utf8(release).expect("Release is text");
    padded.push_str("X-Padding: endless\n");
    while padded.len() < ENDLESS_BYTES {
        padded.push_str(&line);
    }
    let endless = fx.key.clearsign(padded.as_bytes());
    fx.moto.put_object(
        BUCKET,
        &format!("{PREFIX}/dists/production/InRelease"),
        &endless,
    );
    let mark = fx.proxy.mark();

    let out = node.once();

    assert_stopped_early(
        &finished_request(&fx.proxy, mark, is_inrelease),
        endless.len(),
    );
    assert_failed(
        &out,
        65,
        &["InRelease", "larger than the limit of 65536 bytes"],
    );
    assert_unmoved(&node, &before, "1.0");
}
