//! The repository side end to end: `pulldeploy publish`, `promote` and
//! `refresh` writing to a local directory and to moto's S3, read by the real
//! apt-get (sandboxed, `signed-by`) and by the agent; a publish racing
//! polls; publishers racing each other; the store's conditional writes.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod apt;
    pub mod cmd;
    pub mod deb;
    pub mod dpkg;
    pub mod gpg;
    pub mod http;
    pub mod moto;
    pub mod node;
}

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::apt::AptSandbox;
use common::cmd::host_path;
use common::deb::{DebSpec, build_deb};
use common::dpkg::SandboxRoot;
use common::gpg::GpgKey;
use common::moto::{Moto, static_aws_env};
use common::node::{Node, failure};
use pulldeploy::keyring::Keyring;
use pulldeploy::publish::store::{Body, Condition, DirStore, S3Store, Store, Written};
use pulldeploy::repo::packages::read_candidates;
use pulldeploy::repo::release;
use sha2::Digest;

const BUCKET: &str = "acme-apt";
const SUITE: &str = "production";

/// Where a test publishes: a directory or a moto bucket (prefix `repo`).
enum Backend {
    Dir(tempfile::TempDir),
    S3(Moto),
}

struct Repo {
    backend: Backend,
    key: GpgKey,
    debs: tempfile::TempDir,
    home: tempfile::TempDir,
}

impl Repo {
    fn dir() -> Repo {
        Repo::with(Backend::Dir(
            tempfile::Builder::new()
                .prefix("pd-pub-")
                .tempdir()
                .expect("repo dir"),
        ))
    }

    fn s3() -> Repo {
        let moto = Moto::start();
        moto.create_bucket(BUCKET);
        moto.allow_anonymous_read(BUCKET);
        Repo::with(Backend::S3(moto))
    }

    fn with(backend: Backend) -> Repo {
        Repo {
            backend,
            key: GpgKey::generate("Acme Repository <repo@acme.test>"),
            debs: tempfile::tempdir().expect("debs dir"),
            home: tempfile::tempdir().expect("home dir"),
        }
    }

    fn url(&self) -> String {
        match &self.backend {
            Backend::Dir(dir) => format!("file://{}", dir.path().display()),
            Backend::S3(_) => format!("s3://{BUCKET}/repo"),
        }
    }

    /// The URL apt-get reads: file:// or moto path-style over http.
    fn apt_url(&self) -> String {
        match &self.backend {
            Backend::Dir(_) => self.url(),
            Backend::S3(moto) => format!("{}/{BUCKET}/repo", moto.endpoint),
        }
    }

    /// `[repository]` lines for an agent's config.
    fn node_repository(&self) -> String {
        match &self.backend {
            Backend::Dir(_) => format!("url = {:?}", self.url()),
            Backend::S3(moto) => format!(
                "url = {:?}\nendpoint = {:?}\nregion = \"us-east-1\"",
                self.url(),
                moto.endpoint
            ),
        }
    }

    fn node(&self, packages: &[&str]) -> Node {
        let node = Node::new(&self.node_repository(), &self.key.public_key, packages, "");
        node.with_env(static_aws_env())
    }

    fn deb(&self, spec: &DebSpec) -> PathBuf {
        let dir = self
            .debs
            .path()
            .join(format!("{}-{}", spec.name, rand_suffix()));
        build_deb(&dir, spec)
    }

    /// `pulldeploy SUBCOMMAND --repo … --signing-key …` plus `args`.
    fn command(&self, subcommand: &str, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pulldeploy"));
        command
            .env_clear()
            .env("PATH", host_path())
            .env("HOME", self.home.path())
            .env("PULLDEPLOY_LOG", "info")
            .envs(static_aws_env())
            .arg(subcommand)
            .args(["--repo", &self.url()])
            .arg("--signing-key")
            .arg(&self.key.secret_key);
        if let Backend::S3(moto) = &self.backend {
            command.args(["--endpoint", &moto.endpoint, "--region", "us-east-1"]);
        }
        command.args(args).stdin(Stdio::null());
        command
    }

    fn publish(&self, suite: &str, debs: &[&Path], extra: &[&str]) -> Output {
        let mut command = self.command("publish", &["--suite", suite]);
        command.args(extra).args(debs);
        command.output().expect("run pulldeploy publish")
    }

