#!/bin/sh
# EC2 user-data for a Debian or Ubuntu node: install the pulldeploy agent
# from the repository bucket, write its config and keyring, start it. Runs
# once, at first boot, as root (cloud-init); its output goes to
# /var/log/cloud-init-output.log.
#
# The one-liner, on an AMI that has the aws CLI, an instance role that may
# s3:GetObject under the repository prefix (examples/iam-policy.json), and
# config.toml and keyring.asc already baked in /etc/pulldeploy:
#
#   aws s3 cp s3://acme-apt/repo/pool/main/p/pulldeploy/pulldeploy_0.1.0_amd64.deb /tmp/ \
#     && apt-get install -y /tmp/pulldeploy_0.1.0_amd64.deb && systemctl start pulldeploy
#
# This script is that line for stock AMIs, with what it leaves out:
#   - the agent's .deb comes from the repository's own pool (it is published
#     like any package), so the same least-privilege policy covers it; with
#     "pulldeploy" in PULLDEPLOY_PACKAGES the agent then keeps itself up to
#     date from the signed repository;
#   - no aws CLI needed (Debian and Ubuntu AMIs do not have one): without
#     it, curl signs the GET itself (SigV4, curl >= 7.75) with the instance
#     role's credentials from IMDSv2. A public or pre-signed https:// URL
#     in PULLDEPLOY_DEB_URL works too (pre-signed URLs expire: at most 7
#     days, less with role credentials, so not for a launch template that
#     lives for months);
#   - the .deb is checked against PULLDEPLOY_DEB_SHA256 before dpkg sees it
#     (the first install cannot be verified by the agent, which is not
#     there yet; pin the hash in the launch template);
#   - apt-get waits for dpkg's lock (cloud-init and unattended-upgrades may
#     hold it at first boot) and installs missing libraries from the
#     distribution;
#   - config.toml and keyring.asc are written from the variables below,
#     checked with `pulldeploy check-config`, and the service is started;
#     Type=notify makes `systemctl start` wait until /healthz listens.
#
# Settings: environment variables. The Terraform example
# (examples/terraform/main.tf) puts `export NAME='value'` lines in front of
# this file; they may also be edited below.
#
#   PULLDEPLOY_REPO_URL     s3://BUCKET/PREFIX of the repository (required;
#                           or file:///DIR for a repository on a local or
#                           mounted file system)
#   PULLDEPLOY_SUITE        suite to follow (default production)
#   PULLDEPLOY_PACKAGES     packages to run, space-separated (required), e.g.
#                           "myapp pulldeploy"
#   PULLDEPLOY_KEYRING_B64  base64 of the armored certificate(s) allowed to
#                           sign the repository (required; base64 -w0 key.asc)
#   PULLDEPLOY_DEB          the agent's .deb, relative to the repository
#                           (default pool/main/p/pulldeploy/pulldeploy_0.1.0_amd64.deb)
#   PULLDEPLOY_DEB_URL      or a full URL instead: s3://, https://, file://
#   PULLDEPLOY_DEB_SHA256   expected SHA-256 of the .deb (recommended)
#   PULLDEPLOY_REGION       bucket region (default: the instance's, from IMDS)
#   PULLDEPLOY_CHECK_URL    the app's health URL for health.check_url (optional)
#   PULLDEPLOY_HEALTH_LISTEN  health.listen, where /healthz answers (default
#                           0.0.0.0:9100, the agent's default)
#
# For tests and S3-compatible stores (never needed on EC2):
#   PULLDEPLOY_FLEET_URL    s3://BUCKET/PREFIX of the fleet prefix for rollouts
#                           ([fleet] url: leases, halt markers, reports; optional)
#   PULLDEPLOY_LAUNCH_HOOK  Auto Scaling lifecycle hook names ([lifecycle];
#   PULLDEPLOY_TERMINATE_HOOK   optional): CONTINUE after the first healthy
#                           commit / drain before termination
#   PULLDEPLOY_WEBHOOK      incoming-webhook URL for rollback, halt and failing
#                           messages ([notify]; optional)
#   PULLDEPLOY_S3_ENDPOINT  http(s)://HOST:PORT of an S3-compatible server,
#                           path-style; also written to the config
#   AWS_EC2_METADATA_SERVICE_ENDPOINT  IMDS base URL (the AWS SDKs' variable)
#   PULLDEPLOY_AWS_CLI      the aws CLI to use (default aws); empty: use curl
#   PULLDEPLOY_ROOT         install into this directory instead of / (dpkg
#                           --root, chrootless scripts); nothing is started
#   PULLDEPLOY_SYSTEMD_DIR  exists when systemd is PID 1 (default
#                           /run/systemd/system, as sd_booted(3) checks)
set -eu

