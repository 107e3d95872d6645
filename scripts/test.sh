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

# Coverage-guided fuzzing when cargo-fuzz is installed (issue: "a short
# fuzz run in the test command when cargo-fuzz is available").
if cargo fuzz --version >/dev/null 2>&1; then
  scripts/fuzz.sh
else
  echo "cargo-fuzz not installed: skipping the fuzz run (cargo install cargo-fuzz)"
fi
