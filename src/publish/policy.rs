//! The suite's rollout policy (`dists/<suite>/rollout.toml`) as the
//! publisher keeps it: read with the suite and checked against its Release,
//! stamped with the start of every version a publish or promote adds,
//! changed by `pulldeploy rollout`, and written like an index (by hash
//! first, then at its canonical path) so that Release, and with it the
//! signature, covers it.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::Publisher;
use super::index::{Checksum, Entry};
use super::store::{Body, Condition};
use crate::error::{Error, PublishError};
use crate::rollout::{self, Policy, Wave};

/// A change `pulldeploy rollout` makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// New waves and/or in-flight limit (`Some(None)`: no limit).
    Set {
        waves: Option<Vec<Wave>>,
        max_in_flight: Option<Option<u32>>,
    },
    Pause,
    Resume,
    Pin {
        package: String,
        version: String,
    },
    Unpin {
        package: String,
    },
}

impl Change {
    /// Applies the change; what it did, or why it cannot be (a pin to a
    /// version the suite does not have, an unpin of a package not pinned).
    /// `date` is the Date of the Release that will sign it: the moment a
    /// pause begins or ends. `suite` and `url` name the suite in errors.
    pub fn apply(
        &self,
        policy: &mut Policy,
        entries: &[Entry],
        date: DateTime<Utc>,
        suite: &str,
        url: &str,
    ) -> Result<String, PublishError> {
        Ok(match self {
            Change::Set {
                waves,
                max_in_flight,
            } => {
                if let Some(waves) = waves {
                    policy.waves = waves.clone();
                }
                if let Some(limit) = max_in_flight {
                    policy.max_in_flight = *limit;
                }
                format!(
                    "waves {}, max in flight {}",
                    waves_text(&policy.waves),
                    policy
                        .max_in_flight
                        .map_or("unlimited".to_string(), |n| n.to_string())
                )
            }
            Change::Pause => {
                policy.pause(date);
                let since = policy
                    .paused_at
                    .map_or("an unknown time".to_string(), |at| {
                        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    });
                format!(
                    "paused since {since}: nothing is released to any wave after that; no node changes an installed version, a fresh node installs what its wave had then (pins still install)"
                )
            }
            Change::Resume => match policy.resume(date) {
                Some(shift) => format!(
                    "resumed: every start moved {} later (the paused time), so no wave's delay was spent paused",
                    humantime::format_duration(shift.to_std().unwrap_or_default())
                ),
                None => "resumed (the pause had no start time: start times unchanged)".into(),
            },
            Change::Pin { package, version } => {
                let exact = entries
                    .iter()
                    .find(|e| {
                        e.name == *package
                            && crate::repo::packages::same_version(&e.version.to_string(), version)
                    })
                    .ok_or_else(|| PublishError::NotInSuite {
                        package: package.clone(),
                        version: Some(version.clone()),
                        suite: suite.to_string(),
                        url: url.to_string(),
                    })?;
                policy
                    .pins
                    .insert(package.clone(), exact.version.to_string());
                format!("pinned {package} to {}", exact.version)
            }
            Change::Unpin { package } => {
                policy
                    .pins
                    .remove(package)
                    .ok_or_else(|| PublishError::Usage {
                        message: format!("{package} is not pinned in {suite}"),
                    })?;
                format!("unpinned {package}")
            }
        })
    }
}

