//! The README's first command, `scripts/demo.sh`, run end to end against
//! the binary under test (so the demo cannot rot unnoticed).

#[test]
fn readme_demo_installs_upgrades_and_reports() {
    let work = tempfile::tempdir().expect("tempdir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(work.path().join("demo"))
        .env("PULLDEPLOY_BIN", env!("CARGO_BIN_EXE_pulldeploy"))
        .output()
        .expect("run scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "installed demo-app 1.0",
        "sandbox has: 1.0",
        "installed demo-app 1.1",
        "sandbox has: 1.1",
        "\nunchanged\n",
        "demo-app: 1.1",
        "last known good: 1.0",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from the demo's output:\n{stdout}"
        );
    }
    // gpg-agent of the demo's key ring is not left behind.
    let _ = std::process::Command::new("gpgconf")
        .env("GNUPGHOME", work.path().join("demo/gnupg"))
        .args(["--kill", "all"])
        .status();
}
