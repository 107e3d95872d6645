//! dpkg into a sandbox root: a directory with its own dpkg database and log.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use super::cmd::{
    describe_output, fixture_dir, mkdir, output_with_input, run, set_mode, write_file,
};

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
    #[allow(dead_code, reason = "not every test binary uses it")]
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
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn dpkg(&self) -> Command {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", self.path.display()))
            .args(["--force-not-root", "--force-script-chrootless"])
            .arg(format!("--log={}", self.dpkg_log().display()));
        cmd
    }

    /// `dpkg -i DEB` into this root.
    #[allow(dead_code, reason = "not every test binary uses it")]
    pub fn dpkg_install(&self, deb: &Path) {
        run(self.dpkg().arg("-i").arg(deb), "dpkg -i");
    }
}

impl Default for SandboxRoot {
    fn default() -> Self {
        Self::new()
    }
}
