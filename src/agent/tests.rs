//! The install transaction and the cycle's bookkeeping, with fakes for the
//! source (never reached, or only ever answering 304), the installer and
//! the clock: commit, every rollback path, the journal written before the
//! installer runs, a deferred lock, an interrupted install resumed by the
//! next cycle, and expiry judged by the repository's clock.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sequoia_openpgp::cert::CertBuilder;
use sequoia_openpgp::serialize::SerializeInto;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::{Agent, CACHE_SUBDIR, Change, Outcome, Plan, PlannedInstall};
use crate::clock::{Clock, ServerTime};
use crate::config::Config;
use crate::error::{Error, InstallError, SourceError, VerifyError};
use crate::health::Health;
use crate::install::{DpkgStatus, InstallLock, Installer};
use crate::keyring::Keyring;
use crate::source::{BoxFuture, Fetched, Source};
use crate::state::{AcceptedRelease, FileStamp, InstalledPackage, State};

/// One install call: the debs given (as `NAME VERSION`), and state.json
/// as it was while the installer ran.
type Run = (Vec<String>, Option<State>);

/// A package manager in memory. A "deb" is a file whose text is
/// `NAME VERSION`; installing one records that version, unless the
/// version is in `failing` (a postinst that exits 1: dpkg leaves the
/// package half-configured, so it is not installed either). Clones share
/// the database and the record of runs: the test keeps one, the agent owns
/// another.
#[derive(Default, Clone)]
struct FakeInstaller {
    installed: Arc<Mutex<BTreeMap<String, String>>>,
    failing: HashSet<String>,
    /// The lock is held by another package manager.
    locked_elsewhere: bool,
    /// What each install call was given, and what state.json said then.
    runs: Arc<Mutex<Vec<Run>>>,
    state_path: PathBuf,
}

impl Installer for FakeInstaller {
    fn status(&self) -> Result<Arc<DpkgStatus>, InstallError> {
        let installed = self.installed.lock().expect("fake installer");
        Ok(Arc::new(DpkgStatus::with_versions(
            installed.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        )))
    }

    fn status_stamp(&self) -> Option<FileStamp> {
        None
    }

    fn forget_status(&self) {}

    fn needs_recovery(&self) -> Result<bool, InstallError> {
        Ok(false)
    }

    fn lock(&self, _timeout: Duration) -> BoxFuture<'_, Result<Option<InstallLock>, InstallError>> {
        let held = !self.locked_elsewhere;
        Box::pin(async move { Ok(held.then(|| Box::new(()) as InstallLock)) })
    }

    fn recover(&self) -> BoxFuture<'_, Result<(), InstallError>> {
        Box::pin(async { Ok(()) })
    }

    fn install<'a>(&'a self, debs: &'a [PathBuf]) -> BoxFuture<'a, Result<(), InstallError>> {
        Box::pin(async move {
            let mut given = Vec::new();
            let mut failed = None;
            for deb in debs {
                let text = std::fs::read_to_string(deb).expect("fake deb");
                let (name, version) = text.split_once(' ').expect("NAME VERSION");
                given.push(text.clone());
                if self.failing.contains(version) {
                    self.installed.lock().expect("fake installer").remove(name);
                    failed = Some(text.clone());
                } else {
                    self.installed
                        .lock()
                        .expect("fake installer")
                        .insert(name.into(), version.into());
                }
            }
            let state = State::load(&self.state_path).ok();
            self.runs
                .lock()
                .expect("fake installer")
                .push((given, state));
            match failed {
                Some(package) => Err(InstallError::Dpkg {
                    packages: package,
                    status: "exit status: 1".into(),
                    stderr: "postinst exited 1".into(),
                }),
                None => Ok(()),
            }
        })
    }
}

/// The source is never reached by these tests: a cycle that reads the
/// repository fails.
struct NoSource;

impl Source for NoSource {
    fn url(&self, path: &str) -> String {
        format!("fake://{path}")
    }

    fn get<'a>(
        &'a self,
        path: &'a str,
        _if_none_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Fetched, SourceError>> {
        Box::pin(async move {
            Err(SourceError::Unavailable {
                url: self.url(path),
                message: "the fake source was asked".into(),
            })
        })
    }
}

/// A repository that has not changed: every request is answered 304, by a
/// server whose clock (its Date header) is `server`, when it has one.
struct UnchangedSource(Option<Arc<ServerTime>>);

impl Source for UnchangedSource {
    fn url(&self, path: &str) -> String {
        format!("fake://{path}")
    }

