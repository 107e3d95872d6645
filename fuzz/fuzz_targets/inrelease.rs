//! InRelease: cleartext framing, Sequoia verification against a pinned key,
//! and the Release parser on whatever the verifier lets through.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pulldeploy::keyring::Keyring;

static KEYRING: OnceLock<Keyring> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let _ = pulldeploy::repo::csf::split(data);
    let keyring = KEYRING.get_or_init(|| {
        Keyring::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/keyring.asc")))
            .expect("fuzz/keyring.asc (made by fuzz/make-corpus.sh)")
    });
    if let Ok(verified) = keyring.verify_cleartext("fuzz", data, std::time::SystemTime::now(), std::time::Duration::ZERO) {
        let _ = pulldeploy::repo::release::parse(&verified.text);
    }
});
