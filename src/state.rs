//! `state.json`: what this node has installed and accepted.
//!
//! The file is replaced atomically (temp file in the same directory, fsync,
//! rename, fsync of the directory), so a crash at any point leaves either
//! the old or the new state, never a torn one.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, StateError};
use crate::repo::packages::same_version;

/// Bumped when the format changes incompatibly.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub format: u32,
    /// The last Release accepted in full (verified and every step after it
    /// succeeded). Moves only forward.
    pub release: Option<AcceptedRelease>,
    /// The committed version of each package: installed and found healthy.
    pub installed: BTreeMap<String, InstalledPackage>,
    /// Per package, the healthy version before the current one: what a sick
    /// upgrade is rolled back to. Its .deb stays in the cache.
    #[serde(default)]
    pub last_known_good: BTreeMap<String, InstalledPackage>,
    /// Versions that failed to install or to become healthy, per package;
    /// they are not tried again (a newer version is).
    #[serde(default)]
    pub bad: BTreeMap<String, Vec<String>>,
    /// An install that started and was neither committed nor rolled back
    /// (the agent was killed): finished first at the next start.
    #[serde(default)]
    pub pending: Option<Pending>,
    pub last_poll: Option<Poll>,
    pub last_error: Option<Event>,
    /// The latest installs, rollbacks and failures, oldest first.
    #[serde(default)]
    pub events: Vec<Event>,
    /// What the rollout holds back, if anything: the repository is read
    /// again at `recheck_at` even when it has not changed (`None`: only
    /// when it changes, as for a paused rollout).
    #[serde(default)]
    pub waiting: Option<Waiting>,
    /// How many seconds this node's clock was ahead of the repository
    /// server's (its `Date` headers) at the last cycle; negative: behind.
    /// Absent for a `file://` repository, which has no clock of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset: Option<i64>,
    /// Another node uses this node's `[fleet] node_id` (what showed it):
    /// its leases and report collide with this node's. Absent in older
    /// state files and while no duplicate is seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_node_id: Option<String>,
}

/// An install the rollout holds back (a later wave, no free in-flight
/// lease, a halted version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Waiting {
    pub reason: String,
    pub recheck_at: Option<DateTime<Utc>>,
    /// Waiting for an in-flight lease: tried again at every poll.
    #[serde(default)]
    pub for_lease: bool,
}

/// How many events state.json keeps.
pub const EVENTS_KEPT: usize = 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    pub started_at: DateTime<Utc>,
    pub release: AcceptedRelease,
    pub packages: Vec<PendingPackage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingPackage {
    pub name: String,
    /// The committed version before this install, if any.
    pub from: Option<InstalledPackage>,
    pub to: InstalledPackage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptedRelease {
    /// The Release `Date`; a Release older than this is a replay.
    pub date: DateTime<Utc>,
    pub valid_until: Option<DateTime<Utc>>,
    /// ETag of the InRelease (or Release) object, sent as If-None-Match.
    pub etag: Option<String>,
    /// Which file carried the signature.
    pub file: ReleaseFile,
    /// Its URL: an ETag is only meaningful for the object it came from.
    #[serde(default)]
    pub url: String,
    /// `agent.packages` when it was accepted; a changed list (a new pin, a
    /// new package) needs the full repository even if Release is unchanged.
    #[serde(default)]
    pub packages: Vec<String>,
    pub signer: String,
    pub accepted_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstalledPackage {
    pub version: String,
    /// SHA256 of the .deb this agent installed; `None` when the version was
    /// found installed (by hand, or newer than the repository offers).
    pub sha256: Option<String>,
    pub installed_at: Option<DateTime<Utc>>,
    /// The verified .deb in the cache directory, kept for rollback.
    #[serde(default)]
    pub deb: Option<String>,
}

/// The signed file a Release came from: `InRelease` (cleartext-signed)
/// or `Release` with its detached `Release.gpg`. Written in state.json as
/// the file's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseFile {
    InRelease,
    Release,
}

impl ReleaseFile {
    /// The file's name under `dists/SUITE/`.
    pub fn name(self) -> &'static str {
        match self {
            ReleaseFile::InRelease => "InRelease",
            ReleaseFile::Release => "Release",
        }
    }
}

impl std::fmt::Display for ReleaseFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl PartialEq<&str> for ReleaseFile {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Poll {
    pub at: DateTime<Utc>,
    pub outcome: PollOutcome,
}

/// What the last successful poll found. Written in state.json as the
/// words `once` prints (`unchanged`, `up to date`, `installed myapp 1.1`),
/// so status and scripts read it as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum PollOutcome {
    /// The signed Release did not change (HTTP 304).
    Unchanged,
    /// A new Release was verified; everything was at its wanted version.
    UpToDate,
    /// Something was installed; what, in words.
    Installed(String),
    /// Nothing was installed because the rollout holds it back; why.
    Waiting(String),
}

impl std::fmt::Display for PollOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PollOutcome::Unchanged => f.write_str("unchanged"),
            PollOutcome::UpToDate => f.write_str("up to date"),
            PollOutcome::Installed(what) => f.write_str(what),
            PollOutcome::Waiting(why) => write!(f, "waiting: {why}"),
        }
    }
}

