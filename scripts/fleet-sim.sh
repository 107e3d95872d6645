#!/usr/bin/env bash
# Fleet simulation: N agents (real Agent::cycle, real S3 source and Release/policy verification,
# real Fleet leases/halts/reports) in one process against moto's S3, dpkg replaced by an
# in-memory fake (benches/fleet_sim/). Publishes with the real `pulldeploy publish` and
# `pulldeploy rollout set`, then prints: time to converge per wave, nodes in flight vs the limit,
# how many nodes ran a bad version before its halt marker stopped the rest, S3 requests per node
# in steady state and their monthly cost, and the same without a policy.
#
#   scripts/fleet-sim.sh                 # 200 nodes, about 3 minutes once built
#   FLEET_NODES=1000 scripts/fleet-sim.sh
#
# Environment (defaults scale with FLEET_NODES so that moto sees ~80-100 polls/s):
#   FLEET_NODES=200            simulated nodes
#   FLEET_INTERVAL             poll interval in seconds (max(2, NODES/100))
#   FLEET_JITTER               jitter in seconds (INTERVAL/2)
#   FLEET_REPORT_INTERVAL      report_interval in seconds (5 x INTERVAL)
#   FLEET_WAVES                waves ("5%@0s,25%@<5 x INTERVAL>s,100%@<10 x INTERVAL>s")
#   FLEET_MAX_IN_FLIGHT=5      the policy's max_in_flight
#   FLEET_DRAIN=500ms          [health] drain: time a node is in flight before dpkg
#   FLEET_INSTALL_TIME=5ms     how long the fake dpkg takes
#   FLEET_GARBAGE_LEASE=0      bytes of junk written to lease slot 0 just before 1.1 is
#                              published (e.g. 2097152): the in-flight limit must still hold
#   FLEET_CLOCK_AHEAD=0s       one last-wave node's clock runs this far ahead (e.g. 2h): it must
#                              still wait for its wave
#   FLEET_PROFILE=release      release (cargo bench) or dev (faster to build, slower to run)
#   PULLDEPLOY_BIN             the publisher binary (default: built with the same profile)
#
# Needs python3 with moto[server] and boto3, gpg, dpkg-deb, curl (scripts/deps.sh). Everything
# lives in temp dirs (node state on /dev/shm when there is one), removed at exit; moto is stopped
# at exit. Figures on stdout, progress on stderr.
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lib="$here/scripts/bench_lib.py"
nodes="${FLEET_NODES:-200}"
profile="${FLEET_PROFILE:-release}"
bucket="pdsim"

t_start=$EPOCHREALTIME
say() { printf 'fleet-sim [%5.1fs]: %s\n' "$(( (10#${EPOCHREALTIME/./} - 10#${t_start/./}) / 100000 ))e-1" "$*" >&2; }
die() { printf 'fleet-sim: error: %s\n' "$*" >&2; exit 1; }

[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "FLEET_NODES must be a positive integer (got '$nodes')"
interval="${FLEET_INTERVAL:-$(( nodes / 100 > 2 ? nodes / 100 : 2 ))}"
[[ "$interval" =~ ^[1-9][0-9]*$ ]] || die "FLEET_INTERVAL must be whole seconds (got '$interval')"
jitter="${FLEET_JITTER:-$(( interval / 2 ))}"
report="${FLEET_REPORT_INTERVAL:-$(( 5 * interval ))}"
waves="${FLEET_WAVES:-5%@0s,25%@$(( 5 * interval ))s,100%@$(( 10 * interval ))s}"
max_in_flight="${FLEET_MAX_IN_FLIGHT:-5}"
drain="${FLEET_DRAIN:-500ms}"
install_time="${FLEET_INSTALL_TIME:-5ms}"
garbage_lease="${FLEET_GARBAGE_LEASE:-0}"   # bytes of junk in lease slot 0 before the rollout
clock_ahead="${FLEET_CLOCK_AHEAD:-0s}"      # one last-wave node's clock this far ahead
case "$profile" in release | dev) ;; *) die "FLEET_PROFILE is release or dev (got '$profile')" ;; esac

