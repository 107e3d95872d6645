//! Planning: which version of each configured package to install, decided
//! from the verified index, dpkg's database and state (versions that
//! failed before), and whether the node can take it (`Depends`, space).
//! Pure: no I/O and no clock, so every rule is unit-tested here.

use crate::config::PackageSpec;
use crate::error::{InstallError, VerifyError};
use crate::install::DpkgStatus;
use crate::repo::depends;
use crate::repo::packages::{self, Candidate, SelectError, Selection};
use crate::state::State;

/// One package to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice<'a> {
    pub candidate: &'a Candidate,
    /// The version dpkg has now, if any.
    pub current: Option<String>,
}

/// Why a configured package stays as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stay {
    /// The wanted version is installed.
    Current,
    /// The index offers only older versions and no pin asks for one.
    KeepNewer { installed: String, offered: String },
    /// Every published version failed here before.
    OnlyBadPublished,
    /// The pinned version failed here before.
    PinnedBad { version: String },
}

/// The decisions for every configured package.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Choices<'a> {
    pub install: Vec<Choice<'a>>,
    /// (package, why it stays).
    pub stay: Vec<(String, Stay)>,
}

/// Drops the versions that failed before: they are not tried again (a
/// newer one is).
pub fn drop_bad(candidates: &mut Vec<Candidate>, state: &State) {
    candidates.retain(|c| !state.is_bad(&c.name, &c.version.to_string()));
}

/// Chooses for every spec among `candidates` (bad versions already
/// dropped): the pinned version, else the newest, never a downgrade
/// without a pin, nothing when the wanted version is installed.
/// `index_url` names the index in errors.
pub fn choose<'a>(
    candidates: &'a [Candidate],
    specs: &[PackageSpec],
    installed: &DpkgStatus,
    state: &State,
    index_url: &str,
) -> Result<Choices<'a>, VerifyError> {
    let mut choices = Choices::default();
    for spec in specs {
        let current = installed.version(&spec.name);
        let stay = |why| (spec.name.clone(), why);
        let candidate = match packages::select(candidates, spec, current) {
            Ok(Selection::Install(candidate)) => candidate,
            Ok(Selection::Current) => {
                choices.stay.push(stay(Stay::Current));
                continue;
            }
            Ok(Selection::KeepNewer { installed, offered }) => {
                choices
                    .stay
                    .push(stay(Stay::KeepNewer { installed, offered }));
                continue;
            }
            Err(SelectError::Missing) if state.bad.contains_key(&spec.name) => {
                choices.stay.push(stay(Stay::OnlyBadPublished));
                continue;
            }
            Err(SelectError::Missing) => {
                return Err(VerifyError::PackageMissing {
                    package: spec.name.clone(),
                    url: index_url.to_string(),
                });
            }
            Err(SelectError::PinnedMissing) => {
                let version = spec.pinned.clone().unwrap_or_default();
                if state.is_bad(&spec.name, &version) {
                    choices.stay.push(stay(Stay::PinnedBad { version }));
                    continue;
                }
                return Err(VerifyError::PinnedMissing {
                    package: spec.name.clone(),
                    version,
                    url: index_url.to_string(),
                });
            }
            // dpkg reports a version that does not parse: install the
            // wanted one over it.
            Err(SelectError::BadInstalledVersion(_)) => {
                match packages::select(candidates, spec, None) {
                    Ok(Selection::Install(candidate)) => candidate,
                    _ => continue,
                }
            }
        };
        choices.install.push(Choice {
            candidate,
            current: current.map(str::to_string),
        });
    }
    Ok(choices)
}

/// Refuses a package whose `Depends` are neither installed nor part of
/// this plan, naming what is missing.
pub fn check_depends(installed: &DpkgStatus, chosen: &[Choice]) -> Result<(), InstallError> {
    if chosen.iter().all(|c| c.candidate.depends.is_none()) {
        return Ok(());
    }
    let mut after = installed.installed.clone();
    for Choice { candidate, .. } in chosen {
        after.add(
            &candidate.name,
            candidate.version.clone(),
            candidate.provides.as_deref(),
        );
    }
    for Choice { candidate, .. } in chosen {
        let missing = depends::unmet(candidate.depends.as_deref().unwrap_or_default(), &after);
        if !missing.is_empty() {
            return Err(InstallError::UnmetDepends {
                package: candidate.name.clone(),
                version: candidate.version.to_string(),
                missing,
            });
        }
    }
    Ok(())
}

