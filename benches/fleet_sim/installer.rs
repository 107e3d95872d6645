//! The fake dpkg: [`SimInstaller`] and the [`Recorder`] every node reports to.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pulldeploy::error::InstallError;
use pulldeploy::install::{DpkgStatus, InstallLock, Installer};
use pulldeploy::source::BoxFuture;
use pulldeploy::state::FileStamp;

/// What every node's installer reports to.
pub(crate) struct Recorder {
    pub(crate) in_flight: AtomicUsize,
    pub(crate) max_in_flight: AtomicUsize,
    installs: Mutex<Vec<InstallEvent>>,
    pub(crate) cycles: AtomicU64,
    /// Unchanged cycles (a 304): count and total microseconds.
    pub(crate) unchanged: AtomicU64,
    pub(crate) unchanged_us: AtomicU64,
    pub(crate) unchanged_max_us: AtomicU64,
    /// Errors and waits, by their first words.
    pub(crate) errors: Mutex<BTreeMap<String, u64>>,
    pub(crate) waits: Mutex<BTreeMap<String, u64>>,
}

#[derive(Debug, Clone)]
pub(crate) struct InstallEvent {
    pub(crate) node: usize,
    pub(crate) version: String,
    pub(crate) ok: bool,
    pub(crate) at: Instant,
}

impl Recorder {
    pub(crate) fn new() -> Recorder {
        Recorder {
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            installs: Mutex::new(Vec::new()),
            cycles: AtomicU64::new(0),
            unchanged: AtomicU64::new(0),
            unchanged_us: AtomicU64::new(0),
            unchanged_max_us: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            waits: Mutex::new(BTreeMap::new()),
        }
    }

    /// Starts a new maximum from the nodes in flight now.
    pub(crate) fn reset_max(&self) {
        self.max_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    pub(crate) fn events(&self) -> Vec<InstallEvent> {
        self.installs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn count(map: &Mutex<BTreeMap<String, u64>>, key: String) {
        *map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    pub(crate) fn take(map: &Mutex<BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
        std::mem::take(&mut *map.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A node in flight: from the install lock (before the drain) until the
/// lock is dropped (after commit or rollback). Only a node that serves
/// (has a version installed) counts, as only such a node needs a lease.
struct InFlight {
    recorder: Option<Arc<Recorder>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(recorder) = &self.recorder {
            recorder.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// dpkg in memory: `package -> version`, shared with the orchestrator.
pub(crate) type Database = Arc<Mutex<BTreeMap<String, String>>>;

pub(crate) struct SimInstaller {
    pub(crate) node: usize,
    pub(crate) database: Database,
    pub(crate) install_time: Duration,
    pub(crate) recorder: Arc<Recorder>,
}

impl SimInstaller {
    fn database(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.database.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, version: &str, ok: bool) {
        let event = InstallEvent {
            node: self.node,
            version: version.to_string(),
            ok,
            at: Instant::now(),
        };
        self.recorder
            .installs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }
}

impl Installer for SimInstaller {
    fn status(&self) -> Result<Arc<DpkgStatus>, InstallError> {
        let database = self.database();
        Ok(Arc::new(DpkgStatus::with_versions(
            database.iter().map(|(n, v)| (n.as_str(), v.as_str())),
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
        let serving = !self.database().is_empty();
        let recorder = serving.then(|| {
            let now = self.recorder.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.recorder.max_in_flight.fetch_max(now, Ordering::SeqCst);
            self.recorder.clone()
        });
        Box::pin(async move { Ok(Some(Box::new(InFlight { recorder }) as InstallLock)) })
    }

    fn recover(&self) -> BoxFuture<'_, Result<(), InstallError>> {
        Box::pin(async { Ok(()) })
    }

    fn install<'a>(&'a self, debs: &'a [PathBuf]) -> BoxFuture<'a, Result<(), InstallError>> {
        Box::pin(async move {
            tokio::time::sleep(self.install_time).await;
            for deb in debs {
                let identity = pulldeploy::publish::deb::read_identity(deb).map_err(|e| {
                    InstallError::Dpkg {
                        packages: deb.display().to_string(),
                        status: "unreadable".into(),
                        stderr: format!("{e:?}"),
                    }
                })?;
                if identity.version.contains("bad") {
                    // A failed postinst: dpkg leaves the package
                    // half-configured, which is not installed.
                    self.database().remove(&identity.package);
                    self.record(&identity.version, false);
                    return Err(InstallError::Dpkg {
                        packages: format!("{} {}", identity.package, identity.version),
                        status: "exit status: 1".into(),
                        stderr: "postinst: simulated failure (a version named bad)".into(),
                    });
                }
                self.database()
                    .insert(identity.package.clone(), identity.version.clone());
                self.record(&identity.version, true);
            }
            Ok(())
        })
    }
}
