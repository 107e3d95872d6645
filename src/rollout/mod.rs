//! The rollout policy of a suite: `dists/<suite>/rollout.toml`, listed in
//! the suite's Release (so its signature covers the policy), and the wave
//! arithmetic every node does with it. Pure: no I/O, no clock.
//!
//! ```toml
//! format = 1
//! paused = false
//! # paused_at = "2026-11-30T04:30:00Z"   (only while paused)
//! max_in_flight = 1
//! waves = ["5%@0s", "25%@10m", "100%@30m"]
//!
//! [pins]
//! myapp = "1.0"
//!
//! [started.myapp]
//! "1.0" = "2026-11-30T04:00:00Z"
//! "1.1" = "2026-11-30T05:00:00Z"
//! ```
//!
//! - **Waves**: `SHARE%@DELAY`, shares strictly increasing up to 100%,
//!   delays never decreasing. A node's position is a number in [0, 1) from
//!   its node id ([`position`]); its wave is the first whose share exceeds
//!   the position. It may install version V of a package once
//!   `now >= started(V) + delay(its wave)`; the version it wants is the
//!   newest released to its wave. A version with no start time (put in the
//!   suite by another tool) is not held by waves.
//! - **Pins** name the version every node runs (an older one is a signed
//!   fleet rollback). A pin is the operator's explicit word: it is not held
//!   by waves or by `paused`.
//! - **Paused** (`paused_at`: when the pause began): the schedule is frozen
//!   at that moment. A node that has a package installed keeps it; a fresh
//!   node installs what its wave had when the pause began, so that new
//!   instances come up but nothing new goes anywhere. A paused policy
//!   without `paused_at` (written before it existed) is frozen before any
//!   start: nothing with a start time is released (fail closed). On resume
//!   the publisher moves every start forward by the paused time that
//!   overlapped it ([`Policy::resume`]), so the pause counts toward no
//!   wave's delay and resuming does not release every wave at once.
//! - **max_in_flight**: at most that many serving nodes between drain and
//!   commit at once (leases in the fleet prefix; see `crate::fleet`).
//!
//! A policy with an unknown key or a newer `format` is refused: an agent
//! must not follow half of an operator's intent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::repo::packages::same_version;

/// The file's name in `dists/<suite>/`, and its path in Release.
pub const FILE: &str = "rollout.toml";
/// The policy format this agent reads and writes.
pub const FORMAT: u32 = 1;
/// The largest policy an agent reads (a start time per version of every
/// package: thousands of versions fit).
pub const MAX_BYTES: u64 = 4 << 20;
/// At most this many waves.
pub const MAX_WAVES: usize = 32;

/// One wave: the share of the fleet it reaches (cumulative) and its delay
/// after a version's start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wave {
    /// (0, 1]: nodes whose position is below it are in this wave or an
    /// earlier one.
    pub share: f64,
    pub delay: Duration,
}

impl Wave {
    /// `5%@10m`, `0.5%@30s`, `100%@1h`.
    pub fn parse(text: &str) -> Result<Wave, String> {
        let bad = |why: &str| format!("{text:?} is not a wave like \"25%@10m\": {why}");
        let (share, delay) = text.split_once('@').ok_or_else(|| bad("no '@'"))?;
        let percent = share
            .trim()
            .strip_suffix('%')
            .ok_or_else(|| bad("the share ends with '%'"))?;
        let percent: f64 = percent
            .parse()
            .map_err(|_| bad("the share is not a number"))?;
        if !(percent > 0.0 && percent <= 100.0) {
            return Err(bad("the share is more than 0% and at most 100%"));
        }
        // Written back with four decimals (Display): a finer share would
        // come back as another number, and two close shares as equal ones,
        // which every agent then refuses. So: ten-thousandths of a percent.
        let steps = percent * 10_000.0;
        if (steps - steps.round()).abs() > 1e-6 || steps.round() < 1.0 {
            return Err(bad("the share has at most four decimal places"));
        }
        let delay =
            humantime::parse_duration(delay.trim()).map_err(|e| bad(&format!("the delay: {e}")))?;
        Ok(Wave {
            share: steps.round() / 1_000_000.0,
            delay,
        })
    }
}

impl fmt::Display for Wave {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = self.share * 100.0;
        // Whole percents print without decimals; others keep what they need.
        let percent = format!("{percent:.4}");
        let percent = percent.trim_end_matches('0').trim_end_matches('.');
        write!(f, "{percent}%@{}", humantime::format_duration(self.delay))
    }
}

/// Checks a list of waves: at least one, at most [`MAX_WAVES`], shares
/// strictly increasing and ending at 100%, delays never decreasing.
pub fn check_waves(waves: &[Wave]) -> Result<(), String> {
    let last = waves.last().ok_or("list at least one wave")?;
    if waves.len() > MAX_WAVES {
        return Err(format!("at most {MAX_WAVES} waves"));
    }
    for pair in waves.windows(2) {
        if pair[1].share <= pair[0].share {
            return Err(format!(
                "shares must grow from wave to wave ({} then {})",
                pair[0], pair[1]
            ));
        }
        if pair[1].delay < pair[0].delay {
            return Err(format!(
                "delays must not shrink from wave to wave ({} then {})",
                pair[0], pair[1]
            ));
        }
    }
    if last.share < 1.0 {
        return Err(format!("the last wave must reach 100% (it is {last})"));
    }
    Ok(())
}

