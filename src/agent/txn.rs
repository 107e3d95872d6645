//! The install half of a cycle: the journal, dpkg, the health gate, then
//! commit or rollback. Never cancelled: a started install, its health gate
//! and its commit or rollback run to the end, and an install interrupted
//! by a crash is journalled in state and finished by [`Agent::resume`].

use std::path::PathBuf;

use tracing::{info, warn};

use super::fetch::file_sha256;
use super::{Agent, Change, Outcome, Plan, committed_versions};
use crate::error::{Error, Failure, InstallError, StateError, VerifyError};
use crate::repo::packages::same_version;
use crate::state::{InstalledPackage, Pending, PendingPackage, State};

/// Whether the cached .debs handed to dpkg must be hashed again: not when
/// this process streamed and checked them moments ago, always when they
/// come from an earlier run (resume, rollback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DebCheck {
    JustNow,
    Again,
}

impl Agent {
    /// Installs the plan and commits it once healthy, or rolls back. Not
    /// cancellable: callers await it to the end.
    pub(super) async fn apply(&self, plan: Plan, state: &mut State) -> Result<Outcome, Error> {
        if plan.installs.is_empty() {
            let mut next = state.clone();
            next.release = Some(plan.release);
            self.sync_installed(&mut next)?;
            next.save(&self.config.state_path())?;
            *state = next;
            self.remember_status_stamp();
            return Ok(match &state.waiting {
                Some(waiting) => Outcome::Waiting(waiting.reason.clone()),
                None => Outcome::UpToDate,
            });
        }
        let now = self.clock.now();
        let pending = Pending {
            started_at: now,
            release: plan.release,
            packages: plan
                .installs
                .iter()
                .map(|p| PendingPackage {
                    name: p.name.clone(),
                    from: p.from.clone(),
                    to: InstalledPackage {
                        version: p.to.clone(),
                        sha256: Some(p.sha256.clone()),
                        installed_at: Some(now),
                        deb: p.deb.file_name().map(|n| n.to_string_lossy().into_owned()),
                    },
                })
                .collect(),
        };
        let debs = match plan.recheck_debs {
            true => DebCheck::Again,
            false => DebCheck::JustNow,
        };
        self.run_pending(pending, state, debs).await
    }

    /// Finishes an install that an earlier run started and did not commit
    /// (the agent was killed): the same .debs again, the health gate, then
    /// commit or roll back.
    pub(super) async fn resume(&self, state: &mut State) -> Result<Outcome, Error> {
        let Some(pending) = state.pending.clone() else {
            return Ok(Outcome::Unchanged);
        };
        warn!(started_at = %pending.started_at, "finishing an install interrupted by a restart");
        self.run_pending(pending, state, DebCheck::Again).await
    }

    async fn run_pending(
        &self,
        pending: Pending,
        state: &mut State,
        debs: DebCheck,
    ) -> Result<Outcome, Error> {
        let timeout = self.config.install.lock_timeout;
        let Some(_lock) = self.installer.lock(timeout).await? else {
            // A pending install stays journalled in state: it is still owed.
            return Err(Error::Deferred {
                reason: format!(
                    "another package manager holds dpkg's lock for more than {timeout:?}"
                ),
            });
        };
        if self.installer.needs_recovery()? {
            warn!("dpkg was interrupted; running dpkg --configure --pending first");
            self.installer.recover().await?;
        }

        // A cached .deb changed since it was verified (disk error,
        // tampering): give up this install without blaming the version; the
        // next cycle fetches it again from the signed repository.
        let debs = match self.cached_debs(&pending, &target_of, debs).await {
            Ok(debs) => debs,
            Err(e) => {
                let mut next = state.clone();
                next.pending = None;
                next.push_event(self.clock.now(), format!("install abandoned: {e}"));
                next.save(&self.config.state_path())?;
                *state = next;
                return Err(e);
            }
        };

        // The intent goes to disk before dpkg starts, so a kill at any
        // point after this is finished by `resume` at the next start.
        let mut next = state.clone();
        next.pending = Some(pending.clone());
        next.save(&self.config.state_path())?;
        *state = next;

        self.health.set_draining(true);
        let drain = self.config.health.drain;
        if !drain.is_zero() {
            info!(?drain, "draining before dpkg");
            tokio::time::sleep(drain).await;
        }
        let targets = describe(&pending, target_of);
        crate::notify::status(&format!("installing {targets}"));
        let result = match self.run_dpkg(&pending, target_of, &debs).await {
            Ok(()) => {
                crate::notify::status(&format!("waiting for {targets} to be healthy"));
                self.health_gate().await.map_err(Failure::Unhealthy)
            }
            Err(e) => Err(Failure::Install(Box::new(e))),
        };
        let outcome = match result {
            Ok(()) => self.commit(pending, state),
            Err(reason) => self.roll_back(pending, reason, state).await,
        };
        self.health.set_draining(false);
        self.remember_status_stamp();
        outcome
    }

