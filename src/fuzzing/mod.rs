//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`), one function
//! per target, so that cargo-fuzz (nightly, coverage-guided) and the test
//! suite (stable, every run: `tests.rs` replays `fuzz/corpus/*` and a
//! seeded mutation pass) exercise the same code. Not an API: hidden from
//! the docs, called only by the targets and the tests.
//!
//! Each function takes untrusted bytes and must return, whatever they are:
//! no panic, no hang. A property that the agent relies on beyond "does not
//! panic" is asserted here too, so a fuzzer reports its violation as a
//! crash.

use std::time::SystemTime;

use chrono::{DateTime, Utc};

use crate::keyring::Keyring;
use crate::repo::names::PackageSpec;
use crate::repo::{csf, packages, release};
use crate::rollout::{self, Policy};

/// InRelease: strict cleartext framing, Sequoia verification against the
/// pinned key, and the Release parser on whatever the verifier lets
/// through (only ever the framed text).
pub fn inrelease(keyring: &Keyring, data: &[u8]) {
    let framed = csf::split(data);
    if let Ok(verified) =
        keyring.verify_cleartext("fuzz", data, SystemTime::now(), std::time::Duration::ZERO)
    {
        let framed = framed.map(|f| f.text);
        assert_eq!(
            framed.as_deref(),
            Ok(verified.text.as_str()),
            "the verifier let through text other than the framed text"
        );
        release_text(&verified.text);
    }
}

/// Release + Release.gpg: the input split at its first NUL byte into the
/// signed data and the detached signature.
pub fn release_gpg(keyring: &Keyring, data: &[u8]) {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let signed = &data[..split];
    let signature = data.get(split + 1..).unwrap_or_default();
    let _ = keyring.verify_detached(
        "fuzz",
        signed,
        signature,
        SystemTime::now(),
        std::time::Duration::ZERO,
    );
}

/// The Release parser and its index lookup on arbitrary text.
pub fn release(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        release_text(text);
    }
}

fn release_text(text: &str) {
    if let Ok(release) = release::parse(text)
        && let Some(index) = release.packages_index("main", "amd64")
    {
        let _ = index.by_hash_path();
    }
}

/// The streaming Packages parser and version selection.
pub fn packages(data: &[u8]) {
    let Ok(candidates) = packages::read_candidates(data, &["myapp", "helper"], "amd64") else {
        return;
    };
    for spec in ["myapp", "helper=1.0"] {
        if let Ok(spec) = PackageSpec::parse(spec) {
            let _ = packages::select(&candidates, &spec, Some("1:0.9~rc1-1"));
            let _ = packages::select(&candidates, &spec, None);
        }
    }
}

/// The signed rollout policy (`rollout.toml`): signed, but its shape is
/// whatever the publisher (or an older or newer one) wrote. Parsed, then
/// every question a node or the publisher asks of it: wave arithmetic,
/// release times, pause and resume at the ends of the calendar. What the
/// publisher writes back must parse again to the same policy, or one
/// `rollout` command would stop every agent of the suite.
pub fn rollout(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::parse(text) else {
        return;
    };
    let times = [
        DateTime::<Utc>::MIN_UTC,
        DateTime::<Utc>::UNIX_EPOCH,
        DateTime::<Utc>::MAX_UTC,
    ];
    for position in [0.0, 0.5, rollout::position("fuzz")] {
        let wave = policy.wave_of(position);
        for (package, versions) in &policy.started {
            for version in versions.keys() {
                let _ = policy.released_at(package, version, wave);
                for now in times {
                    let _ = policy.is_released(package, version, wave, now);
                }
            }
        }
    }
    let written = policy.to_text("fuzz");
    assert_eq!(
        Policy::parse(&written).as_ref(),
        Ok(&policy),
        "the policy as the publisher writes it back:\n{written}"
    );
    for at in times {
        let mut changed = policy.clone();
        changed.pause(at);
        for later in times {
            let _ = changed.clone().resume(later);
        }
    }
}

#[cfg(test)]
mod tests;