/// Parses a comma-separated wave list (`pulldeploy rollout set --waves`).
pub fn parse_waves(text: &str) -> Result<Vec<Wave>, String> {
    let waves = text
        .split(',')
        .map(|w| Wave::parse(w.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    check_waves(&waves)?;
    Ok(waves)
}

/// The position of a node in [0, 1): the first 64 bits of
/// SHA256("pulldeploy-wave\0" + node id), as a fraction. Stable for a node,
/// evenly spread over a fleet.
pub fn position(node_id: &str) -> f64 {
    let digest = Sha256::new()
        .chain_update(b"pulldeploy-wave\0")
        .chain_update(node_id.as_bytes())
        .finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    // 53 bits: exactly representable, and strictly below 1.
    (u64::from_be_bytes(head) >> 11) as f64 / (1u64 << 53) as f64
}

/// A suite's rollout policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub paused: bool,
    /// When the pause began (the Date of the Release that signed it);
    /// `None` while not paused, or in a paused policy written before this
    /// field existed (see [`Policy::frozen_at`]).
    pub paused_at: Option<DateTime<Utc>>,
    pub max_in_flight: Option<u32>,
    pub waves: Vec<Wave>,
    /// package -> version every node runs.
    pub pins: BTreeMap<String, String>,
    /// package -> version -> when its rollout started.
    pub started: BTreeMap<String, BTreeMap<String, DateTime<Utc>>>,
}

impl Default for Policy {
    /// The policy of a suite nobody configured: one wave, everyone at once.
    fn default() -> Policy {
        Policy {
            paused: false,
            paused_at: None,
            max_in_flight: None,
            waves: vec![Wave {
                share: 1.0,
                delay: Duration::ZERO,
            }],
            pins: BTreeMap::new(),
            started: BTreeMap::new(),
        }
    }
}

/// The file as TOML.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    format: u32,
    #[serde(default)]
    paused: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    paused_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_in_flight: Option<u32>,
    #[serde(default)]
    waves: Vec<String>,
    #[serde(default)]
    pins: BTreeMap<String, String>,
    #[serde(default)]
    started: BTreeMap<String, BTreeMap<String, String>>,
}

