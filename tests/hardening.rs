//! What breaks agents in production rather than in a demo: two runs on one
//! state directory, a cache directory shared with another program or
//! wiped by tmpfiles, a legal but unusual version string, and a .deb that
//! is not what its (correctly hashed) index entry says.
//!
//! Every test runs the real binary against a hand-made signed repository
//! over file:// and installs with real dpkg into a sandbox root; waits are
//! bounded and wait for something, never for a fixed time.

// The tests/common modules this binary uses (see tests/common/README.md).
mod common {
    pub mod cmd;
    pub mod dpkg;
    pub mod fixture;
    pub mod gpg;
    pub mod http;
    pub mod node;
    pub mod repo;
}

use std::path::Path;
use std::time::{Duration, Instant};

use common::fixture::*;
use common::repo::{HandRepo, ReleaseFields, sha256_hex};
use pulldeploy::state::State;

/// myapp 1.0 published and installed by `once`.
fn installed_1_0() -> Fixture {
    let mut f = fixture(&["myapp"], "");
    f.publish(&[pkg("myapp", "1.0")]);
    assert_ok(&f.once(), "installed myapp 1.0");
    f
}

/// The node's whole cache directory (not only the agent's part of it).
fn node_cache_dir(f: &Fixture) -> std::path::PathBuf {
    f.node.dir.path().join("cache")
}

/// Publishes `packages` as the whole Packages text (the repository keeps
/// nothing else), with a fresh signed Release.
fn publish_packages_text(f: &Fixture, packages: &str) {
    let lines = f.repo.write_indexes(packages, false);
    let release = HandRepo::release_text(&ReleaseFields::default(), &lines);
    f.repo.write_signed(&f.key, &release);
}

fn state_versions(state: &State) -> (Option<String>, Option<String>) {
    (
        state.installed.get("myapp").map(|p| p.version.clone()),
        state
            .last_known_good
            .get("myapp")
            .map(|p| p.version.clone()),
    )
}

// ---- Two runs on one state ----------------------------------------------------

