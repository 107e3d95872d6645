//! The Release parser and its index lookup on arbitrary text. The body is
//! `pulldeploy::fuzzing::release`, which the test suite runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pulldeploy::fuzzing::release(data));
