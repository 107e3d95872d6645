#!/usr/bin/env bash
# Builds the agent's own Debian package from a built binary, with dpkg-deb:
#
#   cargo build --release --locked && packaging/build-deb.sh
#   # -> target/debian/pulldeploy_VERSION_ARCH.deb
#
# Options (each also an environment variable):
#   --binary PATH     PULLDEPLOY_BIN       default target/release/pulldeploy
#   --out DIR         PULLDEPLOY_DEB_OUT   default target/debian
#   --compress TYPE   PULLDEPLOY_DEB_COMPRESS  xz (default, smallest) or gzip
#                     (level 1: several times faster, for tests)
#   --maintainer "Name <email>"  DEB_MAINTAINER  default: the changelog's
#   --version VERSION PULLDEPLOY_DEB_VERSION  package the binary under another
#                     version than its own, with no changelog check (tests
#                     of self-update: a newer package of the same binary)
#
# The binary is stripped into the package; shell completions and the man
# page are generated from it (`pulldeploy completions bash|zsh|fish`,
# `pulldeploy manpage`), so it must run on this machine. Depends comes
# from dpkg-shlibdeps (the shared libraries the binary links). The
# version comes from `pulldeploy --version` and must equal the newest
# entry of packaging/changelog (unless given with --version). Prints the
# path of the .deb on stdout.
# Needs dpkg-dev (dpkg-shlibdeps, dpkg-parsechangelog) and binutils.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
top="$(dirname "$here")"

binary="${PULLDEPLOY_BIN:-$top/target/release/pulldeploy}"
out="${PULLDEPLOY_DEB_OUT:-$top/target/debian}"
compress="${PULLDEPLOY_DEB_COMPRESS:-xz}"
maintainer="${DEB_MAINTAINER:-}"
version_override="${PULLDEPLOY_DEB_VERSION:-}"

die() {
    echo "build-deb: $*" >&2
    exit 1
}

while (($#)); do
    case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --compress) compress="${2:?--compress needs xz or gzip}"; shift 2 ;;
    --maintainer) maintainer="${2:?--maintainer needs \"Name <email>\"}"; shift 2 ;;
    --version) version_override="${2:?--version needs a Debian version}"; shift 2 ;;
    -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done

# lintian refuses uncompressed members, so there is no "none".
case "$compress" in
xz) compress_args=(-Zxz) ;;
gzip) compress_args=(-Zgzip -z1) ;;
*) die "--compress must be xz or gzip, not $compress" ;;
esac
for tool in dpkg-deb dpkg-shlibdeps dpkg-parsechangelog strip gzip md5sum; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install dpkg-dev binutils)"
done
[ -x "$binary" ] || die "no binary at $binary: run 'cargo build --release --locked' first, or pass --binary PATH"
binary="$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")"

# ---- what is being packaged -------------------------------------------------
version_line="$("$binary" --version)" || die "$binary --version failed"
version="${version_line#pulldeploy }"
[ "$version" != "$version_line" ] && [ -n "$version" ] ||
    die "$binary --version printed '$version_line', not 'pulldeploy VERSION'"
if [ -n "$version_override" ]; then
    case "$version_override" in
    [0-9]*) ;;
    *) die "--version must start with a digit, not $version_override" ;;
    esac
    case "$version_override" in
    *[!A-Za-z0-9.+~:-]*) die "--version $version_override has characters a Debian version cannot have" ;;
    esac
    version="$version_override"
else
    changelog_version="$(dpkg-parsechangelog -l "$here/changelog" -S Version)"
    [ "$changelog_version" = "$version" ] ||
        die "the binary is $version but packaging/changelog's newest entry is $changelog_version: add an entry (dch -c packaging/changelog -v $version)"
fi
[ -n "$maintainer" ] || maintainer="$(dpkg-parsechangelog -l "$here/changelog" -S Maintainer)"
arch="${DEB_HOST_ARCH:-$(dpkg --print-architecture)}"

# ---- generated from the binary: completions and man page --------------------
generated="$(mktemp -d)"
trap 'rm -rf "$generated"' EXIT
generate() { # FILE ARGS...: stdout of `pulldeploy ARGS...` into FILE, or a clear failure
    local file="$1"
    shift
    if ! "$binary" "$@" >"$generated/$file" 2>"$generated/stderr" || [ ! -s "$generated/$file" ]; then
        die "'pulldeploy $*' failed or printed nothing; the packaging needs the binary to provide it (issue 6: \`pulldeploy completions bash|zsh|fish\`, \`pulldeploy manpage\`): $(head -c 300 "$generated/stderr")"
    fi
}
generate pulldeploy.bash completions bash
generate _pulldeploy completions zsh
generate pulldeploy.fish completions fish
generate pulldeploy.1 manpage
grep -q '^\.TH' "$generated/pulldeploy.1" || die "'pulldeploy manpage' did not print a roff page (no .TH line)"