/// A second `once` while the first is in dpkg waits for the state lock,
/// then gives up with exit 75 naming the first one's PID, and writes
/// nothing: the first commits undisturbed.
#[test]
fn two_runs_on_one_state() {
    let mut f = installed_1_0();
    std::fs::write(f.root().join("hold"), b"").expect("hold");
    f.publish(&[pkg("myapp", "1.0.1").postinst(&hold_at("in-postinst"))]);
    let accepted = f.node.state().release;

    let first = Running::start(f.node.command(&["once"]));
    wait_for("1.0.1's postinst", LIMIT, || {
        f.root().join("in-postinst").exists()
    });
    let state_during = std::fs::read(f.state_dir().join("state.json")).expect("state.json");
    // `status` takes no lock: it answers at once while the lock is held.
    let status = Running::start(f.node.command(&["status"])).finish(Duration::from_secs(5));
    assert!(status.status.success(), "status: {}", stderr(&status));
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("myapp: 1.0"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let started = Instant::now();
    let second = Running::start(f.node.command(&["once"])).finish(LIMIT);
    let waited = started.elapsed();
    assert_failed(
        &second,
        75,
        &[&format!("PID {}", first.pid()), "holds", "try again later"],
    );
    assert!(
        waited >= Duration::from_secs(9),
        "gave up after {waited:?}, before its bounded wait"
    );
    assert_eq!(
        std::fs::read(f.state_dir().join("state.json")).expect("state.json"),
        state_during,
        "the second run wrote state.json"
    );

    std::fs::remove_file(f.root().join("hold")).expect("release the postinst");
    let out = first.finish(LIMIT);
    assert_ok(&out, "installed myapp 1.0.1");
    let state = f.node.state();
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0.1"));
    assert_eq!(
        state_versions(&state),
        (Some("1.0.1".into()), Some("1.0".into()))
    );
    // The Release of 1.0.1 is the one accepted (two publishes may share a
    // Date second; the ETag of the replaced InRelease differs).
    let (now, then) = (
        state.release.expect("accepted"),
        accepted.expect("accepted"),
    );
    assert!(
        now.date >= then.date,
        "the accepted Release Date moved back"
    );
    assert_ne!(now.etag, then.etag, "the 1.0.1 Release was not accepted");
}

/// `once` commits between two cycles of a running daemon; the daemon's
/// next cycles read state again under the lock instead of saving the copy
/// it loaded at start over it (which lost last-known-good and moved the
/// accepted Release Date backwards).
#[test]
fn once_while_the_daemon_runs() {
    let mut f = installed_1_0();
    let mut daemon = Running::start(f.node.command(&["run"]));
    let port = daemon.health_port();
    wait_for("the daemon's first cycle", LIMIT, || cycles(port) >= 1);

    f.publish(&[pkg("myapp", "1.0.1")]);
    // The daemon would install it too; hold its cycles off by holding the
    // state lock ourselves while `once` runs... which `once` itself needs.
    // Instead, let whichever comes first install it: both must end in one
    // consistent state.
    let out = Running::start(f.node.command(&["once"])).finish(LIMIT);
    assert!(
        out.status.success(),
        "once failed: {:?}\n{}",
        out.status,
        stderr(&out)
    );
    let after_once = cycles(port);
    wait_for("two more daemon cycles", LIMIT, || {
        cycles(port) >= after_once + 2
    });
    let state = f.node.state();
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0.1"));
    assert_eq!(
        state_versions(&state),
        (Some("1.0.1".into()), Some("1.0".into())),
        "state.json after the daemon's next cycles"
    );
    assert!(
        state.installed["myapp"].sha256.is_some(),
        "the commit's record of the .deb was lost"
    );
    let (status, body) = healthz(port);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"myapp\": \"1.0.1\""), "{body}");
    daemon.terminate();
    daemon.wait(LIMIT);
}

