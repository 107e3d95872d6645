//! The verified pull loop end to end: aptly publishing to moto's S3 with
//! credentials from an IMDSv2 emulator, reprepro over file://, real dpkg in
//! a sandbox root, and the two rejections every cycle must make.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod aptly;
    pub mod cmd;
    pub mod deb;
    pub mod dpkg;
    pub mod gpg;
    pub mod http;
    pub mod imds;
    pub mod moto;
    pub mod node;
    pub mod reprepro;
}

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::aptly::Aptly;
use common::deb::{DebSpec, build_deb};
use common::gpg::GpgKey;
use common::imds::{Behaviour, Imds};
use common::moto::Moto;
use common::node::{Node, failure};
use common::reprepro::Reprepro;

const BUCKET: &str = "acme-apt";

struct S3Repo {
    moto: Moto,
    key: GpgKey,
    aptly: Aptly,
    imds: Imds,
    debs: tempfile::TempDir,
}

impl S3Repo {
    fn new() -> S3Repo {
        let moto = Moto::start();
        moto.create_bucket(BUCKET);
        let key = GpgKey::generate("Acme Repository <repo@acme.test>");
        let aptly = Aptly::new(&moto, BUCKET, "repo", &key);
        S3Repo {
            moto,
            key,
            aptly,
            imds: Imds::start(Behaviour::default()),
            debs: tempfile::tempdir().expect("debs tempdir"),
        }
    }

    fn deb(&self, spec: &DebSpec) -> PathBuf {
        build_deb(self.debs.path(), spec)
    }

    fn publish(&self, spec: &DebSpec) {
        let deb = self.deb(spec);
        self.aptly.publish("production", &[deb]);
    }

    /// A node reading this bucket with credentials only from the IMDS emulator.
    fn node(&self, packages: &[&str]) -> Node {
        let repository = format!(
            "url = \"s3://{BUCKET}/repo\"\nendpoint = {:?}\nregion = \"us-east-1\"",
            self.moto.endpoint
        );
        let node = Node::new(&repository, &self.key.public_key, packages, "");
        let env = self.imds.env(&node.home());
        node.with_env(env)
    }
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn assert_ok(output: &std::process::Output) {
    assert!(
        output.status.success(),
        "pulldeploy failed: {:?}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn s3_fresh_install_unchanged_poll_and_upgrade_with_imds_credentials() {
    let repo = S3Repo::new();
    repo.publish(&DebSpec::new("myapp", "1.0-1"));
    let node = repo.node(&["myapp"]);

    // Fresh node: credentials come from IMDSv2 (token first), then S3.
    let out = node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 1.0-1");
    assert_eq!(node.installed("myapp").as_deref(), Some("1.0-1"));
    let imds_requests = repo.imds.requests();
    assert_eq!(
        imds_requests.first().map(String::as_str),
        Some("PUT /latest/api/token")
    );
    assert!(
        imds_requests
            .iter()
            .any(|r| r == "GET /latest/meta-data/iam/security-credentials/pulldeploy-node"),
        "{imds_requests:?}"
    );
    let state = node.state();
    assert_eq!(state.installed["myapp"].version, "1.0-1");
    let accepted = state.release.clone().expect("release accepted");
    assert_eq!(accepted.file, "InRelease");
    assert_eq!(accepted.signer, repo.key.fingerprint.to_uppercase());
    assert!(accepted.etag.is_some());

    // Nothing published: exactly one conditional request, answered 304.
    let mark = repo.moto.request_count();
    let out = node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "unchanged");
    let requests = repo.moto.requests_since(mark);
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(
        requests[0].starts_with("GET /acme-apt/repo/dists/production/InRelease")
            && requests[0].ends_with(" 304"),
        "{requests:?}"
    );
    assert_eq!(
        node.state().release,
        state.release,
        "a 304 must not move the accepted release"
    );

    // A new version is published: upgrade, state follows.
    repo.publish(&DebSpec::new("myapp", "1.1-1"));
    let out = node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 1.1-1");
    assert_eq!(node.installed("myapp").as_deref(), Some("1.1-1"));
    let upgraded = node.state();
    assert_eq!(upgraded.installed["myapp"].version, "1.1-1");
    assert!(upgraded.release.as_ref().map(|r| r.date) >= state.release.as_ref().map(|r| r.date));
    assert_ne!(
        upgraded.release.as_ref().and_then(|r| r.etag.clone()),
        accepted.etag
    );
    // The cache keeps the current .deb and the one it replaced, nothing else.
    let debs: Vec<String> = node
        .cache_files()
        .into_iter()
        .filter(|f| f.ends_with(".deb"))
        .collect();
    assert_eq!(debs, ["myapp_1.0-1_amd64.deb", "myapp_1.1-1_amd64.deb"]);
}

#[test]
fn file_repository_made_by_reprepro() {
    let key = GpgKey::generate("Local Repository <local@acme.test>");
    let repo = Reprepro::new(&key, "production");
    let debs = tempfile::tempdir().expect("tempdir");
    repo.include(&build_deb(debs.path(), &DebSpec::new("myapp", "2.0")));
    let node = Node::new(
        &format!("url = {:?}", repo.url()),
        &key.public_key,
        &["myapp"],
        "",
    );

    let out = node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 2.0");
    assert_eq!(node.installed("myapp").as_deref(), Some("2.0"));

    let out = node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "unchanged");

