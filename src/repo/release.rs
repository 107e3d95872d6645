//! The Release file: parsed only from text a pinned key has signed.
//!
//! Debian repository format (wiki.debian.org/DebianRepository/Format,
//! "Release files"): `Suite`/`Codename` name the distribution, `Date` and
//! `Valid-Until` bound its freshness, and the `SHA256` field lists every
//! index by path, size and hash. MD5Sum and SHA1 entries are ignored: a
//! Release with no SHA256 entry for the index we need is refused.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deb822_fast::{FromDeb822Paragraph, Paragraph};
use debian_control::lossy::apt::Release as AptRelease;

use super::digest::{Expected, is_sha256_hex};

/// What pulldeploy uses from a verified Release.
#[derive(Debug, Clone)]
pub struct Release {
    pub suite: Option<String>,
    pub codename: Option<String>,
    pub date: DateTime<Utc>,
    pub valid_until: Option<DateTime<Utc>>,
    pub acquire_by_hash: bool,
    /// (path relative to dists/SUITE/, expected size and SHA256)
    pub sha256: Vec<(String, Expected)>,
}

/// Compression of a Packages index, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Gzip,
    None,
}

impl Compression {
    pub const PREFERENCE: [Compression; 3] =
        [Compression::Xz, Compression::Gzip, Compression::None];

    pub fn extension(self) -> &'static str {
        match self {
            Compression::Xz => ".xz",
            Compression::Gzip => ".gz",
            Compression::None => "",
        }
    }
}

/// An index file named by Release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexFile {
    /// Relative to `dists/SUITE/`, e.g. `main/binary-amd64/Packages.xz`.
    pub path: String,
    pub compression: Compression,
    pub expected: Expected,
}

/// Parses a Release paragraph. `text` must be the output of signature
/// verification and nothing else.
pub fn parse(text: &str) -> Result<Release, String> {
    let paragraph: Paragraph = text.parse().map_err(|e| format!("{e}"))?;
    let mut seen = std::collections::HashSet::new();
    for (name, _) in paragraph.iter() {
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(format!("field {name} appears twice"));
        }
    }
    let apt = AptRelease::from_paragraph(&paragraph)?;
    let date = apt
        .date
        .as_deref()
        .ok_or_else(|| "no Date field".to_string())
        .and_then(parse_date)?;
    let valid_until = paragraph.get("Valid-Until").map(parse_date).transpose()?;
    let mut sha256 = Vec::new();
    for entry in apt.checksums_sha256.unwrap_or_default() {
        if !is_sha256_hex(&entry.sha256) {
            return Err(format!(
                "bad SHA256 {:?} for {}",
                entry.sha256, entry.filename
            ));
        }
        sha256.push((
            entry.filename,
            Expected {
                sha256: entry.sha256.to_ascii_lowercase(),
                size: entry.size as u64,
            },
        ));
    }
    Ok(Release {
        suite: apt.suite,
        codename: apt.codename,
        date,
        valid_until,
        acquire_by_hash: apt.acquire_by_hash.unwrap_or(false),
        sha256,
    })
}

/// Release dates are RFC 2822 in UTC; apt and aptly write the zone as `UTC`,
/// which RFC 2822 does not name, so it is read as `+0000`.
pub fn parse_date(text: &str) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    let normalized = match text.strip_suffix(" UTC") {
        Some(head) => format!("{head} +0000"),
        None => text.to_string(),
    };
    DateTime::parse_from_rfc2822(&normalized)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| format!("date {text:?}: {e}"))
}

/// The freshness rules a Release must pass, all in one place.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    pub now: DateTime<Utc>,
    /// Date of the last Release accepted on this node.
    pub accepted: Option<DateTime<Utc>>,
    pub max_age: Option<Duration>,
    pub clock_skew: Duration,
}

/// Why a Release is not fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// The clock is before the last accepted Date: our clock is wrong.
    ClockBehind {
        accepted: DateTime<Utc>,
    },
    /// Older than the one accepted before: a replay or a rollback.
    Replay {
        accepted: DateTime<Utc>,
    },
    Expired {
        valid_until: DateTime<Utc>,
    },
    FromFuture,
    TooOld {
        max_age: Duration,
    },
}

