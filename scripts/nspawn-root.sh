#!/usr/bin/env bash
# Prints the path of a minimal Debian root file system that boots systemd
# in systemd-nspawn (tests/systemd_node.rs), building it first if this
# machine has none yet:
#
#   debootstrap --variant=minbase --include=PACKAGES bookworm ROOT MIRROR
#
# Built once (about 5 minutes) and cached outside the source tree, in
# PULLDEPLOY_TEST_CACHE (default /var/cache/pulldeploy-tests), under a name
# keyed by a hash of the recipe below: change the recipe and a new root is
# built beside the old one. The root is built in a temporary directory and
# renamed into place when complete, so a killed build never leaves a half
# root behind (its leftovers are swept by the next build). Concurrent
# callers wait for one build (flock). Callers must not write into the
# cached root: they copy it (cp -a --reflink=auto) and boot the copy.
#
# Environment: PULLDEPLOY_TEST_CACHE, PULLDEPLOY_DEBIAN_MIRROR (default
# http://deb.debian.org/debian). Needs root, debootstrap and sha256sum.
set -euo pipefail

cache="${PULLDEPLOY_TEST_CACHE:-/var/cache/pulldeploy-tests}"
mirror="${PULLDEPLOY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
arch="$(dpkg --print-architecture)"
# systemd as PID 1 (systemd-sysv) with D-Bus, so that systemctl works;
# ca-certificates (a Depends of the agent's .deb) and curl (which
# examples/user-data.sh downloads with), as on a stock cloud image; busybox
# for the test app's HTTP health endpoint (busybox httpd).
include=systemd,systemd-sysv,dbus,ca-certificates,curl,busybox
# Bump when the post-debootstrap steps below change.
recipe_version=1

die() {
    echo "nspawn-root: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap; scripts/deps.sh)"

recipe="debootstrap --variant=minbase --include=$include $suite $mirror arch=$arch recipe=$recipe_version"
key="$(printf '%s' "$recipe" | sha256sum | cut -c1-16)"
root="$cache/$suite-minbase-$key"

if [ -d "$root" ]; then
    echo "$root"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
# Someone else may have built it while this one waited for the lock.
if [ -d "$root" ]; then
    echo "$root"
    exit 0
fi
# Leftovers of builds that were killed (under the lock, none is running).
rm -rf "$cache"/.build.*

build="$(mktemp -d "$cache/.build.XXXXXX")"
log="$build.log"
echo "nspawn-root: building $root ($recipe), about 5 minutes; log in $log" >&2
if ! debootstrap --variant=minbase --include="$include" --arch="$arch" \
    "$suite" "$build/root" "$mirror" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "debootstrap failed (log: $log)"
fi

# ---- what every booted copy needs ---------------------------------------------
# An empty machine-id: systemd makes up a fresh one at every boot, so that
# two copies running at once differ.
: >"$build/root/etc/machine-id"
echo pulldeploy-test >"$build/root/etc/hostname"
# No login prompts on the console (the tests use nsenter).
chroot "$build/root" systemctl mask console-getty.service getty@.service >/dev/null 2>&1 || true
# Downloaded .debs are not needed any more.
rm -rf "$build/root/var/cache/apt/archives/"*.deb "$build/root/var/lib/apt/lists/"*_Packages
printf '%s\n' "$recipe" >"$build/root/etc/pulldeploy-test-recipe"

mv -T "$build/root" "$root"
rm -rf "$build" "$log"
echo "$root"