repo_url="${PULLDEPLOY_REPO_URL:-}"
suite="${PULLDEPLOY_SUITE:-production}"
packages="${PULLDEPLOY_PACKAGES:-}"
keyring_b64="${PULLDEPLOY_KEYRING_B64:-}"
deb_path="${PULLDEPLOY_DEB:-pool/main/p/pulldeploy/pulldeploy_0.1.0_amd64.deb}"
deb_url="${PULLDEPLOY_DEB_URL:-}"
deb_sha256="${PULLDEPLOY_DEB_SHA256:-}"
region="${PULLDEPLOY_REGION:-}"
config_region="$region" # only what was set goes to the config (else the agent asks IMDS)
check_url="${PULLDEPLOY_CHECK_URL:-}"
health_listen="${PULLDEPLOY_HEALTH_LISTEN:-}"
fleet_url="${PULLDEPLOY_FLEET_URL:-}"
launch_hook="${PULLDEPLOY_LAUNCH_HOOK:-}"
terminate_hook="${PULLDEPLOY_TERMINATE_HOOK:-}"
webhook="${PULLDEPLOY_WEBHOOK:-}"
endpoint="${PULLDEPLOY_S3_ENDPOINT:-}"
imds="${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}"
aws_cli="${PULLDEPLOY_AWS_CLI-aws}"
root="${PULLDEPLOY_ROOT:-/}"
systemd_dir="${PULLDEPLOY_SYSTEMD_DIR:-/run/systemd/system}"

say() { echo "user-data: $*"; }
die() {
    echo "user-data: $*" >&2
    exit 1
}

[ -n "$repo_url" ] || die "PULLDEPLOY_REPO_URL is not set (s3://BUCKET/PREFIX)"
[ -n "$packages" ] || die "PULLDEPLOY_PACKAGES is not set (e.g. \"myapp pulldeploy\")"
[ -n "$keyring_b64" ] || die "PULLDEPLOY_KEYRING_B64 is not set (base64 -w0 keyring.asc)"
case "$repo_url" in s3://?* | file:///*) ;; *) die "PULLDEPLOY_REPO_URL must be s3://BUCKET[/PREFIX] or file:///DIR, not $repo_url" ;; esac
[ -n "$deb_url" ] || deb_url="${repo_url%/}/$deb_path"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Readable by apt's unprivileged download user (_apt), which apt-get uses
# even for a local file.
chmod 0755 "$work"
deb="$work/pulldeploy.deb"

# ---- 1. download the agent's .deb ----------------------------------------------

imds_get() { # PATH: one IMDSv2 GET with the session token
    curl -fsS --retry 5 --retry-connrefused -H "X-aws-ec2-metadata-token: $imds_token" "$imds/latest/$1"
}

json_field() { # NAME: the string value of NAME in the JSON on stdin
    sed -n "s/.*\"$1\" *: *\"\([^\"]*\)\".*/\1/p" | head -n 1
}

