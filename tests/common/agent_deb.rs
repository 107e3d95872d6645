//! The agent's own .deb, built by the documented `packaging/build-deb.sh`
//! from the test build of the binary (gzip: xz would take 15 s on the
//! unoptimized binary; lintian and dpkg accept both).

use std::path::PathBuf;
use std::process::Command;

use super::cmd::{process_dir, run};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pulldeploy");

/// `pulldeploy --version` of the binary under test, e.g. "0.1.0".
pub fn binary_version() -> String {
    let out = run(Command::new(BIN).arg("--version"), "pulldeploy --version");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("pulldeploy ")
        .expect("--version prints 'pulldeploy VERSION'")
        .to_string()
}

/// Builds the .deb under its own version or `version`, into this test
/// process's directory `name` (see [`process_dir`]); returns the path the
/// script printed.
pub fn build(name: &str, version: Option<&str>) -> PathBuf {
    let out_dir = process_dir(name).join(version.unwrap_or("own"));
    let _ = std::fs::remove_dir_all(&out_dir);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/build-deb.sh");
    let mut command = Command::new(script);
    command
        .args(["--binary", BIN, "--compress", "gzip", "--out"])
        .arg(&out_dir);
    if let Some(version) = version {
        command.args(["--version", version]);
    }
    let out = run(&mut command, "packaging/build-deb.sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
