//! `pulldeploy fleet status`: the suite's fleet from its reports, halt
//! markers and leases, summed up (pure: [`Status::new`]) and printed as
//! text or JSON.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::printable;
use super::report::Reports;
pub use super::report::UnreadableReport;
use super::{Halt, LeaseInfo, NodeReport};

/// The fleet of a suite at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The suite's fleet prefix.
    pub fleet: String,
    pub suite: String,
    /// When this was read, by this host's clock.
    pub at: DateTime<Utc>,
    /// Per package, per version (newest first in text): the nodes on it.
    pub packages: BTreeMap<String, Vec<VersionNodes>>,
    /// Per wave the nodes report being in, in wave order (nodes that do
    /// not say last).
    pub waves: Vec<WaveNodes>,
    /// Nodes whose last cycle failed.
    pub failing: Vec<Failing>,
    /// Nodes whose last report is older than 3 x their report interval.
    pub stale: Vec<Stale>,
    pub halted: Vec<Halt>,
    pub leases: Vec<LeaseInfo>,
    /// Node ids whose report says another node uses the same id: their
    /// leases and reports collide (give each node its own id).
    pub duplicate_node_ids: Vec<String>,
    /// Every report as read.
    pub nodes: Vec<NodeReport>,
    pub unreadable: Vec<UnreadableReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VersionNodes {
    pub version: String,
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WaveNodes {
    /// `None`: the nodes that report no wave (no rollout policy).
    pub wave: Option<usize>,
    pub nodes: Vec<String>,
    /// Of those, the ones waiting for something (wave, lease, halt).
    pub waiting: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failing {
    pub node_id: String,
    pub last_error: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stale {
    pub node_id: String,
    pub last_report: DateTime<Utc>,
    pub report_interval_secs: u64,
}

/// Newest first, in Debian order (`1.10 > 1.9`, `1.0~rc1 < 1.0`).
fn newest_first(a: &str, b: &str) -> Ordering {
    match (
        a.parse::<debversion::Version>(),
        b.parse::<debversion::Version>(),
    ) {
        (Ok(a), Ok(b)) => b.cmp(&a),
        _ => b.cmp(a),
    }
}

impl Status {
    pub fn new(
        fleet: String,
        suite: String,
        at: DateTime<Utc>,
        reports: Reports,
        halted: Vec<Halt>,
        leases: Vec<LeaseInfo>,
    ) -> Status {
        let mut packages: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        let mut waves: BTreeMap<Option<usize>, WaveNodes> = BTreeMap::new();
        let (mut failing, mut stale) = (Vec::new(), Vec::new());
        let mut duplicate_node_ids = Vec::new();
        for report in &reports.nodes {
            let node = report.node_id.clone();
            if report.duplicate_node_id {
                duplicate_node_ids.push(node.clone());
            }
            for (package, version) in &report.installed {
                let versions = packages.entry(package.clone()).or_default();
                versions
                    .entry(version.clone())
                    .or_default()
                    .push(node.clone());
            }
            let wave = waves.entry(report.wave).or_insert_with(|| WaveNodes {
                wave: report.wave,
                nodes: Vec::new(),
                waiting: Vec::new(),
            });
            wave.nodes.push(node.clone());
            if report.waiting.is_some() {
                wave.waiting.push(node.clone());
            }
            if let Some(error) = &report.last_error {
                failing.push(Failing {
                    node_id: node.clone(),
                    last_error: error.clone(),
                    at: report.at,
                });
            }
            if report.is_stale(at) {
                stale.push(Stale {
                    node_id: node,
                    last_report: report.at,
                    report_interval_secs: report.report_interval_secs,
                });
            }
        }
        let packages = packages
            .into_iter()
            .map(|(package, versions)| {
                let mut versions: Vec<VersionNodes> = versions
                    .into_iter()
                    .map(|(version, nodes)| VersionNodes { version, nodes })
                    .collect();
                versions.sort_by(|a, b| newest_first(&a.version, &b.version));
                (package, versions)
            })
            .collect();
        // Some(n) in order, then None (Option orders None first).
        let mut waves: Vec<WaveNodes> = waves.into_values().collect();
        waves.sort_by_key(|w| (w.wave.is_none(), w.wave));
        Status {
            fleet,
            suite,
            at,
            packages,
            waves,
            failing,
            stale,
            halted,
            leases,
            duplicate_node_ids,
            nodes: reports.nodes,
            unreadable: reports.unreadable,
        }
    }

    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }

    /// For a terminal: whatever came from another node is printed with
    /// control characters escaped.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let count = |n: usize| format!("{n} node{}", if n == 1 { "" } else { "s" });
        let _ = writeln!(
            out,
            "fleet {}: {} reporting, {} failing, {} stale",
            self.fleet,
            count(self.nodes.len()),
            self.failing.len(),
            self.stale.len()
        );
        for node in &self.duplicate_node_ids {
            let _ = writeln!(
                out,
                "DUPLICATE NODE ID {node}: two nodes use this id (their leases and reports collide); give each its own [fleet] node_id"
            );
        }
        for (package, versions) in &self.packages {
            let _ = writeln!(out, "{package}:");
            for version in versions {
                let _ = writeln!(
                    out,
                    "  {:<20} {}: {}",
                    version.version,
                    count(version.nodes.len()),
                    version.nodes.join(" ")
                );
            }
        }
        if !self.waves.is_empty() {
            let _ = writeln!(out, "waves:");
        }
        for wave in &self.waves {
            let name = wave
                .wave
                .map_or("(no wave)".to_string(), |w| format!("wave {w}"));
            let _ = writeln!(
                out,
                "  {name}: {}, {} waiting",
                count(wave.nodes.len()),
                wave.waiting.len()
            );
        }
        for report in self.nodes.iter().filter(|r| r.waiting.is_some()) {
            let waiting = report.waiting.as_deref().unwrap_or_default();
            let _ = writeln!(out, "  {} waiting: {}", report.node_id, printable(waiting));
        }
        if !self.failing.is_empty() {
            let _ = writeln!(out, "failing:");
        }
        for node in &self.failing {
            let _ = writeln!(
                out,
                "  {} ({}): {}",
                node.node_id,
                node.at.to_rfc3339(),
                printable(&node.last_error)
            );
        }
        if !self.stale.is_empty() {
            let _ = writeln!(out, "stale (no report for 3 x its interval):");
        }
        for node in &self.stale {
            let _ = writeln!(
                out,
                "  {}: last report {} (interval {}s)",
                node.node_id,
                node.last_report.to_rfc3339(),
                node.report_interval_secs
            );
        }
        let _ = writeln!(
            out,
            "halted:{}",
            if self.halted.is_empty() { " none" } else { "" }
        );
        for halt in &self.halted {
            let by = match (&halt.node, halt.at) {
                (Some(node), Some(at)) => format!(" by {node} at {}", at.to_rfc3339()),
                _ => " (marker unreadable)".to_string(),
            };
            let reason = halt.reason.as_deref().map(printable).unwrap_or_default();
            let _ = writeln!(out, "  {} {}{by}: {reason}", halt.package, halt.version);
        }
        let _ = writeln!(
            out,
            "leases:{}",
            if self.leases.is_empty() {
                " none held"
            } else {
                ""
            }
        );
        for lease in &self.leases {
            let holder = lease.holder.as_deref().unwrap_or("(unreadable)");
            let expires = lease.expires.map(|e| e.to_rfc3339()).unwrap_or_default();
            let expired = if lease.expired { " (expired)" } else { "" };
            let _ = writeln!(
                out,
                "  slot {}: {holder} until {expires}{expired}",
                lease.slot
            );
        }
        for bad in &self.unreadable {
            let _ = writeln!(
                out,
                "unreadable report {}: {}",
                printable(&bad.object),
                printable(&bad.reason)
            );
        }
        out
    }
}