    fn publish_ok(&self, suite: &str, debs: &[&Path], extra: &[&str]) -> String {
        let out = self.publish(suite, debs, extra);
        assert_ok(&out, "publish");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The object at `path` (relative to the repository root), if any.
    fn read(&self, path: &str) -> Option<Vec<u8>> {
        match &self.backend {
            Backend::Dir(dir) => std::fs::read(dir.path().join(path)).ok(),
            Backend::S3(moto) => moto.get_object(BUCKET, &format!("repo/{path}")),
        }
    }

    fn write(&self, path: &str, bytes: &[u8]) {
        match &self.backend {
            Backend::Dir(dir) => {
                let full = dir.path().join(path);
                std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
                std::fs::write(full, bytes).expect("write");
            }
            Backend::S3(moto) => moto.put_object(BUCKET, &format!("repo/{path}"), bytes),
        }
    }

    fn text(&self, path: &str) -> String {
        String::from_utf8(self.read(path).unwrap_or_else(|| panic!("{path} missing")))
            .expect("UTF-8")
    }

    fn keyring(&self) -> Keyring {
        Keyring::load(&self.key.public_key).expect("keyring")
    }

    fn apt(&self, root: &SandboxRoot, suite: &str) -> AptSandbox {
        AptSandbox::new(root, &self.apt_url(), suite, &self.key.public_key)
    }
}

fn rand_suffix() -> String {
    hex::encode(common::cmd::random_bytes(4))
}

#[track_caller]
fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// apt-get update must succeed without a warning or an error line.
#[track_caller]
fn apt_update(apt: &AptSandbox) {
    let out = apt.update();
    assert_ok(&out, "apt-get update");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.lines()
            .any(|l| l.starts_with("W:") || l.starts_with("E:")),
        "apt-get update complained:\n{all}"
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// One poll as an agent makes it, in process: InRelease verified, the
/// Packages index by hash checked against Release, the newest `package`
/// .deb checked against Packages. Returns the newest version, or why the
/// view is not one an agent would install from.
fn poll_view(repo: &Repo, keyring: &Keyring, suite: &str, package: &str) -> Result<String, String> {
    let inrelease = repo
        .read(&format!("dists/{suite}/InRelease"))
        .ok_or("no InRelease")?;
    let verified = keyring
        .verify_cleartext(
            "InRelease",
            &inrelease,
            SystemTime::now(),
            std::time::Duration::ZERO,
        )
        .map_err(|e| e.to_string())?;
    let release = release::parse(&verified.text)?;
    if !release.acquire_by_hash {
        return Err("no Acquire-By-Hash".into());
    }
    let index = release
        .packages_index("main", "amd64")
        .ok_or("no Packages index")?;
    let bytes = repo
        .read(&format!("dists/{suite}/{}", index.by_hash_path()))
        .ok_or_else(|| format!("{} missing", index.by_hash_path()))?;
    if sha256_hex(&bytes) != index.expected.sha256 || bytes.len() as u64 != index.expected.size {
        return Err(format!("{}: hash or size mismatch", index.by_hash_path()));
    }
    let mut text = Vec::new();
    xz2::read::XzDecoder::new(&bytes[..])
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    let candidates =
        read_candidates(&text[..], &[package], "amd64").map_err(|e| format!("{e:?}"))?;
    let newest = candidates
        .iter()
        .max_by(|a, b| a.version.cmp(&b.version))
        .ok_or("package not in the index")?;
    let deb = repo
        .read(&newest.filename)
        .ok_or_else(|| format!("{} missing", newest.filename))?;
    if sha256_hex(&deb) != newest.expected.sha256 || deb.len() as u64 != newest.expected.size {
        return Err(format!("{}: hash or size mismatch", newest.filename));
    }
    Ok(newest.version.to_string())
}

/// Every package name in the suite's amd64 Packages (read as an agent does).
fn package_names(repo: &Repo, suite: &str) -> BTreeSet<String> {
    let text = repo.text(&format!("dists/{suite}/main/binary-amd64/Packages"));
    text.lines()
        .filter_map(|l| l.strip_prefix("Package: "))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------
// publish, read by apt-get and the agent
// ---------------------------------------------------------------------------

fn publish_then_apt_and_agent_install(repo: Repo) {
    // apt revalidates with If-Modified-Since: on S3, each publish below
    // (however soon after the last) must move Last-Modified forward, or
    // apt-get update keeps the previous suite.
    let mut stamps = None;
    let mut newer = |what: &str| {
        if matches!(repo.backend, Backend::S3(_)) {
            check_newer(&repo, SUITE, &mut stamps, what);
        }
    };
    let v1 = repo.deb(&DebSpec {
        payload_bytes: 50_000,
        ..DebSpec::new("myapp", "1.0-1")
    });
    let out = repo.publish_ok(SUITE, &[&v1], &["--valid-for", "7d"]);
    assert!(out.contains("added myapp 1.0-1 (amd64)"), "{out}");
    newer("publish 1.0-1");

    // The layout a reader relies on.
    let release = repo.text(&format!("dists/{SUITE}/Release"));
    for needed in [
        "Acquire-By-Hash: yes",
        "Valid-Until: ",
        "SHA256:",
        "SHA512:",
        "Suite: production",
    ] {
        assert!(release.contains(needed), "{needed} missing:\n{release}");
    }
    assert!(
        !release.contains("MD5Sum") && !release.contains("SHA1:"),
        "{release}"
    );
    let parsed = release::parse(&release).expect("agent parses Release");
    let index = parsed.packages_index("main", "amd64").expect("index");
    assert!(
        repo.read(&format!("dists/{SUITE}/{}", index.by_hash_path()))
            .is_some()
    );
    assert_eq!(
        poll_view(&repo, &repo.keyring(), SUITE, "myapp"),
        Ok("1.0-1".into())
    );

    // apt-get, the reference client.
    let root = SandboxRoot::new();
    let apt = repo.apt(&root, SUITE);
    apt_update(&apt);
    assert_ok(&apt.install("myapp"), "apt-get install");
    assert_eq!(root.installed_version("myapp").as_deref(), Some("1.0-1"));

    // The agent.
    let node = repo.node(&["myapp"]);
    let out = node.once();
    assert_ok(&out, "pulldeploy once");
    assert_eq!(node.installed("myapp").as_deref(), Some("1.0-1"));

    // A second version: the first is kept (no --keep), both upgrade.
    let v2 = repo.deb(&DebSpec::new("myapp", "1.1-1"));
    repo.publish_ok(SUITE, &[&v2], &[]);
    newer("publish 1.1-1");
    let packages = repo.text(&format!("dists/{SUITE}/main/binary-amd64/Packages"));
    assert!(packages.contains("Version: 1.0-1") && packages.contains("Version: 1.1-1"));
    let second = release::parse(&repo.text(&format!("dists/{SUITE}/Release"))).expect("parse");
    assert_eq!(
        second.valid_until.map(|v| v - second.date),
        Some(chrono::Duration::days(7)),
        "a publish without --valid-for keeps the suite's validity period"
    );
    apt_update(&apt);
    assert_ok(&apt.install("myapp"), "apt-get install (upgrade)");
    assert_eq!(root.installed_version("myapp").as_deref(), Some("1.1-1"));
    let downgrade = common::cmd::output_with_input(
        apt.command("apt-get")
            .args(["-q", "-y", "--allow-downgrades", "install", "myapp=1.0-1"]),
        &[],
        "apt-get install myapp=1.0-1",
    );
    assert_ok(&downgrade, "apt-get install myapp=1.0-1 (the kept version)");
    assert_eq!(root.installed_version("myapp").as_deref(), Some("1.0-1"));
    assert_ok(&node.once(), "pulldeploy once (upgrade)");
    assert_eq!(node.installed("myapp").as_deref(), Some("1.1-1"));

    // Publishing the same bytes again changes no package.
    let out = repo.publish_ok(SUITE, &[&v2], &[]);
    assert!(out.contains("already in production"), "{out}");
    newer("publish 1.1-1 again");

    // --keep 1 drops the old version from the index (its pool file stays).
    let v3 = repo.deb(&DebSpec::new("myapp", "1.2-1"));
    let out = repo.publish_ok(SUITE, &[&v3], &["--keep", "1"]);
    assert!(
        out.contains("dropped myapp 1.0-1") && out.contains("dropped myapp 1.1-1"),
        "{out}"
    );
    newer("publish 1.2-1");
    let packages = repo.text(&format!("dists/{SUITE}/main/binary-amd64/Packages"));
    assert!(!packages.contains("Version: 1.0-1") && packages.contains("Version: 1.2-1"));
    assert!(
        repo.read("pool/main/m/myapp/myapp_1.0-1_amd64.deb")
            .is_some()
    );
    apt_update(&apt);
    assert_ok(&apt.install("myapp"), "apt-get install 1.2-1");
    assert_eq!(root.installed_version("myapp").as_deref(), Some("1.2-1"));
    assert_ok(&node.once(), "pulldeploy once 1.2-1");
    assert_eq!(node.installed("myapp").as_deref(), Some("1.2-1"));

    // Old by-hash generations are pruned; the previous one stays.
    let by_hash_dir = format!("dists/{SUITE}/main/binary-amd64/by-hash/SHA256/");
    let count = match &repo.backend {
        Backend::Dir(dir) => std::fs::read_dir(dir.path().join(&by_hash_dir))
            .map(|d| d.count())
            .unwrap_or(0),
        Backend::S3(moto) => moto.list_keys(BUCKET, &format!("repo/{by_hash_dir}")).len(),
    };
    assert!(count <= 6, "{count} by-hash SHA256 files: not pruned");
}

#[test]
fn dir_publish_is_installed_by_apt_get_and_the_agent() {
    publish_then_apt_and_agent_install(Repo::dir());
}

#[test]
fn s3_publish_is_installed_by_apt_get_and_the_agent() {
    publish_then_apt_and_agent_install(Repo::s3());
}

/// A .deb built with `dpkg-deb -Z<compression>` (control and data members).
fn deb_compressed(dir: &Path, name: &str, version: &str, arch: &str, compression: &str) -> PathBuf {
    let tree = dir.join(format!("tree-{name}"));
    std::fs::create_dir_all(tree.join("DEBIAN")).expect("mkdir");
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: t <t@example.invalid>\nDescription: {compression} test\n long text\n .\n more\n"
        ),
    )
    .expect("control");
    let deb = dir.join(format!("{name}_{version}_{arch}.deb"));
    common::cmd::run(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group", &format!("-Z{compression}")])
            .arg(&tree)
            .arg(&deb),
        "dpkg-deb --build",
    );
    deb
}

#[test]
fn control_members_in_gzip_xz_zstd_and_arch_all() {
    let repo = Repo::dir();
    let dir = repo.debs.path().to_path_buf();
    let gz = deb_compressed(&dir, "app-gz", "1.0", "amd64", "gzip");
    let xz = deb_compressed(&dir, "app-xz", "1:2.0~rc1", "amd64", "xz");
    let zst = deb_compressed(&dir, "app-zst", "3.0+b1", "amd64", "zstd");
    let all = deb_compressed(&dir, "app-all", "1.0", "all", "xz");
    let out = repo.publish_ok(SUITE, &[&gz, &xz, &zst, &all], &[]);
    assert!(out.contains("app-zst 3.0+b1"), "{out}");
    assert_eq!(
        package_names(&repo, SUITE),
        ["app-all", "app-gz", "app-xz", "app-zst"]
            .map(String::from)
            .into()
    );
    let root = SandboxRoot::new();
    let apt = repo.apt(&root, SUITE);
    apt_update(&apt);
    for package in ["app-gz", "app-xz", "app-zst", "app-all"] {
        assert_ok(&apt.install(package), package);
    }
    assert_eq!(
        root.installed_version("app-xz").as_deref(),
        Some("1:2.0~rc1")
    );
    // The description round-trips byte for byte (multi-line, with " .").
    let shown = common::cmd::run(
        apt.command("apt-cache").args(["show", "app-gz"]),
        "apt-cache show",
    );
    assert!(
        String::from_utf8_lossy(&shown.stdout)
            .contains("Description: gzip test\n long text\n .\n more"),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );

    // Only Architecture: all packages: the suite needs an architecture.
    let lonely = Repo::dir();
    let all = deb_compressed(lonely.debs.path(), "only-all", "1", "all", "gzip");
    let (code, line) = failure(&lonely.publish(SUITE, &[&all], &[]));
    assert_eq!(code, Some(64), "{line}");
    assert!(line.contains("--architecture"), "{line}");
    lonely.publish_ok(SUITE, &[&all], &["--architecture", "amd64"]);
    assert_eq!(
        package_names(&lonely, SUITE),
        ["only-all".to_string()].into()
    );
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

#[test]
fn not_a_debian_package_is_refused_and_nothing_is_written() {
    let repo = Repo::dir();
    let fake = repo.debs.path().join("evil.deb");
    std::fs::write(&fake, "#!/bin/sh\nrm -rf /\n").expect("write");
    let (code, line) = failure(&repo.publish(SUITE, &[&fake], &[]));
    assert_eq!(code, Some(65), "{line}");
    assert!(
        line.contains("evil.deb is not a valid Debian package") && line.contains("ar archive"),
        "{line}"
    );
    assert!(repo.read(&format!("dists/{SUITE}/InRelease")).is_none());

    let missing = repo.debs.path().join("missing.deb");
    let (code, line) = failure(&repo.publish(SUITE, &[&missing], &[]));
    assert_eq!(code, Some(74), "{line}");
    assert!(line.contains("missing.deb"), "{line}");
}

#[test]
fn same_version_with_different_bytes_is_refused_and_the_suite_does_not_move() {
    for repo in [Repo::dir(), Repo::s3()] {
        let first = repo.deb(&DebSpec {
            payload_bytes: 100,
            ..DebSpec::new("myapp", "1.0")
        });
        repo.publish_ok(SUITE, &[&first], &[]);
        let before = repo.read(&format!("dists/{SUITE}/InRelease"));
        let rebuilt = repo.deb(&DebSpec {
            payload_bytes: 100,
            ..DebSpec::new("myapp", "1.0")
        });
        let (code, line) = failure(&repo.publish(SUITE, &[&rebuilt], &[]));
        assert_eq!(code, Some(65), "{line}");
        assert!(
            line.contains("myapp 1.0 (amd64) already exists") && line.contains("different bytes"),
            "{line}"
        );
        assert_eq!(repo.read(&format!("dists/{SUITE}/InRelease")), before);

        // Also across suites: the pool is shared, a version is one set of bytes.
        let (code, line) = failure(&repo.publish("staging", &[&rebuilt], &[]));
        assert_eq!(code, Some(65), "{line}");
        assert!(
            line.contains("pool/main/m/myapp/myapp_1.0_amd64.deb"),
            "{line}"
        );
        assert!(repo.read("dists/staging/InRelease").is_none());
    }
}

#[test]
fn a_secret_key_that_cannot_sign_is_refused() {
    let repo = Repo::dir();
    let deb = repo.deb(&DebSpec::new("myapp", "1.0"));
    // A public key where the secret key belongs.
    let out = Command::new(env!("CARGO_BIN_EXE_pulldeploy"))
        .env_clear()
        .env("PATH", host_path())
        .args([
            "publish",
            "--repo",
            &repo.url(),
            "--suite",
            SUITE,
            "--signing-key",
        ])
        .arg(&repo.key.public_key)
        .arg(&deb)
        .output()
        .expect("run publish");
    let (code, line) = failure(&out);
    assert_eq!(code, Some(64), "{line}");
    assert!(
        line.contains("cannot sign") && line.contains("no secret key material"),
        "{line}"
    );

    // An expired key: made 3 days ago (gpg's faked time), valid for 1 day.
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        - 3 * 86400;
    let home = tempfile::Builder::new()
        .prefix("g")
        .tempdir_in("/tmp")
        .expect("gnupghome");
    std::fs::set_permissions(
        home.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let gpg = |args: &[&str]| {
        let mut command = Command::new("gpg");
        command
            .env("GNUPGHOME", home.path())
            .args([
                "--batch",
                "--no-tty",
                "--yes",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
            ])
            .args(args);
        command
    };
    common::cmd::run(
        &mut gpg(&[
            &format!("--faked-system-time={created}!"),
            "--quick-gen-key",
            "Expired <old@acme.test>",
            "ed25519",
            "sign",
            "1d",
        ]),
        "gpg --quick-gen-key (expired)",
    );
    let secret = common::cmd::run(&mut gpg(&["--armor", "--export-secret-keys"]), "export");
    let secret_file = home.path().join("secret.asc");
    std::fs::write(&secret_file, &secret.stdout).expect("write secret");
    let out = Command::new(env!("CARGO_BIN_EXE_pulldeploy"))
        .env_clear()
        .env("PATH", host_path())
        .args([
            "publish",
            "--repo",
            &repo.url(),
            "--suite",
            SUITE,
            "--signing-key",
        ])
        .arg(&secret_file)
        .arg(&deb)
        .output()
        .expect("run publish");
    let (code, line) = failure(&out);
    assert_eq!(code, Some(64), "{line}");
    assert!(
        line.contains("cannot sign") && line.contains("not alive"),
        "{line}"
    );
    assert!(repo.read(&format!("dists/{SUITE}/InRelease")).is_none());
}

#[test]
fn verify_before_flip_refuses_a_store_serving_wrong_index_bytes() {
    // The Packages bytes depend only on the .deb: publish once elsewhere
    // to learn their by-hash names, then plant garbage there. The
    // publisher's write is If-None-Match (content-addressed), so it keeps
    // the garbage, and only reading back catches it.
    let scratch = Repo::dir();
    let v1 = scratch.deb(&DebSpec::new("myapp", "1.0"));
    let repo = Repo::dir();
    repo.publish_ok(SUITE, &[&v1], &[]);
    let before = repo.read(&format!("dists/{SUITE}/InRelease"));
    let v2 = scratch.deb(&DebSpec::new("myapp", "2.0"));
    // The scratch suite gets the same entries as the real one will: 1.0 then 2.0.
    scratch.publish_ok(SUITE, &[&v1], &[]);
    scratch.publish_ok(SUITE, &[&v2], &[]);
    let release = release::parse(&scratch.text(&format!("dists/{SUITE}/Release"))).expect("parse");
    let index = release.packages_index("main", "amd64").expect("index");
    repo.write(
        &format!("dists/{SUITE}/{}", index.by_hash_path()),
        b"not the index",
    );

    let out = repo.publish(SUITE, &[&v2], &[]);
    let (code, line) = failure(&out);
    assert_eq!(code, Some(65), "{line}");
    assert!(
        line.contains("verify before flip failed, InRelease not written"),
        "{line}"
    );
    assert!(line.contains(&index.by_hash_path()), "{line}");
    assert_eq!(
        repo.read(&format!("dists/{SUITE}/InRelease")),
        before,
        "InRelease moved"
    );
    // An agent still gets a consistent view: the old InRelease and its indexes.
    assert_eq!(
        poll_view(&repo, &repo.keyring(), SUITE, "myapp"),
        Ok("1.0".into())
    );
}

// ---------------------------------------------------------------------------
// A publish racing polls
// ---------------------------------------------------------------------------

fn publish_racing_polls(repo: Repo) {
    const VERSIONS: usize = 6;
    let v0 = repo.deb(&DebSpec {
        payload_bytes: 300_000,
        ..DebSpec::new("myapp", "1.0")
    });
    repo.publish_ok(SUITE, &[&v0], &[]);
    let node = repo.node(&["myapp"]);
    assert_ok(&node.once(), "first agent cycle");
    let keyring = repo.keyring();
    let debs: Vec<PathBuf> = (1..=VERSIONS)
        .map(|i| {
            repo.deb(&DebSpec {
                payload_bytes: 300_000,
                ..DebSpec::new("myapp", &format!("1.{i}"))
            })
        })
        .collect();

    std::thread::scope(|scope| {
        let publisher = scope.spawn(|| {
            for deb in &debs {
                repo.publish_ok(SUITE, &[deb], &["--keep", "2"]);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut polls = 0;
        let mut agent_cycles = 0;
        let mut seen = BTreeSet::new();
        let mut bad = Vec::new();
        while !publisher.is_finished() {
            assert!(
                Instant::now() < deadline,
                "publisher did not finish in 180 s"
            );
            match poll_view(&repo, &keyring, SUITE, "myapp") {
                Ok(version) => {
                    seen.insert(version);
                }
                Err(reason) => bad.push(reason),
            }
            polls += 1;
            if polls % 10 == 0 {
                let out = node.once();
                assert_ok(&out, "agent cycle during a publish");
                agent_cycles += 1;
            }
        }
        publisher.join().expect("publisher thread");
        eprintln!(
            "racing polls: {polls} in-process polls, {agent_cycles} agent cycles, {} versions seen, {} inconsistent",
            seen.len(),
            bad.len()
        );
        assert!(bad.is_empty(), "inconsistent views: {bad:?}");
        assert!(
            polls >= 20,
            "only {polls} polls during {VERSIONS} publishes"
        );
        assert!(seen.len() >= 2, "the polls saw only {seen:?}");
    });
    assert_ok(&node.once(), "agent after the publishes");
    assert_eq!(node.installed("myapp"), Some(format!("1.{VERSIONS}")));
    assert_eq!(
        poll_view(&repo, &keyring, SUITE, "myapp"),
        Ok(format!("1.{VERSIONS}"))
    );

    // The check itself can fail: a pool file swapped under the index.
    let evil = repo.deb(&DebSpec {
        payload_bytes: 300_000,
        ..DebSpec::new("myapp", &format!("1.{VERSIONS}"))
    });
    let pool = format!("pool/main/m/myapp/myapp_1.{VERSIONS}_amd64.deb");
    repo.write(&pool, &std::fs::read(evil).expect("read evil"));
    let view = poll_view(&repo, &keyring, SUITE, "myapp");
    assert!(
        view.as_ref().is_err_and(|e| e.contains("mismatch")),
        "{view:?}"
    );
}

#[test]
fn dir_publish_racing_polls_never_shows_a_mix() {
    publish_racing_polls(Repo::dir());
}

#[test]
fn s3_publish_racing_polls_never_shows_a_mix() {
    publish_racing_polls(Repo::s3());
}

// ---------------------------------------------------------------------------
// Publishers racing each other
// ---------------------------------------------------------------------------

fn spawn_publish(repo: &Repo, deb: &Path, extra: &[&str]) -> Child {
    repo.command("publish", &["--suite", SUITE, "--lock-wait", "120s"])
        .args(extra)
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn publish")
}

/// `count` publishers at once, each adding its own package; none may be
/// lost. `extra` may make every lock stale at once (`--lock-ttl 0s`), so
/// that only the conditional flip of InRelease keeps them apart.
fn racing_publishers(repo: &Repo, prefix: &str, count: usize, extra: &[&str]) -> (usize, usize) {
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    let debs: Vec<PathBuf> = names
        .iter()
        .map(|n| {
            repo.deb(&DebSpec {
                payload_bytes: 20_000,
                ..DebSpec::new(n, "1.0")
            })
        })
        .collect();
    let children: Vec<Child> = debs.iter().map(|d| spawn_publish(repo, d, extra)).collect();
    let mut lost_flips = 0;
    let mut broken_locks = 0;
    for child in children {
        let out = child.wait_with_output().expect("wait publish");
        assert_ok(&out, "racing publish");
        let stderr = String::from_utf8_lossy(&out.stderr);
        lost_flips += stderr
            .matches("another publisher flipped InRelease first")
            .count()
            + stderr.matches("verify before flip failed").count();
        broken_locks += stderr.matches("broke a stale publish lock").count();
    }
    let expected: BTreeSet<String> = names.into_iter().collect();
    let published = package_names(repo, SUITE);
    assert!(
        expected.is_subset(&published),
        "lost packages: {:?}",
        expected.difference(&published).collect::<Vec<_>>()
    );
    (lost_flips, broken_locks)
}

fn publishers_race(repo: Repo) {
    let seed = repo.deb(&DebSpec::new("seed", "1"));
    repo.publish_ok(SUITE, &[&seed], &[]);
    // With the lock: serialized.
    let (lost, broken) = racing_publishers(&repo, "locked", 4, &[]);
    eprintln!("4 publishers with the lock: {lost} attempts retried, {broken} broken locks");
    assert_eq!((lost, broken), (0, 0), "the lock did not serialize them");
    // Every lock stale at once: only If-Match on InRelease keeps them apart.
    let (lost, broken) = racing_publishers(&repo, "unlocked", 4, &["--lock-ttl", "0s"]);
    eprintln!(
        "4 publishers without a live lock: {lost} attempts retried (lost flip or verify refused), {broken} locks broken"
    );
    // Everything installs.
    let root = SandboxRoot::new();
    let apt = repo.apt(&root, SUITE);
    apt_update(&apt);
    for package in ["locked-3", "unlocked-3"] {
        assert_ok(&apt.install(package), package);
    }
    assert_eq!(package_names(&repo, SUITE).len(), 9, "seed + 2 x 4");
}

#[test]
fn dir_publishers_racing_lose_no_package() {
    publishers_race(Repo::dir());
}

#[test]
fn s3_publishers_racing_lose_no_package() {
    publishers_race(Repo::s3());
}

#[test]
fn stale_lock_is_broken_and_a_live_one_is_waited_for() {
    for repo in [Repo::dir(), Repo::s3()] {
        let deb = repo.deb(&DebSpec::new("myapp", "1.0"));
        let lock = format!("dists/{SUITE}/.publish-lock");
        // A holder that died an hour ago.
        let past = chrono::Utc::now() - chrono::Duration::hours(1);
        repo.write(
            &lock,
            format!(
                "Owner: ci@dead-host pid 1 run 0\nAcquired: {}\nExpires: {}\n",
                (past - chrono::Duration::minutes(10)).to_rfc3339(),
                past.to_rfc3339()
            )
            .as_bytes(),
        );
        let out = repo.publish(SUITE, &[&deb], &[]);
        assert_ok(&out, "publish over a stale lock");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("broke a stale publish lock") && stderr.contains("ci@dead-host"),
            "{stderr}"
        );
        assert!(repo.read(&lock).is_none(), "the lock was not released");

        // A live holder: wait, then give up with exit 75 naming it.
        let future = chrono::Utc::now() + chrono::Duration::hours(1);
        repo.write(
            &lock,
            format!(
                "Owner: ci@busy-host pid 7 run 1\nAcquired: {}\nExpires: {}\n",
                chrono::Utc::now().to_rfc3339(),
                future.to_rfc3339()
            )
            .as_bytes(),
        );
        let deb2 = repo.deb(&DebSpec::new("myapp", "1.1"));
        let started = Instant::now();
        let out = repo.publish(SUITE, &[&deb2], &["--lock-wait", "1s"]);
        let (code, line) = failure(&out);
        assert_eq!(code, Some(75), "{line}");
        assert!(line.contains("locked by ci@busy-host pid 7"), "{line}");
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(!package_names(&repo, SUITE).is_empty());
        assert!(
            !repo
                .text(&format!("dists/{SUITE}/main/binary-amd64/Packages"))
                .contains("Version: 1.1")
        );
    }
}

// ---------------------------------------------------------------------------
// The stores' conditional writes (what the flip and the lock stand on)
// ---------------------------------------------------------------------------

async fn conditional_writes(store: &dyn Store) {
    let path = "dists/x/InRelease";
    let first = match store
        .put(path, Body::Bytes(b"one"), Condition::IfAbsent)
        .await
        .expect("put")
    {
        Written::Done { etag } => etag.expect("etag"),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        store
            .put(path, Body::Bytes(b"two"), Condition::IfAbsent)
            .await
            .expect("put"),
        Written::PreconditionFailed,
        "If-None-Match: * on an existing object"
    );
    let stored = store.get(path, 1024).await.expect("get").expect("exists");
    assert_eq!(stored.bytes, b"one");
    assert_eq!(stored.etag.as_deref(), Some(first.as_str()));
    let second = match store
        .put(path, Body::Bytes(b"two"), Condition::IfMatch(&first))
        .await
        .expect("put")
    {
        Written::Done { etag } => etag.expect("etag"),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        store
            .put(path, Body::Bytes(b"three"), Condition::IfMatch(&first))
            .await
            .expect("put"),
        Written::PreconditionFailed,
        "If-Match with a stale ETag"
    );
    assert_eq!(
        store
            .put(
                "dists/x/absent",
                Body::Bytes(b"x"),
                Condition::IfMatch(&first)
            )
            .await
            .expect("put"),
        Written::PreconditionFailed,
        "If-Match on a missing object"
    );
    assert!(
        !store.delete(path, Some(&first)).await.expect("delete"),
        "delete with a stale ETag"
    );
    assert_eq!(
        store
            .get(path, 1024)
            .await
            .expect("get")
            .expect("exists")
            .bytes,
        b"two"
    );
    assert!(store.delete(path, Some(&second)).await.expect("delete"));
    assert!(store.get(path, 1024).await.expect("get").is_none());
    assert_eq!(store.size("dists/x/absent").await.expect("size"), None);
}

#[tokio::test]
async fn dir_store_conditional_writes() {
    let dir = tempfile::tempdir().expect("dir");
    conditional_writes(&DirStore::new(dir.path().to_path_buf())).await;
}

#[tokio::test]
async fn moto_store_conditional_writes() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "test", "test", None, None, "tests",
        ))
        .endpoint_url(&moto.endpoint)
        .force_path_style(true)
        .build();
    let store = S3Store::from_client(
        BUCKET.into(),
        "repo".into(),
        aws_sdk_s3::Client::from_conf(config),
    );
    conditional_writes(&store).await;
}

// ---------------------------------------------------------------------------
// promote and refresh
// ---------------------------------------------------------------------------

fn promote_and_refresh(repo: Repo) {
    let v1 = repo.deb(&DebSpec::new("myapp", "1.0"));
    let v2 = repo.deb(&DebSpec::new("myapp", "2.0"));
    repo.publish_ok("staging", &[&v1], &[]);
    repo.publish_ok("staging", &[&v2], &[]);

    let out = repo
        .command(
            "promote",
            &["--from", "staging", "--to", SUITE, "myapp=1.0"],
        )
        .output()
        .expect("promote");
    assert_ok(&out, "promote myapp=1.0");
    let staging = repo.text("dists/staging/main/binary-amd64/Packages");
    let production = repo.text(&format!("dists/{SUITE}/main/binary-amd64/Packages"));
    let stanza = |text: &str, version: &str| {
        text.split("\n\n")
            .find(|s| s.contains(&format!("Version: {version}\n")))
            .map(|s| s.trim_end().to_string())
    };
    assert_eq!(
        stanza(&production, "1.0"),
        stanza(&staging, "1.0"),
        "the exact stanza, the exact file"
    );
    assert!(!production.contains("Version: 2.0"));
    let node = repo.node(&["myapp"]);
    assert_ok(&node.once(), "agent on production");
    assert_eq!(node.installed("myapp").as_deref(), Some("1.0"));

    // Newest by default.
    let out = repo
        .command("promote", &["--from", "staging", "--to", SUITE, "myapp"])
        .output()
        .expect("promote");
    assert_ok(&out, "promote myapp");
    assert_ok(&node.once(), "agent after promote");
    assert_eq!(node.installed("myapp").as_deref(), Some("2.0"));

    // Not in the source suite.
    let out = repo
        .command(
            "promote",
            &["--from", "staging", "--to", SUITE, "myapp=9.9"],
        )
        .output()
        .expect("promote");
    let (code, line) = failure(&out);
    assert_eq!(code, Some(65), "{line}");
    assert!(line.contains("myapp 9.9 is not in suite staging"), "{line}");

    // Refresh: new Date and Valid-Until, the same indexes.
    let before = repo.text(&format!("dists/{SUITE}/Release"));
    let out = repo
        .command("refresh", &["--suite", SUITE, "--valid-for", "2d"])
        .output()
        .expect("refresh");
    assert_ok(&out, "refresh");
    let after = repo.text(&format!("dists/{SUITE}/Release"));
    let (old, new) = (
        release::parse(&before).expect("old"),
        release::parse(&after).expect("new"),
    );
    assert!(new.date > old.date, "{} !> {}", new.date, old.date);
    assert_eq!(
        new.valid_until.map(|v| v - new.date),
        Some(chrono::Duration::days(2))
    );
    assert_eq!(new.sha256, old.sha256, "content changed");
    let checksums = |text: &str| text.split_once("SHA256:").map(|(_, rest)| rest.to_string());
    assert_eq!(checksums(&after), checksums(&before));
    let out = node.once();
    assert_ok(&out, "agent after refresh");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "up to date");

    let out = repo
        .command("refresh", &["--suite", "nonexistent"])
        .output()
        .expect("refresh");
    let (code, line) = failure(&out);
    assert_eq!(code, Some(65), "{line}");
    assert!(line.contains("nothing to refresh"), "{line}");
}

#[test]
fn dir_promote_and_refresh() {
    promote_and_refresh(Repo::dir());
}

#[test]
fn s3_promote_and_refresh() {
    promote_and_refresh(Repo::s3());
}

// ---------------------------------------------------------------------------
// the agent's index cap
// ---------------------------------------------------------------------------

/// The agent reads an index through the same capped decompression as the
/// publisher: a Packages.xz within `max_index_bytes` whose text is not is
/// refused by name and limit, and nothing is installed from the part of
/// the index before the cap.
#[test]
fn agent_index_over_cap_is_an_error() {
    let repo = Repo::dir();
    let debs: Vec<PathBuf> = (0..12)
        .map(|i| repo.deb(&DebSpec::new(&format!("pkg{i:02}"), "1.0")))
        .collect();
    let refs: Vec<&Path> = debs.iter().map(PathBuf::as_path).collect();
    repo.publish_ok(SUITE, &refs, &[]);
    let dir = format!("dists/{SUITE}/main/binary-amd64");
    let text = repo
        .read(&format!("{dir}/Packages"))
        .expect("Packages")
        .len();
    let xz = repo
        .read(&format!("{dir}/Packages.xz"))
        .expect("Packages.xz")
        .len();
    // pkg00 comes first in the index: its stanza is read before the cap.
    let limit = (text + xz) / 2;
    assert!(xz < limit && limit < text, "{xz} {limit} {text}");

    let repository = format!("{}\nmax_index_bytes = {limit}", repo.node_repository());
    let node = Node::new(&repository, &repo.key.public_key, &["pkg00"], "");
    let out = node.once();
    let (code, line) = failure(&out);
    assert_eq!(code, Some(65), "{line}");
    assert!(
        line.contains(&format!("inflates past the limit of {limit} bytes")),
        "{line}"
    );
    assert_eq!(node.installed("pkg00"), None);

    // Within the cap, the same index installs.
    let repository = format!("{}\nmax_index_bytes = {text}", repo.node_repository());
    let node = Node::new(&repository, &repo.key.public_key, &["pkg00"], "");
    assert_ok(
        &node.once(),
        "pulldeploy once with the index within its cap",
    );
    assert_eq!(node.installed("pkg00").as_deref(), Some("1.0"));
}

// ---------------------------------------------------------------------------
// every write of a suite is newer than the last, even within one second
// ---------------------------------------------------------------------------

/// InRelease as anyone reads it from moto (anonymous GET): its Release
/// Date and the object's Last-Modified header.
fn inrelease_date_and_last_modified(
    repo: &Repo,
    suite: &str,
) -> (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) {
    let Backend::S3(moto) = &repo.backend else {
        panic!("Last-Modified is read from moto");
    };
    let response = common::http::http_request(
        moto.port,
        "GET",
        &format!("/{BUCKET}/repo/dists/{suite}/InRelease"),
        &[],
        &[],
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let verified = repo
        .keyring()
        .verify_cleartext(
            "InRelease",
            &response.body,
            SystemTime::now(),
            std::time::Duration::ZERO,
        )
        .expect("InRelease verifies");
    let date = release::parse(&verified.text).expect("Release parses").date;
    let header = response
        .header("Last-Modified")
        .expect("moto sends Last-Modified");
    let last_modified = chrono::DateTime::parse_from_rfc2822(header)
        .unwrap_or_else(|e| panic!("Last-Modified {header:?}: {e}"))
        .with_timezone(&chrono::Utc);
    (date, last_modified)
}

type Stamp = (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>);

/// The suite's InRelease after a write: Last-Modified no earlier than the
/// Release Date (InRelease is written after its Date is stamped), and both
/// strictly later than those of the write before (`previous`). Returns
/// whether Last-Modified fell in a later second than the Date.
#[track_caller]
fn check_newer(repo: &Repo, suite: &str, previous: &mut Option<Stamp>, what: &str) -> bool {
    let (date, last_modified) = inrelease_date_and_last_modified(repo, suite);
    assert!(
        last_modified >= date,
        "{what}: Last-Modified {last_modified} before the Release Date {date}"
    );
    if let Some((old_date, old_last_modified)) = *previous {
        assert!(
            date > old_date,
            "{what}: Release Date {date} is not after the previous {old_date}"
        );
        assert!(
            last_modified > old_last_modified,
            "{what}: Last-Modified {last_modified} is not after the previous \
             {old_last_modified}: apt's If-Modified-Since gets 304"
        );
    }
    *previous = Some((date, last_modified));
    last_modified > date
}

/// apt revalidates InRelease with If-Modified-Since and S3 keeps
/// Last-Modified in whole seconds: two writes of a suite in one second
/// would look like one to apt (304, the new suite missed). Every write
/// (publish, promote, refresh), back to back with no pause between them,
/// must carry a later Release Date and a later Last-Modified than the one
/// it replaces, and apt must see each new version.
#[test]
fn two_publishes_in_one_second() {
    let repo = Repo::s3();

    // The case that loses an update: a write whose InRelease lands in a
    // later second than its Date (here a large .deb, hashed and read back
    // in full between the two), then a quick write (a refresh) in that
    // same second. Each round is a new suite; the .deb is uploaded once.
    // Rounds go on until two of them crossed a second (each does in a
    // debug build), so the case under test surely happened.
    let big = repo.deb(&DebSpec {
        payload_bytes: 12 << 20,
        ..DebSpec::new("bigapp", "1.0-1")
    });
    let mut crossed = 0;
    for round in 0..8 {
        let suite = format!("round{round}");
        let mut previous = None;
        repo.publish_ok(&suite, &[&big], &[]);
        if check_newer(&repo, &suite, &mut previous, "publish of a large .deb") {
            crossed += 1;
        }
        let out = repo
            .command("refresh", &["--suite", &suite])
            .output()
            .expect("refresh");
        assert_ok(&out, "refresh");
        check_newer(&repo, &suite, &mut previous, "refresh right after it");
        if crossed == 2 {
            break;
        }
    }
    assert_eq!(
        crossed, 2,
        "the large .deb's publish did not write InRelease in a later second than its Date \
         twice in 8 rounds: the case under test did not happen"
    );

    // Back to back: each write starts as soon as the last one returned.
    let staging = repo.deb(&DebSpec::new("myapp", "0.9-1"));
    repo.publish_ok("staging", &[&staging], &[]);
    let mut previous = None;
    for minor in 0..2 {
        let version = format!("1.{minor}-1");
        let deb = repo.deb(&DebSpec::new("myapp", &version));
        repo.publish_ok(SUITE, &[&deb], &[]);
        check_newer(&repo, SUITE, &mut previous, &format!("publish {version}"));
    }
    let out = repo
        .command("refresh", &["--suite", SUITE])
        .output()
        .expect("refresh");
    assert_ok(&out, "refresh");
    check_newer(&repo, SUITE, &mut previous, "refresh");
    let out = repo
        .command("promote", &["--from", "staging", "--to", SUITE, "myapp"])
        .output()
        .expect("promote");
    assert_ok(&out, "promote");
    check_newer(&repo, SUITE, &mut previous, "promote");

    // apt between two publishes: the second update must see the version
    // just published, however soon after the one apt saw it came.
    let root = SandboxRoot::new();
    let apt = repo.apt(&root, SUITE);
    for minor in 2..4 {
        let version = format!("1.{minor}-1");
        let deb = repo.deb(&DebSpec::new("myapp", &version));
        repo.publish_ok(SUITE, &[&deb], &[]);
        check_newer(&repo, SUITE, &mut previous, &format!("publish {version}"));
        apt_update(&apt);
        assert_ok(&apt.install("myapp"), &format!("apt-get install {version}"));
        assert_eq!(
            root.installed_version("myapp").as_deref(),
            Some(version.as_str()),
            "apt-get update after the publish of {version} kept an older suite"
        );
    }
}
