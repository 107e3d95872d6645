//! The signed rollout policy (rollout.toml): parser, wave arithmetic,
//! pause and resume, and the publisher's write-back. The body is
//! `pulldeploy::fuzzing::rollout`, which the test suite runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pulldeploy::fuzzing::rollout(data));
