//! `pulldeploy rollout show|set|pause|resume|pin|unpin`: the suite's
//! rollout policy, read and verified like the suite itself; each change a
//! signed, atomic re-publish of the suite through the one flip (verify
//! before flip, conditional InRelease write), the packages untouched.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::index::{self, Checksum, ReleaseContent};
use super::policy::{Change, waves_text};
use super::suite::Current;
use super::write::Content;
use super::{Operation, Publisher, print_report};
use crate::cli::{RolloutArgs, RolloutCommand, RolloutTarget};
use crate::error::{Error, PublishError};
use crate::rollout::{self, Policy};
use crate::webhook::PublisherEvent;

/// `pulldeploy rollout ...`.
pub async fn rollout(args: RolloutArgs) -> Result<(), Error> {
    let (target, change) = match args.command {
        RolloutCommand::Show(target) => return show(&target).await,
        RolloutCommand::Set(set) => {
            if set.waves.is_none() && set.max_in_flight.is_none() {
                return Err(super::usage(
                    "say what to set: --waves and/or --max-in-flight",
                ));
            }
            (
                set.target,
                Change::Set {
                    waves: set.waves.map(|w| w.0),
                    max_in_flight: set.max_in_flight.map(|limit| limit.0),
                },
            )
        }
        RolloutCommand::Pause(target) => (target, Change::Pause),
        RolloutCommand::Resume(target) => (target, Change::Resume),
        RolloutCommand::Pin { target, pin } => {
            let (package, version) = pin.split_once('=').unwrap_or((&pin, ""));
            (
                target,
                Change::Pin {
                    package: package.to_string(),
                    version: version.to_string(),
                },
            )
        }
        RolloutCommand::Unpin { target, package } => (target, Change::Unpin { package }),
    };
    let publisher = Publisher::open(&target.repo).await?;
    let report = publisher
        .update(&target.suite, Operation::Rollout(change))
        .await?;
    print_report(&report);
    super::announce(
        &target.repo,
        PublisherEvent::Rollout,
        &target.suite,
        &report,
    )
    .await;
    Ok(())
}

/// One line: paused or active, waves, limit, pins.
pub fn describe(policy: &Policy) -> String {
    let state = match (policy.paused, policy.paused_at) {
        (false, _) => "active".to_string(),
        (true, Some(at)) => format!(
            "paused since {}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        (true, None) => "paused since an unknown time (nothing with a start time is released; resume, then pause again, to record one)".to_string(),
    };
    let mut line = format!(
        "{state}, waves {}, max in flight {}",
        waves_text(&policy.waves),
        policy
            .max_in_flight
            .map_or("unlimited".to_string(), |n| n.to_string())
    );
    for (package, version) in &policy.pins {
        let _ = write!(line, ", {package} pinned to {version}");
    }
    line
}

/// `rollout show`: the policy in force and, per package, the version each
/// wave is on now (and the next one it gets, and when; while paused, what
/// the pause holds back instead).
async fn show(target: &RolloutTarget) -> Result<(), Error> {
    let publisher = Publisher::open(&target.repo).await?;
    let suite = &target.suite;
    let current =
        publisher
            .read_current(suite)
            .await?
            .ok_or_else(|| PublishError::NothingToRefresh {
                suite: suite.clone(),
                url: publisher.store.url(&Publisher::dists(suite, "InRelease")),
            })?;
    print_report(&[show_text(suite, &current, Utc::now())]);
    Ok(())
}

fn show_text(suite: &str, current: &Current, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let policy = match &current.policy {
        Some(policy) => policy.clone(),
        None => {
            let _ = writeln!(
                out,
                "suite {suite} has no rollout policy ({} not in its Release): every node installs the newest version at once",
                rollout::FILE
            );
            Policy::default()
        }
    };
    let _ = writeln!(out, "suite {suite}: {}", describe(&policy));
    let mut versions: BTreeMap<&str, Vec<&debversion::Version>> = BTreeMap::new();
    for entry in &current.entries {
        let list = versions.entry(entry.name.as_str()).or_default();
        if !list.contains(&&entry.version) {
            list.push(&entry.version);
        }
    }
    for (package, mut list) in versions {
        list.sort();
        if let Some(pin) = policy.pin(package) {
            let _ = writeln!(out, "{package}: every wave on {pin} (pinned)");
            continue;
        }
        let _ = writeln!(out, "{package}:");
        for (i, wave) in policy.waves.iter().enumerate() {
            let released =
                |v: &&&debversion::Version| policy.is_released(package, &v.to_string(), i, now);
            let on = list.iter().rev().find(released);
            let newer = || list.iter().rev().filter(|v| on.is_none_or(|on| **v > *on));
            let _ = write!(
                out,
                "  wave {} ({wave}): {}",
                i + 1,
                on.map_or("nothing yet".to_string(), |v| v.to_string())
            );
            if policy.paused {
                // Nothing newer has a time while paused: the resume sets it.
                if let Some(version) = newer().next() {
                    let _ = write!(out, "; {version} held by the pause");
                }
            } else if let Some((version, at)) = newer()
                .filter_map(|v| Some((v, policy.released_at(package, &v.to_string(), i)?)))
                .filter(|(_, at)| *at > now)
                .min_by_key(|(_, at)| *at)
            {
                let _ = write!(out, "; {version} at {}", at.to_rfc3339());
            }
            out.push('\n');
        }
    }
    out.trim_end().to_string()
}

impl Publisher {
    /// The suite with `change` applied to its policy: the same indexes,
    /// a new rollout.toml, a new Release. `None` when the policy would not
    /// change (nothing is re-signed).
    pub(super) async fn rollout_content(
        &self,
        suite: &str,
        current: &Current,
        change: &Change,
        date: DateTime<Utc>,
        valid_until: Option<DateTime<Utc>>,
    ) -> Result<Option<Content>, Error> {
        let before = current.policy.clone().unwrap_or_default();
        let mut policy = before.clone();
        let url = self.store.url(&Self::dists(suite, "InRelease"));
        let what = change.apply(&mut policy, &current.entries, date, suite, &url)?;
        if current.policy.is_some() && policy == before {
            return Ok(None);
        }
        let (policy256, policy512) = self.write_policy(suite, &policy).await?;
        let others = |c: &&Checksum| c.path != rollout::FILE;
        let mut sha256: Vec<Checksum> = current.sha256.iter().filter(others).cloned().collect();
        let mut sha512: Vec<Checksum> = current.sha512.iter().filter(others).cloned().collect();
        sha256.push(policy256);
        sha512.push(policy512);
        let release_text = index::release_text(&ReleaseContent {
            previous: Some(&current.release),
            suite,
            date,
            valid_until,
            architectures: &current.architectures,
            components: &current.components,
            sha256,
            sha512,
        });
        Ok(Some(Content {
            release_text,
            new_pool_files: Default::default(),
            report: vec![format!("rollout of {suite}: {what}")],
        }))
    }
}
