//! dpkg as a subprocess: what is installed, and installing verified .debs.
//!
//! dpkg runs non-interactively: stdin is closed, `DEBIAN_FRONTEND` is
//! `noninteractive`, and `--force-confold` keeps locally modified conffiles
//! (`--force-confdef` takes the default where there is one). With a root
//! other than `/` dpkg works on a sandbox: `--root`, its own `--log`, and
//! maintainer scripts run without chroot.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::InstallError;
use crate::repo::depends;
use crate::source::BoxFuture;
use crate::state::FileStamp;

pub struct Dpkg {
    root: PathBuf,
    /// The status file as last parsed, with the stamp of the file it was
    /// parsed from: one parse per version of the file, however many steps
    /// of a cycle ask (see [`Dpkg::status`]).
    status: Mutex<Option<(FileStamp, Arc<DpkgStatus>)>>,
}

/// dpkg's database of installed packages at one moment.
#[derive(Debug, Default)]
pub struct DpkgStatus {
    /// Packages in state "install ok installed": the version as dpkg
    /// records it.
    versions: HashMap<String, String>,
    /// The same packages as `Depends` sees them (parsed versions, Provides).
    pub installed: depends::Installed,
    /// Some package is left half-way by an interrupted dpkg run.
    pub half_way: bool,
}

impl DpkgStatus {
    /// The installed version of `name`, as dpkg records it.
    pub fn version(&self, name: &str) -> Option<&str> {
        self.versions.get(name).map(String::as_str)
    }
}

/// Holds a package manager's lock until dropped.
pub type InstallLock = Box<dyn Send + Sync>;

/// What the agent needs of a package manager: dpkg on a node, a fake in
/// the agent's unit tests.
pub trait Installer: Send + Sync {
    /// The database of installed packages now (see [`Dpkg::status`]).
    fn status(&self) -> Result<Arc<DpkgStatus>, InstallError>;
    /// Identifies the current version of the database, when it can be
    /// told cheaply; two equal stamps mean nothing was installed between.
    fn status_stamp(&self) -> Option<FileStamp>;
    /// Drops any copy of the database kept since the last [`Installer::status`].
    fn forget_status(&self);
    /// True when an earlier run was interrupted and must be completed first.
    fn needs_recovery(&self) -> Result<bool, InstallError>;
    /// Waits up to `timeout` for the package manager's lock; `None` when
    /// another package manager still holds it.
    fn lock(&self, timeout: Duration) -> BoxFuture<'_, Result<Option<InstallLock>, InstallError>>;
    /// Completes an interrupted run.
    fn recover(&self) -> BoxFuture<'_, Result<(), InstallError>>;
    /// Installs `debs` in one transaction; the caller holds the lock.
    fn install<'a>(&'a self, debs: &'a [PathBuf]) -> BoxFuture<'a, Result<(), InstallError>>;
}

impl Installer for Dpkg {
    fn status(&self) -> Result<Arc<DpkgStatus>, InstallError> {
        Dpkg::status(self)
    }

    fn status_stamp(&self) -> Option<FileStamp> {
        FileStamp::of(&self.status_path())
    }

    fn forget_status(&self) {
        Dpkg::forget_status(self)
    }

    fn needs_recovery(&self) -> Result<bool, InstallError> {
        Dpkg::needs_recovery(self)
    }

    fn lock(&self, timeout: Duration) -> BoxFuture<'_, Result<Option<InstallLock>, InstallError>> {
        Box::pin(async move {
            let lock = Dpkg::lock(self, timeout).await?;
            Ok(lock.map(|lock| Box::new(lock) as InstallLock))
        })
    }

    fn recover(&self) -> BoxFuture<'_, Result<(), InstallError>> {
        Box::pin(Dpkg::recover(self))
    }

    fn install<'a>(&'a self, debs: &'a [PathBuf]) -> BoxFuture<'a, Result<(), InstallError>> {
        Box::pin(Dpkg::install(self, debs))
    }
}

impl DpkgStatus {
    /// A database with these packages installed (`name`, `version`), for
    /// fakes in tests.
    pub fn with_versions<'a>(packages: impl IntoIterator<Item = (&'a str, &'a str)>) -> DpkgStatus {
        let mut status = DpkgStatus::default();
        for (name, version) in packages {
            status
                .versions
                .insert(name.to_string(), version.to_string());
            if let Ok(parsed) = version.parse() {
                status.installed.add(name, parsed, None);
            }
        }
        status
    }
}