s3_get_with_curl() { # BUCKET KEY FILE: SigV4-signed GET with the instance role's credentials
    # IMDSv2 only: a session token first (a GET without one is IMDSv1).
    imds_token="$(curl -fsS --retry 5 --retry-connrefused -X PUT \
        -H "X-aws-ec2-metadata-token-ttl-seconds: 300" "$imds/latest/api/token")" ||
        die "no IMDSv2 token from $imds"
    role="$(imds_get meta-data/iam/security-credentials/)" && role="$(echo "$role" | head -n 1)" &&
        [ -n "$role" ] || die "no instance role: attach an instance profile that may s3:GetObject under $repo_url"
    credentials="$(imds_get "meta-data/iam/security-credentials/$role")" ||
        die "no credentials for role $role from IMDS"
    access_key="$(echo "$credentials" | json_field AccessKeyId)"
    secret_key="$(echo "$credentials" | json_field SecretAccessKey)"
    session_token="$(echo "$credentials" | json_field Token)"
    [ -n "$access_key" ] && [ -n "$secret_key" ] || die "IMDS credentials for role $role have no keys"
    [ -n "$region" ] || region="$(imds_get meta-data/placement/region)" || die "no region: set PULLDEPLOY_REGION"
    # Keys of pool files are [A-Za-z0-9._+~/-]; '+' must be sent as %2B.
    key="$(printf '%s' "$2" | sed 's/+/%2B/g')"
    if [ -n "$endpoint" ]; then
        url="${endpoint%/}/$1/$key"
    else
        url="https://$1.s3.$region.amazonaws.com/$key"
    fi
    # Secrets go to curl on stdin (-K -), not on its command line, where
    # any local user could read them in /proc. The payload hash is the
    # SHA-256 of the empty body of a GET.
    curl -fsS --retry 5 --retry-connrefused -K - -o "$3" "$url" <<EOF || die "GET $url failed"
aws-sigv4 = "aws:amz:$region:s3"
user = "$access_key:$secret_key"
header = "x-amz-security-token: $session_token"
header = "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
EOF
}

case "$deb_url" in
s3://*)
    bucket_and_key="${deb_url#s3://}"
    bucket="${bucket_and_key%%/*}"
    key="${bucket_and_key#*/}"
    if [ -n "$aws_cli" ] && command -v "$aws_cli" >/dev/null 2>&1; then
        say "downloading $deb_url (aws CLI)"
        set -- s3 cp --only-show-errors
        [ -z "$endpoint" ] || set -- "$@" --endpoint-url "$endpoint"
        [ -z "$region" ] || set -- "$@" --region "$region"
        "$aws_cli" "$@" "$deb_url" "$deb" || die "aws s3 cp $deb_url failed"
    else
        say "downloading $deb_url (curl, SigV4 with the instance role from IMDSv2)"
        s3_get_with_curl "$bucket" "$key" "$deb"
    fi
    ;;
https://* | http://* | file://*)
    say "downloading $deb_url (curl)"
    curl -fsS --retry 5 --retry-connrefused -o "$deb" "$deb_url" || die "download of $deb_url failed"
    ;;
*) die "PULLDEPLOY_DEB_URL must be s3://, https://, http:// or file://, not $deb_url" ;;
esac

if [ -n "$deb_sha256" ]; then
    actual="$(sha256sum "$deb" | cut -d ' ' -f 1)"
    [ "$actual" = "$deb_sha256" ] ||
        die "$deb_url has SHA-256 $actual, expected $deb_sha256: not installing it"
else
    say "warning: PULLDEPLOY_DEB_SHA256 is not set; installing $deb_url unverified"
fi
chmod 0644 "$deb"

# ---- 2. install it ---------------------------------------------------------------

if [ "$root" = / ]; then
    # apt-get, not dpkg -i: it waits for the dpkg lock and installs missing
    # libraries from the distribution (refreshing the lists only if needed).
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 \
            -o Dpkg::Options::=--force-confold install --no-install-recommends "$deb"
    }
    apt_install || { apt-get -q -o DPkg::Lock::Timeout=600 update && apt_install; } ||
        die "installing $deb_url failed"
else
    # A sandbox root (tests): dpkg as the tests use it. The sandbox has no
    # libc6 or libnettle8 of its own, so dependencies are not enforced; the
    # binary runs with the host's libraries. (To bake an image, run this
    # script inside the image's chroot with the default root instead.)
    mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/var/lib/dpkg/triggers" "$root/var/log"
    [ -e "$root/var/lib/dpkg/status" ] || : >"$root/var/lib/dpkg/status"
    DEBIAN_FRONTEND=noninteractive dpkg --root="$root" --log="$root/var/log/dpkg.log" \
        --force-script-chrootless --force-not-root --force-depends --force-confold \
        -i "$deb" || die "dpkg -i $deb_url into $root failed"
