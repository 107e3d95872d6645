//! Release + Release.gpg: the input is split at its first NUL byte into the
//! signed data and the detached signature. The body is
//! `pulldeploy::fuzzing::release_gpg`, which the test suite runs too.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pulldeploy::keyring::Keyring;

static KEYRING: OnceLock<Keyring> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let keyring = KEYRING.get_or_init(|| {
        Keyring::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/keyring.asc")))
            .expect("fuzz/keyring.asc (made by fuzz/make-corpus.sh)")
    });
    pulldeploy::fuzzing::release_gpg(keyring, data);
});