    // The package removed behind the agent's back: a poll notices even
    // though the repository did not change, and reinstalls.
    common::cmd::assert_success(
        &node
            .root
            .dpkg()
            .args(["--purge", "myapp"])
            .output()
            .expect("dpkg --purge"),
        "dpkg --purge",
    );
    let out = node.once();
    assert_ok(&out);
    assert_eq!(stdout(&out), "installed myapp 2.0");
    assert_eq!(node.installed("myapp").as_deref(), Some("2.0"));
}

#[test]
fn tampered_packages_index_is_rejected_and_nothing_moves() {
    let repo = S3Repo::new();
    repo.publish(&DebSpec::new("myapp", "1.0"));
    let node = repo.node(&["myapp"]);
    assert_ok(&node.once());
    let before = node.state();

    // Publish 1.1, then swap in a Packages.gz that points 1.1 at other bytes.
    repo.publish(&DebSpec::new("myapp", "1.1"));
    let evil = repo.deb(&DebSpec {
        payload_bytes: 100,
        ..DebSpec::new("myapp", "1.1")
    });
    let evil_bytes = std::fs::read(&evil).expect("read evil deb");
    let key = "repo/dists/production/main/binary-amd64/Packages";
    let packages =
        String::from_utf8(repo.moto.get_object(BUCKET, key).expect("Packages")).expect("utf8");
    let real_sha = packages
        .lines()
        .find_map(|l| l.strip_prefix("SHA256: "))
        .expect("SHA256 line")
        .to_string();
    let tampered = gzip(
        packages
            .replace(&real_sha, &sha256_hex(&evil_bytes))
            .as_bytes(),
    );
    let declared = repo
        .moto
        .get_object(BUCKET, &format!("{key}.gz"))
        .expect("Packages.gz")
        .len();
    repo.moto
        .put_object(BUCKET, &format!("{key}.gz"), &tampered);

    // Which check catches it depends on how well the new hash compresses:
    // the stream is cut one byte past the declared size, a short one fails
    // the size check, one of the same size fails the SHA256 check.
    let expected = match tampered.len().cmp(&declared) {
        std::cmp::Ordering::Greater => format!("longer than the declared {declared} bytes"),
        std::cmp::Ordering::Less => format!("size mismatch: expected {declared} bytes"),
        std::cmp::Ordering::Equal => "SHA256 mismatch".to_string(),
    };
    let out = node.once();
    let (code, line) = failure(&out);
    assert_eq!(code, Some(65), "{line}");
    assert!(
        line.contains("Packages.gz") && line.contains(&expected),
        "expected {expected:?} in: {line}"
    );
    assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));
    let after = node.state();
    assert_eq!(after.release, before.release);
    assert_eq!(after.installed, before.installed);
    assert!(after.last_error.is_some());
}