# ---- the package tree ---------------------------------------------------------
# Laid out as debian/<package>/ so that dpkg-shlibdeps sees an installed tree.
work="$generated/build"
pkg="$work/debian/pulldeploy"
install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" \
    "$pkg/etc/pulldeploy" "$pkg/var/lib/pulldeploy" "$pkg/var/cache/pulldeploy" \
    "$pkg/usr/share/bash-completion/completions" "$pkg/usr/share/zsh/vendor-completions" \
    "$pkg/usr/share/fish/vendor_completions.d" "$pkg/usr/share/man/man1" \
    "$pkg/usr/share/doc/pulldeploy" "$pkg/usr/share/lintian/overrides"

install -m 0755 "$binary" "$pkg/usr/bin/pulldeploy"
# As dh_strip does for executables: no symbols, no .comment/.note sections
# (keeps the build-id note out too; debug symbols are not shipped).
strip --remove-section=.comment --remove-section=.note "$pkg/usr/bin/pulldeploy"
install -m 0644 "$top/systemd/pulldeploy.service" "$pkg/lib/systemd/system/pulldeploy.service"
install -m 0644 "$here/config.toml" "$pkg/etc/pulldeploy/config.toml"
install -m 0644 "$generated/pulldeploy.bash" "$pkg/usr/share/bash-completion/completions/pulldeploy"
install -m 0644 "$generated/_pulldeploy" "$pkg/usr/share/zsh/vendor-completions/_pulldeploy"
install -m 0644 "$generated/pulldeploy.fish" "$pkg/usr/share/fish/vendor_completions.d/pulldeploy.fish"
gzip -9n <"$generated/pulldeploy.1" >"$pkg/usr/share/man/man1/pulldeploy.1.gz"
install -m 0644 "$here/copyright" "$pkg/usr/share/doc/pulldeploy/copyright"
# The README documents every config key (config.toml points to it).
gzip -9n <"$top/README.md" >"$pkg/usr/share/doc/pulldeploy/README.md.gz"
# A native package: its Debian changelog is changelog.gz.
gzip -9n <"$here/changelog" >"$pkg/usr/share/doc/pulldeploy/changelog.gz"
install -m 0644 "$here/lintian-overrides" "$pkg/usr/share/lintian/overrides/pulldeploy"
chmod 0644 "$pkg/usr/share/man/man1/pulldeploy.1.gz" "$pkg/usr/share/doc/pulldeploy/changelog.gz" \
    "$pkg/usr/share/doc/pulldeploy/README.md.gz"
for script in postinst prerm postrm; do
    install -m 0755 "$here/$script" "$pkg/DEBIAN/$script"
done
printf '/etc/pulldeploy/config.toml\n' >"$pkg/DEBIAN/conffiles"
chmod 0644 "$pkg/DEBIAN/conffiles"

# ---- control ------------------------------------------------------------------
printf 'Source: pulldeploy\n\nPackage: pulldeploy\nArchitecture: any\n' >"$work/debian/control"
shlibs="$(cd "$work" && dpkg-shlibdeps -O "debian/pulldeploy/usr/bin/pulldeploy")" ||
    die "dpkg-shlibdeps failed on $binary"
depends="${shlibs#shlibs:Depends=}"
[ "$depends" != "$shlibs" ] || die "dpkg-shlibdeps printed '$shlibs'"
# rustls reads the system's CA certificates (rustls-native-certs) for S3 over https.
depends="$depends, ca-certificates"

# md5sums of every shipped file except conffiles (dpkg tracks those itself),
# as dh_md5sums writes them.
(cd "$pkg" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' |
    LC_ALL=C sort -z | xargs -0 md5sum) >"$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/md5sums"

# Installed-Size in KiB as dpkg-gencontrol counts it: each file rounded up
# to a KiB, each directory and symlink one.
installed_size="$(cd "$pkg" && find . ! -path './DEBIAN*' -printf '%y %s\n' |
    awk '$1 == "f" { kib += int(($2 + 1023) / 1024); next } { kib += 1 } END { print kib }')"

cat >"$pkg/DEBIAN/control" <<EOF
Package: pulldeploy
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends
Section: admin
Priority: optional
Description: pull-based deployment agent for signed apt repositories
 pulldeploy runs on every server of a fleet. It polls a signed apt
 repository kept in S3 (or a local directory), verifies every byte
 against pinned OpenPGP certificates, installs the newest version of
 the configured packages with dpkg, and tells the load balancer through
 /healthz whether the node is ready. New versions must pass a health
 check, or the last known good version is reinstalled.
 .
 The package ships the agent, its systemd service (enabled, not started:
 configure /etc/pulldeploy/config.toml and the keyring first), shell
 completions and a man page. The same binary publishes repositories
 (pulldeploy publish, promote, refresh).
EOF
chmod 0644 "$pkg/DEBIAN/control"

# ---- the .deb -----------------------------------------------------------------
mkdir -p "$out"
# The file name leaves out an epoch, as dpkg-buildpackage does.
deb="$out/pulldeploy_${version#*:}_${arch}.deb"
dpkg-deb --root-owner-group "${compress_args[@]}" --build "$pkg" "$deb" >/dev/null
echo "$deb"
