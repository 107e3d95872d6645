//! The install transaction and the cycle's bookkeeping, with fakes for the
//! source (never reached, or only ever answering 304), the installer and
//! the clock: commit, every rollback path, the journal written before the
//! installer runs, a deferred lock, an interrupted install resumed by the
//! next cycle, and expiry judged by the repository's clock. Then the fleet
//! steps around dpkg, on a directory store: the halt check under the
//! lease, the lease renewed while dpkg runs and held through the health
//! gate, and the halt marker written before the lease goes back.

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
use crate::clock::{Clock, ServerTime, SystemClock};
use crate::config::Config;
use crate::error::{Error, InstallError, PublishError, SourceError, VerifyError};
use crate::fleet::Fleet;
use crate::health::Health;
use crate::install::{DpkgStatus, InstallLock, Installer};
use crate::keyring::Keyring;
use crate::publish::store::{Body, Condition, DirStore, Store, Stored, Written};
use crate::rollout::Policy;
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
    /// Run inside the first install call, as if dpkg took that long.
    during: Arc<Mutex<Option<During>>>,
}

/// What a test does while the fake dpkg runs.
type During = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

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
            let first = self.runs.lock().expect("fake installer").is_empty();
            let during = self.during.lock().expect("fake installer").clone();
            if let (true, Some(during)) = (first, during) {
                during().await;
            }
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

/// The node's own clock: fixed at first; [`Node::in_fleet`] switches it
/// to the clock a fleet test moves, so that the agent (and the fleet it
/// hands its clock to) go by that one.
#[derive(Clone)]
struct NodeClock(Arc<Mutex<Arc<dyn Clock>>>);

impl Clock for NodeClock {
    fn now(&self) -> DateTime<Utc> {
        self.0.lock().expect("node clock").now()
    }
}

struct Node {
    dir: TempDir,
    agent: Agent,
    installer: FakeInstaller,
    clock: NodeClock,
}

/// A node whose installer has `installed`, fails `failing` versions, and
/// (with `locked_elsewhere`) never gets the lock.
fn node(installed: &[(&str, &str)], failing: &[&str], locked_elsewhere: bool) -> Node {
    node_configured(installed, failing, locked_elsewhere, "")
}

/// [`node`] with `extra` appended to its config (more sections).
fn node_configured(
    installed: &[(&str, &str)],
    failing: &[&str],
    locked_elsewhere: bool,
    extra: &str,
) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, extra).expect("config");
    node_from(
        dir,
        config,
        Box::new(NoSource),
        installed,
        failing,
        locked_elsewhere,
        noon(),
    )
}

/// [`node`] reading `source`, its own clock at `clock`.
fn node_with(
    installed: &[(&str, &str)],
    failing: &[&str],
    locked_elsewhere: bool,
    source: Box<dyn Source>,
    clock: DateTime<Utc>,
) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, "").expect("config");
    node_from(
        dir,
        config,
        source,
        installed,
        failing,
        locked_elsewhere,
        clock,
    )
}

/// The node's config in `dir`, with `extra` lines at the top of its
/// tables (`extra` holds whole `[table]` blocks: repository, agent,
/// install, health, fleet), and a fresh keyring.
fn write_config(dir: &TempDir, extra: &str) -> Result<Config, crate::error::ConfigError> {
    let (cert, _) = CertBuilder::new()
        .add_userid("Repo <repo@acme.test>")
        .add_signing_subkey()
        .generate()
        .expect("certificate");
    let keyring_path = dir.path().join("keyring.asc");
    std::fs::write(&keyring_path, cert.armored().to_vec().expect("armor")).expect("keyring");
    let config_path = dir.path().join("config.toml");
    let mut text = format!(
        "[repository]\nurl = \"file:///nonexistent\"\nsuite = \"production\"\narchitecture = \"amd64\"\n\
         keyring = \"keyring.asc\"\n\n[agent]\npackages = [\"myapp\"]\nstate_dir = \"state\"\n\
         cache_dir = \"cache\"\n\n[install]\nroot = {:?}\n",
        dir.path().join("root")
    );
    if !extra.contains("lock_timeout") {
        text = text.replace("[install]\n", "[install]\nlock_timeout = \"1s\"\n");
    }
    for block in extra.split("\n\n").map(str::trim).filter(|b| !b.is_empty()) {
        let (header, lines) = block.split_once('\n').unwrap_or((block, ""));
        let header = format!("{header}\n");
        match text.contains(&header) {
            true => text = text.replacen(&header, &format!("{header}{lines}\n"), 1),
            false => text.push_str(&format!("\n{header}{lines}\n")),
        }
    }
    std::fs::write(&config_path, &text).expect("config");
    Config::from_toml(&config_path, &text)
}

