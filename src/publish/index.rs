//! The text a publisher writes: Packages stanzas and the Release file, and
//! a lossless deb822 stanza type to carry fields through unchanged.
//!
//! Debian repository format (wiki.debian.org/DebianRepository/Format):
//! a Packages index is the control stanza of each .deb plus `Filename`,
//! `Size` and hashes, stanzas separated by an empty line; Release names
//! every index by hash, size and path relative to `dists/SUITE/`. Only
//! SHA256 and SHA512 are written: MD5Sum and SHA1 are not verified by
//! current apt and add nothing. With `Acquire-By-Hash: yes` every index is
//! also served as `by-hash/SHA256/<hex>` (and SHA512: apt fetches by-hash
//! with the strongest hash Release lists).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use debversion::Version;

/// One deb822 stanza with its fields in order. A value keeps its
/// continuation lines verbatim (each with its leading space), so a
/// `Description` round-trips byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stanza {
    fields: Vec<(String, String)>,
}

impl Stanza {
    /// The value of `name` (case-insensitive), first line trimmed; for a
    /// multi-line field, the whole raw value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    /// Replaces the value of `name`, or appends the field.
    pub fn set(&mut self, name: &str, value: &str) {
        match self
            .fields
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some((_, v)) => *v = value.to_string(),
            None => self.fields.push((name.to_string(), value.to_string())),
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.fields.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(n, _)| n.as_str())
    }

    /// `Name: value` lines; a value that starts with a line break (the
    /// checksum fields) is written as `Name:` and its lines.
    pub fn write(&self, out: &mut String) {
        for (name, value) in &self.fields {
            if value.starts_with('\n') {
                let _ = writeln!(out, "{name}:{value}");
            } else {
                let _ = writeln!(out, "{name}: {value}");
            }
        }
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }
}

/// Parses deb822 text into stanzas. Strict: a field name is printable
/// ASCII without `:` (not starting with `#` or `-`), a name appears once
/// per stanza, a continuation line needs a field before it. Comment lines
/// (`#`) are not allowed: neither control files nor indexes have them.
pub fn parse_stanzas(text: &str) -> Result<Vec<Stanza>, String> {
    let mut stanzas = Vec::new();
    let mut current = Stanza::default();
    for (number, line) in text.lines().enumerate() {
        let number = number + 1;
        if line.trim().is_empty() {
            if !current.fields.is_empty() {
                stanzas.push(std::mem::take(&mut current));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            let Some((_, value)) = current.fields.last_mut() else {
                return Err(format!("line {number}: continuation line without a field"));
            };
            value.push('\n');
            value.push_str(line.trim_end());
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("line {number}: {line:?} is not a field"))?;
        if name.is_empty()
            || name.starts_with(['#', '-'])
            || !name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(format!("line {number}: bad field name {name:?}"));
        }
        if current.get(name).is_some() {
            return Err(format!("line {number}: field {name} appears twice"));
        }
        current
            .fields
            .push((name.to_string(), value.trim().to_string()));
    }
    if !current.fields.is_empty() {
        stanzas.push(current);
    }
    Ok(stanzas)
}

/// Debian Policy §5.6.1: at least two characters, lower-case letters,
/// digits, `+`, `-`, `.`, starting with a letter or digit.
pub fn valid_package_name(name: &str) -> bool {
    crate::repo::names::PackageName::is_valid(name)
}

/// Debian Policy §5.6.12, checked by `debversion`, plus the characters it
/// allows (no whitespace, no `/`, so it can name a pool file).
pub fn valid_version(version: &str) -> bool {
    crate::repo::names::Version::is_valid(version)
}

/// A Debian architecture name (`amd64`, `arm64`, `all`).
pub fn valid_architecture(arch: &str) -> bool {
    crate::repo::names::Architecture::is_valid(arch)
}

/// A suite or component name: what may stand in `dists/<suite>/<component>`.
pub fn valid_dist_name(name: &str) -> bool {
    crate::repo::names::Suite::is_valid(name)
}

/// The pool path of a package, as Debian lays it out:
/// `pool/<component>/<initial>/<source>/<name>_<version>_<arch>.deb`,
/// where `<initial>` is the first letter, or the first four for `lib*`,
/// and the epoch is left out of the file name.
pub fn pool_path(component: &str, source: &str, name: &str, version: &str, arch: &str) -> String {
    let initial = if source.starts_with("lib") && source.len() > 3 {
        &source[..4]
    } else {
        &source[..1.min(source.len())]
    };
    let file_version = version.split_once(':').map_or(version, |(_, v)| v);
    format!("pool/{component}/{initial}/{source}/{name}_{file_version}_{arch}.deb")
}

