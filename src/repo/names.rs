//! The names of the repository model, validated once for every reader of
//! them: the config (`agent.packages`, `repository.suite` ...), the command
//! line (`publish --suite`, `promote PKG[=VER]` ...) and the publisher's
//! checks of a `.deb`'s control fields.
//!
//! Each type has `is_valid` (a yes or no, for a check) and `parse` (the
//! value, or an error message that names it). The rules are Debian's where
//! Debian has one, and narrowed where a name becomes a path or a URL
//! segment here.

use std::fmt;
use std::str::FromStr;

/// The parts shared by every name type: `parse`, `as_str`, `into_string`,
/// `Display`, `AsRef<str>` and `FromStr`, all through `$check`, a
/// `fn(&str) -> Result<(), String>` whose error is a complete message.
macro_rules! name_type {
    ($name:ident, $check:path) => {
        impl $name {
            /// `text` as this name, or a message naming `text` and the rule.
            pub fn parse(text: &str) -> Result<$name, String> {
                $check(text)?;
                Ok($name(text.to_string()))
            }

            pub fn is_valid(text: &str) -> bool {
                $check(text).is_ok()
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(text: &str) -> Result<$name, String> {
                $name::parse(text)
            }
        }
    };
}

/// A binary package name. Debian Policy §5.6.7 (Package) with §5.6.1
/// (Source): "must consist only of lower case letters (a-z), digits (0-9),
/// plus (+) and minus (-) signs, and periods (.). They must be at least two
/// characters long and must start with an alphanumeric character."
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackageName(String);

name_type!(PackageName, check_package_name);

fn check_package_name(name: &str) -> Result<(), String> {
    let valid = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a Debian package name ([a-z0-9][a-z0-9+.-]+)"
        ))
    }
}

/// A package version, `[epoch:]upstream_version[-debian_revision]`, Debian
/// Policy §5.6.12. What dpkg's `parseversion` refuses is refused: an empty
/// or non-numeric epoch, an empty upstream version or revision. What the
/// Policy says a version "should" be is required too: the upstream version
/// starts with a digit. The characters are the Policy's (letters, digits,
/// `. + ~ -`, and `:` after an epoch; the revision has no `-` or `:`), which
/// keeps a version usable in a pool file name. It also parses as a
/// `debversion::Version`, the type every comparison of versions uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(String);

name_type!(Version, check_version);

fn check_version(version: &str) -> Result<(), String> {
    version_problem(version).map_or(Ok(()), |problem| {
        Err(format!("{version:?} is not a Debian version: {problem}"))
    })
}

/// Why `version` is not a Debian version (see [`Version`]), if it is not.
fn version_problem(version: &str) -> Option<&'static str> {
    if version.is_empty() {
        return Some("it is empty");
    }
    if !version
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".+~:-".contains(&b))
    {
        return Some("only letters, digits and . + ~ : - are allowed");
    }
    // dpkg reads everything before the first ':' as the epoch.
    let rest = match version.split_once(':') {
        Some((epoch, rest)) => {
            if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
                return Some("the epoch (before ':') must be a number");
            }
            rest
        }
        None => version,
    };
    // ... and everything after the last '-' as the revision.
    let upstream = match rest.rsplit_once('-') {
        Some((upstream, revision)) => {
            if revision.is_empty() {
                return Some("the revision (after the last '-') is empty");
            }
            if !revision
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".+~".contains(&b))
            {
                return Some(
                    "the revision (after the last '-') may only have letters, digits and . + ~",
                );
            }
            upstream
        }
        None => rest,
    };
    if upstream.is_empty() {
        return Some("the upstream version is empty");
    }
    if !upstream.starts_with(|c: char| c.is_ascii_digit()) {
        return Some("the upstream version must start with a digit");
    }
    if version.parse::<debversion::Version>().is_err() {
        // An epoch past u32, say.
        return Some("it does not parse as a version");
    }
    None
}

/// The characters of a suite or component: RFC 3986's unreserved ones
/// (letters, digits, `- . _ ~`) and `+`, none of which needs escaping in
/// an S3 key or a URL.
fn dist_segment(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._~".contains(&b))
}

/// A suite (distribution): `dists/<suite>/` of the Debian repository format
/// (wiki.debian.org/DebianRepository/Format), and the `Suite`/`Codename`
/// of its Release. Debian's own are like `bookworm` or `stable-updates`.
/// Here a suite is one path segment (no `/`, not `.` or `..`) of
/// letters, digits and `+ - . _ ~`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Suite(String);

name_type!(Suite, check_suite);

fn check_suite(name: &str) -> Result<(), String> {
    if dist_segment(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a suite name (one path segment of letters, digits and + - . _ ~)"
        ))
    }
}

/// A component: `dists/<suite>/<component>/` of the Debian repository
/// format, and a word of its Release's `Components` (`main`, `contrib`).
/// The format allows a `/` in one (`updates/main`); here a component is
/// one path segment of letters, digits and `+ - . _ ~`, as a suite is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Component(String);

name_type!(Component, check_component);

fn check_component(name: &str) -> Result<(), String> {
    if dist_segment(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a component name (one path segment of letters, digits and + - . _ ~)"
        ))
    }
}

/// A Debian architecture name (Debian Policy §11.1, the names
/// `dpkg-architecture -L` lists: `amd64`, `arm64`, `armhf`, `hurd-i386`),
/// or `all` for architecture-independent packages (§5.6.8): lower-case
/// letters, digits and `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Architecture(String);

name_type!(Architecture, check_architecture);