fn node_from(
    dir: TempDir,
    config: Config,
    source: Box<dyn Source>,
    installed: &[(&str, &str)],
    failing: &[&str],
    locked_elsewhere: bool,
    clock: DateTime<Utc>,
) -> Node {
    let keyring_path = dir.path().join("keyring.asc");
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
        during: Arc::default(),
    };
    let health = Health::for_config(&config);
    let node_clock = NodeClock(Arc::new(Mutex::new(Arc::new(FixedClock(clock)))));
    let agent = Agent::from_parts(
        config,
        "amd64".into(),
        source,
        Box::new(installer.clone()),
        Keyring::load(&keyring_path).expect("keyring"),
        Box::new(node_clock.clone()),
        health,
    );
    Node {
        dir,
        agent,
        installer,
        clock: node_clock,
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

// ---- the fleet steps around dpkg ------------------------------------------

/// How long a test waits for something the agent does in the background;
/// generous, for a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

/// A clock the test moves by hand: what a fleet judges lease expiry by.
struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    fn advance(&self, by: Duration) {
        let mut now = self.0.lock().expect("clock");
        *now = crate::clock::add(*now, by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().expect("clock")
    }
}

/// A directory store that records each write and delete when it is done,
/// in order: `put PATH`, `delete PATH`.
struct Recording {
    inner: DirStore,
    ops: Arc<Mutex<Vec<String>>>,
}

impl Store for Recording {
    fn url(&self, path: &str) -> String {
        self.inner.url(path)
    }

    fn get<'a>(
        &'a self,
        path: &'a str,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Stored>, PublishError>> {
        self.inner.get(path, limit)
    }

    fn digest<'a>(
        &'a self,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Option<(String, u64)>, PublishError>> {
        self.inner.digest(path)
    }

    fn size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Option<u64>, PublishError>> {
        self.inner.size(path)
    }

    fn head<'a>(
        &'a self,
        path: &'a str,
    ) -> BoxFuture<'a, Result<Option<crate::publish::store::Head>, PublishError>> {
        self.inner.head(path)
    }

    fn put<'a>(
        &'a self,
        path: &'a str,
        body: Body<'a>,
        condition: Condition<'a>,
    ) -> BoxFuture<'a, Result<Written, PublishError>> {
        Box::pin(async move {
            let written = self.inner.put(path, body, condition).await;
            self.ops.lock().expect("ops").push(format!("put {path}"));
            written
        })
    }

    fn delete<'a>(
        &'a self,
        path: &'a str,
        if_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool, PublishError>> {
        Box::pin(async move {
            let deleted = self.inner.delete(path, if_match).await;
            self.ops.lock().expect("ops").push(format!("delete {path}"));
            deleted
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, PublishError>> {
        self.inner.list(prefix)
    }
}

fn store(fleet_dir: &std::path::Path) -> Box<dyn Store> {
    Box::new(DirStore::new(fleet_dir.to_path_buf()))
}

fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// The lease object of slot `slot` in the fleet at `fleet_dir`.
fn lease_path(fleet_dir: &std::path::Path, slot: u32) -> PathBuf {
    fleet_dir.join("production/leases").join(slot.to_string())
}

/// Who holds the lease at `path`, until when; `None` when there is none.
fn lease_holder(path: &std::path::Path) -> Option<crate::publish::lock::Holder> {
    crate::publish::lock::parse_holder(&std::fs::read(path).ok()?)
}

impl Node {
    /// The node as `id` in the fleet at `store`, judging leases by `clock`.
    fn in_fleet(self, store: Box<dyn Store>, id: &str, clock: Arc<dyn Clock>) -> Node {
        // The agent hands its own (repository-corrected) clock to the
        // fleet; with no repository clock here, that is the node's.
        *self.clock.0.lock().expect("node clock") = clock;
        let fleet = Fleet::with_store(store, "production", id);
        Node {
            agent: self.agent.with_fleet(fleet),
            ..self
        }
    }

    /// [`Node::plan`] under a signed policy of one install in flight.
    fn one_in_flight_plan(&self, state: &State, to: &str) -> Plan {
        let mut plan = self.plan(state, to);
        plan.policy = Some(Policy {
            max_in_flight: Some(1),
            ..Policy::default()
        });
        plan
    }
}

/// What `Agent::cycle` does with the verified plan `prepare` hands it
/// (`Agent::coordinate_and_apply`, the cycle's own sequence).
async fn coordinated(agent: &Agent, plan: Plan, state: &mut State) -> Result<Outcome, Error> {
    agent.coordinate_and_apply(plan, state).await
}

/// Node B waits for the only lease while node A, holding it, installs 1.1,
/// fails, rolls back and halts 1.1. B's verified plan was made before the
/// halt (a 304 hands it back as it was), so only the halt check under the
/// lease keeps B from running dpkg on 1.1.
#[test]
fn a_version_halted_while_a_node_waited_for_the_lease_is_not_installed() {
    let fleet_dir = tempfile::tempdir().expect("fleet dir");
    let a = node(&[("myapp", "1.0")], &["1.1"], false).in_fleet(
        store(fleet_dir.path()),
        "node-a",
        system_clock(),
    );
    let b = node(&[("myapp", "1.0")], &[], false).in_fleet(
        store(fleet_dir.path()),
        "node-b",
        system_clock(),
    );
    let mut state_a = a.committed("1.0", true);
    let mut state_b = b.committed("1.0", true);
    let before_b = state_b.clone();
    let outcome = runtime().block_on(async {
        let mut plan_a = a.one_in_flight_plan(&state_a, "1.1");
        let lease_a = a
            .agent
            .coordinate(&mut plan_a, &state_a)
            .await
            .expect("node-a coordinates");
        assert!(lease_a.is_some(), "node-a took no lease");
        let waited = coordinated(&b.agent, b.one_in_flight_plan(&state_b, "1.1"), &mut state_b)
            .await
            .expect("node-b waits");
        assert!(
            matches!(waited, Outcome::Waiting(ref why) if why.starts_with("lease: myapp 1.1 waits")),
            "{waited:?}"
        );

        let result = a.agent.apply(plan_a, &mut state_a).await;
        assert!(
            matches!(result, Err(Error::Install(InstallError::RolledBack { .. }))),
            "{result:?}"
        );
        let attempted = [("myapp".to_string(), "1.1".to_string())];
        a.agent
            .after_install(&attempted, lease_a, &state_a, &result)
            .await;

        // node-b's next poll: the Release is unchanged (304), so the plan
        // that waited tries for the lease again as it was.
        let waited = b
            .agent
            .lease_wait
            .lock()
            .expect("lease wait")
            .take()
            .expect("node-b kept its verified plan for the lease");
        let plan = Plan {
            release: accepted(),
            installs: waited.installs,
            policy: waited.policy,
            waiting: None,
            recheck_debs: true,
        };
        coordinated(&b.agent, plan, &mut state_b).await
    });
    let outcome = outcome.expect("node-b waits, it does not fail");
    assert!(
        matches!(outcome, Outcome::Waiting(ref why) if why.contains("halted: myapp 1.1 (by node-a)")),
        "{outcome:?}"
    );
    let runs: Vec<Vec<String>> = b
        .installer
        .runs
        .lock()
        .expect("runs")
        .iter()
        .map(|r| r.0.clone())
        .collect();
    assert!(
        runs.is_empty(),
        "node-b ran dpkg on a version node-a had halted: {runs:?}"
    );
    assert_eq!(b.installed().as_deref(), Some("1.0"));
    assert_eq!(state_b.installed, before_b.installed);
    assert!(state_b.bad.is_empty(), "{:?}", state_b.bad);
    assert!(
        !lease_path(fleet_dir.path(), 0).exists(),
        "node-b kept the lease it had no use for"
    );
}

/// dpkg outlasting the lease's TTL: the renewal in the background must
/// keep the slot this node's, or another node takes it while this one is
/// still in dpkg. While the fake dpkg runs, the fleet's clock is moved on
/// by two TTLs, three times; each time the renewal must push `Expires`
/// past it, and at the end another node must find no free slot.
#[test]
fn the_lease_is_renewed_while_dpkg_outlasts_its_ttl() {
    let fleet_dir = tempfile::tempdir().expect("fleet dir");
    let clock = Arc::new(ManualClock(Mutex::new(noon())));
    let ttl = Duration::from_millis(600);
    let mut a = node(&[("myapp", "1.0")], &[], false).in_fleet(
        store(fleet_dir.path()),
        "node-a",
        clock.clone(),
    );
    a.agent.lease_ttl = ttl;
    let other = Arc::new(
        Fleet::with_store(store(fleet_dir.path()), "production", "node-b")
            .with_clock(clock.clone()),
    );
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let lease = lease_path(fleet_dir.path(), 0);
    let during: During = {
        let problems = problems.clone();
        Arc::new(move || {
            let (clock, other, problems, lease) = (
                clock.clone(),
                other.clone(),
                problems.clone(),
                lease.clone(),
            );
            Box::pin(async move {
                'steps: for step in 1..=3 {
                    clock.advance(ttl * 2);
                    let now = clock.now();
                    let waiting = std::time::Instant::now();
                    loop {
                        let expires = lease_holder(&lease).and_then(|h| h.expires);
                        if expires.is_some_and(|e| e > now) {
                            break;
                        }
                        if waiting.elapsed() > WAIT {
                            problems.lock().expect("problems").push(format!(
                                "step {step}: not renewed while dpkg ran: the lease expires {expires:?}, the fleet's clock says {now}"
                            ));
                            break 'steps;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                match other.take_lease(1, ttl).await {
                    Ok(None) => {}
                    Ok(Some(taken)) => problems.lock().expect("problems").push(format!(
                        "node-b took slot {} while node-a was in dpkg",
                        taken.slot()
                    )),
                    Err(e) => problems
                        .lock()
                        .expect("problems")
                        .push(format!("node-b could not ask for a lease: {e}")),
                }
            })
        })
    };
    *a.installer.during.lock().expect("during") = Some(during);
    let mut state = a.committed("1.0", true);
    let plan = a.one_in_flight_plan(&state, "1.1");
    let outcome = runtime().block_on(coordinated(&a.agent, plan, &mut state));
    assert!(matches!(outcome, Ok(Outcome::Installed(_))), "{outcome:?}");
    let problems = problems.lock().expect("problems").clone();
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(a.installer.runs.lock().expect("runs").len(), 1);
    assert!(
        !lease_path(fleet_dir.path(), 0).exists(),
        "the lease was not given back"
    );
}

/// The app behind `check_url` for the health gate: answers 200 to every
/// probe and records, for each, who held the lease at `lease` then.
struct GateApp {
    url: String,
    seen: Arc<Mutex<Vec<Option<String>>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    addr: std::net::SocketAddr,
}

impl GateApp {
    fn start(lease: PathBuf) -> GateApp {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the app");
        let addr = listener.local_addr().expect("app address");
        let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut stream) = stream else { continue };
                    let _ = stream.set_read_timeout(Some(WAIT));
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                        match stream.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => break,
                        }
                    }
                    seen.lock()
                        .expect("probes")
                        .push(lease_holder(&lease).map(|h| h.owner));
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                }
            });
        }
        GateApp {
            url: format!("http://{addr}/health"),
            seen,
            stop,
            addr,
        }
    }
}