/// One package in an index: its stanza (control fields, `Filename`, `Size`,
/// hashes) and the fields it is keyed and ordered by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub version: Version,
    pub architecture: String,
    pub filename: String,
    pub size: u64,
    pub sha256: String,
    pub stanza: Stanza,
}

impl Entry {
    /// Reads a Packages stanza, checking the fields an agent relies on.
    pub fn from_stanza(stanza: Stanza) -> Result<Entry, String> {
        let field = |name: &str| {
            stanza
                .get(name)
                .map(str::to_string)
                .ok_or_else(|| format!("a stanza has no {name} field"))
        };
        let name = field("Package")?;
        let version_text = field("Version")?;
        let version = version_text
            .parse::<Version>()
            .map_err(|e| format!("{name}: version {version_text:?}: {e}"))?;
        let architecture = field("Architecture")?;
        let filename = field("Filename")?;
        if !crate::repo::packages::safe_filename(&filename) {
            return Err(format!("{name}: unsafe Filename {filename:?}"));
        }
        let size = field("Size")?
            .parse::<u64>()
            .map_err(|e| format!("{name}: bad Size: {e}"))?;
        let sha256 = field("SHA256")?.to_ascii_lowercase();
        if !crate::repo::digest::is_sha256_hex(&sha256) {
            return Err(format!("{name}: bad SHA256 {sha256:?}"));
        }
        Ok(Entry {
            name,
            version,
            architecture,
            filename,
            size,
            sha256,
            stanza,
        })
    }

    /// (name, version, architecture): one set of bytes each, ever.
    pub fn key(&self) -> (String, String, String) {
        (
            self.name.clone(),
            self.version.to_string(),
            self.architecture.clone(),
        )
    }
}

/// Order of stanzas in a Packages file: by name, then Debian version
/// order, then architecture, so that a publish of the same content writes
/// the same bytes.
pub fn sort_entries(entries: &mut [Entry]) {
    entries.sort_by(|a, b| {
        a.name
            .cmp(&b.name)
            .then_with(|| a.version.cmp(&b.version))
            .then_with(|| a.architecture.cmp(&b.architecture))
    });
}

/// Keeps the newest `keep` versions of each (name, architecture); returns
/// the entries dropped.
pub fn apply_keep(entries: &mut Vec<Entry>, keep: usize) -> Vec<Entry> {
    sort_entries(entries);
    let mut dropped = Vec::new();
    let mut kept = Vec::new();
    // Newest first within each (name, arch) group.
    let mut grouped: Vec<Entry> = std::mem::take(entries);
    grouped.sort_by(|a, b| {
        a.name
            .cmp(&b.name)
            .then_with(|| a.architecture.cmp(&b.architecture))
            .then_with(|| b.version.cmp(&a.version))
    });
    let mut seen: Option<(String, String)> = None;
    let mut count = 0;
    for entry in grouped {
        let group = (entry.name.clone(), entry.architecture.clone());
        if seen.as_ref() != Some(&group) {
            seen = Some(group);
            count = 0;
        }
        count += 1;
        if count <= keep {
            kept.push(entry);
        } else {
            dropped.push(entry);
        }
    }
    sort_entries(&mut kept);
    *entries = kept;
    dropped
}

/// The Packages text for `arch`: entries built for it or for `all`.
pub fn packages_text(entries: &[Entry], arch: &str) -> String {
    let mut out = String::new();
    for entry in entries
        .iter()
        .filter(|e| e.architecture == arch || e.architecture == "all")
    {
        if !out.is_empty() {
            out.push('\n');
        }
        entry.stanza.write(&mut out);
    }
    out
}

/// One line of a Release checksum field.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Checksum {
    /// Relative to `dists/SUITE/`.
    pub path: String,
    pub size: u64,
    pub hex: String,
}

/// Reads a Release checksum field (`SHA256`, `SHA512`): ` <hex> <size> <path>` lines.
pub fn parse_checksums(value: &str) -> Result<Vec<Checksum>, String> {
    value
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(hex), Some(size), Some(path), None)
                    if hex.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    Ok(Checksum {
                        path: path.to_string(),
                        size: size
                            .parse()
                            .map_err(|e| format!("checksum line {line:?}: {e}"))?,
                        hex: hex.to_ascii_lowercase(),
                    })
                }
                _ => Err(format!("malformed checksum line {line:?}")),
            }
        })
        .collect()
}