impl Policy {
    /// Parses and checks a policy file.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        if file.format != FORMAT {
            return Err(format!(
                "format {} (this agent reads format {FORMAT}; upgrade it)",
                file.format
            ));
        }
        if file.max_in_flight == Some(0) {
            return Err("max_in_flight must be at least 1 (leave it out for no limit)".into());
        }
        let waves = match file.waves.is_empty() {
            true => Policy::default().waves,
            false => file
                .waves
                .iter()
                .map(|w| Wave::parse(w))
                .collect::<Result<Vec<_>, _>>()?,
        };
        check_waves(&waves).map_err(|e| format!("waves: {e}"))?;
        for (package, version) in &file.pins {
            crate::repo::names::PackageSpec::parse(&format!("{package}={version}"))
                .map_err(|e| format!("pins.{package}: {e}"))?;
        }
        let paused_at = match (file.paused, file.paused_at) {
            (_, None) => None,
            (true, Some(at)) => Some(
                DateTime::parse_from_rfc3339(&at)
                    .map_err(|e| format!("paused_at: {at:?}: {e}"))?
                    .with_timezone(&Utc),
            ),
            (false, Some(at)) => {
                return Err(format!(
                    "paused_at = {at:?} without paused = true (a pause half undone)"
                ));
            }
        };
        let mut started = BTreeMap::new();
        for (package, versions) in file.started {
            let mut times = BTreeMap::new();
            for (version, at) in versions {
                let at = DateTime::parse_from_rfc3339(&at)
                    .map_err(|e| format!("started.{package}.{version:?}: {at:?}: {e}"))?
                    .with_timezone(&Utc);
                times.insert(version, at);
            }
            started.insert(package, times);
        }
        Ok(Policy {
            paused: file.paused,
            paused_at,
            max_in_flight: file.max_in_flight,
            waves,
            pins: file.pins,
            started,
        })
    }

    /// The file's text, with a header saying what it is.
    pub fn to_text(&self, suite: &str) -> String {
        let file = File {
            format: FORMAT,
            paused: self.paused,
            paused_at: self
                .paused_at
                .filter(|_| self.paused)
                .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            max_in_flight: self.max_in_flight,
            waves: self.waves.iter().map(ToString::to_string).collect(),
            pins: self.pins.clone(),
            started: self
                .started
                .iter()
                .map(|(package, versions)| {
                    let versions = versions
                        .iter()
                        .map(|(v, at)| {
                            (
                                v.clone(),
                                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            )
                        })
                        .collect();
                    (package.clone(), versions)
                })
                .collect(),
        };
        let body = toml::to_string(&file).unwrap_or_default();
        format!(
            "# The rollout policy of suite {suite:?}, signed through its Release.\n\
             # Change it with `pulldeploy rollout`, never by hand: the suite is re-signed.\n\
             {body}"
        )
    }

    /// The wave (index into `waves`) of a node at `position`.
    pub fn wave_of(&self, position: f64) -> usize {
        self.waves
            .iter()
            .position(|w| w.share > position)
            .unwrap_or(self.waves.len().saturating_sub(1))
    }

    /// When `version` of `package` started rolling out (Debian version
    /// equality: `0:1.0` is `1.0`).
    pub fn started(&self, package: &str, version: &str) -> Option<DateTime<Utc>> {
        self.started
            .get(package)?
            .iter()
            .find(|(v, _)| same_version(v, version))
            .map(|(_, at)| *at)
    }

    /// When `wave` may install `version` of `package`; `None` when the
    /// policy has no start time for it (not held).
    pub fn released_at(&self, package: &str, version: &str, wave: usize) -> Option<DateTime<Utc>> {
        let started = self.started(package, version)?;
        let delay = self.waves.get(wave).map_or(Duration::ZERO, |w| w.delay);
        // A delay past the calendar (a signed "100%@1000000years") means
        // never, not a panic.
        let at = chrono::Duration::from_std(delay)
            .ok()
            .and_then(|delay| started.checked_add_signed(delay))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        Some(at)
    }

    /// When the schedule froze: `None` when not paused; the moment the
    /// pause began; [`DateTime::MIN_UTC`] for a paused policy that does not
    /// say when (nothing with a start time is released: fail closed).
    pub fn frozen_at(&self) -> Option<DateTime<Utc>> {
        self.paused
            .then(|| self.paused_at.unwrap_or(DateTime::<Utc>::MIN_UTC))
    }

    /// The time the schedule is read at: `now`, or the moment the pause
    /// began when that is earlier.
    pub fn schedule_time(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        self.frozen_at().map_or(now, |frozen| frozen.min(now))
    }

    /// Whether `version` of `package` is released to `wave` at `now`: no
    /// start time (not held), or its wave's time is at or before the
    /// schedule time (a pause freezes it).
    pub fn is_released(
        &self,
        package: &str,
        version: &str,
        wave: usize,
        now: DateTime<Utc>,
    ) -> bool {
        self.released_at(package, version, wave)
            .is_none_or(|at| at <= self.schedule_time(now))
    }

    /// Pauses at `at` (the Date of the Release that signs it). A policy
    /// already paused keeps the moment its pause began: pausing again must
    /// not release what became due since. `true` when it changed.
    pub fn pause(&mut self, at: DateTime<Utc>) -> bool {
        if self.paused {
            return false;
        }
        self.paused = true;
        self.paused_at = Some(at);
        true
    }

    /// Resumes at `at`: every start moves forward by the paused time that
    /// overlapped it, `start' = min(start, paused_at) + (at - paused_at)`,
    /// so no wave's delay is eaten by the pause (a version published while
    /// paused starts at the resume). The shift, or `None` when the pause
    /// has no start time (a policy from before `paused_at`: the starts
    /// stay) or the policy was not paused.
    pub fn resume(&mut self, at: DateTime<Utc>) -> Option<chrono::Duration> {
        if !self.paused {
            return None;
        }
        self.paused = false;
        let paused_at = self.paused_at.take()?;
        // A publisher clock behind the pause's: no shift backwards.
        let shift = (at - paused_at).max(chrono::Duration::zero());
        for versions in self.started.values_mut() {
            for start in versions.values_mut() {
                *start = (*start)
                    .min(paused_at)
                    .checked_add_signed(shift)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
            }
        }
        Some(shift)
    }

    /// The pinned version of `package`, if any.
    pub fn pin(&self, package: &str) -> Option<&str> {
        self.pins.get(package).map(String::as_str)
    }

    /// Records `now` as the start of `version` of `package` unless it has
    /// one. `true` when it was new.
    pub fn stamp(&mut self, package: &str, version: &str, now: DateTime<Utc>) -> bool {
        if self.started(package, version).is_some() {
            return false;
        }
        self.started
            .entry(package.to_string())
            .or_default()
            .insert(version.to_string(), now);
        true
    }

    /// Forgets the start times of versions no longer in the suite.
    pub fn retain(&mut self, present: &BTreeSet<(String, String)>) {
        for (package, versions) in &mut self.started {
            versions.retain(|version, _| {
                present
                    .iter()
                    .any(|(p, v)| p == package && same_version(v, version))
            });
        }
        self.started.retain(|_, versions| !versions.is_empty());
    }
}

#[cfg(test)]
mod tests;