impl Drop for GateApp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// The health gate is part of the install: a node whose new version has
/// not yet proved healthy still holds its in-flight slot, so no other
/// node drains meanwhile. Every probe of the gate must find the lease
/// this node's.
#[test]
fn the_lease_is_held_until_the_health_gate_has_passed() {
    let fleet_dir = tempfile::tempdir().expect("fleet dir");
    let app = GateApp::start(lease_path(fleet_dir.path(), 0));
    let health = format!(
        "\n[health]\ncheck_url = \"{}\"\nhealthy_after = 3\ncheck_interval = \"50ms\"\nhealth_timeout = \"60s\"\n",
        app.url
    );
    let a = node_configured(&[("myapp", "1.0")], &[], false, &health).in_fleet(
        store(fleet_dir.path()),
        "node-a",
        system_clock(),
    );
    let mut state = a.committed("1.0", true);
    let plan = a.one_in_flight_plan(&state, "1.1");
    let outcome = runtime().block_on(coordinated(&a.agent, plan, &mut state));
    assert!(matches!(outcome, Ok(Outcome::Installed(_))), "{outcome:?}");
    let seen = app.seen.lock().expect("probes").clone();
    assert!(seen.len() >= 3, "the gate probed {} times", seen.len());
    assert!(
        seen.iter()
            .all(|holder| holder.as_deref() == Some("node-a")),
        "the health gate ran while node-a did not hold the lease (holder per probe): {seen:?}"
    );
    assert!(
        !lease_path(fleet_dir.path(), 0).exists(),
        "the lease was not given back after the commit"
    );
}

