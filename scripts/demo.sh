#!/usr/bin/env bash
# End-to-end demo on one machine, no AWS: pulldeploy publishes a signed apt
# repository into a local directory (key made by gpg), then installs the
# demo app from it into a sandbox root with real dpkg, then an upgrade, an
# unchanged poll, and the status.
#
#   scripts/demo.sh [WORKDIR]      (default: a new directory under /tmp)
#
# PULLDEPLOY_BIN=path uses an existing binary instead of building one.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/pulldeploy-demo.XXXXXX)}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"

need=()
for tool in gpg:gpg dpkg-deb:dpkg-dev; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
for lib in nettle-dev libclang-dev; do
  [ -n "${PULLDEPLOY_BIN:-}" ] || dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q "ok installed" || need+=("$lib")
done
if ((${#need[@]})); then
  echo "demo: installing ${need[*]}"
  [ "$(id -u)" -eq 0 ] || { echo "demo: run as root, or install: ${need[*]}" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

bin="${PULLDEPLOY_BIN:-}"
if [ -z "$bin" ]; then
  echo "demo: building pulldeploy (release)"
  cargo build --release --locked --manifest-path "$here/Cargo.toml" --quiet
  bin="$here/target/release/pulldeploy"
fi

say() { printf '\n== %s\n' "$*"; }

say "signing key and repository in $work"
export GNUPGHOME="$work/gnupg"
mkdir -p -m 700 "$GNUPGHOME"
# gpg starts an agent for this key ring; it should not outlive the demo.
trap 'gpgconf --kill all 2>/dev/null || true' EXIT
gpg --batch --quiet --passphrase '' --quick-gen-key "pulldeploy demo <demo@localhost>" ed25519 sign never 2>/dev/null
fingerprint="$(gpg --list-keys --with-colons 2>/dev/null | awk -F: '/^fpr/ {print $10; exit}')"
gpg --armor --export "$fingerprint" > "$work/keyring.asc"
gpg --armor --export-secret-keys "$fingerprint" > "$work/signing-key.asc"
mkdir -p "$work/repo"

build_app() {  # version
  local dir="$work/build/demo-app-$1"
  mkdir -p "$dir/DEBIAN" "$dir/usr/share/demo-app"
  cat > "$dir/DEBIAN/control" <<CONTROL
Package: demo-app
Version: $1
Architecture: all
Maintainer: pulldeploy demo <demo@localhost>
Section: misc
Priority: optional
Description: demo application installed by pulldeploy
CONTROL
  echo "$1" > "$dir/usr/share/demo-app/VERSION"
  dpkg-deb --build --root-owner-group "$dir" "$work/build/demo-app_$1_all.deb" >/dev/null
  "$bin" publish --repo "file://$work/repo" --suite production --signing-key "$work/signing-key.asc" \
    --architecture "$(dpkg --print-architecture)" "$work/build/demo-app_$1_all.deb"
  echo "published demo-app $1"
}
build_app 1.0

root="$work/root"
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/var/lib/dpkg/triggers" "$root/var/log"
touch "$root/var/lib/dpkg/status"
cat > "$work/config.toml" <<CONF
[repository]
url = "file://$work/repo"
suite = "production"
keyring = "keyring.asc"

[agent]
packages = ["demo-app"]
state_dir = "state"
cache_dir = "cache"

[install]
root = "root"      # a sandbox: dpkg --root, nothing of this machine changes

[health]
listen = "127.0.0.1:0"
CONF

export PULLDEPLOY_LOG="${PULLDEPLOY_LOG:-warn}"
say "pulldeploy check-config"
"$bin" check-config --config "$work/config.toml"
say "pulldeploy once (fresh node)"
"$bin" once --config "$work/config.toml"
echo "sandbox has: $(cat "$root/usr/share/demo-app/VERSION")"

say "publish 1.1, pulldeploy once (upgrade)"
build_app 1.1
"$bin" once --config "$work/config.toml"
echo "sandbox has: $(cat "$root/usr/share/demo-app/VERSION")"

say "pulldeploy once (nothing published)"
"$bin" once --config "$work/config.toml"

say "pulldeploy status"
"$bin" status --config "$work/config.toml"