/// `5%@0s, 100%@30m`.
pub fn waves_text(waves: &[Wave]) -> String {
    waves
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The policy after a publish or promote: every (package, version) of the
/// suite's entries without a start gets `date`, the Date of the Release
/// that first lists it; versions of these packages that left the suite
/// are forgotten.
pub(super) fn stamped(previous: Option<&Policy>, entries: &[Entry], date: DateTime<Utc>) -> Policy {
    let mut policy = previous.cloned().unwrap_or_default();
    let present: BTreeSet<(String, String)> = entries
        .iter()
        .map(|e| (e.name.clone(), e.version.to_string()))
        .collect();
    // Only the packages of this component are known here: others keep
    // their start times.
    for (package, versions) in &mut policy.started {
        if present.iter().any(|(p, _)| p == package) {
            versions.retain(|version, _| {
                present
                    .iter()
                    .any(|(p, v)| p == package && crate::repo::packages::same_version(v, version))
            });
        }
    }
    policy.started.retain(|_, versions| !versions.is_empty());
    for (package, version) in &present {
        policy.stamp(package, version, date);
    }
    policy
}

impl Publisher {
    /// Writes the policy at its by-hash paths and then at
    /// `dists/<suite>/rollout.toml`; its SHA256 and SHA512 lines for Release.
    pub(super) async fn write_policy(
        &self,
        suite: &str,
        policy: &Policy,
    ) -> Result<(Checksum, Checksum), Error> {
        let text = policy.to_text(suite);
        let checksums = self
            .write_by_hash(suite, rollout::FILE, text.as_bytes())
            .await?;
        self.store
            .put(
                &Self::dists(suite, rollout::FILE),
                Body::Bytes(text.as_bytes()),
                Condition::Always,
            )
            .await?;
        Ok(checksums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::index::parse_stanzas;

    fn entry(name: &str, version: &str) -> Entry {
        let text = format!(
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\nFilename: pool/{name}_{version}.deb\nSize: 1\nSHA256: {}\n",
            "a".repeat(64)
        );
        Entry::from_stanza(parse_stanzas(&text).unwrap().remove(0)).unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_publish_stamps_new_versions_and_keeps_old_starts() {
        let first = stamped(None, &[entry("myapp", "1.0")], at("2026-11-30T04:00:00Z"));
        assert_eq!(
            first.started("myapp", "1.0"),
            Some(at("2026-11-30T04:00:00Z"))
        );
        let second = stamped(
            Some(&first),
            &[entry("myapp", "1.0"), entry("myapp", "1.1")],
            at("2026-11-30T05:00:00Z"),
        );
        assert_eq!(
            second.started("myapp", "1.0"),
            Some(at("2026-11-30T04:00:00Z"))
        );
        assert_eq!(
            second.started("myapp", "1.1"),
            Some(at("2026-11-30T05:00:00Z"))
        );
        // --keep 1 dropped 1.0; another component's package is left alone.
        let mut with_other = second.clone();
        with_other.stamp("tool", "2", at("2026-11-30T03:00:00Z"));
        let third = stamped(
            Some(&with_other),
            &[entry("myapp", "1.1")],
            at("2026-11-30T06:00:00Z"),
        );
        assert_eq!(third.started("myapp", "1.0"), None);
        assert_eq!(third.started("tool", "2"), Some(at("2026-11-30T03:00:00Z")));
    }

    /// `rollout pin` finds the typed version by Debian equality and pins
    /// it as the suite spells it, so nodes find it in the index as is.
    #[test]
    fn a_pin_is_the_suite_version_equal_to_the_typed_one() {
        let entries = [entry("myapp", "0:1.1"), entry("myapp", "1.2~rc1")];
        for (typed, pinned) in [("1.1", "0:1.1"), ("0:1.2~rc1-0", "1.2~rc1")] {
            let mut policy = Policy::default();
            let pin = Change::Pin {
                package: "myapp".into(),
                version: typed.into(),
            };
            assert_eq!(
                pin.apply(&mut policy, &entries, at("2026-11-30T04:00:00Z"), "s", "u")
                    .unwrap(),
                format!("pinned myapp to {pinned}")
            );
            assert_eq!(policy.pin("myapp"), Some(pinned));
        }
        let not_there = Change::Pin {
            package: "myapp".into(),
            version: "1.2".into(),
        };
        assert!(
            not_there
                .apply(
                    &mut Policy::default(),
                    &entries,
                    at("2026-11-30T04:00:00Z"),
                    "s",
                    "u"
                )
                .is_err(),
            "1.2 is not 1.2~rc1"
        );
    }

    #[test]
    fn changes_say_what_they_did_or_why_not() {
        let entries = [entry("myapp", "1.0"), entry("myapp", "1.1")];
        let now = at("2026-11-30T05:00:00Z");
        let mut policy = Policy::default();
        let pin = Change::Pin {
            package: "myapp".into(),
            version: "0:1.0".into(),
        };
        assert_eq!(
            pin.apply(&mut policy, &entries, now, "s", "u").unwrap(),
            "pinned myapp to 1.0"
        );
        assert_eq!(policy.pin("myapp"), Some("1.0"));
        let missing = Change::Pin {
            package: "myapp".into(),
            version: "2.0".into(),
        };
        assert!(
            missing
                .apply(&mut policy, &entries, now, "s", "u")
                .unwrap_err()
                .to_string()
                .contains("myapp 2.0 is not in suite s")
        );
        let unpin = Change::Unpin {
            package: "myapp".into(),
        };
        unpin.apply(&mut policy, &entries, now, "s", "u").unwrap();
        assert!(
            unpin
                .apply(&mut policy, &entries, now, "s", "u")
                .unwrap_err()
                .to_string()
                .contains("myapp is not pinned in s")
        );
        let paused = Change::Pause
            .apply(&mut policy, &entries, now, "s", "u")
            .unwrap();
        assert!(
            paused.starts_with("paused since 2026-11-30T05:00:00Z"),
            "{paused}"
        );
        assert!(policy.paused);
        // A second pause keeps the first one's time.
        let later = at("2026-11-30T06:00:00Z");
        Change::Pause
            .apply(&mut policy, &entries, later, "s", "u")
            .unwrap();
        assert_eq!(policy.paused_at, Some(now));
        let set = Change::Set {
            waves: Some(rollout::parse_waves("10%@0s,100%@1m").unwrap()),
            max_in_flight: Some(Some(2)),
        };
        assert_eq!(
            set.apply(&mut policy, &entries, now, "s", "u").unwrap(),
            "waves 10%@0s, 100%@1m, max in flight 2"
        );
        policy.stamp("myapp", "1.0", at("2026-11-30T04:00:00Z"));
        let resumed = Change::Resume
            .apply(&mut policy, &entries, at("2026-11-30T05:30:00Z"), "s", "u")
            .unwrap();
        assert!(resumed.contains("moved 30m later"), "{resumed}");
        assert!(!policy.paused);
        assert_eq!(
            policy.started("myapp", "1.0"),
            Some(at("2026-11-30T04:30:00Z"))
        );
    }
}