    /// dpkg -i of the .debs `which` picks from `pending`, each re-verified
    /// against its recorded SHA256 first when `check` asks for it.
    async fn install_debs(
        &self,
        pending: &Pending,
        which: impl Fn(&PendingPackage) -> Option<&InstalledPackage>,
        check: DebCheck,
    ) -> Result<(), Error> {
        let debs = self.cached_debs(pending, &which, check).await?;
        self.run_dpkg(pending, which, &debs).await
    }

    /// dpkg -i of `debs` (from [`Agent::cached_debs`]) in one transaction;
    /// then dpkg must report exactly the versions `which` picks, by Debian
    /// version equality.
    async fn run_dpkg(
        &self,
        pending: &Pending,
        which: impl Fn(&PendingPackage) -> Option<&InstalledPackage>,
        debs: &[PathBuf],
    ) -> Result<(), Error> {
        if debs.is_empty() {
            return Ok(());
        }
        self.installer.install(debs).await?;
        let installed = self.dpkg_status()?;
        for package in &pending.packages {
            let Some(target) = which(package) else {
                continue;
            };
            let actual = installed.version(&package.name);
            if !actual.is_some_and(|actual| same_version(actual, &target.version)) {
                return Err(InstallError::NotInstalled {
                    package: package.name.clone(),
                    expected: target.version.clone(),
                    actual: actual.map(str::to_string),
                }
                .into());
            }
        }
        Ok(())
    }

    /// The cached .debs that `which` picks, each hashed again first when
    /// `check` asks for it. Packages dpkg already has fully installed at the
    /// target version are left out (a resume after the health gate must not
    /// restart a healthy app). A file that does not match is removed: it
    /// can only be fetched again from the signed repository.
    async fn cached_debs(
        &self,
        pending: &Pending,
        which: &impl Fn(&PendingPackage) -> Option<&InstalledPackage>,
        check: DebCheck,
    ) -> Result<Vec<PathBuf>, Error> {
        let installed = self.dpkg_status()?;
        let mut debs = Vec::new();
        for package in &pending.packages {
            let Some(target) = which(package) else {
                continue;
            };
            if installed
                .version(&package.name)
                .is_some_and(|v| same_version(v, &target.version))
            {
                continue;
            }
            let (Some(file), Some(sha256)) = (&target.deb, &target.sha256) else {
                return Err(StateError::Corrupt {
                    path: self.config.state_path(),
                    message: format!(
                        "no cached .deb recorded for {} {}",
                        package.name, target.version
                    ),
                }
                .into());
            };
            let path = self.cached_path(file);
            if check == DebCheck::Again {
                let actual = file_sha256(&path)
                    .await
                    .unwrap_or_else(|e| format!("unreadable ({e})"));
                if !actual.eq_ignore_ascii_case(sha256) {
                    let _ = std::fs::remove_file(&path);
                    return Err(VerifyError::HashMismatch {
                        url: path.display().to_string(),
                        expected: sha256.clone(),
                        actual,
                    }
                    .into());
                }
            }
            info!(package = %package.name, version = %target.version, "installing");
            debs.push(path);
        }
        Ok(debs)
    }

    /// Waits for the app to answer healthy (see [`Health::wait_healthy`]).
    async fn health_gate(&self) -> Result<(), String> {
        let health = &self.config.health;
        self.health
            .wait_healthy(
                health.healthy_after,
                health.health_timeout,
                health.check_interval,
            )
            .await
    }

    fn commit(&self, pending: Pending, state: &mut State) -> Result<Outcome, Error> {
        let mut next = state.clone();
        let mut installed = Vec::new();
        for package in &pending.packages {
            info!(package = %package.name, from = package.from.as_ref().map_or("-", |f| f.version.as_str()), to = %package.to.version, "installed and healthy");
            if let Some(from) = &package.from {
                next.last_known_good
                    .insert(package.name.clone(), from.clone());
            }
            next.installed
                .insert(package.name.clone(), package.to.clone());
            installed.push(Change {
                package: package.name.clone(),
                from: package.from.as_ref().map(|f| f.version.clone()),
                to: package.to.version.clone(),
            });
            next.push_event(
                self.clock.now(),
                format!(
                    "installed {} {} (was {})",
                    package.name,
                    package.to.version,
                    package.from.as_ref().map_or("-", |f| f.version.as_str())
                ),
            );
        }
        next.release = Some(pending.release);
        next.pending = None;
        self.sync_installed(&mut next)?;
        next.save(&self.config.state_path())?;
        *state = next;
        self.prune_cache(state);
        self.health
            .update(|s| s.installed = committed_versions(state));
        Ok(Outcome::Installed(installed))
    }

