//! The streaming Packages parser and version selection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pulldeploy::config::PackageSpec;
use pulldeploy::repo::packages;

fuzz_target!(|data: &[u8]| {
    let Ok(candidates) = packages::read_candidates(data, &["myapp", "helper"], "amd64") else {
        return;
    };
    for spec in ["myapp", "helper=1.0"] {
        if let Ok(spec) = PackageSpec::parse(spec) {
            let _ = packages::select(&candidates, &spec, Some("1:0.9~rc1-1"));
            let _ = packages::select(&candidates, &spec, None);
        }
    }
});
