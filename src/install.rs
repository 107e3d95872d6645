//! dpkg as a subprocess: what is installed, and installing verified .debs.
//!
//! dpkg runs non-interactively: stdin is closed, `DEBIAN_FRONTEND` is
//! `noninteractive`, and `--force-confold` keeps locally modified conffiles
//! (`--force-confdef` takes the default where there is one). With a root
//! other than `/` dpkg works on a sandbox: `--root`, its own `--log`, and
//! maintainer scripts run without chroot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::error::InstallError;

pub struct Dpkg {
    root: PathBuf,
}

impl Dpkg {
    pub fn new(root: &Path) -> Dpkg {
        Dpkg {
            root: root.to_path_buf(),
        }
    }

    fn is_sandbox(&self) -> bool {
        self.root != Path::new("/")
    }

    /// dpkg's database of installed packages.
    pub fn status_path(&self) -> PathBuf {
        self.root.join("var/lib/dpkg/status")
    }

    /// Installed versions of `names` (only packages in state "install ok
    /// installed"), read from the status file without running dpkg-query.
    pub fn installed_versions(
        &self,
        names: &[&str],
    ) -> Result<HashMap<String, String>, InstallError> {
        let path = self.status_path();
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
            Err(source) => return Err(InstallError::Status { path, source }),
        };
        let mut versions = HashMap::new();
        for paragraph in
            deb822_fast::Deb822::iter_paragraphs_from_reader(std::io::BufReader::new(file))
        {
            let paragraph = paragraph.map_err(|e| InstallError::Status {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?;
            let (Some(name), Some(status), Some(version)) = (
                paragraph.get("Package"),
                paragraph.get("Status"),
                paragraph.get("Version"),
            ) else {
                continue;
            };
            if names.contains(&name)
                && status.split_whitespace().collect::<Vec<_>>() == ["install", "ok", "installed"]
            {
                versions.insert(name.to_string(), version.to_string());
            }
        }
        Ok(versions)
    }

    /// `dpkg -i` of all `debs` in one transaction. Never cancelled by the
    /// caller's shutdown: the future is awaited to the end.
    pub async fn install(&self, debs: &[PathBuf]) -> Result<(), InstallError> {
        let mut command = tokio::process::Command::new("dpkg");
        if self.is_sandbox() {
            command
                .arg(format!("--root={}", self.root.display()))
                .arg(format!(
                    "--log={}",
                    self.root.join("var/log/dpkg.log").display()
                ))
                .arg("--force-not-root")
                .arg("--force-script-chrootless");
        }
        command
            .args(["--force-confold", "--force-confdef", "--install"])
            .args(debs)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        let output = command
            .output()
            .await
            .map_err(|source| InstallError::Spawn {
                program: "dpkg".into(),
                source,
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(InstallError::Dpkg {
                packages: debs
                    .iter()
                    .map(|d| d.file_name().unwrap_or_default().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                status: output.status.to_string(),
                stderr: stderr.trim().lines().last().unwrap_or_default().to_string(),
            });
        }
        Ok(())
    }
}