fn checksum_field(lines: &[Checksum]) -> String {
    let width = lines
        .iter()
        .map(|c| c.size.to_string().len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for c in lines {
        let _ = write!(out, "\n {} {:>width$} {}", c.hex, c.size, c.path);
    }
    out
}

/// `t` without its fraction of a second, as Release dates and HTTP dates
/// (Last-Modified) have it.
pub fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// Release dates: RFC 2822 in UTC, as apt and dak write them.
pub fn release_date(date: DateTime<Utc>) -> String {
    date.format("%a, %d %b %Y %H:%M:%S UTC").to_string()
}

/// What goes into a new Release.
pub struct ReleaseContent<'a> {
    /// The Release being replaced: its other fields (Origin, Label,
    /// Description, ...) are carried over.
    pub previous: Option<&'a Stanza>,
    pub suite: &'a str,
    pub date: DateTime<Utc>,
    pub valid_until: Option<DateTime<Utc>>,
    pub architectures: &'a BTreeSet<String>,
    pub components: &'a BTreeSet<String>,
    pub sha256: Vec<Checksum>,
    pub sha512: Vec<Checksum>,
}

/// Fields the publisher owns; everything else in a previous Release is
/// carried over in its order.
const OWNED_RELEASE_FIELDS: &[&str] = &[
    "Suite",
    "Codename",
    "Date",
    "Valid-Until",
    "Acquire-By-Hash",
    "Architectures",
    "Components",
    "MD5Sum",
    "SHA1",
    "SHA256",
    "SHA512",
];

