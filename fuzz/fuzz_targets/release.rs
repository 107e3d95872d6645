//! The Release parser and its index lookup on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(release) = pulldeploy::repo::release::parse(text) {
        if let Some(index) = release.packages_index("main", "amd64") {
            let _ = index.by_hash_path();
        }
    }
});