fi
say "installed $("${root%/}/usr/bin/pulldeploy" --version)"

# ---- 3. config and keyring -------------------------------------------------------

etc="${root%/}/etc/pulldeploy"
mkdir -p "$etc"
printf '%s' "$keyring_b64" | base64 -d >"$etc/keyring.asc.new" || die "PULLDEPLOY_KEYRING_B64 is not base64"
chmod 0644 "$etc/keyring.asc.new"
mv -f "$etc/keyring.asc.new" "$etc/keyring.asc"

# Values go into TOML strings: no quotes, backslashes or control characters.
for value in "$repo_url" "$suite" "$endpoint" "$config_region" "$check_url" "$health_listen" \
    "$fleet_url" "$launch_hook" "$terminate_hook" "$webhook"; do
    case "$value" in *[\"\\]* | *[![:print:]]*) die "refusing to write $value into the config" ;; esac
done
toml_list=""
for package in $packages; do
    case "$package" in *[!a-z0-9+.=:~_-]*) die "PULLDEPLOY_PACKAGES: $package is not NAME or NAME=VERSION" ;; esac
    toml_list="$toml_list${toml_list:+, }\"$package\""
done
{
    echo "# Written by the EC2 user-data at first boot (examples/user-data.sh)."
    echo "[repository]"
    echo "url = \"$repo_url\""
    echo "suite = \"$suite\""
    # Relative: next to this file, also when installed under PULLDEPLOY_ROOT.
    echo "keyring = \"keyring.asc\""
    [ -z "$config_region" ] || echo "region = \"$config_region\""
    [ -z "$endpoint" ] || echo "endpoint = \"$endpoint\""
    echo
    echo "[agent]"
    echo "packages = [$toml_list]"
    if [ -n "$check_url" ] || [ -n "$health_listen" ]; then
        echo
        echo "[health]"
        [ -z "$check_url" ] || echo "check_url = \"$check_url\""
        [ -z "$health_listen" ] || echo "listen = \"$health_listen\""
    fi
    if [ -n "$fleet_url" ]; then
        echo
        echo "[fleet]"
        echo "url = \"$fleet_url\""
    fi
    if [ -n "$launch_hook" ] || [ -n "$terminate_hook" ]; then
        echo
        echo "[lifecycle]"
        [ -z "$launch_hook" ] || echo "launch_hook = \"$launch_hook\""
        [ -z "$terminate_hook" ] || echo "terminate_hook = \"$terminate_hook\""
    fi
    if [ -n "$webhook" ]; then
        echo
        echo "[notify]"
        echo "webhook = \"$webhook\""
    fi
} >"$etc/config.toml.new"
chmod 0644 "$etc/config.toml.new"
mv -f "$etc/config.toml.new" "$etc/config.toml"
"${root%/}/usr/bin/pulldeploy" check-config --config "$etc/config.toml" ||
    die "the config written to $etc/config.toml is refused (above)"

# ---- 4. start ----------------------------------------------------------------------

start="systemctl enable pulldeploy.service && systemctl restart pulldeploy.service"
if [ ! -d "$systemd_dir" ]; then
    # A container, a chroot while an image is baked, or a test.
    say "systemd is not running ($systemd_dir does not exist): not starting pulldeploy.service; would run: $start"
    [ "$root" != / ] || say "the package enabled pulldeploy.service: it starts at the next boot"
elif [ "$root" != / ]; then
    say "installed into $root (a sandbox root): not starting pulldeploy.service; would run: $start"
else
    # restart, not start: if user-data runs again, the agent rereads the
    # config. Type=notify: this returns once /healthz listens.
    systemctl enable pulldeploy.service
    systemctl restart pulldeploy.service || {
        systemctl status --no-pager pulldeploy.service || true
        die "pulldeploy.service did not become ready"
    }
    say "pulldeploy.service is $(systemctl is-active pulldeploy.service)"
fi
