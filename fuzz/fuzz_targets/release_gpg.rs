//! Release + Release.gpg: the input is split at its first NUL byte into the
//! signed data and the detached signature.
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
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (release, signature) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let _ = keyring.verify_detached("fuzz", release, signature, std::time::SystemTime::now(), std::time::Duration::ZERO);
});
