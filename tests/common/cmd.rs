//! Running commands and making files for the fixtures and tests. Every helper panics with
//! the failing command, its exit status, stdout and stderr, so a broken fixture says what broke.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

/// Render an `Output` for a panic message.
pub fn describe_output(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Panic with `what`, the exit status, stdout and stderr unless `out` succeeded.
#[track_caller]
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed\n{}",
        describe_output(out)
    );
}

/// Run `cmd` to completion with stdin closed; panic (showing stdout and stderr) unless it exits 0.
#[track_caller]
pub fn run(cmd: &mut Command, what: &str) -> Output {
    run_with_input(cmd, &[], what)
}

/// Like [`run`], feeding `input` on stdin (from a thread, so large inputs cannot deadlock).
#[track_caller]
pub fn run_with_input(cmd: &mut Command, input: &[u8], what: &str) -> Output {
    let out = output_with_input(cmd, input, what);
    assert!(
        out.status.success(),
        "{what} failed: {cmd:?}\n{}",
        describe_output(&out)
    );
    out
}

/// Run `cmd` with `input` on stdin and return its output whatever the exit status.
/// Panics only if the program cannot be started.
#[track_caller]
pub fn output_with_input(cmd: &mut Command, input: &[u8], what: &str) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("child stdin was piped");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // A child that does not read its stdin closes the pipe: that is not our failure.
        let _ = stdin.write_all(&input);
    });
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{what}: waiting for {cmd:?}: {e}"));
    writer.join().expect("stdin writer thread panicked");
    out
}

/// A directory for fixtures: under /tmp rather than $TMPDIR, because gpg-agent's socket path
/// (`GNUPGHOME/S.gpg-agent`) must fit in sockaddr_un (108 bytes).
pub fn fixture_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap_or_else(|e| panic!("creating a tempdir in /tmp for {prefix}: {e}"))
}

pub fn mkdir(path: &Path) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", path.display()));
}

pub fn write_file(path: &Path, contents: impl AsRef<[u8]>) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

#[allow(dead_code, reason = "not every test binary uses it")]
pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// `CARGO_TARGET_TMPDIR/NAME/PID`: a directory for what one test process
/// builds once (the agent's .deb), so that two test runs at once in one
/// tree never write one file. The directories of processes that are gone
/// are deleted. Not created.
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn process_dir(name: &str) -> PathBuf {
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    for entry in fs::read_dir(&parent).into_iter().flatten().flatten() {
        let gone = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
            .is_none_or(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if gone {
            let path = entry.path();
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
    }
    parent.join(std::process::id().to_string())
}

/// The host's `PATH`, for children started with `env_clear()`.
pub fn host_path() -> String {
    std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_string())
}

/// Pseudo-random bytes (splitmix64, seeded per call from time, pid and a counter): enough to
/// make payloads incompressible and distinct between builds; not cryptographic.
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn random_bytes(len: usize) -> Vec<u8> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut state = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `command` run under libfaketime: `faketime ARGS PROGRAM ARGS...` with
/// the same environment (a start time, or `-f` and an offset such as
/// `+2h`). The monotonic clock is left alone (FAKETIME_DONT_FAKE_MONOTONIC),
/// so that tokio's timers run as they do on a node whose wall clock is
/// simply wrong.
#[allow(dead_code, reason = "not every test binary uses it")]
pub fn under_faketime(command: &Command, faketime: &[&str]) -> Command {
    let mut faked = Command::new("faketime");
    faked
        .args(faketime)
        .arg(command.get_program())
        .args(command.get_args())
        .env_clear()
        .envs(
            command
                .get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        )
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    if let Some(dir) = command.get_current_dir() {
        faked.current_dir(dir);
    }
    faked
}