/// Bytes the plan needs: (in the cache for the .debs, under the install
/// root for their `Installed-Size`), each with a margin so that the node
/// is not left with a full disk.
pub fn space_needed(chosen: &[Choice]) -> (u64, u64) {
    let margin = |needed: u64| match needed {
        0 => 0,
        needed => needed + needed / 10 + (16 << 20),
    };
    let download = chosen.iter().map(|c| c.candidate.expected.size).sum();
    let unpacked = chosen
        .iter()
        .map(|c| c.candidate.installed_size_kib.unwrap_or(0) * 1024)
        .sum();
    (margin(download), margin(unpacked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::digest::Expected;

    fn candidate(name: &str, version: &str) -> Candidate {
        Candidate {
            name: name.into(),
            version: version.parse().expect("version"),
            architecture: "amd64".into(),
            filename: format!("pool/main/{name}_{version}_amd64.deb"),
            expected: Expected {
                sha256: "00".repeat(32),
                size: 1000,
            },
            depends: None,
            provides: None,
            installed_size_kib: Some(10),
        }
    }

    fn specs(texts: &[&str]) -> Vec<PackageSpec> {
        texts
            .iter()
            .map(|t| PackageSpec::parse(t).expect("spec"))
            .collect()
    }

    fn chosen_versions(choices: &Choices) -> Vec<(String, String)> {
        choices
            .install
            .iter()
            .map(|c| (c.candidate.name.clone(), c.candidate.version.to_string()))
            .collect()
    }

    #[test]
    fn newest_not_installed_is_chosen_with_what_it_replaces() {
        let index = [candidate("myapp", "1.0"), candidate("myapp", "1.1")];
        let dpkg = DpkgStatus::with_versions([("myapp", "1.0")]);
        let choices = choose(&index, &specs(&["myapp"]), &dpkg, &State::default(), "u").unwrap();
        assert_eq!(chosen_versions(&choices), [("myapp".into(), "1.1".into())]);
        assert_eq!(choices.install[0].current.as_deref(), Some("1.0"));
    }

    #[test]
    fn installed_by_debian_equality_stays() {
        let index = [candidate("myapp", "0:1.0.1")];
        let dpkg = DpkgStatus::with_versions([("myapp", "1.0.1")]);
        let choices = choose(&index, &specs(&["myapp"]), &dpkg, &State::default(), "u").unwrap();
        assert!(choices.install.is_empty());
        assert_eq!(choices.stay, [("myapp".into(), Stay::Current)]);
    }

    #[test]
    fn no_downgrade_without_a_pin_but_a_pin_downgrades() {
        let index = [candidate("myapp", "1.0")];
        let dpkg = DpkgStatus::with_versions([("myapp", "2.0")]);
        let state = State::default();
        let choices = choose(&index, &specs(&["myapp"]), &dpkg, &state, "u").unwrap();
        assert_eq!(
            choices.stay,
            [(
                "myapp".into(),
                Stay::KeepNewer {
                    installed: "2.0".into(),
                    offered: "1.0".into()
                }
            )]
        );
        let pinned = choose(&index, &specs(&["myapp=1.0"]), &dpkg, &state, "u").unwrap();
        assert_eq!(chosen_versions(&pinned), [("myapp".into(), "1.0".into())]);
    }

    #[test]
    fn bad_versions_are_dropped_and_only_bad_published_stays() {
        let mut state = State::default();
        state.mark_bad("myapp", "1.1");
        let mut index = vec![candidate("myapp", "1.0"), candidate("myapp", "0:1.1")];
        drop_bad(&mut index, &state);
        assert_eq!(index.len(), 1, "0:1.1 is the bad 1.1");
        let dpkg = DpkgStatus::with_versions([("myapp", "1.0")]);
        let choices = choose(&index, &specs(&["myapp"]), &dpkg, &state, "u").unwrap();
        assert_eq!(choices.stay, [("myapp".into(), Stay::Current)]);

        let mut only_bad = vec![candidate("myapp", "1.1")];
        drop_bad(&mut only_bad, &state);
        let choices = choose(&only_bad, &specs(&["myapp"]), &dpkg, &state, "u").unwrap();
        assert_eq!(choices.stay, [("myapp".into(), Stay::OnlyBadPublished)]);
    }

    #[test]
    fn missing_package_and_missing_pin_are_named_errors() {
        let index = [candidate("other", "1.0")];
        let dpkg = DpkgStatus::default();
        let state = State::default();
        let missing = choose(&index, &specs(&["myapp"]), &dpkg, &state, "INDEX");
        assert!(
            matches!(missing, Err(VerifyError::PackageMissing { ref package, ref url }) if package == "myapp" && url == "INDEX"),
            "{missing:?}"
        );
        let index = [candidate("myapp", "1.0")];
        let pin = choose(&index, &specs(&["myapp=2.0"]), &dpkg, &state, "INDEX");
        assert!(
            matches!(pin, Err(VerifyError::PinnedMissing { ref version, .. }) if version == "2.0"),
            "{pin:?}"
        );
        let mut bad_pin = State::default();
        bad_pin.mark_bad("myapp", "2.0");
        let choices = choose(&index, &specs(&["myapp=2.0"]), &dpkg, &bad_pin, "INDEX").unwrap();
        assert_eq!(
            choices.stay,
            [(
                "myapp".into(),
                Stay::PinnedBad {
                    version: "2.0".into()
                }
            )]
        );
    }

    #[test]
    fn depends_may_be_met_by_the_plan_itself() {
        let mut app = candidate("myapp", "2.0");
        app.depends = Some("libfoo (>= 1.2), base".into());
        let lib = candidate("libfoo", "1.3");
        let dpkg = DpkgStatus::with_versions([("base", "1")]);
        let both = [
            Choice {
                candidate: &app,
                current: None,
            },
            Choice {
                candidate: &lib,
                current: None,
            },
        ];
        check_depends(&dpkg, &both).unwrap();
        let alone = check_depends(&dpkg, &both[..1]);
        assert!(
            matches!(alone, Err(InstallError::UnmetDepends { ref missing, .. }) if missing == &["libfoo (>= 1.2)"]),
            "{alone:?}"
        );
    }

    #[test]
    fn space_needed_adds_a_margin_and_nothing_for_nothing() {
        assert_eq!(space_needed(&[]), (0, 0));
        let app = candidate("myapp", "1.0");
        let plan = [Choice {
            candidate: &app,
            current: None,
        }];
        assert_eq!(
            space_needed(&plan),
            (1000 + 100 + (16 << 20), 10240 + 1024 + (16 << 20))
        );
    }
}