    fn get<'a>(
        &'a self,
        _path: &'a str,
        _if_none_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Fetched, SourceError>> {
        Box::pin(async { Ok(Fetched::NotModified) })
    }

    fn server_time(&self) -> Option<Arc<ServerTime>> {
        self.0.clone()
    }
}

struct FixedClock(DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}

fn noon() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap()
}

struct Node {
    dir: TempDir,
    agent: Agent,
    installer: FakeInstaller,
}

/// A node whose installer has `installed`, fails `failing` versions, and
/// (with `locked_elsewhere`) never gets the lock.
fn node(installed: &[(&str, &str)], failing: &[&str], locked_elsewhere: bool) -> Node {
    node_with(
        installed,
        failing,
        locked_elsewhere,
        Box::new(NoSource),
        noon(),
    )
}

/// The same, reading `source`, its own clock at `clock`.
fn node_with(
    installed: &[(&str, &str)],
    failing: &[&str],
    locked_elsewhere: bool,
    source: Box<dyn Source>,
    clock: DateTime<Utc>,
) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _) = CertBuilder::new()
        .add_userid("Repo <repo@acme.test>")
        .add_signing_subkey()
        .generate()
        .expect("certificate");
    let keyring_path = dir.path().join("keyring.asc");
    std::fs::write(&keyring_path, cert.armored().to_vec().expect("armor")).expect("keyring");
    let config_path = dir.path().join("config.toml");
    let text = format!(
        "[repository]\nurl = \"file:///nonexistent\"\nsuite = \"production\"\narchitecture = \"amd64\"\n\
         keyring = \"keyring.asc\"\n\n[agent]\npackages = [\"myapp\"]\nstate_dir = \"state\"\n\
         cache_dir = \"cache\"\n\n[install]\nroot = {:?}\nlock_timeout = \"1s\"\n",
        dir.path().join("root")
    );
    std::fs::write(&config_path, &text).expect("config");
    let config = Config::from_toml(&config_path, &text).expect("config");
    std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
    std::fs::create_dir_all(dir.path().join("cache").join(CACHE_SUBDIR)).expect("cache dir");
    let installer = FakeInstaller {
        installed: Arc::new(Mutex::new(
            installed
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        )),
        failing: failing.iter().map(|v| v.to_string()).collect(),
        locked_elsewhere,
        runs: Arc::default(),
        state_path: config.state_path(),
    };
    let health = Health::for_config(&config);
    let agent = Agent::from_parts(
        config,
        "amd64".into(),
        source,
        Box::new(installer.clone()),
        Keyring::load(&keyring_path).expect("keyring"),
        Box::new(FixedClock(clock)),
        health,
    );
    Node {
        dir,
        agent,
        installer,
    }
}

impl Node {
    /// A fake .deb of `name version` in the agent's cache, as the fetch
    /// half leaves it: (file name, SHA256).
    fn cached_deb(&self, name: &str, version: &str) -> (String, String) {
        let file = format!("{name}_{version}_amd64.deb");
        let text = format!("{name} {version}");
        let path = self.cache().join(&file);
        std::fs::write(&path, &text).expect("fake deb");
        (file, hex::encode(Sha256::digest(text.as_bytes())))
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache").join(CACHE_SUBDIR)
    }

    fn state_path(&self) -> PathBuf {
        self.dir.path().join("state/state.json")
    }

    fn installed(&self) -> Option<String> {
        self.installer
            .installed
            .lock()
            .expect("fake installer")
            .get("myapp")
            .cloned()
    }

    /// State with `version` of myapp committed, its .deb in the cache
    /// (when `cached`), saved to disk.
    fn committed(&self, version: &str, cached: bool) -> State {
        let mut state = State::load(&self.state_path()).expect("state");
        let (deb, sha256) = match cached {
            true => {
                let (file, sha) = self.cached_deb("myapp", version);
                (Some(file), Some(sha))
            }
            false => (None, None),
        };
        state.installed.insert(
            "myapp".into(),
            InstalledPackage {
                version: version.into(),
                sha256,
                installed_at: Some(noon()),
                deb,
            },
        );
        state.save(&self.state_path()).expect("save state");
        state
    }

    /// The plan the fetch half would hand over: myapp `to`, from what
    /// state has committed.
    fn plan(&self, state: &State, to: &str) -> Plan {
        let (file, sha256) = self.cached_deb("myapp", to);
        Plan {
            release: accepted(),
            installs: vec![PlannedInstall {
                name: "myapp".into(),
                from: state.installed.get("myapp").cloned(),
                to: to.into(),
                deb: self.cache().join(file),
                sha256,
            }],
            policy: None,
            waiting: None,
            recheck_debs: false,
        }
    }
}

