//! Node reports, `<suite>/nodes/<node-id>.json`: what a node has
//! installed and what it waits for, written by the node itself.
//!
//! Every node with write access to the fleet prefix can write any report,
//! so a report read back is untrusted input: read with a size cap
//! ([`MAX_REPORT_BYTES`]), parsed into typed fields (serde_json; its
//! recursion limit bounds nesting), checked ([`NodeReport::parse`]), and
//! only ever displayed. Nothing a node decides depends on another node's
//! report. Unknown fields are ignored, so newer agents may add some.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Fleet, FleetError, READ_CONCURRENCY, key};
use crate::repo::names::{PackageName, Version};

/// A report lists a few packages; 64 KiB is far beyond any real one.
pub const MAX_REPORT_BYTES: u64 = 64 * 1024;
/// Packages in one report.
pub const MAX_REPORT_PACKAGES: usize = 256;
/// Any free-text field (an error message, what the node waits for).
pub const MAX_TEXT: usize = 2048;

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node_id: String,
    /// Committed version per package.
    #[serde(default)]
    pub installed: BTreeMap<String, String>,
    /// The node's stable position in the waves, in [0, 1).
    #[serde(default)]
    pub wave_position: Option<f64>,
    /// Index of the node's wave in the policy's `waves`.
    #[serde(default)]
    pub wave: Option<usize>,
    /// `installed`, `up to date`, `rolled back`, ...
    #[serde(default)]
    pub last_outcome: Option<String>,
    /// The last cycle's error; `None` once a cycle succeeded.
    #[serde(default)]
    pub last_error: Option<String>,
    /// What holds an install back: `wave until T`, `lease`, `halted V`.
    #[serde(default)]
    pub waiting: Option<String>,
    /// How often the node reports when nothing changes; staleness is
    /// judged against three of these.
    pub report_interval_secs: u64,
    /// When the report was written, by the node's clock.
    pub at: DateTime<Utc>,
    #[serde(default)]
    pub agent_version: String,
    /// The writing process's instance token ([`super::instance_token`]):
    /// tells two processes with one node id apart.
    #[serde(default)]
    pub instance: Option<String>,
    /// The writer has seen another node use its node id.
    #[serde(default)]
    pub duplicate_node_id: bool,
}

impl NodeReport {
    /// The report's bytes as written.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses and checks a report read from `nodes/<expected_node>.json`.
    /// The error says what is wrong, for `fleet status`.
    pub fn parse(bytes: &[u8], expected_node: &str) -> Result<NodeReport, String> {
        if bytes.len() as u64 > MAX_REPORT_BYTES {
            return Err(format!("larger than {MAX_REPORT_BYTES} bytes"));
        }
        let report: NodeReport =
            serde_json::from_slice(bytes).map_err(|e| format!("not a node report: {e}"))?;
        report.check(expected_node)?;
        Ok(report)
    }

    fn check(&self, expected_node: &str) -> Result<(), String> {
        if self.node_id != expected_node {
            return Err(format!(
                "says it is node {:?}, but is stored as {expected_node:?}",
                super::printable(&self.node_id)
            ));
        }
        crate::config::node_id(&self.node_id)?;
        if self.installed.len() > MAX_REPORT_PACKAGES {
            return Err(format!("more than {MAX_REPORT_PACKAGES} packages"));
        }
        for (name, version) in &self.installed {
            PackageName::parse(name)?;
            Version::parse(version)?;
        }
        if let Some(position) = self.wave_position
            && !(0.0..1.0).contains(&position)
        {
            return Err(format!("wave_position {position} is not in [0, 1)"));
        }
        for (field, text) in [
            ("last_outcome", &self.last_outcome),
            ("last_error", &self.last_error),
            ("waiting", &self.waiting),
        ] {
            if text.as_ref().is_some_and(|t| t.len() > MAX_TEXT) {
                return Err(format!("{field} is longer than {MAX_TEXT} bytes"));
            }
        }
        if self.agent_version.len() > 64 {
            return Err("agent_version is longer than 64 bytes".into());
        }
        if self.instance.as_ref().is_some_and(|i| i.len() > 64) {
            return Err("instance is longer than 64 bytes".into());
        }
        if self.report_interval_secs == 0 {
            return Err("report_interval_secs is 0".into());
        }
        Ok(())
    }

    /// Older than three report intervals at `now`: the node stopped
    /// reporting (down, cut off, or its clock is far behind).
    pub fn is_stale(&self, now: DateTime<Utc>) -> bool {
        let interval = i64::try_from(self.report_interval_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(3);
        now.signed_duration_since(self.at).num_seconds() > interval
    }
}

/// A report object that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnreadableReport {
    /// The object's URL.
    pub object: String,
    pub reason: String,
}

/// Every node report of a suite.
#[derive(Debug, Clone, Default)]
pub struct Reports {
    /// By node id.
    pub nodes: Vec<NodeReport>,
    pub unreadable: Vec<UnreadableReport>,
}

