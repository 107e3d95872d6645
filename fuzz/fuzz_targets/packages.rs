//! The streaming Packages parser and version selection. The body is
//! `pulldeploy::fuzzing::packages`, which the test suite runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pulldeploy::fuzzing::packages(data));