#[test]
fn release_signed_by_unpinned_key_is_rejected() {
    let signer = GpgKey::generate("Intruder <intruder@evil.test>");
    let pinned = GpgKey::generate("Acme Repository <repo@acme.test>");
    let repo = Reprepro::new(&signer, "production");
    let debs = tempfile::tempdir().expect("tempdir");
    repo.include(&build_deb(debs.path(), &DebSpec::new("myapp", "6.6.6")));
    let node = Node::new(
        &format!("url = {:?}", repo.url()),
        &pinned.public_key,
        &["myapp"],
        "",
    );

    let out = node.once();
    let (code, line) = failure(&out);
    assert_eq!(code, Some(65), "{line}");
    assert!(line.contains("not in the keyring"), "{line}");
    assert!(
        line.to_uppercase()
            .contains(&signer.fingerprint.to_uppercase()),
        "{line}"
    );
    assert_eq!(node.installed("myapp"), None);
    let state = node.state();
    assert_eq!(state.release, None);
    assert!(state.installed.is_empty());
    assert!(node.cache_files().iter().all(|f| !f.ends_with(".deb")));
}

/// An app health endpoint whose answer the test flips.
struct App {
    url: String,
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl App {
    fn start() -> App {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind app");
        let url = format!("http://{}/health", listener.local_addr().expect("app addr"));
        let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = healthy.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buffer = [0u8; 1024];
                let _ = stream.read(&mut buffer);
                let status = if flag.load(Ordering::SeqCst) {
                    "200 OK"
                } else {
                    "500 Internal Server Error"
                };
                let _ = stream.write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        App { url, healthy }
    }
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("health port");
    let response = common::http::http_request(port, "GET", path, &[], &[]);
    (response.status, response.text())
}

#[test]
fn daemon_serves_healthz_upgrades_and_finishes_install_on_sigterm() {
    let repo = S3Repo::new();
    repo.publish(&DebSpec::new("myapp", "1.0"));
    let app = App::start();
    let repository = format!(
        "url = \"s3://{BUCKET}/repo\"\nendpoint = {:?}\nregion = \"us-east-1\"",
        repo.moto.endpoint
    );
    let node = Node::new(
        &repository,
        &repo.key.public_key,
        &["myapp"],
        &format!("check_url = {:?}\n", app.url),
    );
    let env = repo.imds.env(&node.home());
    let node = node.with_env(env);
    let mut child = node.spawn_run();
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut log = Vec::new();
    let mut wait_for = |needle: &str, limit: Duration| -> String {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) {
                log.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
        }
        panic!("no {needle:?} in the daemon's log:\n{}", log.join("\n"));
    };
    let line = wait_for("serving /healthz", Duration::from_secs(10));
    let addr = line
        .split("addr=")
        .nth(1)
        .expect("addr field")
        .trim()
        .to_string();

    // Not installed yet, or the app not healthy yet: not ready.
    let (status, body) = get(&addr, "/healthz");
    assert_eq!(status, 503, "{body}");
    app.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_for(
        "installed and healthy package=myapp",
        Duration::from_secs(20),
    );
    let (status, body) = get(&addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&app.url) && body.contains("\"myapp\": \"1.0\""),
        "{body}"
    );
    // The app turns sick: the node leaves the load balancer.
    app.healthy
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = get(&addr, "/healthz");
    assert_eq!(status, 503, "{body}");
    app.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(&addr, "/healthz").0, 200);
    assert_eq!(get(&addr, "/other").0, 404);

    // A new version whose postinst takes a while; SIGTERM lands mid-dpkg.
    let marker = node.root.path.join("postinst-started");
    repo.publish(&DebSpec {
        postinst: Some("touch \"$DPKG_ROOT/postinst-started\"\nsleep 2"),
        ..DebSpec::new("myapp", "1.1")
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the daemon never started installing 1.1"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().expect("wait for the daemon");
    assert!(status.success(), "daemon exit: {status:?}");
    assert_eq!(node.installed("myapp").as_deref(), Some("1.1"));
    assert_eq!(
        node.state().installed["myapp"].version,
        "1.1",
        "the started install was committed"
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}