impl From<String> for PollOutcome {
    fn from(text: String) -> Self {
        match text.as_str() {
            "unchanged" => PollOutcome::Unchanged,
            "up to date" => PollOutcome::UpToDate,
            _ => match text.strip_prefix("waiting: ") {
                Some(why) => PollOutcome::Waiting(why.to_string()),
                None => PollOutcome::Installed(text),
            },
        }
    }
}

impl From<PollOutcome> for String {
    fn from(outcome: PollOutcome) -> Self {
        outcome.to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub at: DateTime<Utc>,
    pub message: String,
}

impl State {
    /// Reads `path`; a missing file is a fresh node.
    pub fn load(path: &Path) -> Result<State, StateError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    format: FORMAT,
                    ..State::default()
                });
            }
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if state.format != FORMAT {
            return Err(StateError::Corrupt {
                path: path.to_path_buf(),
                message: format!("format {} (this agent reads {FORMAT})", state.format),
            });
        }
        Ok(state)
    }

    /// Appends an event that happened `at`, keeping the latest
    /// [`EVENTS_KEPT`].
    pub fn push_event(&mut self, at: DateTime<Utc>, message: String) {
        self.events.push(Event { at, message });
        let excess = self.events.len().saturating_sub(EVENTS_KEPT);
        self.events.drain(..excess);
    }

    /// True when `version` of `package` failed before (by Debian version
    /// equality: `0:1.0` failed means `1.0` failed).
    pub fn is_bad(&self, package: &str, version: &str) -> bool {
        self.bad
            .get(package)
            .is_some_and(|v| v.iter().any(|b| same_version(b, version)))
    }

    /// Records that `version` of `package` failed, once.
    pub fn mark_bad(&mut self, package: &str, version: &str) {
        if !self.is_bad(package, version) {
            self.bad
                .entry(package.to_string())
                .or_default()
                .push(version.to_string());
        }
    }

    /// Replaces `path` atomically with this state.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| StateError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        write_atomically(path, &json)
    }
}

/// temp file in the same directory, write, fsync, rename over `path`, fsync
/// the directory so the rename itself is durable.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let write_error = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp: PathBuf = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(write_error)
}

/// Removes temp files that a write killed half-way left beside `path`
/// (`.state.json.tmp.PID`); the state itself is whole either way. Called
/// with the [`StateLock`] held, so no other agent is writing; a file whose
/// PID is still alive is left alone all the same (a process of an older
/// agent that took no lock).
pub fn remove_stale_temp_files(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!(".{}.tmp.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(&prefix) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|pid| pid != std::process::id() && process_alive(pid));
        if !alive {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// True when a process with this PID exists (signal 0 probes without
/// sending anything; EPERM means it exists but is not ours).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with signal 0 only checks for the process.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The name of the lock file in the state directory.
pub const LOCK_FILE: &str = "lock";

/// How long a second `run` cycle or `once` waits for the lock before it
/// gives up (exit 75, naming the holder).
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// One writer per state directory: an exclusive `flock(2)` on
/// `STATE_DIR/lock`, held by a `run` cycle or a `once` from before state is
/// read until after it is last written, and released when dropped (or when
/// the process dies: the kernel drops a dead process's locks, so a crash
/// never leaves the directory locked). The holder writes its PID into the
/// file so that a runner that gives up can name it. `status` takes no lock:
/// state.json is replaced atomically, so a reader always sees a whole file.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    /// Takes the lock, waiting up to `wait` (polling: flock has no timeout).
    pub async fn acquire(state_dir: &Path, wait: Duration) -> Result<StateLock, Error> {
        let path = state_dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| StateError::Lock {
                path: path.clone(),
                source,
            })?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // SAFETY: flock(2) on a descriptor this function owns.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if locked == 0 {
                break;
            }
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(StateError::Lock {
                    path,
                    source: error,
                }
                .into());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Busy {
                    holder: lock_holder(&path),
                    path,
                    waited: wait,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Who holds it, for a runner that gives up; best effort (the lock,
        // not this text, is what excludes).
        let pid = format!("{}\n", std::process::id());
        let _ = file
            .set_len(0)
            .and_then(|()| file.write_all_at(pid.as_bytes(), 0));
        Ok(StateLock { _file: file })
    }
}

/// The PID written in a lock file, if it can be read.
fn lock_holder(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Identifies one version of state.json on disk (it is replaced by rename,
/// so every write makes a new inode): lets a long-running agent skip
/// re-reading a file that nobody else wrote since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    inode: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileStamp {
    /// The stamp of `path`, `None` when it does not exist or cannot be read.
    pub fn of(path: &Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            inode: meta.ino(),
            size: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        })
    }
}

/// Creates `dir` (and parents) if needed.
pub fn ensure_dir(dir: &Path) -> Result<(), StateError> {
    std::fs::create_dir_all(dir).map_err(|source| StateError::Dir {
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_a_fresh_node_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut state = State::load(&path).unwrap();
        assert_eq!(state.format, FORMAT);
        assert!(state.installed.is_empty());
        state.installed.insert(
            "myapp".into(),
            InstalledPackage {
                version: "1.0".into(),
                sha256: Some("00".into()),
                installed_at: Some(Utc::now()),
                deb: None,
            },
        );
        state.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), state);
        // no temp file left behind
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_fresh_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{\"format\": 1, \"installed\": ").unwrap();
        assert!(matches!(
            State::load(&path),
            Err(StateError::Corrupt { .. })
        ));
    }
}