impl Dpkg {
    pub fn new(root: &Path) -> Dpkg {
        Dpkg {
            root: root.to_path_buf(),
            status: Mutex::new(None),
        }
    }

    fn is_sandbox(&self) -> bool {
        self.root != Path::new("/")
    }

    /// dpkg's database of installed packages.
    pub fn status_path(&self) -> PathBuf {
        self.root.join("var/lib/dpkg/status")
    }

    /// Calls `visit` with every paragraph of dpkg's status file (none when
    /// the file does not exist yet: a fresh root).
    fn each_status(
        &self,
        mut visit: impl FnMut(&deb822_fast::Paragraph) -> bool,
    ) -> Result<(), InstallError> {
        let path = self.status_path();
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(InstallError::Status { path, source }),
        };
        for paragraph in
            deb822_fast::Deb822::iter_paragraphs_from_reader(std::io::BufReader::new(file))
        {
            let paragraph = paragraph.map_err(|e| status_error(&path, e))?;
            if !visit(&paragraph) {
                break;
            }
        }
        Ok(())
    }

    /// dpkg's database now. Parsed only when the status file changed since
    /// the last parse (dpkg replaces it by rename, so any write gives a new
    /// stamp); otherwise the earlier parse is handed out again.
    pub fn status(&self) -> Result<Arc<DpkgStatus>, InstallError> {
        let path = self.status_path();
        let stamp = FileStamp::of(&path);
        let mut cached = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(stamp), Some((seen, status))) = (stamp, cached.as_ref())
            && stamp == *seen
        {
            return Ok(status.clone());
        }
        let status = Arc::new(self.read_status()?);
        *cached = stamp.map(|stamp| (stamp, status.clone()));
        Ok(status)
    }

    /// Drops the parsed status (a long-running agent keeps no copy of the
    /// database between cycles); the next [`Dpkg::status`] reads it again.
    pub fn forget_status(&self) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn read_status(&self) -> Result<DpkgStatus, InstallError> {
        tracing::debug!(path = %self.status_path().display(), "reading dpkg status");
        let mut status = DpkgStatus::default();
        self.each_status(|paragraph| {
            let state = paragraph
                .get("Status")
                .and_then(|s| s.split_whitespace().nth(2));
            status.half_way |= matches!(
                state,
                Some(
                    "half-installed"
                        | "unpacked"
                        | "half-configured"
                        | "triggers-awaited"
                        | "triggers-pending"
                )
            );
            if let (Some(name), Some(version)) =
                (paragraph.get("Package"), paragraph.get("Version"))
                && is_installed(paragraph)
            {
                status
                    .versions
                    .insert(name.to_string(), version.to_string());
                if let Ok(parsed) = version.parse() {
                    status
                        .installed
                        .add(name, parsed, paragraph.get("Provides"));
                }
            }
            true
        })?;
        Ok(status)
    }

    /// dpkg with the root, log and non-interactive settings.
    fn dpkg(&self) -> tokio::process::Command {
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
            .args(["--force-confold", "--force-confdef"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            // Maintainer scripts and what they start are not the agent: they
            // must not talk to systemd on its behalf.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            // We hold the frontend lock ourselves (see `lock`), as apt does.
            .env("DPKG_FRONTEND_LOCKED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        command
    }

    async fn run(
        &self,
        mut command: tokio::process::Command,
        what: String,
    ) -> Result<(), InstallError> {
        let output = command
            .output()
            .await
            .map_err(|source| InstallError::Spawn {
                program: "dpkg".into(),
                source,
            })?;
        if !output.status.success() {
            return Err(InstallError::Dpkg {
                packages: what,
                status: output.status.to_string(),
                stderr: dpkg_cause(&String::from_utf8_lossy(&output.stderr)),
            });
        }
        Ok(())
    }

    /// `dpkg -i` of all `debs` in one transaction. The caller holds the
    /// frontend lock. Never cancelled by the caller's shutdown: the future
    /// is awaited to the end.
    pub async fn install(&self, debs: &[PathBuf]) -> Result<(), InstallError> {
        let mut command = self.dpkg();
        command.arg("--install").args(debs);
        let names = debs
            .iter()
            .map(|d| d.file_name().unwrap_or_default().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        self.run(command, names).await
    }

    /// True when an earlier dpkg run was interrupted: its journal
    /// (`updates/`) has entries, or a package is left half-way.
    pub fn needs_recovery(&self) -> Result<bool, InstallError> {
        let updates = self.root.join("var/lib/dpkg/updates");
        if let Ok(entries) = std::fs::read_dir(&updates)
            && entries.flatten().any(|e| e.file_name() != "tmp.i")
        {
            return Ok(true);
        }
        Ok(self.status()?.half_way)
    }

    /// Completes an interrupted dpkg run: `dpkg --configure --pending`.
    pub async fn recover(&self) -> Result<(), InstallError> {
        let mut command = self.dpkg();
        command.args(["--configure", "--pending"]);
        self.run(command, "--configure --pending (recovery)".into())
            .await
    }

    /// Waits up to `timeout` for dpkg's locks, as apt does, so that another
    /// apt, dpkg or unattended-upgrades run finishes undisturbed: first the
    /// frontend lock (`lock-frontend`, kept until the returned value is
    /// dropped), then the database lock (`lock`), which a dpkg still running
    /// after its frontend died holds alone. The database lock is only
    /// checked, not kept: dpkg takes it itself. `None` when either is still
    /// held after `timeout`: the caller defers.
    pub async fn lock(&self, timeout: Duration) -> Result<Option<DpkgLock>, InstallError> {
        let admin = self.root.join("var/lib/dpkg");
        let started = Instant::now();
        let frontend = loop {
            match wait_step(
                DpkgLock::try_acquire(&admin.join("lock-frontend")),
                started,
                timeout,
            )
            .await
            {
                Step::Got(lock) => break lock,
                Step::Retry => continue,
                Step::TimedOut => return Ok(None),
                Step::Failed(source) => {
                    return Err(InstallError::Lock {
                        path: admin.join("lock-frontend"),
                        source,
                    });
                }
            }
        };
        loop {
            match wait_step(DpkgLock::try_acquire(&admin.join("lock")), started, timeout).await {
                // Released at once: dpkg takes it itself.
                Step::Got(_database) => return Ok(Some(frontend)),
                Step::Retry => continue,
                Step::TimedOut => return Ok(None),
                Step::Failed(source) => {
                    return Err(InstallError::Lock {
                        path: admin.join("lock"),
                        source,
                    });
                }
            }
        }
    }
}

enum Step<T> {
    Got(T),
    Retry,
    TimedOut,
    Failed(std::io::Error),
}

/// One attempt at a lock: held elsewhere means sleep and retry until
/// `timeout` has passed since `started`.
async fn wait_step<T>(
    attempt: std::io::Result<Option<T>>,
    started: Instant,
    timeout: Duration,
) -> Step<T> {
    match attempt {
        Ok(Some(lock)) => Step::Got(lock),
        Ok(None) if started.elapsed() >= timeout => Step::TimedOut,
        Ok(None) => {
            tokio::time::sleep(Duration::from_millis(250)).await;
            Step::Retry
        }
        Err(e) => Step::Failed(e),
    }
}

/// dpkg's "install ok installed": the only state in which a package counts.
fn is_installed(paragraph: &deb822_fast::Paragraph) -> bool {
    paragraph
        .get("Status")
        .is_some_and(|s| s.split_whitespace().eq(["install", "ok", "installed"]))
}

fn status_error(path: &Path, e: deb822_fast::Error) -> InstallError {
    InstallError::Status {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    }
}

/// dpkg's frontend lock (`lock-frontend`), an fcntl write lock held for as
/// long as this value lives. dpkg itself is told (DPKG_FRONTEND_LOCKED) that
/// its frontend holds it.
pub struct DpkgLock {
    _file: std::fs::File,
}

impl DpkgLock {
    fn try_acquire(path: &Path) -> std::io::Result<Option<DpkgLock>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .open(path)?;
        // SAFETY: `flock` is plain data, zeroed then filled; the fd is open
        // for the duration of the call.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        let result = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) };
        if result == 0 {
            return Ok(Some(DpkgLock { _file: file }));
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EACCES | libc::EAGAIN) => Ok(None),
            _ => Err(error),
        }
    }
}

/// Bytes available to unprivileged users on the filesystem holding `path`.
pub fn free_space(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: statvfs fills the zeroed struct; c_path is a valid C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// How many lines before dpkg's error line [`dpkg_cause`] keeps.
const CAUSE_CONTEXT_LINES: usize = 3;
/// At most this many characters of it.
const CAUSE_MAX_CHARS: usize = 600;

/// The cause of a dpkg failure from its stderr, on one line: dpkg's first
/// error line with its indented continuation ("error processing package
/// myapp (--install):" says nothing without " installed myapp package
/// post-installation script subprocess returned error exit status 1"),
/// then the last few lines before it: a failing maintainer script's own
/// output, or dpkg's note on what a dependency lacks. Without an error
/// line, the last line; the "Errors were encountered" summary is never
/// the cause.
pub fn dpkg_cause(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let is_summary = |l: &str| l.starts_with("Errors were encountered");
    // dpkg's own error line first: a script may print "error" too.
    let error = lines
        .iter()
        .position(|l| l.starts_with("dpkg") && l.contains("error"))
        .or_else(|| {
            lines
                .iter()
                .position(|l| l.contains("error") && !is_summary(l))
        });
    let Some(at) = error else {
        let last = lines
            .iter()
            .rev()
            .find(|l| !is_summary(l) && !l.starts_with(' '));
        return clip(last.map_or("", |l| l.trim()));
    };
    let mut cause = lines[at].trim().to_string();
    for continuation in lines[at + 1..]
        .iter()
        .take_while(|l| l.starts_with([' ', '\t']))
    {
        cause.push(' ');
        cause.push_str(continuation.trim());
    }
    let before: Vec<&str> = lines[at.saturating_sub(CAUSE_CONTEXT_LINES)..at]
        .iter()
        .map(|l| l.trim())
        .collect();
    if !before.is_empty() {
        cause.push_str("; before that: ");
        cause.push_str(&before.join(" / "));
    }
    clip(&cause)
}

/// `text`, cut to [`CAUSE_MAX_CHARS`] characters with "...".
fn clip(text: &str) -> String {
    match text.char_indices().nth(CAUSE_MAX_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::dpkg_cause;

    #[test]
    fn a_failing_maintainer_script_is_told_with_its_own_words() {
        // dpkg 1.21's stderr when a postinst prints two lines and exits 1.
        let stderr = "broken release\nerror: config missing\n\
            dpkg: error processing package myapp (--install):\n \
            installed myapp package post-installation script subprocess returned error exit status 1\n\
            Errors were encountered while processing:\n myapp\n";
        assert_eq!(
            dpkg_cause(stderr),
            "dpkg: error processing package myapp (--install): installed myapp package \
             post-installation script subprocess returned error exit status 1; \
             before that: broken release / error: config missing"
        );
    }

    #[test]
    fn a_dependency_problem_keeps_what_is_missing() {
        let stderr = "dpkg: dependency problems prevent configuration of myapp:\n \
            myapp depends on libfoo; however:\n  Package libfoo is not installed.\n\n\
            dpkg: error processing package myapp (--install):\n \
            dependency problems - leaving unconfigured\n\
            Errors were encountered while processing:\n myapp\n";
        assert_eq!(
            dpkg_cause(stderr),
            "dpkg: error processing package myapp (--install): dependency problems - \
             leaving unconfigured; before that: dpkg: dependency problems prevent \
             configuration of myapp: / myapp depends on libfoo; however: / Package \
             libfoo is not installed."
        );
    }

    #[test]
    fn a_one_line_error_is_itself_and_no_error_line_gives_the_last() {
        assert_eq!(
            dpkg_cause("dpkg: error: cannot access archive 'x.deb': No such file or directory\n"),
            "dpkg: error: cannot access archive 'x.deb': No such file or directory"
        );
        assert_eq!(
            dpkg_cause("something odd\nthe last word\n"),
            "the last word"
        );
        assert_eq!(dpkg_cause(""), "");
    }

    #[test]
    fn a_long_cause_is_cut_on_a_character_boundary() {
        let noise = "é".repeat(2_000);
        let cause = dpkg_cause(&format!("{noise}\ndpkg: error processing package myapp:\n"));
        assert!(cause.starts_with("dpkg: error processing package myapp:; before that: éé"));
        assert!(cause.ends_with("é..."), "{cause}");
        assert_eq!(cause.chars().count(), 603);
    }
}
