//! Planning: which version of each configured package to install, decided
//! from the verified index, dpkg's database and state (versions that
//! failed before), and whether the node can take it (`Depends`, space).
//! Pure: no I/O and no clock, so every rule is unit-tested here.

use chrono::{DateTime, Utc};

use crate::config::PackageSpec;
use crate::error::{InstallError, VerifyError};
use crate::install::DpkgStatus;
use crate::repo::depends;
use crate::repo::packages::{self, Candidate, SelectError, Selection};
use crate::rollout::Policy;
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
    /// The rollout policy holds this node's wave back from `version`
    /// until `at`; nothing older is released to it either.
    WaitingForWave { version: String, at: DateTime<Utc> },
    /// The rollout is paused: the installed version stays; a fresh node
    /// waits when nothing was released to its wave before the pause.
    Paused,
}

/// Where a node stands in a suite's rollout.
#[derive(Debug, Clone, Copy)]
pub struct Rollout<'a> {
    pub policy: &'a Policy,
    /// The node's wave (index into `policy.waves`).
    pub wave: usize,
    pub now: DateTime<Utc>,
}

/// The configured packages as the rollout policy lets this node have them.
#[derive(Debug, Default, PartialEq)]
pub struct Held {
    /// The specs to choose for: a fleet pin becomes a pin; packages held
    /// back entirely are left out.
    pub specs: Vec<PackageSpec>,
    /// Packages held back entirely, and why.
    pub stay: Vec<(String, Stay)>,
    /// The earliest time a version now held back from this node is
    /// released to its wave: when to read the repository again even if it
    /// has not changed.
    pub next_release: Option<DateTime<Utc>>,
}