    /// Puts the last-known-good versions back, marks the new ones bad, and
    /// leaves the accepted Release where it was (the next cycle re-reads it
    /// and skips the bad versions).
    async fn roll_back(
        &self,
        pending: Pending,
        reason: Failure,
        state: &mut State,
    ) -> Result<Outcome, Error> {
        let mut next = state.clone();
        for package in &pending.packages {
            next.mark_bad(&package.name, &package.to.version);
        }
        let first = &pending.packages[0];
        let restorable = pending
            .packages
            .iter()
            .any(|p| p.from.as_ref().is_some_and(|f| f.deb.is_some()));
        let error = if !restorable {
            InstallError::NoRollback {
                package: first.name.clone(),
                version: first.to.version.clone(),
                reason,
            }
        } else {
            let restored = pending
                .packages
                .iter()
                .filter_map(|p| p.from.as_ref().map(|f| format!("{} {}", p.name, f.version)))
                .collect::<Vec<_>>()
                .join(", ");
            warn!(%reason, %restored, "rolling back");
            crate::notify::status(&format!("rolling back to {restored}: {reason}"));
            let rollback = match self
                .install_debs(
                    &pending,
                    |p| p.from.as_ref().filter(|f| f.deb.is_some()),
                    DebCheck::Again,
                )
                .await
            {
                Ok(()) => self.health_gate().await.map_err(Failure::Unhealthy),
                Err(e) => Err(Failure::Install(Box::new(e))),
            };
            if rollback.is_ok() {
                // The committed versions are back; keep the record of their
                // .debs (fetched again if the cache had lost them), so that
                // pruning keeps them as the way back of the next upgrade.
                for package in &pending.packages {
                    if let Some(from) = package.from.as_ref().filter(|f| f.deb.is_some()) {
                        next.installed.insert(package.name.clone(), from.clone());
                    }
                }
            }
            match rollback {
                Ok(()) => InstallError::RolledBack {
                    package: first.name.clone(),
                    version: first.to.version.clone(),
                    reason,
                    restored,
                },
                Err(rollback_error) => InstallError::RollbackFailed {
                    package: first.name.clone(),
                    version: first.to.version.clone(),
                    reason,
                    restored,
                    rollback_error,
                },
            }
        };
        next.pending = None;
        next.push_event(self.clock.now(), error.to_string());
        next.save(&self.config.state_path())?;
        *state = next;
        self.notifier.node_event(
            crate::config::NodeEvent::Rollback,
            crate::webhook::rollback_text(&pending, &error),
        );
        self.prune_cache(state);
        Err(error.into())
    }

    /// Records dpkg's view of the wanted packages that this agent did not
    /// install itself (so the 304 shortcut can compare), keeping the entries
    /// it did install.
    fn sync_installed(&self, state: &mut State) -> Result<(), Error> {
        let installed = self.dpkg_status()?;
        for name in self.wanted() {
            match installed.version(name) {
                Some(version)
                    if state
                        .installed
                        .get(name)
                        .is_some_and(|p| same_version(&p.version, version)) => {}
                // A version that failed its health gate is not "committed",
                // even though dpkg has it (there was nothing to roll back to).
                Some(version) if state.is_bad(name, version) => {
                    state.installed.remove(name);
                }
                Some(version) => {
                    state.installed.insert(
                        name.to_string(),
                        InstalledPackage {
                            version: version.to_string(),
                            sha256: None,
                            installed_at: None,
                            deb: None,
                        },
                    );
                }
                None => {
                    state.installed.remove(name);
                }
            }
        }
        Ok(())
    }

    pub(super) fn remember_status_stamp(&self) {
        *self.agreed_status.lock().unwrap_or_else(|e| e.into_inner()) =
            self.installer.status_stamp();
    }

    /// Keeps, per package, the current .deb and the last known good one
    /// (both named in state) and removes every other file in the agent's
    /// own cache directory; nothing outside it is touched.
    fn prune_cache(&self, state: &State) {
        let keep: Vec<&str> = state
            .installed
            .values()
            .chain(state.last_known_good.values())
            .filter_map(|p| p.deb.as_deref())
            .collect();
        let Ok(entries) = std::fs::read_dir(self.cache()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if is_file
                && !keep.contains(&name.as_str())
                && let Err(e) = std::fs::remove_file(entry.path())
            {
                warn!(path = %entry.path().display(), error = %e, "cannot prune cache");
            }
        }
    }
}

/// "myapp 1.2, other 3.4": the versions `which` picks, for STATUS=.
fn describe(
    pending: &Pending,
    which: impl Fn(&PendingPackage) -> Option<&InstalledPackage>,
) -> String {
    let names: Vec<String> = pending
        .packages
        .iter()
        .filter_map(|p| which(p).map(|v| format!("{} {}", p.name, v.version)))
        .collect();
    names.join(", ")
}

/// What an install puts in place: the new version.
fn target_of(package: &PendingPackage) -> Option<&InstalledPackage> {
    Some(&package.to)
}