impl Release {
    /// True when `Suite` or `Codename` is `suite` (apt accepts either).
    pub fn matches_suite(&self, suite: &str) -> bool {
        self.suite.as_deref() == Some(suite) || self.codename.as_deref() == Some(suite)
    }

    pub fn check_freshness(&self, rules: &Freshness) -> Result<(), Stale> {
        let ahead = crate::clock::add(rules.now, rules.clock_skew);
        if let Some(accepted) = rules.accepted {
            if ahead < accepted {
                return Err(Stale::ClockBehind { accepted });
            }
            if self.date < accepted {
                return Err(Stale::Replay { accepted });
            }
        }
        if let Some(valid_until) = self.valid_until
            && valid_until < rules.now
        {
            return Err(Stale::Expired { valid_until });
        }
        if self.date > ahead {
            return Err(Stale::FromFuture);
        }
        if let Some(max_age) = rules.max_age
            && self.valid_until.is_none()
            && crate::clock::add(self.date, max_age) < rules.now
        {
            return Err(Stale::TooOld { max_age });
        }
        Ok(())
    }

    /// The Packages index for `component`/`arch`, preferring xz, then gzip,
    /// then plain (apt's order), among those Release lists with SHA256.
    pub fn packages_index(&self, component: &str, arch: &str) -> Option<IndexFile> {
        let base = format!("{component}/binary-{arch}/Packages");
        Compression::PREFERENCE.into_iter().find_map(|compression| {
            let path = format!("{base}{}", compression.extension());
            self.sha256
                .iter()
                .find(|(name, _)| *name == path)
                .map(|(_, expected)| IndexFile {
                    path: path.clone(),
                    compression,
                    expected: expected.clone(),
                })
        })
    }
}

fn check_clock(rules: &Freshness) -> Result<(), Stale> {
    match rules.accepted {
        Some(accepted) if crate::clock::add(rules.now, rules.clock_skew) < accepted => {
            Err(Stale::ClockBehind { accepted })
        }
        _ => Ok(()),
    }
}

/// The rules that hold for a Release at every poll, including an unchanged
/// (304) one: the clock is not behind what we accepted, the Release is not
/// expired, not from the future, and not older than `max_age` when it has
/// no Valid-Until. A node whose repository stops being refreshed thus
/// reports it, instead of running on a frozen view forever.
pub fn check_times(
    date: DateTime<Utc>,
    valid_until: Option<DateTime<Utc>>,
    rules: &Freshness,
) -> Result<(), Stale> {
    check_clock(rules)?;
    if let Some(valid_until) = valid_until
        && valid_until < rules.now
    {
        return Err(Stale::Expired { valid_until });
    }
    if date > crate::clock::add(rules.now, rules.clock_skew) {
        return Err(Stale::FromFuture);
    }
    if let Some(max_age) = rules.max_age
        && valid_until.is_none()
        && crate::clock::add(date, max_age) < rules.now
    {
        return Err(Stale::TooOld { max_age });
    }
    Ok(())
}