/// pulldeploy_cycles_total from the daemon's /metrics.
fn cycles(port: u16) -> u64 {
    let response = common::http::http_request(port, "GET", "/metrics", &[], &[]);
    response
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("pulldeploy_cycles_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

// ---- A cache directory shared with another program ------------------------------

#[test]
fn cache_pruning_deletes_only_its_own_files() {
    let mut f = fixture(&["myapp"], "");
    let shared = node_cache_dir(&f);
    std::fs::create_dir_all(shared.join("other-program")).expect("mkdir");
    let theirs = [
        "other-program.deb",
        "myapp_0.9_amd64.deb",
        "notes.txt",
        "other-program/data",
    ];
    for name in theirs {
        std::fs::write(shared.join(name), b"not pulldeploy's").expect("write");
    }
    for version in ["1.0", "1.1", "1.2"] {
        f.publish(&[pkg("myapp", version)]);
        assert_ok(&f.once(), &format!("installed myapp {version}"));
    }
    for name in theirs {
        assert_eq!(
            std::fs::read(shared.join(name)).ok().as_deref(),
            Some(&b"not pulldeploy's"[..]),
            "{name} in the shared cache_dir was touched"
        );
    }
    // Its own part keeps exactly the current and the last known good .deb.
    assert_eq!(
        cached_debs(&f.node),
        ["myapp_1.1_amd64.deb", "myapp_1.2_amd64.deb"]
    );
}

// ---- Rollback without a cached .deb -----------------------------------------------

/// tmpfiles (or an operator) emptied the cache; the next upgrade's postinst
/// fails. The way back was fetched again before dpkg ran, so the node goes
/// back to 1.0 instead of staying half-configured.
#[test]
fn rollback_without_a_cached_deb() {
    let mut f = installed_1_0();
    let before = f.node.state();
    wipe(&node_cache_dir(&f));
    f.publish(&[pkg("myapp", "1.1").postinst("echo 'myapp 1.1 cannot start' >&2\nexit 1")]);
    let out = f.once();
    assert_failed(
        &out,
        70,
        &["myapp 1.1 failed to install", "rolled back to myapp 1.0"],
    );
    assert!(
        stderr(&out).contains("fetching it again"),
        "{}",
        stderr(&out)
    );
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    assert_eq!(
        std::fs::read_to_string(f.root().join("usr/share/myapp/VERSION")).expect("VERSION"),
        "1.0\n"
    );
    let log = dpkg_log(&f.node);
    assert!(
        log.iter()
            .any(|l| l.contains("status installed myapp:amd64 1.0")),
        "1.0 not reinstalled:\n{}",
        log.join("\n")
    );
    let state = f.node.state();
    assert_eq!(versions(&state.installed), versions(&before.installed));
    assert_eq!(state.bad, bad(&[("myapp", &["1.1"])]));
    assert_eq!(state.release, before.release);
    // The way back fetched again stays for the next upgrade.
    assert_eq!(cached_debs(&f.node), ["myapp_1.0_amd64.deb"]);
}

/// The cache is empty and the repository no longer offers 1.0: the
/// upgrade does not start at all, and says why.
#[test]
fn no_way_back_no_upgrade() {
    let mut f = installed_1_0();
    let before = f.node.state();
    let dpkg_before = dpkg_log(&f.node);
    wipe(&node_cache_dir(&f));
    f.publish(&[pkg("myapp", "1.1")]);
    let only_1_1: Vec<&str> = f
        .repo
        .packages_text()
        .leak()
        .split("\n\n")
        .filter(|p| !p.contains("Version: 1.0\n"))
        .collect();
    publish_packages_text(&f, &only_1_1.join("\n\n"));

    let out = f.once();
    assert_failed(
        &out,
        70,
        &[
            "not upgrading 1.0 to 1.1",
            "no way back",
            "no longer offers 1.0",
            "staying on 1.0",
        ],
    );
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    assert_eq!(dpkg_log(&f.node), dpkg_before, "dpkg ran");
    let state = f.node.state();
    assert_eq!(versions(&state.installed), versions(&before.installed));
    assert_eq!(state.release, before.release);
    assert!(state.bad.is_empty(), "{:?}", state.bad);
}

/// Removes everything in `dir` (as `systemd-tmpfiles --clean` or an
/// operator would), keeping `dir` itself.
fn wipe(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read cache").flatten() {
        let path = entry.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).expect("wipe dir");
        } else {
            std::fs::remove_file(&path).expect("wipe file");
        }
    }
}

// ---- Versions compared by Debian order ----------------------------------------------

/// aptly publishes `Version: 0:1.0.1` as the control file spells it; dpkg
/// records `1.0.1`. One version: installed, committed, not marked bad, and
/// the next version is still taken.
#[test]
fn epoch_zero_version_is_the_same_version() {
    let mut f = fixture(&["myapp"], "");
    f.publish(&[pkg("myapp", "0:1.0.1")]);
    assert_ok(&f.once(), "installed myapp 0:1.0.1");
    let state = f.node.state();
    assert!(state.bad.is_empty(), "marked bad: {:?}", state.bad);
    assert_eq!(
        state.installed.get("myapp").map(|p| p.version.as_str()),
        Some("0:1.0.1")
    );
    let again = f.once();
    assert!(again.status.success(), "{}", stderr(&again));
    let said = String::from_utf8_lossy(&again.stdout).trim().to_string();
    assert!(
        said == "unchanged" || said == "up to date",
        "second run: {said:?}\n{}",
        stderr(&again)
    );
    assert_eq!(f.node.state().last_error, None);

    f.publish(&[pkg("myapp", "1.0.2")]);
    assert_ok(&f.once(), "installed myapp 1.0.2");
    let state = f.node.state();
    assert_eq!(
        state_versions(&state),
        (Some("1.0.2".into()), Some("0:1.0.1".into()))
    );
}

