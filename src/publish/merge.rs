//! Merging an operation into the suite's current packages: the new .debs
//! of a publish (each uploaded to the pool as it is added) or the exact
//! entries of another suite (promote, their pool files hashed first);
//! the same (package, version, architecture) with other bytes refused;
//! `--keep N` applied per package and architecture.

use std::collections::BTreeSet;

use super::deb::DebInfo;
use super::index::{self, Entry};
use super::suite::Current;
use super::{Operation, Publisher, usage};
use crate::error::{Error, PublishError};

/// The packages a suite will list, and what the operation did.
pub(super) struct Merged {
    /// Sorted, `--keep` applied.
    pub(super) entries: Vec<Entry>,
    /// Never empty, never `all`.
    pub(super) architectures: BTreeSet<String>,
    /// Pool files this operation adds to the suite: read back in full
    /// before the flip.
    pub(super) new_pool_files: BTreeSet<String>,
    pub(super) report: Vec<String>,
}

impl Publisher {
    /// Merges the operation into the current packages, uploading new pool
    /// files (once per publish: `uploaded` lasts across attempts).
    pub(super) async fn merge(
        &self,
        suite: &str,
        operation: &Operation,
        current: Option<&Current>,
        uploaded: &mut BTreeSet<String>,
    ) -> Result<Merged, Error> {
        let mut entries: Vec<Entry> = current.map(|c| c.entries.clone()).unwrap_or_default();
        let mut architectures = current.map(|c| c.architectures.clone()).unwrap_or_default();
        let mut report = Vec::new();
        let mut new_pool_files = BTreeSet::new();
        let target_url = self.store.url(&Self::dists(suite, "InRelease"));
        let keep = match operation {
            Operation::Publish {
                debs,
                keep,
                architectures: extra,
            } => {
                architectures.extend(extra.iter().cloned());
                for (path, info) in debs {
                    let entry = self.new_entry(info)?;
                    if !add_entry(&mut entries, entry.clone(), &target_url)? {
                        report.push(format!(
                            "{} {} ({}) is already in {suite}",
                            info.package, info.version, info.architecture
                        ));
                        continue;
                    }
                    if info.architecture != "all" {
                        architectures.insert(info.architecture.clone());
                    }
                    if !uploaded.contains(&entry.filename) {
                        self.upload_pool(path, info, &entry.filename).await?;
                        uploaded.insert(entry.filename.clone());
                    }
                    new_pool_files.insert(entry.filename.clone());
                    report.push(format!(
                        "added {} {} ({}) to {suite}: {}",
                        info.package, info.version, info.architecture, entry.filename
                    ));
                }
                *keep
            }
            Operation::Promote { from, wanted, keep } => {
                let source =
                    self.read_current(from)
                        .await?
                        .ok_or_else(|| PublishError::NotInSuite {
                            package: wanted.first().map(|w| w.0.clone()).unwrap_or_default(),
                            version: None,
                            suite: from.clone(),
                            url: self.store.url(&Self::dists(from, "InRelease")),
                        })?;
                for (name, version) in wanted {
                    let chosen = promoted_entries(&source.entries, name, version.as_deref());
                    if chosen.is_empty() {
                        return Err(PublishError::NotInSuite {
                            package: name.clone(),
                            version: version.clone(),
                            suite: from.clone(),
                            url: source.url.clone(),
                        }
                        .into());
                    }
                    for entry in chosen {
                        // The exact bytes the source suite names: hashed
                        // from the store, not trusted from the index.
                        self.check_pool_file(&entry).await?;
                        if entry.architecture != "all" {
                            architectures.insert(entry.architecture.clone());
                        }
                        let filename = entry.filename.clone();
                        let line = format!(
                            "promoted {} {} ({}) from {from} to {suite}: {filename}",
                            entry.name, entry.version, entry.architecture
                        );
                        if add_entry(&mut entries, entry, &target_url)? {
                            new_pool_files.insert(filename);
                            report.push(line);
                        } else {
                            report.push(format!("{line} (already there)"));
                        }
                    }
                }
                *keep
            }
            Operation::Refresh | Operation::Rollout(_) => None,
        };
        if let Some(keep) = keep {
            for dropped in index::apply_keep(&mut entries, keep) {
                report.push(format!(
                    "dropped {} {} ({}) from {suite} (--keep {keep}); its pool file stays",
                    dropped.name, dropped.version, dropped.architecture
                ));
                new_pool_files.remove(&dropped.filename);
            }
        }
        index::sort_entries(&mut entries);
        if architectures.is_empty() {
            return Err(usage(
                "the suite would have no architecture (only Architecture: all packages): \
                 name one with --architecture",
            ));
        }
        Ok(Merged {
            entries,
            architectures,
            new_pool_files,
            report,
        })
    }

    fn new_entry(&self, info: &DebInfo) -> Result<Entry, Error> {
        let filename = index::pool_path(
            &self.component,
            &info.source,
            &info.package,
            &info.version,
            &info.architecture,
        );
        let mut stanza = info.control.clone();
        stanza.set("Filename", &filename);
        stanza.set("Size", &info.size.to_string());
        stanza.set("SHA256", &info.sha256);
        stanza.set("SHA512", &info.sha512);
        Entry::from_stanza(stanza)
            .map_err(|reason| usage(format!("cannot index {}: {reason}", info.package)))
    }

    /// A promoted .deb must be in the pool with the bytes its index names.
    async fn check_pool_file(&self, entry: &Entry) -> Result<(), Error> {
        let url = self.store.url(&entry.filename);
        match self.store.digest(&entry.filename).await? {
            Some((sha256, size)) if sha256 == entry.sha256 && size == entry.size => Ok(()),
            Some((sha256, size)) => Err(PublishError::CurrentSuite {
                url,
                reason: format!(
                    "SHA256 {sha256} ({size} bytes), the index says {} ({} bytes): not promoted",
                    entry.sha256, entry.size
                ),
            }
            .into()),
            None => Err(PublishError::CurrentSuite {
                url,
                reason: "named by the index but missing: not promoted".into(),
            }
            .into()),
        }
    }
}

/// Adds `entry` unless the same (name, version, arch) is there. `false`
/// when it is there with the same bytes; an error when with other bytes.
fn add_entry(entries: &mut Vec<Entry>, entry: Entry, url: &str) -> Result<bool, Error> {
    if let Some(existing) = entries.iter().find(|e| e.key() == entry.key()) {
        if existing.sha256 == entry.sha256 {
            return Ok(false);
        }
        return Err(PublishError::VersionExists {
            package: format!("{} {} ({})", entry.name, entry.version, entry.architecture),
            url: url.to_string(),
            existing: existing.sha256.clone(),
            new: entry.sha256.clone(),
        }
        .into());
    }
    entries.push(entry);
    Ok(true)
}

/// The entries of `name` to promote: of `version`, or of its newest
/// version, every architecture.
fn promoted_entries(entries: &[Entry], name: &str, version: Option<&str>) -> Vec<Entry> {
    let mine: Vec<&Entry> = entries.iter().filter(|e| e.name == name).collect();
    let wanted = match version {
        Some(text) => match text.parse::<debversion::Version>() {
            Ok(v) => v,
            Err(_) => return Vec::new(),
        },
        None => match mine.iter().map(|e| &e.version).max() {
            Some(v) => v.clone(),
            None => return Vec::new(),
        },
    };
    mine.into_iter()
        .filter(|e| e.version == wanted)
        .cloned()
        .collect()
}