impl IndexFile {
    /// The by-hash location of this index (`.../by-hash/SHA256/<hex>`),
    /// which never changes under a reader while a new Release is published.
    pub fn by_hash_path(&self) -> String {
        match self.path.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/by-hash/SHA256/{}", self.expected.sha256),
            // A file at the top of the suite (rollout.toml).
            None => format!("by-hash/SHA256/{}", self.expected.sha256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn release_text(extra: &str) -> String {
        format!(
            "Origin: acme\nSuite: production\nCodename: prod\nDate: Thu, 26 Nov 2026 04:00:00 UTC\n{extra}Architectures: amd64\nComponents: main\nMD5Sum:\n d41d8cd98f00b204e9800998ecf8427e 0 main/binary-amd64/Packages\nSHA256:\n {HASH} 0 main/binary-amd64/Packages\n {HASH} 20 main/binary-amd64/Packages.gz\n"
        )
    }

    fn at(text: &str) -> DateTime<Utc> {
        parse_date(text).unwrap()
    }

    #[test]
    fn parses_fields_and_prefers_compressed_index() {
        let release = parse(&release_text("Acquire-By-Hash: yes\n")).unwrap();
        assert!(release.matches_suite("production"));
        assert!(release.matches_suite("prod"));
        assert!(!release.matches_suite("staging"));
        assert!(release.acquire_by_hash);
        assert_eq!(release.date, at("Thu, 26 Nov 2026 04:00:00 +0000"));
        let index = release.packages_index("main", "amd64").unwrap();
        assert_eq!(index.path, "main/binary-amd64/Packages.gz");
        assert_eq!(index.compression, Compression::Gzip);
        assert_eq!(index.expected.size, 20);
        assert_eq!(
            index.by_hash_path(),
            format!("main/binary-amd64/by-hash/SHA256/{HASH}")
        );
        assert!(release.packages_index("main", "arm64").is_none());
    }

    #[test]
    fn md5_only_index_is_not_offered() {
        let text = release_text("").replace(
            &format!(
                " {HASH} 0 main/binary-amd64/Packages\n {HASH} 20 main/binary-amd64/Packages.gz\n"
            ),
            "",
        );
        let release = parse(&text).unwrap();
        assert!(release.packages_index("main", "amd64").is_none());
    }

    #[test]
    fn duplicate_fields_are_refused() {
        assert!(
            parse(&release_text("Suite: staging\n"))
                .unwrap_err()
                .contains("twice")
        );
    }

    #[test]
    fn missing_date_is_refused() {
        let text = release_text("").replace("Date: Thu, 26 Nov 2026 04:00:00 UTC\n", "");
        assert!(parse(&text).unwrap_err().contains("Date"));
    }

    #[test]
    fn freshness_rules() {
        let release = parse(&release_text(
            "Valid-Until: Thu, 03 Dec 2026 04:00:00 UTC\n",
        ))
        .unwrap();
        let now = at("Thu, 26 Nov 2026 05:00:00 +0000");
        let rules = Freshness {
            now,
            accepted: None,
            max_age: None,
            clock_skew: Duration::from_secs(300),
        };
        assert_eq!(release.check_freshness(&rules), Ok(()));
        // Same Date as accepted is fine (re-fetch after a lost ETag).
        let same = Freshness {
            accepted: Some(release.date),
            ..rules
        };
        assert_eq!(release.check_freshness(&same), Ok(()));
        let newer_accepted = at("Thu, 26 Nov 2026 04:30:00 +0000");
        assert_eq!(
            release.check_freshness(&Freshness {
                accepted: Some(newer_accepted),
                ..rules
            }),
            Err(Stale::Replay {
                accepted: newer_accepted
            })
        );
        let late = at("Fri, 04 Dec 2026 00:00:00 +0000");
        assert!(matches!(
            release.check_freshness(&Freshness { now: late, ..rules }),
            Err(Stale::Expired { .. })
        ));
        let early = at("Thu, 26 Nov 2026 03:00:00 +0000");
        assert_eq!(
            release.check_freshness(&Freshness {
                now: early,
                ..rules
            }),
            Err(Stale::FromFuture)
        );
        assert_eq!(
            release.check_freshness(&Freshness {
                now: early,
                accepted: Some(newer_accepted),
                ..rules
            }),
            Err(Stale::ClockBehind {
                accepted: newer_accepted
            })
        );
    }

    #[test]
    fn max_age_applies_without_valid_until() {
        let release = parse(&release_text("")).unwrap();
        let rules = Freshness {
            now: at("Mon, 30 Nov 2026 04:00:00 +0000"),
            accepted: None,
            max_age: Some(Duration::from_secs(86400)),
            clock_skew: Duration::from_secs(300),
        };
        assert_eq!(
            release.check_freshness(&rules),
            Err(Stale::TooOld {
                max_age: Duration::from_secs(86400)
            })
        );
        assert_eq!(
            release.check_freshness(&Freshness {
                max_age: None,
                ..rules
            }),
            Ok(())
        );
    }
}
