//! InRelease: cleartext framing, Sequoia verification against a pinned key,
//! and the Release parser on whatever the verifier lets through. The body
//! is `pulldeploy::fuzzing::inrelease`, which the test suite runs too.
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
    pulldeploy::fuzzing::inrelease(keyring, data);
});
