//! Halt markers, `<suite>/halted/<package>_<version>`: a node that rolled
//! back a version says so, and no node installs that version until an
//! operator runs `pulldeploy fleet unhalt`.
//!
//! The object's existence is the halt; its content (who, when, why, as
//! JSON) is for people. A marker that does not parse still halts: a halt
//! can only keep nodes where they are, so when in doubt it holds. The
//! first marker stays (`If-None-Match: *`): the node that rolled back first
//! has the original reason.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Fleet, FleetError, key, printable};
use crate::publish::store::{Body, Condition, Written};
use crate::repo::names::{PackageName, Version};
use crate::repo::packages::same_version;

/// A marker is one short JSON object; anything larger is not one of ours.
pub const MAX_HALT_BYTES: u64 = 16 * 1024;
/// The reason kept in a marker (the rollback's error, cut).
const MAX_REASON: usize = 2048;

/// A halted version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Halt {
    pub package: String,
    pub version: String,
    /// The node that wrote the marker; `None` when the marker is unreadable.
    pub node: Option<String>,
    pub at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

/// The marker as written.
#[derive(Serialize, Deserialize)]
struct Marker {
    node: String,
    at: DateTime<Utc>,
    reason: String,
}

fn checked(package: &str, version: &str) -> Result<(), FleetError> {
    PackageName::parse(package)
        .and_then(|_| Version::parse(version))
        .map(|_| ())
        .map_err(|reason| FleetError::Invalid { reason })
}

/// The key segment of `package` `version`: Debian package names and
/// versions have no `_`, so the first `_` separates them.
fn segment(package: &str, version: &str) -> String {
    format!("{}_{}", key::encode(package), key::encode(version))
}

/// The package and version of a key segment, when it is one.
fn parse_segment(segment: &str) -> Option<(String, String)> {
    let (package, version) = segment.split_once('_')?;
    let (package, version) = (key::decode(package)?, key::decode(version)?);
    checked(&package, &version).ok()?;
    Some((package, version))
}

impl Fleet {
    fn halt_path(&self, package: &str, version: &str) -> String {
        format!("{}/halted/{}", self.suite, segment(package, version))
    }

    /// The halt marker of `package` `version`, if there is one (one GET).
    pub async fn halted(&self, package: &str, version: &str) -> Result<Option<Halt>, FleetError> {
        checked(package, version)?;
        let path = self.halt_path(package, version);
        let stored = match self.get(&path, MAX_HALT_BYTES).await {
            Ok(stored) => stored,
            // Too large to read: a marker all the same.
            Err(FleetError::Store(e)) if super::too_large(&e) => {
                return Ok(Some(unreadable(package, version)));
            }
            Err(e) => return Err(e),
        };
        Ok(stored.map(
            |stored| match serde_json::from_slice::<Marker>(&stored.bytes) {
                Ok(marker) => Halt {
                    package: package.to_string(),
                    version: version.to_string(),
                    node: Some(printable(&marker.node)),
                    at: Some(marker.at),
                    reason: Some(printable(&marker.reason)),
                },
                Err(_) => unreadable(package, version),
            },
        ))
    }

    /// Writes the halt marker of `package` `version` (this node, now,
    /// `reason`). A marker already there stays as it is.
    pub async fn halt(&self, package: &str, version: &str, reason: &str) -> Result<(), FleetError> {
        checked(package, version)?;
        let path = self.halt_path(package, version);
        let mut reason = reason.to_string();
        if reason.len() > MAX_REASON {
            let mut cut = MAX_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        let marker = Marker {
            node: self.node_id.clone(),
            at: self.now(),
            reason,
        };
        let bytes = serde_json::to_vec_pretty(&marker).unwrap_or_default();
        match self
            .put(&path, Body::Bytes(&bytes), Condition::IfAbsent)
            .await?
        {
            Written::Done { .. } => {
                warn!(marker = %self.store.url(&path), %package, %version, "halted the version for the fleet")
            }
            Written::PreconditionFailed => {
                info!(marker = %self.store.url(&path), %package, %version, "the version was halted already")
            }
        }
        Ok(())
    }

    /// Removes every halt marker of `package` whose version equals
    /// `version` by Debian version equality, not as typed: a node names a
    /// marker after the version as the index spells it (`0:1.1`), an
    /// operator types `1.1`. Returns the versions as the removed markers
    /// spelled them; empty when there was none.
    pub async fn unhalt(&self, package: &str, version: &str) -> Result<Vec<String>, FleetError> {
        checked(package, version)?;
        let prefix = format!("{}/halted/", self.suite);
        let mut removed = Vec::new();
        for path in self.list(&prefix).await? {
            let Some((name, halted)) = path.strip_prefix(&prefix).and_then(parse_segment) else {
                continue;
            };
            if name == package && same_version(&halted, version) {
                self.delete(&path, None).await?;
                removed.push(halted);
            }
        }
        Ok(removed)
    }

    /// Every halted version of the suite (markers under other names are
    /// skipped: they halt nothing).
    pub async fn halts(&self) -> Result<Vec<Halt>, FleetError> {
        let prefix = format!("{}/halted/", self.suite);
        let mut halts = Vec::new();
        for path in self
            .list(&prefix)
            .await?
            .into_iter()
            .take(super::MAX_LISTED)
        {
            let Some((package, version)) = path.strip_prefix(&prefix).and_then(parse_segment)
            else {
                warn!(object = %self.store.url(&path), "not a halt marker name; ignored");
                continue;
            };
            match self.halted(&package, &version).await {
                Ok(Some(halt)) => halts.push(halt),
                Ok(None) => {}
                Err(FleetError::Store(e)) => {
                    warn!(error = %e, "unreadable halt marker; shown without details");
                    halts.push(unreadable(&package, &version));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(halts)
    }
}

fn unreadable(package: &str, version: &str) -> Halt {
    Halt {
        package: package.to_string(),
        version: version.to_string(),
        node: None,
        at: None,
        reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_names_round_trip() {
        let segment = segment("myapp", "1:2.0~rc1+b1-3");
        assert_eq!(segment, "myapp_1%3A2.0%7Erc1+b1-3");
        assert_eq!(
            parse_segment(&segment),
            Some(("myapp".into(), "1:2.0~rc1+b1-3".into()))
        );
        for bad in [
            "myapp",
            "myapp_",
            "_1.0",
            "MyApp_1.0",
            "myapp_1.0_2",
            "myapp_x%2F1",
        ] {
            assert_eq!(parse_segment(bad), None, "{bad}");
        }
    }
}
