#!/usr/bin/env bash
# Short coverage-guided fuzz runs of the repository parsers, the rollout
# policy and the signature check (fuzz/fuzz_targets), FUZZ_SECONDS each
# (default 45). The targets' bodies are pulldeploy::fuzzing, which
# `cargo test` already runs on stable over the committed corpus and a
# seeded mutation pass (src/fuzzing/tests.rs); this adds coverage guidance.
# New inputs go to a temporary corpus; the committed one (fuzz/corpus) is
# only read. A crash fails the run and leaves its input in fuzz/artifacts.
# Needs cargo-fuzz (cargo install cargo-fuzz); stable Rust is enough with
# RUSTC_BOOTSTRAP=1, which cargo-fuzz's -Z flags need.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-45}"
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in inrelease release_gpg release packages rollout; do
  scratch="$(mktemp -d)"
  echo "fuzz: $target for ${seconds}s"
  status=0
  cargo fuzz run -O "$target" "$scratch" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 >"$scratch.log" 2>&1 || status=$?
  grep -E "^Done|ERROR|panicked" "$scratch.log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$scratch.log" >&2
    echo "fuzz: $target failed (exit $status); the input is in fuzz/artifacts/$target" >&2
    rm -rf "$scratch" "$scratch.log"
    exit 1
  fi
  rm -rf "$scratch" "$scratch.log"
done