fn check_architecture(arch: &str) -> Result<(), String> {
    let valid = !arch.is_empty()
        && arch
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{arch:?} is not a Debian architecture (lower-case letters, digits and -, like amd64)"
        ))
    }
}

/// A package the agent follows, as `agent.packages` and `promote` write
/// it: `name` (its newest version) or `name=version`, a pin. The name is a
/// [`PackageName`] and the version a [`Version`]; both are kept as the
/// text that was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSpec {
    pub name: String,
    pub pinned: Option<String>,
}

impl PackageSpec {
    /// `name` or `name=version`; the error names the part that is wrong.
    pub fn parse(text: &str) -> Result<PackageSpec, String> {
        let (name, pinned) = match text.split_once('=') {
            Some((name, version)) => (name, Some(version)),
            None => (text, None),
        };
        check_package_name(name)?;
        if let Some(version) = pinned
            && let Some(problem) = version_problem(version)
        {
            return Err(format!("pinned version {version:?} of {name}: {problem}"));
        }
        Ok(PackageSpec {
            name: name.to_string(),
            pinned: pinned.map(str::to_string),
        })
    }
}

impl fmt::Display for PackageSpec {
    /// As written: `name` or `name=version`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pinned {
            Some(version) => write!(f, "{}={version}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl FromStr for PackageSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<PackageSpec, String> {
        PackageSpec::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_follow_policy_5_6_1() {
        for good in ["myapp", "libc6-dev", "g++", "0ad", "a.b+c-d", "xz"] {
            assert!(PackageName::is_valid(good), "{good}");
            assert_eq!(
                PackageName::parse(good).map(PackageName::into_string),
                Ok(good.into())
            );
        }
        for bad in [
            "", "a", "M", "My-app", "my_app", "-x", "+x", ".x", "a b", "../x", "é1",
        ] {
            assert!(!PackageName::is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_value() {
        let cases = [
            (
                PackageName::parse("Bad_Name").err(),
                "\"Bad_Name\" is not a Debian package name",
            ),
            (Version::parse("x1").err(), "\"x1\" is not a Debian version"),
            (Suite::parse("a/b").err(), "\"a/b\" is not a suite name"),
            (
                Component::parse("..").err(),
                "\"..\" is not a component name",
            ),
            (
                Architecture::parse("AMD64").err(),
                "\"AMD64\" is not a Debian architecture",
            ),
            (
                PackageSpec::parse("ok=1:").err(),
                "pinned version \"1:\" of ok:",
            ),
            (
                PackageSpec::parse("Ok=1").err(),
                "\"Ok\" is not a Debian package name",
            ),
        ];
        for (error, says) in cases {
            let error = error.unwrap_or_default();
            assert!(
                error.starts_with(says),
                "{error:?} does not start with {says:?}"
            );
        }
    }

    #[test]
    fn versions_follow_policy_5_6_12_and_dpkg() {
        for good in [
            "1",
            "1.0",
            "1.2-3",
            "1:2.0~rc1+b1-3",
            "2.0-1-2",
            "0~git20240101.abc-1",
            "1.0+dfsg-1ubuntu0.1",
            "3:1.0:2-1",
        ] {
            assert!(
                Version::is_valid(good),
                "{good}: {:?}",
                Version::parse(good)
            );
        }
        for (bad, why) in [
            ("", "empty"),
            ("1.0 beta", "only letters"),
            ("1/2", "only letters"),
            ("1_2", "only letters"),
            ("1:", "upstream version is empty"),
            (":1", "epoch"),
            ("a:1", "epoch"),
            ("1:-2", "upstream version is empty"),
            ("1.0-", "revision"),
            ("-1", "upstream version is empty"),
            ("abc", "start with a digit"),
            ("1:abc-1", "start with a digit"),
            ("1.0-a:b", "epoch"),
            ("1:1.0-a:b", "revision"),
            ("99999999999:1", "parse"),
        ] {
            let error = Version::parse(bad).err().unwrap_or_default();
            assert!(
                error.contains(why),
                "{bad:?}: {error:?} does not say {why:?}"
            );
        }
    }

    #[test]
    fn suites_and_components_are_one_safe_path_segment() {
        for good in [
            "production",
            "bookworm-updates",
            "v1.2",
            "a_b",
            "x~y+z",
            "main",
        ] {
            assert!(Suite::is_valid(good), "{good}");
            assert!(Component::is_valid(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "prod/../x",
            "a b",
            "a:b",
            "%2e",
            "über",
            "a\n",
        ] {
            assert!(!Suite::is_valid(bad), "{bad:?}");
            assert!(!Component::is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn architectures() {
        for good in ["amd64", "arm64", "all", "hurd-i386", "ppc64el"] {
            assert!(Architecture::is_valid(good), "{good}");
        }
        for bad in ["", "AMD64", "amd_64", "amd64 ", "x/y"] {
            assert!(!Architecture::is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn package_specs_and_pins() {
        assert_eq!(
            PackageSpec::parse("myapp=1.2-3"),
            Ok(PackageSpec {
                name: "myapp".into(),
                pinned: Some("1.2-3".into())
            })
        );
        assert_eq!(
            PackageSpec::parse("myapp"),
            Ok(PackageSpec {
                name: "myapp".into(),
                pinned: None
            })
        );
        for text in ["myapp", "myapp=1:2.0-1"] {
            let spec: PackageSpec = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(spec.to_string(), text);
        }
        for bad in [
            "a",
            "../x",
            "myapp=",
            "myapp=x",
            "=1.0",
            "myapp=1=2",
            "myapp=1 0",
        ] {
            assert!(PackageSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