/// The Release text (unsigned). `Suite` and `Codename` are both the suite
/// name: apt accepts either for the distribution in sources.list.
pub fn release_text(content: &ReleaseContent) -> String {
    let mut stanza = Stanza::default();
    let carried: Vec<(String, String)> = content
        .previous
        .map(|p| {
            p.fields
                .iter()
                .filter(|(n, _)| {
                    !OWNED_RELEASE_FIELDS
                        .iter()
                        .any(|o| o.eq_ignore_ascii_case(n))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for (name, value) in carried
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Origin") || n.eq_ignore_ascii_case("Label"))
    {
        stanza.set(name, value);
    }
    stanza.set("Suite", content.suite);
    stanza.set("Codename", content.suite);
    stanza.set("Date", &release_date(content.date));
    if let Some(valid_until) = content.valid_until {
        stanza.set("Valid-Until", &release_date(valid_until));
    }
    stanza.set("Acquire-By-Hash", "yes");
    let join = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(" ");
    stanza.set("Architectures", &join(content.architectures));
    stanza.set("Components", &join(content.components));
    for (name, value) in carried
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("Origin") && !n.eq_ignore_ascii_case("Label"))
    {
        stanza.set(name, value);
    }
    let mut sha256 = content.sha256.clone();
    sha256.sort();
    let mut sha512 = content.sha512.clone();
    sha512.sort();
    stanza.set("SHA256", &checksum_field(&sha256));
    stanza.set("SHA512", &checksum_field(&sha512));
    stanza.to_text()
}

/// Every checksum line of a Release stanza for `field`.
pub fn release_checksums(release: &Stanza, field: &str) -> Result<Vec<Checksum>, String> {
    release
        .fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(field))
        .map(|(_, v)| parse_checksums(v))
        .unwrap_or_else(|| Ok(Vec::new()))
}

/// A whitespace-separated list field (`Architectures`, `Components`).
pub fn word_list(release: &Stanza, field: &str) -> BTreeSet<String> {
    release
        .get(field)
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Replaces `Date` and `Valid-Until` in a Release text and nothing else:
/// a refresh re-signs the same content.
pub fn refreshed_release(
    release: &Stanza,
    date: DateTime<Utc>,
    valid_until: Option<DateTime<Utc>>,
) -> String {
    let mut out = Stanza::default();
    for (name, value) in &release.fields {
        if name.eq_ignore_ascii_case("Valid-Until") {
            continue;
        }
        if name.eq_ignore_ascii_case("Date") {
            out.fields.push(("Date".to_string(), release_date(date)));
            if let Some(valid_until) = valid_until {
                out.fields
                    .push(("Valid-Until".to_string(), release_date(valid_until)));
            }
            continue;
        }
        out.fields.push((name.clone(), value.clone()));
    }
    out.to_text()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTROL: &str = "Package: myapp\nVersion: 1:1.0-1\nArchitecture: amd64\nMaintainer: A <a@b.c>\nDescription: short\n long line\n .\n more\n";

    fn entry(name: &str, version: &str, arch: &str) -> Entry {
        let text = format!(
            "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nFilename: pool/main/m/{name}/{name}_{version}_{arch}.deb\nSize: 1\nSHA256: {}\n",
            "a".repeat(64)
        );
        let stanza = parse_stanzas(&text).unwrap().remove(0);
        Entry::from_stanza(stanza).unwrap()
    }

    #[test]
    fn stanzas_round_trip_byte_for_byte() {
        let two = format!("{CONTROL}\n{CONTROL}");
        let stanzas = parse_stanzas(&two).unwrap();
        assert_eq!(stanzas.len(), 2);
        assert_eq!(stanzas[0].to_text(), CONTROL);
        assert_eq!(stanzas[0].get("version"), Some("1:1.0-1"));
        assert_eq!(
            stanzas[0].get("Description"),
            Some("short\n long line\n .\n more")
        );
    }

    #[test]
    fn strict_stanza_parsing() {
        assert!(parse_stanzas(" continuation\n").is_err());
        assert!(
            parse_stanzas("Package: a\nPackage: b\n")
                .unwrap_err()
                .contains("twice")
        );
        assert!(parse_stanzas("no colon\n").is_err());
        assert!(parse_stanzas("#comment: x\n").is_err());
    }

    #[test]
    fn names_versions_and_pool_paths() {
        assert!(valid_package_name("myapp"));
        assert!(valid_package_name("libc6-dev"));
        assert!(!valid_package_name("M"));
        assert!(!valid_package_name("my_app"));
        assert!(!valid_package_name("-x"));
        assert!(valid_version("1:2.0~rc1+b1-3"));
        assert!(!valid_version("1.0 beta"));
        assert!(!valid_version("1/2"));
        assert!(!valid_version(""));
        assert_eq!(
            pool_path("main", "myapp", "myapp", "1:1.0-1", "amd64"),
            "pool/main/m/myapp/myapp_1.0-1_amd64.deb"
        );
        assert_eq!(
            pool_path("main", "libfoo", "libfoo1", "2", "all"),
            "pool/main/libf/libfoo/libfoo1_2_all.deb"
        );
    }

    #[test]
    fn keep_drops_the_oldest_per_package_and_arch() {
        let mut entries = vec![
            entry("myapp", "1.9", "amd64"),
            entry("myapp", "1.10", "amd64"),
            entry("myapp", "1.10~rc1", "amd64"),
            entry("myapp", "1.0", "arm64"),
            entry("other", "1", "all"),
        ];
        let dropped = apply_keep(&mut entries, 2);
        let names: Vec<String> = entries
            .iter()
            .map(|e| format!("{} {} {}", e.name, e.version, e.architecture))
            .collect();
        assert_eq!(
            names,
            [
                "myapp 1.0 arm64",
                "myapp 1.10~rc1 amd64",
                "myapp 1.10 amd64",
                "other 1 all"
            ]
        );
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].version.to_string(), "1.9");
        let text = packages_text(&entries, "amd64");
        assert!(text.contains("1.10~rc1") && text.contains("Package: other"));
        assert!(!text.contains("arm64"));
    }

    #[test]
    fn release_text_is_parsed_by_the_agent() {
        let archs: BTreeSet<String> = ["amd64".to_string()].into();
        let comps: BTreeSet<String> = ["main".to_string()].into();
        let previous = parse_stanzas(
            "Origin: Acme\nLabel: Acme\nSuite: old\nMD5Sum:\n 00 1 x\nDescription: kept\n",
        )
        .unwrap()
        .remove(0);
        let date = crate::repo::release::parse_date("Thu, 26 Nov 2026 04:00:00 UTC").unwrap();
        let text = release_text(&ReleaseContent {
            previous: Some(&previous),
            suite: "production",
            date,
            valid_until: Some(date + chrono::Duration::days(7)),
            architectures: &archs,
            components: &comps,
            sha256: vec![Checksum {
                path: "main/binary-amd64/Packages".into(),
                size: 0,
                hex: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into(),
            }],
            sha512: vec![],
        });
        assert!(text.starts_with("Origin: Acme\nLabel: Acme\nSuite: production\nCodename: production\nDate: Thu, 26 Nov 2026 04:00:00 UTC\nValid-Until: Thu, 03 Dec 2026 04:00:00 UTC\nAcquire-By-Hash: yes\n"), "{text}");
        assert!(!text.contains("MD5Sum") && text.contains("Description: kept"));
        let parsed = crate::repo::release::parse(&text).unwrap();
        assert!(parsed.acquire_by_hash && parsed.matches_suite("production"));
        assert_eq!(parsed.date, date);
        assert_eq!(
            parsed
                .packages_index("main", "amd64")
                .unwrap()
                .expected
                .size,
            0
        );

        let stanza = parse_stanzas(&text).unwrap().remove(0);
        let later = date + chrono::Duration::hours(1);
        let refreshed = refreshed_release(&stanza, later, None);
        assert!(!refreshed.contains("Valid-Until"));
        assert_eq!(
            refreshed.replace("Date: Thu, 26 Nov 2026 05:00:00 UTC\n", ""),
            text.replace(
                "Date: Thu, 26 Nov 2026 04:00:00 UTC\nValid-Until: Thu, 03 Dec 2026 04:00:00 UTC\n",
                ""
            )
        );
        assert_eq!(
            release_checksums(&stanza, "SHA256").unwrap()[0].path,
            "main/binary-amd64/Packages"
        );
    }
}
