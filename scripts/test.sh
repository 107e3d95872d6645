#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, then
# formatting, lints, unit and integration tests against real servers
# (moto, an IMDS emulator, s3s-fs, gpg/aptly/reprepro repositories, dpkg
# sandboxes). The fuzz targets' bodies (src/fuzzing) run inside `cargo
# test` on every run, over the committed corpora and a seeded mutation
# pass; a coverage-guided run is added when cargo-fuzz is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Every test binary runs even after one failed, so that one run shows
# every failure; the script still fails.
status=0
cargo test --locked --no-fail-fast -- --test-threads="${PULLDEPLOY_TEST_THREADS:-4}" 2>&1 |
  tee "$log" || status=$?

# Coverage-guided fuzzing on top, when cargo-fuzz is installed (it needs
# nightly flags; without it the targets' bodies still ran above, in
# pulldeploy::fuzzing's unit tests).
if [ "$status" -ne 0 ]; then
  echo "tests failed: skipping the fuzz run"
elif cargo fuzz --version >/dev/null 2>&1; then
  scripts/fuzz.sh
else
  echo "cargo-fuzz not installed: the fuzz targets ran as unit tests only (corpus + mutations); cargo install cargo-fuzz for coverage-guided runs"
fi

# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
