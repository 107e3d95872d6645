//! The Packages index: candidates for the configured packages, and the
//! choice among them by Debian version order (Debian Policy §5.6.12).
//!
//! The index is read as a stream of paragraphs so a repository of 100,000
//! packages costs one paragraph of memory plus the candidates we keep.

use std::io::BufRead;

use debversion::Version;

use super::digest::{Expected, is_sha256_hex};
use crate::config::PackageSpec;

/// One version of a wanted package, as the verified index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub version: Version,
    pub architecture: String,
    /// Relative to the repository root, checked by [`safe_filename`].
    pub filename: String,
    pub expected: Expected,
    pub depends: Option<String>,
    pub provides: Option<String>,
    /// `Installed-Size`, in KiB, when the index gives it.
    pub installed_size_kib: Option<u64>,
}

impl Candidate {
    /// The cache file name: `name_version_arch.deb` with `:` (epochs)
    /// replaced, as apt names its archive files.
    pub fn cache_name(&self) -> String {
        format!("{}_{}_{}.deb", self.name, self.version, self.architecture).replace(':', "%3a")
    }
}

/// Debian version equality (Debian Policy §5.6.12): `0:1.0-1`, `1.0-1`
/// and `1.0-1` are one version, as dpkg sees them; aptly publishes the
/// version as the control file spells it, dpkg records it without a zero
/// epoch. Text that does not parse as a version is compared as text.
pub fn same_version(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (a.parse::<Version>(), b.parse::<Version>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackagesError {
    Parse(String),
    UnsafeFilename {
        package: String,
        filename: String,
    },
    MissingField {
        package: String,
        field: &'static str,
    },
}

/// Reads every paragraph of `reader` and keeps those of `wanted` packages
/// built for `arch` or `all`.
pub fn read_candidates<R: BufRead>(
    reader: R,
    wanted: &[&str],
    arch: &str,
) -> Result<Vec<Candidate>, PackagesError> {
    let mut candidates = Vec::new();
    for paragraph in deb822_fast::Deb822::iter_paragraphs_from_reader(reader) {
        let paragraph = paragraph.map_err(|e| PackagesError::Parse(e.to_string()))?;
        let Some(name) = paragraph.get("Package") else {
            return Err(PackagesError::Parse(
                "a paragraph has no Package field".into(),
            ));
        };
        if !wanted.contains(&name) {
            continue;
        }
        let field = |field: &'static str| {
            paragraph
                .get(field)
                .ok_or_else(|| PackagesError::MissingField {
                    package: name.to_string(),
                    field,
                })
        };
        let architecture = field("Architecture")?;
        if architecture != arch && architecture != "all" {
            continue;
        }
        let version_text = field("Version")?;
        let version: Version = version_text
            .parse()
            .map_err(|e| PackagesError::Parse(format!("{name} version {version_text:?}: {e}")))?;
        let filename = field("Filename")?;
        if !safe_filename(filename) {
            return Err(PackagesError::UnsafeFilename {
                package: name.to_string(),
                filename: filename.to_string(),
            });
        }
        let sha256 = field("SHA256")?;
        if !is_sha256_hex(sha256) {
            return Err(PackagesError::Parse(format!(
                "{name}: bad SHA256 {sha256:?}"
            )));
        }
        let size = field("Size")?
            .parse::<u64>()
            .map_err(|e| PackagesError::Parse(format!("{name}: bad Size: {e}")))?;
        candidates.push(Candidate {
            name: name.to_string(),
            version,
            architecture: architecture.to_string(),
            filename: filename.to_string(),
            expected: Expected {
                sha256: sha256.to_ascii_lowercase(),
                size,
            },
            depends: paragraph.get("Depends").map(str::to_string),
            provides: paragraph.get("Provides").map(str::to_string),
            installed_size_kib: paragraph
                .get("Installed-Size")
                .and_then(|s| s.trim().parse().ok()),
        });
    }
    Ok(candidates)
}

/// A Filename we are willing to fetch and to name a cache file after:
/// relative, `/`-separated, no `.`/`..`/empty segments, and only the
/// characters Debian file names use. Rejects `../../etc/x`, absolute paths,
/// NUL, newlines and URL tricks (`?`, `#`, `%`).
pub fn safe_filename(filename: &str) -> bool {
    !filename.is_empty()
        && filename.len() <= 1024
        && filename.ends_with(".deb")
        && filename
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._~/:".contains(&b))
        && filename
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}

/// What to do about one configured package.
#[derive(Debug, PartialEq, Eq)]
pub enum Selection<'a> {
    /// Install this candidate.
    Install(&'a Candidate),
    /// The wanted version is installed.
    Current,
    /// The index offers only versions older than the installed one and no
    /// pin asks for a downgrade: keep what is installed.
    KeepNewer { installed: String, offered: String },
}

#[derive(Debug, PartialEq, Eq)]
pub enum SelectError {
    Missing,
    PinnedMissing,
    BadInstalledVersion(String),
}

/// Chooses for `spec` among `candidates`: the pinned version when there is
/// a pin, otherwise the newest; never a downgrade without a pin.
pub fn select<'a>(
    candidates: &'a [Candidate],
    spec: &PackageSpec,
    installed: Option<&str>,
) -> Result<Selection<'a>, SelectError> {
    let mut mine = candidates.iter().filter(|c| c.name == spec.name);
    let chosen = match &spec.pinned {
        Some(pin) => {
            let pin: Version = pin.parse().map_err(|_| SelectError::PinnedMissing)?;
            mine.find(|c| c.version == pin)
                .ok_or(SelectError::PinnedMissing)?
        }
        None => mine
            .max_by(|a, b| a.version.cmp(&b.version))
            .ok_or(SelectError::Missing)?,
    };
    let Some(installed) = installed else {
        return Ok(Selection::Install(chosen));
    };
    let installed_version: Version = installed
        .parse()
        .map_err(|_| SelectError::BadInstalledVersion(installed.to_string()))?;
    Ok(match installed_version.cmp(&chosen.version) {
        std::cmp::Ordering::Equal => Selection::Current,
        std::cmp::Ordering::Greater if spec.pinned.is_none() => Selection::KeepNewer {
            installed: installed.to_string(),
            offered: chosen.version.to_string(),
        },
        _ => Selection::Install(chosen),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn paragraph(name: &str, version: &str, arch: &str) -> String {
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nFilename: pool/main/{name}_{version}_{arch}.deb\nSize: 10\nSHA256: {HASH}\nDescription: x\n multi-line\n\n"
        )
    }

    fn spec(text: &str) -> PackageSpec {
        PackageSpec::parse(text).unwrap()
    }

    fn index() -> Vec<Candidate> {
        let text = [
            paragraph("myapp", "1.9-1", "amd64"),
            paragraph("other", "9.0", "amd64"),
            paragraph("myapp", "1.10-1", "amd64"),
            paragraph("myapp", "1.10~rc1-1", "amd64"),
            paragraph("myapp", "2.0-1", "arm64"),
            paragraph("helper", "1:0.1", "all"),
        ]
        .concat();
        read_candidates(text.as_bytes(), &["myapp", "helper"], "amd64").unwrap()
    }

    #[test]
    fn keeps_only_wanted_packages_for_our_architecture() {
        let candidates = index();
        let names: Vec<_> = candidates
            .iter()
            .map(|c| format!("{} {}", c.name, c.version))
            .collect();
        assert_eq!(
            names,
            [
                "myapp 1.9-1",
                "myapp 1.10-1",
                "myapp 1.10~rc1-1",
                "helper 1:0.1"
            ]
        );
        assert_eq!(candidates[3].cache_name(), "helper_1%3a0.1_all.deb");
    }

    #[test]
    fn newest_by_debian_version_order() {
        let candidates = index();
        // 1.10 > 1.10~rc1 > 1.9 (numeric, tilde sorts before anything)
        match select(&candidates, &spec("myapp"), None).unwrap() {
            Selection::Install(c) => assert_eq!(c.version.to_string(), "1.10-1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            select(&candidates, &spec("myapp"), Some("1.10-1")),
            Ok(Selection::Current)
        );
        assert!(matches!(
            select(&candidates, &spec("myapp"), Some("1.9-1")),
            Ok(Selection::Install(_))
        ));
    }

    #[test]
    fn app_downgrade_needs_a_pin() {
        let candidates = index();
        assert_eq!(
            select(&candidates, &spec("myapp"), Some("3.0")),
            Ok(Selection::KeepNewer {
                installed: "3.0".into(),
                offered: "1.10-1".into()
            })
        );
        match select(&candidates, &spec("myapp=1.9-1"), Some("3.0")).unwrap() {
            Selection::Install(c) => assert_eq!(c.version.to_string(), "1.9-1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            select(&candidates, &spec("myapp=5"), None),
            Err(SelectError::PinnedMissing)
        );
        assert_eq!(
            select(&candidates, &spec("absent"), None),
            Err(SelectError::Missing)
        );
    }

    #[test]
    fn versions_are_equal_by_debian_order_not_text() {
        assert!(same_version("0:1.0.1", "1.0.1"));
        assert!(same_version("1.0.1", "0:1.0.1"));
        assert!(same_version("1.0", "1.0-0"));
        assert!(!same_version("1:1.0.1", "1.0.1"));
        assert!(!same_version("1.0.1", "1.0.10"));
        assert!(!same_version("not a version", "1.0"));
        assert!(same_version("not a version", "not a version"));
    }

    #[test]
    fn filename_traversal_is_rejected() {
        for bad in [
            "../../etc/x.deb",
            "/etc/x.deb",
            "pool/../x.deb",
            "pool//x.deb",
            "pool/x.deb\n",
            "pool/x\0.deb",
            "pool/x.deb?y",
            "pool/x.sh",
        ] {
            assert!(!safe_filename(bad), "{bad:?} accepted");
        }
        assert!(safe_filename(
            "pool/main/m/myapp/myapp_1:1.0+b1~rc_amd64.deb"
        ));
        let text = paragraph("myapp", "1", "amd64")
            .replace("pool/main/myapp_1_amd64.deb", "../../etc/cron.d/x.deb");
        assert!(matches!(
            read_candidates(text.as_bytes(), &["myapp"], "amd64"),
            Err(PackagesError::UnsafeFilename { .. })
        ));
    }

    #[test]
    fn wanted_package_without_sha256_is_an_error() {
        let text = paragraph("myapp", "1", "amd64").replace(
            &format!("SHA256: {HASH}\n"),
            "MD5sum: d41d8cd98f00b204e9800998ecf8427e\n",
        );
        assert_eq!(
            read_candidates(text.as_bytes(), &["myapp"], "amd64"),
            Err(PackagesError::MissingField {
                package: "myapp".into(),
                field: "SHA256"
            })
        );
    }
}