/// After a rollback the halt marker must be in the store before the lease
/// is: a node waiting for the lease takes it the moment it is free, checks
/// the marker, and installs the bad version if the marker is not there
/// yet.
#[test]
fn the_halt_marker_is_written_before_the_lease_is_given_back() {
    let fleet_dir = tempfile::tempdir().expect("fleet dir");
    let ops: Arc<Mutex<Vec<String>>> = Arc::default();
    let recording = Recording {
        inner: DirStore::new(fleet_dir.path().to_path_buf()),
        ops: ops.clone(),
    };
    let a = node(&[("myapp", "1.0")], &["1.1"], false).in_fleet(
        Box::new(recording),
        "node-a",
        system_clock(),
    );
    let mut state = a.committed("1.0", true);
    let plan = a.one_in_flight_plan(&state, "1.1");
    let result = runtime().block_on(coordinated(&a.agent, plan, &mut state));
    assert!(
        matches!(result, Err(Error::Install(InstallError::RolledBack { .. }))),
        "{result:?}"
    );
    let ops = ops.lock().expect("ops").clone();
    let halted = ops
        .iter()
        .position(|op| op == "put production/halted/myapp_1.1");
    let released = ops.iter().position(|op| op == "delete production/leases/0");
    assert!(
        matches!((halted, released), (Some(h), Some(r)) if h < r),
        "the halt marker must be written before the lease is given back: {ops:#?}"
    );
}

