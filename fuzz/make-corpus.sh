#!/usr/bin/env bash
# Makes the fuzz keyring and seed corpus with real gpg: a signing key
# (fuzz/keyring.asc, public part only), and a valid InRelease, Release +
# Release.gpg, and Packages to start each target from. corpus/rollout
# (rollout.toml policies) needs no key: its seeds are committed as written.
set -euo pipefail
cd "$(dirname "$0")"
export GNUPGHOME="$(mktemp -d)"
trap 'gpgconf --kill all; rm -rf "$GNUPGHOME"' EXIT
gpg --batch --quiet --passphrase '' --quick-gen-key "pulldeploy fuzz <fuzz@localhost>" ed25519 sign never 2>/dev/null
fpr="$(gpg --list-keys --with-colons 2>/dev/null | awk -F: '/^fpr/ {print $10; exit}')"
gpg --armor --export "$fpr" > keyring.asc

mkdir -p corpus/inrelease corpus/release_gpg corpus/release corpus/packages
packages='Package: myapp
Version: 1:1.2~rc1-1
Architecture: amd64
Maintainer: t <t@localhost>
Depends: libc6 (>= 2.36), helper | other
Filename: pool/main/m/myapp/myapp_1.2~rc1-1_amd64.deb
Size: 1234
SHA256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
Description: an app
 with a long description
 .
 and a paragraph

Package: helper
Version: 1.0
Architecture: all
Filename: pool/main/h/helper/helper_1.0_all.deb
Size: 10
SHA256: ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
'
printf '%s' "$packages" > corpus/packages/two-packages
sha=$(printf '%s' "$packages" | sha256sum | cut -d' ' -f1)
size=$(printf '%s' "$packages" | wc -c)
release="Origin: Acme
Suite: production
Codename: production
Date: Thu, 26 Nov 2026 04:00:00 UTC
Valid-Until: Thu, 03 Dec 2026 04:00:00 UTC
Acquire-By-Hash: yes
Architectures: amd64
Components: main
SHA256:
 $sha $size main/binary-amd64/Packages
 $sha $size main/binary-amd64/Packages.xz
"
printf '%s' "$release" > corpus/release/release
printf '%s' "$release" | gpg --batch --digest-algo SHA256 --clearsign > corpus/inrelease/inrelease
{ printf '%s' "$release"; printf '\0'; printf '%s' "$release" | gpg --batch --digest-algo SHA256 --armor --detach-sign; } > corpus/release_gpg/armored
{ printf '%s' "$release"; printf '\0'; printf '%s' "$release" | gpg --batch --digest-algo SHA256 --detach-sign; } > corpus/release_gpg/binary
echo "fuzz keyring $fpr and corpus written"
