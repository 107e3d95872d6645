#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then
# formatting, lints, unit and integration tests against real servers
# (moto, an IMDS emulator, gpg/aptly/reprepro repositories, dpkg sandboxes).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked -- --test-threads="${PULLDEPLOY_TEST_THREADS:-4}"
