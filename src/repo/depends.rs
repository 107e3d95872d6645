//! `Depends` checking before dpkg runs (Debian Policy §7.1, §7.5).
//!
//! dpkg refuses a package whose dependencies are not installed, but only
//! after it has unpacked it; checking first lets the agent refuse cleanly,
//! naming what is missing, with the running version untouched.

use std::collections::HashMap;

use debversion::Version;

/// What is (or will be) installed: versions by name, and virtual names
/// satisfied through `Provides` (with the provided version, if any).
#[derive(Debug, Default, Clone)]
pub struct Installed {
    pub versions: HashMap<String, Version>,
    pub provides: HashMap<String, Vec<Option<Version>>>,
}

impl Installed {
    pub fn add(&mut self, name: &str, version: Version, provides: Option<&str>) {
        self.versions.insert(name.to_string(), version);
        for provided in provides.unwrap_or_default().split(',') {
            let provided = provided.trim();
            if provided.is_empty() {
                continue;
            }
            let (provided_name, provided_version) = match provided.split_once('(') {
                Some((n, rest)) => (
                    n.trim(),
                    rest.trim_end_matches(')')
                        .trim()
                        .strip_prefix('=')
                        .and_then(|v| v.trim().parse().ok()),
                ),
                None => (provided, None),
            };
            self.provides
                .entry(strip_arch(provided_name).to_string())
                .or_default()
                .push(provided_version);
        }
    }
}

fn strip_arch(name: &str) -> &str {
    name.split(':').next().unwrap_or(name)
}

/// The unmet parts of `depends`, each as written (`libfoo (>= 2)`,
/// `a | b`). Empty when every group is satisfied. An unparsable relation is
/// reported as unmet rather than ignored.
pub fn unmet(depends: &str, installed: &Installed) -> Vec<String> {
    depends
        .split(',')
        .map(str::trim)
        .filter(|group| !group.is_empty())
        .filter(|group| {
            !group
                .split('|')
                .any(|alternative| satisfied(alternative.trim(), installed))
        })
        .map(|group| group.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn satisfied(relation: &str, installed: &Installed) -> bool {
    // Architecture restrictions `[amd64]` and build profiles `<!nocheck>`
    // do not occur in binary Depends; anything unexpected fails closed.
    let (name, constraint) = match relation.split_once('(') {
        Some((name, rest)) => (name.trim(), Some(rest.trim().trim_end_matches(')').trim())),
        None => (relation.trim(), None),
    };
    let name = strip_arch(name);
    let Some(constraint) = constraint else {
        return installed.versions.contains_key(name) || installed.provides.contains_key(name);
    };
    let op_len = constraint
        .find(|c: char| !"<>=".contains(c))
        .unwrap_or(constraint.len());
    let (op, wanted) = constraint.split_at(op_len);
    let Ok(wanted) = wanted.trim().parse::<Version>() else {
        return false;
    };
    let fits = |have: &Version| match op {
        ">=" => *have >= wanted,
        "<=" => *have <= wanted,
        ">>" => *have > wanted,
        "<<" => *have < wanted,
        "=" => *have == wanted,
        _ => false,
    };
    installed.versions.get(name).is_some_and(fits)
        || installed
            .provides
            .get(name)
            .is_some_and(|versions| versions.iter().flatten().any(fits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Installed {
        let mut installed = Installed::default();
        installed.add("libc6", "2.36-9".parse().unwrap(), None);
        installed.add(
            "python3",
            "3.11.2-1".parse().unwrap(),
            Some("python3-any (= 3.11.2-1), python3:any"),
        );
        installed
    }

    #[test]
    fn satisfied_by_version_alternative_or_provides() {
        let node = node();
        assert!(unmet("libc6 (>= 2.34), python3-any (>= 3.9) | python2", &node).is_empty());
        assert!(unmet("libc6:amd64 (<< 3)", &node).is_empty());
        assert!(unmet("missing | python3", &node).is_empty());
        assert!(unmet("", &node).is_empty());
    }

    #[test]
    fn names_each_unmet_group() {
        let node = node();
        assert_eq!(
            unmet("libc6 (>= 2.40), libssl3, missing | other", &node),
            ["libc6 (>= 2.40)", "libssl3", "missing | other"]
        );
        // Unparsable versions fail closed.
        assert_eq!(unmet("libc6 (>= !!)", &node), ["libc6 (>= !!)"]);
        // A versioned dependency is not met by an unversioned Provides.
        assert_eq!(unmet("python3 (>= 4)", &node), ["python3 (>= 4)"]);
    }
}
