//! aptly: publishes straight to moto's S3, as in production.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

use super::cmd::{fixture_dir, host_path, mkdir, run, write_file};
use super::gpg::GpgKey;
use super::moto::Moto;

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