missing=()
for tool in python3 gpg gpgconf dpkg-deb curl cargo; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ! python3 -c 'import moto.server, boto3' >/dev/null 2>&1; then
  missing+=("python3 modules moto[server], boto3")
fi
((${#missing[@]} == 0)) || die "missing: ${missing[*]}; run scripts/deps.sh (as root) first"

# --- temp dirs, children, cleanup ----------------------------------------------------------------
tmp="$(mktemp -d /tmp/pdsim.XXXXXX)"  # short: gpg-agent's socket lives in GNUPGHOME
shm_parent=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && shm_parent=/dev/shm
work="$(mktemp -d "$shm_parent/pdsim-nodes.XXXXXX")"
moto_pid=""
sim_pid=""
cleanup() {
  local rc=$? i
  set +e
  trap - EXIT INT TERM
  [ -n "$sim_pid" ] && kill -TERM "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null
  if [ -n "$moto_pid" ]; then
    kill -TERM "$moto_pid" 2>/dev/null
    for i in $(seq 50); do kill -0 "$moto_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$moto_pid" 2>/dev/null
    wait "$moto_pid" 2>/dev/null
  fi
  [ -d "$tmp/g" ] && GNUPGHOME="$tmp/g" gpgconf --kill all >/dev/null 2>&1
  rm -rf "$tmp" "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

check() {  # WHAT CMD...: output to $tmp/last.{out,err}; on failure print both and exit
  local what=$1 rc=0
  shift
  "$@" >"$tmp/last.out" 2>"$tmp/last.err" || rc=$?
  if ((rc != 0)); then
    {
      printf 'fleet-sim: error: %s failed (exit %s)\n  command: %s\n' "$what" "$rc" "$*"
      tail -n 30 "$tmp/last.out"; tail -n 30 "$tmp/last.err"
    } >&2
    exit 1
  fi
}

# Every node's S3 connections are file descriptors here.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# --- build -----------------------------------------------------------------------------------------
# The bench binary, by its path (cargo's JSON messages name it).
executable() { python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"; }
say "building the simulation ($profile profile; the first release build takes minutes)"
cd "$here"
if [ "$profile" = release ]; then
  sim="$(cargo bench --locked --bench fleet_sim --no-run --message-format=json 2>"$tmp/build.err" | executable fleet_sim)" \
    || { tail -n 30 "$tmp/build.err" >&2; die "cargo bench --no-run failed"; }
  [ -n "${PULLDEPLOY_BIN:-}" ] || check "cargo build --release" cargo build --locked --release --bin pulldeploy
  bin="${PULLDEPLOY_BIN:-$here/target/release/pulldeploy}"
else
  sim="$(cargo build --locked --bench fleet_sim --message-format=json 2>"$tmp/build.err" | executable fleet_sim)" \
    || { tail -n 30 "$tmp/build.err" >&2; die "cargo build --bench failed"; }
  [ -n "${PULLDEPLOY_BIN:-}" ] || check "cargo build" cargo build --locked --bin pulldeploy
  bin="${PULLDEPLOY_BIN:-$here/target/debug/pulldeploy}"
fi
[ -x "$sim" ] || die "no simulation binary ($sim)"
[ -x "$bin" ] || die "no pulldeploy binary at $bin"

# Static credentials for moto; nothing from the host, no IMDS.
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/nonexistent/aws-credentials
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL AWS_REGION AWS_DEFAULT_REGION

# --- moto ------------------------------------------------------------------------------------------
say "starting moto"
mkdir -p "$tmp/moto"
# werkzeug logs every request to stderr: the simulation counts S3 requests there.
(cd "$tmp/moto" && PYTHONUNBUFFERED=1 exec python3 "$here/scripts/moto_server.py" -H 127.0.0.1 -p 0) \
  >"$tmp/moto.log" 2>&1 &
moto_pid=$!
moto_port=""
for _ in $(seq 600); do
  moto_port="$(sed -n 's/.*Running on http:\/\/127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$tmp/moto.log" | sed -n 1p)"
  [ -n "$moto_port" ] && break
  kill -0 "$moto_pid" 2>/dev/null || { cat "$tmp/moto.log" >&2; die "moto exited during startup"; }
  sleep 0.1
done
[ -n "$moto_port" ] || die "moto did not report its port within 60 s"
moto="http://127.0.0.1:$moto_port"
check "moto's first answer" curl -sf -o /dev/null "$moto/moto-api/data.json"
check "creating bucket $bucket" python3 "$lib" s3-setup "$moto_port" "$bucket"
moto_version="$(python3 -c 'import moto; print(moto.__version__)')"

# --- signing key, packages -------------------------------------------------------------------------
say "signing key and packages"
export GNUPGHOME="$tmp/g"
mkdir -m 700 "$GNUPGHOME"
gpg_() { gpg --batch --no-tty --yes --pinentry-mode loopback "$@"; }
check "gpg --quick-gen-key" gpg_ --passphrase '' --quick-gen-key "fleet sim <sim@localhost>" ed25519 sign never
fpr="$(gpg_ --with-colons --list-secret-keys 2>/dev/null | awk -F: '/^fpr:/ { print $10; exit }')"
[ -n "$fpr" ] || die "no fingerprint from gpg"
gpg_ --armor --export "$fpr" >"$tmp/public.asc"
gpg_ --passphrase '' --armor --export-secret-keys "$fpr" >"$tmp/signing.asc"

mkdir -p "$tmp/debs"
for version in 1.0 1.1 '1.2~bad'; do
  tree="$tmp/build/$version"
  mkdir -p "$tree/DEBIAN" "$tree/usr/share/myapp"
  printf 'Package: myapp\nVersion: %s\nArchitecture: amd64\nMaintainer: fleet sim <sim@localhost>\nInstalled-Size: 1\nDescription: fleet simulation package\n' \
    "$version" >"$tree/DEBIAN/control"
  echo "$version" >"$tree/usr/share/myapp/VERSION"
  check "dpkg-deb --build myapp $version" dpkg-deb --build --root-owner-group "$tree" "$tmp/debs/myapp_${version}_amd64.deb"
done

# The publisher, as an operator runs it: `publish SUITE DEB`.
cat >"$tmp/publish" <<SH
#!/bin/sh
exec "$bin" publish --repo "s3://$bucket/repo" --endpoint "$moto" --region us-east-1 \\
  --signing-key "$tmp/signing.asc" --suite "\$1" "\$2"
SH
chmod +x "$tmp/publish"

say "publishing myapp 1.0 to suites production (with a policy) and direct (without)"
check "publish 1.0 to production" "$tmp/publish" production "$tmp/debs/myapp_1.0_amd64.deb"
check "publish 1.0 to direct" "$tmp/publish" direct "$tmp/debs/myapp_1.0_amd64.deb"
check "rollout set" "$bin" rollout set --repo "s3://$bucket/repo" --endpoint "$moto" --region us-east-1 \
  --signing-key "$tmp/signing.asc" --suite production --waves "$waves" --max-in-flight "$max_in_flight"
say "rollout set: $(cat "$tmp/last.out")"

# --- the simulation --------------------------------------------------------------------------------
say "running $nodes nodes (interval ${interval}s + ${jitter}s jitter, waves $waves, max_in_flight $max_in_flight)"
"$sim" \
  --endpoint "$moto" --bucket "$bucket" --keyring "$tmp/public.asc" \
  --moto-log "$tmp/moto.log" --moto-pid "$moto_pid" \
  --publish "$tmp/publish" --debs "$tmp/debs" --workdir "$work" \
  --nodes "$nodes" --interval "${interval}s" --jitter "${jitter}s" --report-interval "${report}s" \
  --drain "$drain" --install-time "$install_time" \
  --garbage-lease-bytes "$garbage_lease" --clock-ahead "$clock_ahead" \
  --policy-suite production --waves "$waves" --max-in-flight "$max_in_flight" --direct-suite direct \
  --note "moto $moto_version (one python process, threaded werkzeug) on 127.0.0.1; node state on $shm_parent; $profile build" &
# In the background and waited for: bash runs the INT/TERM trap (which stops it) only between
# commands, never while a foreground child runs.
sim_pid=$!
wait "$sim_pid"
sim_pid=""
say "done"