// ---- The .deb against its index entry ----------------------------------------------

/// An index entry for myapp whose correctly hashed .deb is another package
/// (or another version, or architecture): refused before dpkg, exit 65.
#[test]
fn deb_not_matching_its_index_entry() {
    let f = installed_1_0();
    let before = f.node.state();
    let dpkg_before = dpkg_log(&f.node);
    let evil = pkg("evil-tool", "6.6.6").postinst("touch \"$DPKG_ROOT/evil-ran\"");
    let older = pkg("myapp", "1.9");
    let cases = [
        (build(f.debs.path(), &evil), "myapp", "6.6.6", "Package"),
        (build(f.debs.path(), &older), "myapp", "2.0", "Version"),
    ];
    for (deb, name, version, field) in cases {
        let bytes = std::fs::read(&deb).expect("read deb");
        let pool = format!("pool/main/{name}_{version}_amd64.deb");
        std::fs::create_dir_all(f.repo.path("pool/main")).expect("mkdir pool");
        std::fs::write(f.repo.path(&pool), &bytes).expect("write pool");
        let entry = format!(
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: t <t@example.invalid>\n\
             Installed-Size: 4\nDescription: mislabelled\nFilename: {pool}\nSize: {}\nSHA256: {}\n",
            bytes.len(),
            sha256_hex(&bytes)
        );
        publish_packages_text(&f, &format!("{}\n{entry}", f.repo.packages_text()));
        let out = f.once();
        assert_failed(&out, 65, &["the .deb says", field, "index entry"]);
        assert!(
            !f.root().join("evil-ran").exists(),
            "evil-tool's postinst ran"
        );
        assert_eq!(f.node.installed("evil-tool"), None);
        assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
        assert_eq!(dpkg_log(&f.node), dpkg_before, "dpkg ran ({field})");
        let state = f.node.state();
        assert_eq!(versions(&state.installed), versions(&before.installed));
        assert_eq!(state.release, before.release);
        assert!(
            !cached_debs(&f.node).iter().any(|d| d.contains(version)),
            "the mislabelled .deb stayed in the cache: {:?}",
            cached_debs(&f.node)
        );
    }
}

// ---- Work done once ---------------------------------------------------------------

/// An install cycle parses dpkg's status file once before dpkg and once
/// after it, and says "installing" once per package.
#[test]
fn work_done_once_per_install() {
    let mut f = installed_1_0();
    f.publish(&[pkg("myapp", "1.1")]);
    let mut command = f.node.command(&["once"]);
    command.env("PULLDEPLOY_LOG", "pulldeploy=debug");
    let out = Running::start(command).finish(LIMIT);
    assert_ok(&out, "installed myapp 1.1");
    let log = stderr(&out);
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count("reading dpkg status"), 2, "{log}");
    assert_eq!(count("installing package=myapp"), 1, "{log}");
}

/// 1.0 was installed by hand (user-data, apt): the agent has no .deb of
/// it. The way back is fetched from the repository before the upgrade,
/// used by the rollback, and kept for the next upgrade.
#[test]
fn way_back_for_a_version_installed_by_hand() {
    let mut f = fixture(&["myapp"], "");
    let debs = f.publish(&[pkg("myapp", "1.0")]);
    f.node.root.dpkg_install(&debs[0]);
    let out = f.once();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(f.node.state().installed["myapp"].deb, None);

    f.publish(&[pkg("myapp", "1.1").postinst("exit 1")]);
    let out = f.once();
    assert_failed(&out, 70, &["rolled back to myapp 1.0"]);
    assert_eq!(f.node.installed("myapp").as_deref(), Some("1.0"));
    assert_eq!(cached_debs(&f.node), ["myapp_1.0_amd64.deb"]);
    let state = f.node.state();
    assert_eq!(
        state.installed["myapp"].deb.as_deref(),
        Some("myapp_1.0_amd64.deb")
    );
}