/// A repository that has not changed since the accepted Release: every
/// request answers 304, so a cycle checks the accepted Release's times
/// (clock_skew, max_age) and ends.
struct Unchanged;

impl Source for Unchanged {
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
}

/// No duration in the config panics the agent: over many random
/// durations (huge ones included) for every duration key, the config is
/// either refused naming the key and its range, or a whole cycle runs
/// (and, the accepted Release being as old as the clock, succeeds).
#[test]
fn no_config_duration_panics_a_cycle() {
    use rand::{Rng, SeedableRng};
    const KEYS: [(&str, &str); 10] = [
        ("repository", "max_age"),
        ("repository", "clock_skew"),
        ("agent", "interval"),
        ("agent", "jitter"),
        ("agent", "cycle_timeout"),
        ("install", "lock_timeout"),
        ("health", "health_timeout"),
        ("health", "check_interval"),
        ("health", "drain"),
        ("fleet", "report_interval"),
    ];
    const UNITS: [&str; 6] = ["ms", "s", "m", "h", "d", "years"];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x16_05);
    let (mut refused, mut ran) = (0, 0);
    for _ in 0..200 {
        let (table, key) = KEYS[rng.random_range(0..KEYS.len())];
        let unit = UNITS[rng.random_range(0..UNITS.len())];
        let amount: u64 = match rng.random_range(0..4) {
            0 => rng.random_range(0..100),
            1 => rng.random_range(0..1_000_000),
            2 => rng.random_range(0..u64::from(u32::MAX)),
            _ => rng.random(),
        };
        let value = format!("{amount}{unit}");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = match write_config(&dir, &format!("[{table}]\n{key} = {value:?}")) {
            Err(crate::error::ConfigError::Invalid { problems, .. }) => {
                let named = format!("{table}.{key}: ");
                assert!(
                    problems.iter().any(|p| p.starts_with(&named)),
                    "{value} for {table}.{key}: {problems:?}"
                );
                assert_eq!(problems.len(), 1, "{problems:?}");
                refused += 1;
                continue;
            }
            Err(other) => panic!("{value} for {table}.{key}: {other}"),
            Ok(config) => config,
        };
        let n = node_from(
            dir,
            config,
            Box::new(Unchanged),
            &[("myapp", "1.0")],
            &[],
            false,
            noon(),
        );
        let mut state = n.committed("1.0", true);
        state.release = Some(accepted());
        state.save(&n.state_path()).expect("save state");
        let cycle = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime().block_on(n.agent.cycle(&mut state, std::future::pending()))
        }));
        let result = cycle
            .unwrap_or_else(|_| panic!("{table}.{key} = {value:?} panicked the cycle"))
            .expect("not cancelled");
        assert!(result.is_ok(), "{table}.{key} = {value:?}: {result:?}");
        ran += 1;
    }
    // Both ways were taken: the seed gives in-range and huge values.
    assert!(refused > 20 && ran > 20, "refused {refused}, ran {ran}");
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