impl Fleet {
    /// Lists `nodes/` and reads every report, [`READ_CONCURRENCY`] at a
    /// time. A report that cannot be read or parsed is listed in
    /// `unreadable`, not an error: one bad node does not hide the fleet.
    pub async fn reports(&self) -> Result<Reports, FleetError> {
        let prefix = format!("{}/nodes/", self.suite);
        let mut pending = self
            .list(&prefix)
            .await?
            .into_iter()
            .take(super::MAX_LISTED);
        let mut reading = tokio::task::JoinSet::new();
        let mut reports = Reports::default();
        loop {
            while reading.len() < READ_CONCURRENCY
                && let Some(path) = pending.next()
            {
                let url = self.store.url(&path);
                let node = path
                    .strip_prefix(&prefix)
                    .and_then(|name| name.strip_suffix(".json"))
                    .and_then(key::decode);
                let Some(node) = node else {
                    reports.unreadable.push(UnreadableReport {
                        object: url,
                        reason: "not a node report name (<node-id>.json)".into(),
                    });
                    continue;
                };
                let store = self.store.clone();
                reading.spawn(async move {
                    let read = store.get(&path, MAX_REPORT_BYTES).await;
                    let parsed = match read {
                        Ok(Some(stored)) => NodeReport::parse(&stored.bytes, &node).map(Some),
                        Ok(None) => Ok(None),
                        Err(e) => Err(e.to_string()),
                    };
                    (url, parsed)
                });
            }
            let Some(done) = reading.join_next().await else {
                break;
            };
            match done {
                Ok((_, Ok(Some(report)))) => reports.nodes.push(report),
                // Deleted between the listing and the read.
                Ok((_, Ok(None))) => {}
                Ok((object, Err(reason))) => {
                    reports.unreadable.push(UnreadableReport { object, reason });
                }
                Err(e) => reports.unreadable.push(UnreadableReport {
                    object: self.store.url(&prefix),
                    reason: format!("read task failed: {e}"),
                }),
            }
        }
        reports.nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        reports.unreadable.sort_by(|a, b| a.object.cmp(&b.object));
        Ok(reports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> NodeReport {
        NodeReport {
            node_id: "i-0abc".into(),
            installed: [("myapp".to_string(), "1:2.0~rc1+b1-1".to_string())].into(),
            wave_position: Some(0.25),
            wave: Some(1),
            last_outcome: Some("installed".into()),
            last_error: None,
            waiting: Some("lease".into()),
            report_interval_secs: 300,
            at: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            agent_version: "0.1.0".into(),
            instance: Some("0123456789abcdef".into()),
            duplicate_node_id: false,
        }
    }

    #[test]
    fn a_report_round_trips() {
        let report = report();
        assert_eq!(NodeReport::parse(&report.to_json(), "i-0abc"), Ok(report));
    }

    #[test]
    fn huge_report_is_refused_before_parsing() {
        let mut bytes = b"{\"node_id\": \"i-0abc\", \"x\": \"".to_vec();
        bytes.resize(MAX_REPORT_BYTES as usize + 1, b'a');
        let error = NodeReport::parse(&bytes, "i-0abc").unwrap_err();
        assert!(error.contains("larger than"), "{error}");
    }

    #[test]
    fn garbage_wrong_types_and_deep_nesting_are_errors_not_panics() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        for bad in [
            &b"\xff\xfe garbage"[..],
            b"",
            b"null",
            b"[]",
            br#"{"node_id": 5, "report_interval_secs": 300, "at": "2024-01-01T00:00:00Z"}"#,
            br#"{"node_id": "i-0abc", "report_interval_secs": -1, "at": "2024-01-01T00:00:00Z"}"#,
            br#"{"node_id": "i-0abc", "report_interval_secs": 300, "at": "yesterday"}"#,
            br#"{"node_id": "i-0abc", "report_interval_secs": 300, "at": "2024-01-01T00:00:00Z", "installed": {"myapp": 1}}"#,
            br#"{"node_id": "i-0abc", "report_interval_secs": 300, "at": "2024-01-01T00:00:00Z", "wave": -3}"#,
            br#"{"node_id": "i-0abc", "report_interval_secs": 300, "at": "2024-01-01T00:00:00Z", "x": "#,
            deep.as_bytes(),
        ] {
            assert!(NodeReport::parse(bad, "i-0abc").is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_report_lying_about_its_node_or_packages_is_refused() {
        let mut other = report();
        other.node_id = "i-0other".into();
        assert!(
            NodeReport::parse(&other.to_json(), "i-0abc")
                .unwrap_err()
                .contains("stored as")
        );
        let mut bad_name = report();
        bad_name.installed.insert("../../etc".into(), "1.0".into());
        assert!(NodeReport::parse(&bad_name.to_json(), "i-0abc").is_err());
        let mut bad_version = report();
        bad_version
            .installed
            .insert("myapp".into(), "1.0\u{1b}[2J".into());
        assert!(NodeReport::parse(&bad_version.to_json(), "i-0abc").is_err());
        let mut position = report();
        position.wave_position = Some(7.0);
        assert!(NodeReport::parse(&position.to_json(), "i-0abc").is_err());
        let mut long = report();
        long.last_error = Some("x".repeat(MAX_TEXT + 1));
        assert!(NodeReport::parse(&long.to_json(), "i-0abc").is_err());
    }

    #[test]
    fn stale_after_three_intervals() {
        let report = report();
        let at = report.at;
        assert!(!report.is_stale(at + chrono::Duration::seconds(900)));
        assert!(report.is_stale(at + chrono::Duration::seconds(901)));
        // From the future (a node's clock ahead): not stale.
        assert!(!report.is_stale(at - chrono::Duration::days(1)));
        let mut huge = report.clone();
        huge.report_interval_secs = u64::MAX;
        assert!(!huge.is_stale(at + chrono::Duration::days(365)));
    }
}
