//! Integration-test harness for pulldeploy: real servers and real tools on loopback
//! (moto for S3 + IMDS, gpg, aptly, reprepro, dpkg-deb, dpkg, a sandboxed apt-get),
//! each in its own tempdir, removed (and its processes killed) on Drop.
//!
//! Integration tests include it with `mod common;`. Every helper panics with the failing
//! command, its exit status, stdout and stderr, so a broken fixture says what broke.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod cmd;
pub mod deb;
pub mod faulty;
pub mod fixture;
pub mod gpg;
pub mod http;
pub mod imds;
pub mod moto;
pub mod node;
pub mod repo;

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

// Until every fixture has its own module, the old `common::X` names stay reachable
// (transitional: not every binary uses every fixture).
pub use cmd::*;
#[allow(unused_imports)]
pub use deb::*;
pub use gpg::*;
pub use http::*;
pub use moto::*;

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
