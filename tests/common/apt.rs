//! A sandboxed apt-get: all its state under a tempdir, installing into a [`SandboxRoot`].

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

use super::cmd::{fixture_dir, host_path, mkdir, output_with_input, run, write_file};
use super::dpkg::SandboxRoot;

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
    /// fetched it is answered 304 and the old lists are kept. `Aptly::publish` waits for the
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