/// Applies the signed rollout policy to the node's package specs and the
/// candidates (bad versions already dropped):
///
/// - a pin in the node's own config wins over the policy;
/// - a fleet pin becomes the spec's pin, whatever the waves or `paused`;
/// - `paused`: a package the node has installed stays as it is; a fresh
///   node gets only what its wave had when the pause began (the schedule
///   is read at `paused_at`), and nothing waits for a time: the resume,
///   a new signed Release, moves the schedule;
/// - otherwise the versions not yet released to the node's wave are
///   removed from the candidates; a package left with none waits.
pub fn apply_policy(
    candidates: &mut Vec<Candidate>,
    specs: &[PackageSpec],
    installed: &DpkgStatus,
    rollout: Rollout,
) -> Held {
    let mut held = Held::default();
    for spec in specs {
        if spec.pinned.is_some() {
            held.specs.push(spec.clone());
            continue;
        }
        if let Some(version) = rollout.policy.pin(&spec.name) {
            held.specs.push(PackageSpec {
                name: spec.name.clone(),
                pinned: Some(version.to_string()),
            });
            continue;
        }
        if rollout.policy.paused && installed.version(&spec.name).is_some() {
            held.stay.push((spec.name.clone(), Stay::Paused));
            continue;
        }
        let schedule = rollout.policy.schedule_time(rollout.now);
        let mut newest_held: Option<(&Candidate, DateTime<Utc>)> = None;
        let mut kept = 0;
        for candidate in candidates.iter().filter(|c| c.name == spec.name) {
            let version = candidate.version.to_string();
            match rollout
                .policy
                .released_at(&spec.name, &version, rollout.wave)
            {
                Some(at) if at > schedule => {
                    // Paused, no time of the schedule comes: only a resume does.
                    if !rollout.policy.paused {
                        held.next_release = Some(held.next_release.map_or(at, |next| next.min(at)));
                    }
                    if newest_held.is_none_or(|(c, _)| candidate.version > c.version) {
                        newest_held = Some((candidate, at));
                    }
                }
                _ => kept += 1,
            }
        }
        if let Some((candidate, at)) = newest_held
            && kept == 0
        {
            let why = match rollout.policy.paused {
                true => Stay::Paused,
                false => Stay::WaitingForWave {
                    version: candidate.version.to_string(),
                    at,
                },
            };
            held.stay.push((spec.name.clone(), why));
        } else {
            held.specs.push(spec.clone());
        }
    }
    candidates.retain(|c| {
        held.specs
            .iter()
            .any(|s| s.name == c.name && s.pinned.is_some())
            || rollout.policy.is_released(
                &c.name,
                &c.version.to_string(),
                rollout.wave,
                rollout.now,
            )
    });
    held
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

    /// A pin is typed (config, `rollout pin`); the index spells versions
    /// its own way. Equal by Debian order is the pinned version: `1.1` is
    /// the index's `0:1.1`, `1.2~rc1-0` its `1.2~rc1` (not `1.2`).
    #[test]
    fn a_pin_finds_its_version_by_debian_equality() {
        let index = [
            candidate("myapp", "0:1.1"),
            candidate("myapp", "1.2~rc1"),
            candidate("myapp", "1.2"),
        ];
        let dpkg = DpkgStatus::with_versions([("myapp", "1.0")]);
        let state = State::default();
        for (pin, wanted) in [("myapp=1.1", "0:1.1"), ("myapp=1.2~rc1-0", "1.2~rc1")] {
            let choices = choose(&index, &specs(&[pin]), &dpkg, &state, "u").unwrap();
            assert_eq!(
                chosen_versions(&choices),
                [("myapp".into(), wanted.into())],
                "{pin}"
            );
        }
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

    // ---- the rollout policy ----------------------------------------------

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    /// Waves 10%@0s, 50%@10m, 100%@20m; myapp 1.0 started long ago, 1.1
    /// at 05:00.
    fn waves_policy() -> Policy {
        let mut policy = Policy {
            waves: crate::rollout::parse_waves("10%@0s,50%@10m,100%@20m").unwrap(),
            ..Policy::default()
        };
        policy.stamp("myapp", "1.0", at("2026-11-29T00:00:00Z"));
        policy.stamp("myapp", "1.1", at("2026-11-30T05:00:00Z"));
        policy
    }

    /// What the policy held, the versions chosen, why the others stay.
    type HeldChoice = (Held, Vec<(String, String)>, Vec<(String, Stay)>);

    fn held_choice(
        policy: &Policy,
        wave: usize,
        now: &str,
        installed: &[(&str, &str)],
        spec_texts: &[&str],
    ) -> HeldChoice {
        let mut index = vec![candidate("myapp", "1.0"), candidate("myapp", "1.1")];
        let dpkg = DpkgStatus::with_versions(installed.iter().copied());
        let rollout = Rollout {
            policy,
            wave,
            now: at(now),
        };
        let held = apply_policy(&mut index, &specs(spec_texts), &dpkg, rollout);
        let choices = choose(&index, &held.specs, &dpkg, &State::default(), "u").unwrap();
        let chosen = chosen_versions(&choices);
        let mut stay = choices.stay;
        stay.extend(held.stay.clone());
        (held, chosen, stay)
    }

    #[test]
    fn each_wave_gets_a_version_at_its_own_time() {
        let policy = waves_policy();
        let installed = [("myapp", "1.0")];
        // 05:05: wave 1 (delay 0) has 1.1; waves 2 and 3 stay on 1.0.
        let (held, chosen, _) =
            held_choice(&policy, 0, "2026-11-30T05:05:00Z", &installed, &["myapp"]);
        assert_eq!(chosen, [("myapp".into(), "1.1".into())]);
        assert_eq!(held.next_release, None);
        let (held, chosen, stay) =
            held_choice(&policy, 1, "2026-11-30T05:05:00Z", &installed, &["myapp"]);
        assert!(chosen.is_empty());
        assert_eq!(stay, [("myapp".into(), Stay::Current)]);
        assert_eq!(held.next_release, Some(at("2026-11-30T05:10:00Z")));
        // 05:10 exactly: wave 2's time has come.
        let (_, chosen, _) =
            held_choice(&policy, 1, "2026-11-30T05:10:00Z", &installed, &["myapp"]);
        assert_eq!(chosen, [("myapp".into(), "1.1".into())]);
        let (held, chosen, _) =
            held_choice(&policy, 2, "2026-11-30T05:19:59Z", &installed, &["myapp"]);
        assert!(chosen.is_empty());
        assert_eq!(held.next_release, Some(at("2026-11-30T05:20:00Z")));
    }

    #[test]
    fn a_fresh_node_installs_what_its_wave_has_not_the_newest() {
        let policy = waves_policy();
        let (_, chosen, _) = held_choice(&policy, 2, "2026-11-30T05:05:00Z", &[], &["myapp"]);
        assert_eq!(chosen, [("myapp".into(), "1.0".into())]);
        // Only 1.1 published, and not yet for this wave: it waits.
        let mut only_new = Policy {
            waves: policy.waves.clone(),
            ..Policy::default()
        };
        only_new.stamp("myapp", "1.1", at("2026-11-30T05:00:00Z"));
        let mut index = vec![candidate("myapp", "1.1")];
        let held = apply_policy(
            &mut index,
            &specs(&["myapp"]),
            &DpkgStatus::with_versions([]),
            Rollout {
                policy: &only_new,
                wave: 2,
                now: at("2026-11-30T05:05:00Z"),
            },
        );
        assert!(held.specs.is_empty());
        assert_eq!(
            held.stay,
            [(
                "myapp".into(),
                Stay::WaitingForWave {
                    version: "1.1".into(),
                    at: at("2026-11-30T05:20:00Z")
                }
            )]
        );
        assert!(index.is_empty());
    }

    #[test]
    fn paused_holds_installed_packages_and_pins_still_install() {
        let mut policy = waves_policy();
        policy.pause(at("2026-11-30T05:30:00Z"));
        let (held, chosen, stay) = held_choice(
            &policy,
            0,
            "2026-11-30T06:00:00Z",
            &[("myapp", "1.0")],
            &["myapp"],
        );
        assert!(chosen.is_empty());
        assert_eq!(stay, [("myapp".into(), Stay::Paused)]);
        assert_eq!(held.next_release, None);
        policy.pins.insert("myapp".into(), "1.0".into());
        let (_, chosen, _) = held_choice(
            &policy,
            0,
            "2026-11-30T06:00:00Z",
            &[("myapp", "1.1")],
            &["myapp"],
        );
        assert_eq!(
            chosen,
            [("myapp".into(), "1.0".into())],
            "a pin is a rollback, paused or not"
        );
    }

    #[test]
    fn paused_a_fresh_node_gets_what_its_wave_had_when_the_pause_began() {
        // Paused at 05:05: wave 1 had 1.1 (05:00), wave 2 not yet (05:10).
        let mut policy = waves_policy();
        policy.pause(at("2026-11-30T05:05:00Z"));
        let (held, chosen, _) = held_choice(&policy, 0, "2026-11-30T07:00:00Z", &[], &["myapp"]);
        assert_eq!(chosen, [("myapp".into(), "1.1".into())]);
        assert_eq!(held.next_release, None);
        let (held, chosen, _) = held_choice(&policy, 1, "2026-11-30T07:00:00Z", &[], &["myapp"]);
        assert_eq!(
            chosen,
            [("myapp".into(), "1.0".into())],
            "wave 2's time for 1.1 came after the pause"
        );
        assert_eq!(held.next_release, None, "no wave time comes while paused");

        // Paused before 1.1 was published: a fresh wave-1 node (delay 0)
        // installs 1.0, not the version published during the pause.
        let mut policy = waves_policy();
        policy.pause(at("2026-11-30T04:00:00Z"));
        let (held, chosen, _) = held_choice(&policy, 0, "2026-11-30T05:00:01Z", &[], &["myapp"]);
        assert_eq!(chosen, [("myapp".into(), "1.0".into())]);
        assert_eq!(held.next_release, None);

        // Only the new version in the suite: the fresh node waits, paused.
        let mut only_new = Policy {
            waves: policy.waves.clone(),
            ..Policy::default()
        };
        only_new.stamp("myapp", "1.1", at("2026-11-30T05:00:00Z"));
        only_new.pause(at("2026-11-30T04:00:00Z"));
        let mut index = vec![candidate("myapp", "1.1")];
        let held = apply_policy(
            &mut index,
            &specs(&["myapp"]),
            &DpkgStatus::with_versions([]),
            Rollout {
                policy: &only_new,
                wave: 0,
                now: at("2026-11-30T06:00:00Z"),
            },
        );
        assert!(held.specs.is_empty());
        assert_eq!(held.stay, [("myapp".into(), Stay::Paused)]);
        assert_eq!(held.next_release, None);
        assert!(index.is_empty());
    }

    #[test]
    fn paused_without_a_time_releases_nothing_with_a_start() {
        // A policy written before paused_at: frozen before every start.
        let mut policy = waves_policy();
        policy.paused = true;
        let (held, chosen, stay) = held_choice(&policy, 0, "2026-11-30T06:00:00Z", &[], &["myapp"]);
        assert!(chosen.is_empty(), "{chosen:?}");
        assert_eq!(stay, [("myapp".into(), Stay::Paused)]);
        assert_eq!(held.next_release, None);
        // A version without a start time is not the rollout's to hold.
        let unstamped = Policy {
            paused: true,
            ..Policy::default()
        };
        let (_, chosen, _) = held_choice(&unstamped, 0, "2026-11-30T06:00:00Z", &[], &["myapp"]);
        assert_eq!(chosen, [("myapp".into(), "1.1".into())]);
    }

    #[test]
    fn after_resume_the_waves_go_on_in_order_with_their_delays() {
        // Paused at 05:05 for an hour; resumed at 06:05.
        let mut policy = waves_policy();
        policy.pause(at("2026-11-30T05:05:00Z"));
        policy.resume(at("2026-11-30T06:05:00Z"));
        let installed = [("myapp", "1.0")];
        // Wave 2 had 5 of its 10 minutes before the pause: 5 more after.
        let (held, chosen, _) =
            held_choice(&policy, 1, "2026-11-30T06:09:59Z", &installed, &["myapp"]);
        assert!(chosen.is_empty());
        assert_eq!(held.next_release, Some(at("2026-11-30T06:10:00Z")));
        let (_, chosen, _) =
            held_choice(&policy, 1, "2026-11-30T06:10:00Z", &installed, &["myapp"]);
        assert_eq!(chosen, [("myapp".into(), "1.1".into())]);
        let (held, chosen, _) =
            held_choice(&policy, 2, "2026-11-30T06:10:00Z", &installed, &["myapp"]);
        assert!(chosen.is_empty());
        assert_eq!(held.next_release, Some(at("2026-11-30T06:20:00Z")));
        // Wave 1 had 1.1 before the pause and keeps it.
        let (_, chosen, _) =
            held_choice(&policy, 0, "2026-11-30T06:05:00Z", &installed, &["myapp"]);
        assert_eq!(chosen, [("myapp".into(), "1.1".into())]);
    }

    #[test]
    fn a_fleet_pin_ignores_waves_and_a_local_pin_wins() {
        let mut policy = waves_policy();
        policy.pins.insert("myapp".into(), "1.1".into());
        // Wave 3 at 05:01 would wait for 1.1; the pin installs it now.
        let (held, chosen, _) = held_choice(
            &policy,
            2,
            "2026-11-30T05:01:00Z",
            &[("myapp", "1.0")],
            &["myapp"],
        );
        assert_eq!(chosen, [("myapp".into(), "1.1".into())]);
        assert_eq!(held.next_release, None);
        // Pinned back to 1.0: a downgrade, signed.
        policy.pins.insert("myapp".into(), "1.0".into());
        let (_, chosen, _) = held_choice(
            &policy,
            0,
            "2026-11-30T06:00:00Z",
            &[("myapp", "1.1")],
            &["myapp"],
        );
        assert_eq!(chosen, [("myapp".into(), "1.0".into())]);
        // The node's own pin wins over the fleet's.
        let (_, chosen, _) = held_choice(
            &policy,
            0,
            "2026-11-30T06:00:00Z",
            &[("myapp", "1.0")],
            &["myapp=1.1"],
        );
        assert_eq!(chosen, [("myapp".into(), "1.1".into())]);
    }

    #[test]
    fn a_version_without_a_start_time_is_not_held() {
        let policy = Policy {
            waves: crate::rollout::parse_waves("10%@0s,100%@1h").unwrap(),
            ..Policy::default()
        };
        let (held, chosen, _) = held_choice(
            &policy,
            1,
            "2026-11-30T05:00:00Z",
            &[("myapp", "1.0")],
            &["myapp"],
        );
        assert_eq!(chosen, [("myapp".into(), "1.1".into())]);
        assert_eq!(held.next_release, None);
    }
}