impl Node {
    /// Saves what a crash after the journal was written leaves: `plan`
    /// pending in state.json over `state`, its .deb in the cache, the
    /// installer at the old version.
    fn crashed_after_the_journal(&self, state: &State, plan: &Plan) {
        let mut crashed = state.clone();
        let install = &plan.installs[0];
        crashed.pending = Some(crate::state::Pending {
            started_at: noon(),
            release: plan.release.clone(),
            packages: vec![crate::state::PendingPackage {
                name: install.name.clone(),
                from: install.from.clone(),
                to: InstalledPackage {
                    version: install.to.clone(),
                    sha256: Some(install.sha256.clone()),
                    installed_at: Some(noon()),
                    deb: install
                        .deb
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned()),
                },
            }],
        });
        crashed.save(&self.state_path()).expect("save");
    }
}

fn accepted() -> AcceptedRelease {
    AcceptedRelease {
        date: noon(),
        valid_until: None,
        etag: Some("\"new\"".into()),
        file: crate::state::ReleaseFile::InRelease,
        url: "fake://dists/production/InRelease".into(),
        packages: vec!["myapp".into()],
        signer: "FPR".into(),
        accepted_at: noon(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn commit_records_the_new_version_and_keeps_the_old_as_last_known_good() {
    let n = node(&[("myapp", "1.0")], &[], false);
    let mut state = n.committed("1.0", true);
    let plan = n.plan(&state, "1.1");
    let outcome = runtime().block_on(n.agent.apply(plan, &mut state));
    assert_eq!(
        outcome.expect("installed"),
        Outcome::Installed(vec![Change {
            package: "myapp".into(),
            from: Some("1.0".into()),
            to: "1.1".into()
        }])
    );
    assert_eq!(n.installed().as_deref(), Some("1.1"));
    let on_disk = State::load(&n.state_path()).expect("state");
    assert_eq!(on_disk, state, "state.json is what the agent holds");
    assert_eq!(state.installed["myapp"].version, "1.1");
    assert_eq!(
        state.installed["myapp"].deb.as_deref(),
        Some("myapp_1.1_amd64.deb")
    );
    assert_eq!(state.last_known_good["myapp"].version, "1.0");
    assert_eq!(state.release, Some(accepted()));
    assert_eq!(state.pending, None);
    assert!(state.bad.is_empty());
    assert_eq!(state.events.last().map(|e| e.at), Some(noon()));
}

#[test]
fn the_journal_is_on_disk_before_the_installer_runs() {
    let n = node(&[("myapp", "1.0")], &[], false);
    let mut state = n.committed("1.0", true);
    let plan = n.plan(&state, "1.1");
    runtime()
        .block_on(n.agent.apply(plan, &mut state))
        .expect("installed");
    let runs = n.installer.runs.lock().expect("runs");
    let (given, seen) = &runs[0];
    assert_eq!(given, &["myapp 1.1"]);
    let pending = seen
        .as_ref()
        .and_then(|s| s.pending.as_ref())
        .expect("no pending install in state.json while the installer ran");
    assert_eq!(pending.packages[0].to.version, "1.1");
    assert_eq!(
        pending.packages[0]
            .from
            .as_ref()
            .map(|f| f.version.as_str()),
        Some("1.0")
    );
}

#[test]
fn failed_install_rolls_back_to_the_committed_version() {
    let n = node(&[("myapp", "1.0")], &["1.1"], false);
    let mut state = n.committed("1.0", true);
    let before = state.clone();
    let plan = n.plan(&state, "1.1");
    let error = runtime()
        .block_on(n.agent.apply(plan, &mut state))
        .expect_err("1.1 fails");
    assert!(
        matches!(error, Error::Install(InstallError::RolledBack { ref restored, .. }) if restored == "myapp 1.0"),
        "{error}"
    );
    assert_eq!(n.installed().as_deref(), Some("1.0"));
    let runs = n.installer.runs.lock().expect("runs");
    assert_eq!(
        runs.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        [vec!["myapp 1.1".to_string()], vec!["myapp 1.0".to_string()]]
    );
    assert_eq!(state.installed, before.installed);
    assert_eq!(state.release, before.release, "the Release moved");
    assert_eq!(state.bad["myapp"], ["1.1"]);
    assert_eq!(state.pending, None);
    assert_eq!(State::load(&n.state_path()).expect("state"), state);
}

#[test]
fn rollback_fails_when_the_way_back_no_longer_hashes() {
    let n = node(&[("myapp", "1.0")], &["1.1"], false);
    let mut state = n.committed("1.0", true);
    let plan = n.plan(&state, "1.1");
    // The cached 1.0 changed after it was verified (disk error, tampering).
    std::fs::write(n.cache().join("myapp_1.0_amd64.deb"), "myapp 6.6.6").expect("tamper");
    let error = runtime()
        .block_on(n.agent.apply(plan, &mut state))
        .expect_err("1.1 fails");
    assert!(
        matches!(error, Error::Install(InstallError::RollbackFailed { ref rollback_error, .. }) if rollback_error.to_string().contains("SHA256 mismatch")),
        "{error}"
    );
    assert_eq!(n.installed(), None, "the tampered .deb was installed");
    assert!(
        !n.cache().join("myapp_1.0_amd64.deb").exists(),
        "a .deb that no longer hashes stays in the cache"
    );
    assert_eq!(state.bad["myapp"], ["1.1"]);
}

#[test]
fn a_first_install_that_fails_has_nothing_to_roll_back_to() {
    let n = node(&[], &["1.0"], false);
    let mut state = State::load(&n.state_path()).expect("state");
    let plan = n.plan(&state, "1.0");
    let error = runtime()
        .block_on(n.agent.apply(plan, &mut state))
        .expect_err("1.0 fails");
    assert!(
        matches!(error, Error::Install(InstallError::NoRollback { .. })),
        "{error}"
    );
    assert!(state.installed.is_empty());
    assert_eq!(state.bad["myapp"], ["1.0"]);
    assert_eq!(state.release, None);
}

#[test]
fn a_held_package_manager_lock_defers_without_moving_state() {
    let n = node(&[("myapp", "1.0")], &[], true);
    let mut state = n.committed("1.0", true);
    let before = state.clone();
    let plan = n.plan(&state, "1.1");
    let error = runtime()
        .block_on(n.agent.apply(plan, &mut state))
        .expect_err("deferred");
    assert!(matches!(error, Error::Deferred { .. }), "{error}");
    assert_eq!(error.exit_code(), crate::error::exit::TEMPFAIL);
    assert!(n.installer.runs.lock().expect("runs").is_empty());
    assert_eq!(state, before);
    assert_eq!(State::load(&n.state_path()).expect("state"), before);
}

#[test]
fn an_interrupted_install_is_finished_by_the_next_cycle_without_the_repository() {
    let n = node(&[("myapp", "1.0")], &[], false);
    let mut state = n.committed("1.0", true);
    let plan = n.plan(&state, "1.1");
    // What a crash after the journal was written leaves: pending in
    // state.json, the verified .deb in the cache, dpkg at the old version.
    n.crashed_after_the_journal(&state, &plan);
    // The cycle reads state.json under its lock; it never asks the source.
    let outcome = runtime()
        .block_on(n.agent.cycle(&mut state, std::future::pending()))
        .expect("not cancelled");
    assert_eq!(
        outcome.expect("resumed"),
        Outcome::Installed(vec![Change {
            package: "myapp".into(),
            from: Some("1.0".into()),
            to: "1.1".into()
        }])
    );
    assert_eq!(n.installed().as_deref(), Some("1.1"));
    assert_eq!(state.pending, None);
    assert_eq!(state.installed["myapp"].version, "1.1");
    assert_eq!(state.last_poll.as_ref().map(|p| p.at), Some(noon()));
}

#[test]
fn a_cycle_that_cannot_read_the_repository_records_the_error_and_moves_nothing() {
    let n = node(&[("myapp", "1.0")], &[], false);
    let mut state = n.committed("1.0", true);
    let before = state.clone();
    let result = runtime()
        .block_on(n.agent.cycle(&mut state, std::future::pending()))
        .expect("not cancelled");
    let error = result.expect_err("the fake source fails");
    assert!(matches!(error, Error::Source(_)), "{error}");
    assert_eq!(state.installed, before.installed);
    assert_eq!(state.release, before.release);
    let last_error = state.last_error.as_ref().expect("recorded");
    assert_eq!(last_error.at, noon());
    assert!(last_error.message.contains("the fake source was asked"));
    assert_eq!(State::load(&n.state_path()).expect("state"), state);
    assert!(n.installer.runs.lock().expect("runs").is_empty());
}

#[test]
fn a_resumed_install_hashes_its_debs_again_and_abandons_a_changed_one() {
    let n = node(&[("myapp", "1.0")], &[], false);
    let mut state = n.committed("1.0", true);
    let plan = n.plan(&state, "1.1");
    // A crash after the journal was written, before dpkg ran; while the
    // agent was down the cached 1.1 was replaced (disk error, tampering).
    n.crashed_after_the_journal(&state, &plan);
    std::fs::write(n.cache().join("myapp_1.1_amd64.deb"), "myapp 6.6.6").expect("tamper");

    let result = runtime()
        .block_on(n.agent.cycle(&mut state, std::future::pending()))
        .expect("not cancelled");
    let error = result.expect_err("a changed .deb must not be installed");
    assert!(
        matches!(
            error,
            Error::Verify(crate::error::VerifyError::HashMismatch { .. })
        ),
        "{error}"
    );
    assert!(
        n.installer.runs.lock().expect("runs").is_empty(),
        "the installer ran"
    );
    assert_eq!(n.installed().as_deref(), Some("1.0"));
    assert!(!n.cache().join("myapp_1.1_amd64.deb").exists());
    assert_eq!(state.pending, None, "the install is abandoned, not retried");
    assert_eq!(state.installed["myapp"].version, "1.0");
    assert!(state.bad.is_empty(), "the version is not to blame");
}

/// A node whose clock is 3 h behind runs on a Release whose Valid-Until
/// passed an hour ago by the repository's clock, from a mirror frozen
/// since (every poll a 304). By its own clock the Release is still valid;
/// expiry is judged at the later of its clock and the server's (the Date
/// headers), so the freeze is reported. A source without a server clock (a
/// directory) has only the node's clock to go by.
#[test]
fn a_node_clock_behind_does_not_keep_an_expired_release_current() {
    for server_clock in [true, false] {
        let server = server_clock.then(|| {
            let time = Arc::new(ServerTime::default());
            time.observe(noon());
            time
        });
        let behind = noon() - chrono::TimeDelta::hours(3);
        let n = node_with(
            &[("myapp", "1.0")],
            &[],
            false,
            Box::new(UnchangedSource(server)),
            behind,
        );
        let mut state = n.committed("1.0", true);
        state.release = Some(AcceptedRelease {
            date: noon() - chrono::TimeDelta::days(2),
            valid_until: Some(noon() - chrono::TimeDelta::hours(1)),
            ..accepted()
        });
        state.save(&n.state_path()).expect("save state");
        let before = state.clone();
        let result = runtime()
            .block_on(n.agent.cycle(&mut state, std::future::pending()))
            .expect("not cancelled");
        if server_clock {
            let error = result.expect_err("expired by the server's clock");
            assert!(
                matches!(error, Error::Verify(VerifyError::Expired { .. })),
                "{error}"
            );
            // The offset is what the node records and shows.
            assert_eq!(state.clock_offset.map(|s| s / 60), Some(-180));
        } else {
            assert_eq!(result.expect("no server clock"), Outcome::Unchanged);
            assert_eq!(state.clock_offset, None);
        }
        assert_eq!(state.release, before.release);
        assert_eq!(state.installed, before.installed);
        assert!(n.installer.runs.lock().expect("runs").is_empty());
    }
}

/// The fleet (lease expiry, halt times) goes by the agent's corrected
/// clock: a node whose clock runs 2 h ahead judges leases by the
/// repository's time, so it does not break another node's live lease as
/// expired.
#[test]
fn the_fleet_judges_lease_times_by_the_repository_clock() {
    let server = Arc::new(ServerTime::default());
    server.observe(noon());
    let ahead = noon() + chrono::TimeDelta::hours(2);
    let n = node_with(
        &[],
        &[],
        false,
        Box::new(UnchangedSource(Some(server))),
        ahead,
    );
    let store = crate::publish::store::DirStore::new(n.dir.path().join("fleet"));
    let agent = n.agent.with_fleet(crate::fleet::Fleet::with_store(
        Box::new(store),
        "production",
        "n-1",
    ));
    let fleet_now = agent.fleet.as_ref().expect("fleet").now();
    let off = fleet_now.signed_duration_since(noon());
    assert!(
        off >= chrono::TimeDelta::zero() && off < chrono::TimeDelta::seconds(60),
        "the fleet's now is {fleet_now}, the repository's {}",
        noon()
    );
    let offset = agent.clock.offset().expect("offset").num_seconds();
    assert!((7140..=7200).contains(&offset), "{offset}");
}
