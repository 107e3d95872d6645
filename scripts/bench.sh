#!/usr/bin/env bash
# Benchmark: pulldeploy against apt-get (and against the curl + dpkg floor) on the SAME signed
# repository, published by aptly into moto's S3, in the same run, all on 127.0.0.1.
#
#   scripts/bench.sh
#
# Environment:
#   BENCH_RUNS=5          runs per measurement (figures are medians, with min-max)
#   BENCH_CPU_SECONDS=30  how long `pulldeploy run` polls an unchanged repository for the CPU,
#                         IMDS and idle-RSS figures (interval 1s: about one cycle per second)
#   PULLDEPLOY_BIN=PATH   the binary to measure (default: target/release/pulldeploy)
#
# Needs: python3 with moto[server] and boto3, aptly, gpg, dpkg-deb, apt-get, curl
# (scripts/deps.sh installs them). Everything lives in one temp dir under /tmp, removed at
# exit; every server and agent started here is stopped at exit. The report goes to stdout,
# progress to stderr. Exit 0 when everything was measured (a missed target is printed as MISS,
# not an error); non-zero when a step failed.
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lib="$here/scripts/bench_lib.py"
runs="${BENCH_RUNS:-5}"
cpu_seconds="${BENCH_CPU_SECONDS:-30}"
bin="${PULLDEPLOY_BIN:-$here/target/release/pulldeploy}"
bucket="pdbench"
prefix="repo"

bench_t0=$EPOCHREALTIME
say() { printf 'bench [%5.1fs]: %s\n' "$(( (10#${EPOCHREALTIME/./} - 10#${bench_t0/./}) / 100000 ))e-1" "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }

[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer (got '$runs')"
[[ "$cpu_seconds" =~ ^[1-9][0-9]*$ ]] || die "BENCH_CPU_SECONDS must be a positive integer (got '$cpu_seconds')"
((BASH_VERSINFO[0] >= 5)) || die "bash >= 5 needed (EPOCHREALTIME)"

# --- tools ---------------------------------------------------------------------------------------
missing=()
for tool in python3 aptly gpg gpgconf dpkg dpkg-deb dpkg-query apt-get curl getconf gzip; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import moto.server, boto3, werkzeug' >/dev/null 2>&1; then
  missing+=("python3 modules moto[server], boto3")
fi
((${#missing[@]} == 0)) || die "missing: ${missing[*]}; run scripts/deps.sh (as root) first"
[ -f "$lib" ] || die "missing $lib"
[ -f "$here/scripts/moto_server.py" ] || die "missing $here/scripts/moto_server.py"
[ -x "$bin" ] || die "no pulldeploy binary at $bin: run 'cargo build --release --locked' (or set PULLDEPLOY_BIN)"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
bin_real="$(readlink -f "$bin")"
bin_bytes=$(stat -c %s "$bin_real")
# dpkg wants ldconfig and start-stop-daemon on PATH.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin" ;; esac
case ":$PATH:" in *:/sbin:*) ;; *) PATH="$PATH:/sbin" ;; esac
export PATH

# --- temp dir, children, cleanup -----------------------------------------------------------------
# Under /tmp with a short name: gpg-agent's socket lives in GNUPGHOME (sockaddr_un is 108 bytes).
tmp="$(mktemp -d /tmp/pdbench.XXXXXX)"
pids=()
cleanup() {
  local rc=$? pid i
  set +e
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for i in $(seq 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  # Safety net: any process of ours still running with this run's temp dir on its command line
  # (the path is unique to this run), killed by pid.
  for pid in $(grep -lsF "$tmp/" /proc/[0-9]*/cmdline | sed 's|/proc/\([0-9]*\)/cmdline|\1|'); do
    [ "$pid" != "$$" ] && kill -KILL "$pid" 2>/dev/null
  done
  [ -d "$tmp/g" ] && GNUPGHOME="$tmp/g" gpgconf --kill all >/dev/null 2>&1
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget_pid() {  # drop $1 from pids
  local keep=() p
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

stop_pid() {  # TERM, wait up to 10 s, KILL
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

# check WHAT CMD...: run CMD with output in $tmp/last.{out,err}; on failure print both and exit.
check() {
  local what=$1 rc=0
  shift
  "$@" >"$tmp/last.out" 2>"$tmp/last.err" || rc=$?
  if ((rc != 0)); then
    {
      printf 'bench: error: %s failed (exit %s)\n  command: %s\n' "$what" "$rc" "$*"
      printf -- '--- stdout (tail) ---\n'; tail -n 30 "$tmp/last.out"
      printf -- '--- stderr (tail) ---\n'; tail -n 30 "$tmp/last.err"
    } >&2
    exit 1
  fi
}

us_since() { local t=$EPOCHREALTIME; echo $((10#${t/./} - 10#${1/./})); }  # microseconds since $1

stats() { python3 "$lib" stats "$@"; }  # -> "median min max"
fmt_ms() { awk -v v="$1" 'BEGIN { printf "%.1f ms", v / 1000 }'; }         # us -> "12.3 ms"
fmt_range_ms() { awk -v a="$2" -v b="$3" -v m="$1" 'BEGIN { printf "%.1f ms (%.1f-%.1f)", m/1000, a/1000, b/1000 }'; }
fmt_range_s() { awk -v a="$2" -v b="$3" -v m="$1" 'BEGIN { printf "%.3f s (%.3f-%.3f)", m/1e6, a/1e6, b/1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "inf"; else printf "%.2f", a / b }'; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a <= b) }'; }

verdicts=()
verdict() {  # VAR NAME PASS(0/1): VAR=PASS/MISS, remembered for the summary
  if [ "$3" = 1 ]; then printf -v "$1" PASS; else printf -v "$1" MISS; fi
  verdicts+=("${!1}  $2")
}

load_start="$(cut -d' ' -f1-3 /proc/loadavg)"

# --- moto ----------------------------------------------------------------------------------------
say "starting moto"
mkdir -p "$tmp/moto" "$tmp/home"
: >"$tmp/empty"
(cd "$tmp/moto" && PYTHONUNBUFFERED=1 exec python3 "$here/scripts/moto_server.py" -H 127.0.0.1 -p 0) \
  >"$tmp/moto.log" 2>&1 &
moto_pid=$!
pids+=("$moto_pid")
moto_port=""
for _ in $(seq 600); do
  moto_port="$(sed -n 's/.*Running on http:\/\/127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$tmp/moto.log" | sed -n 1p)"
  [ -n "$moto_port" ] && break
  kill -0 "$moto_pid" 2>/dev/null || { cat "$tmp/moto.log" >&2; die "moto exited during startup (is moto[server] installed? scripts/deps.sh)"; }
  sleep 0.1
done
[ -n "$moto_port" ] || { tail -n 20 "$tmp/moto.log" >&2; die "moto did not report its port within 60 s"; }
moto="http://127.0.0.1:$moto_port"
case "$(readlink "/proc/$moto_pid/exe" 2>/dev/null)" in
  *python*) ;;
  *) die "moto's pid $moto_pid is not python: cannot stop it reliably" ;;
esac
check "moto's first answer" curl -sf -o /dev/null "$moto/moto-api/data.json"
check "creating bucket $bucket with an anonymous-read policy" python3 "$lib" s3-setup "$moto_port" "$bucket"

# --- signing key ---------------------------------------------------------------------------------
say "generating an ed25519 signing key"
export GNUPGHOME="$tmp/g"
mkdir -m 700 "$GNUPGHOME"
gpg_() { gpg --batch --no-tty --yes --pinentry-mode loopback "$@"; }
check "gpg --quick-gen-key" gpg_ --passphrase '' --quick-gen-key "pulldeploy bench <bench@localhost>" ed25519 sign never
fpr="$(gpg_ --with-colons --list-secret-keys 2>/dev/null | awk -F: '/^fpr:/ { print $10; exit }')"
[ -n "$fpr" ] || die "no fingerprint from gpg --list-secret-keys"
gpg_ --armor --export "$fpr" >"$tmp/public.asc" || die "gpg --export failed"

# --- packages ------------------------------------------------------------------------------------
build_deb() {  # NAME VERSION PAYLOAD_MIB DPKG_DEB_COMPRESSION_ARGS... -> $tmp/debs/NAME_VERSION_amd64.deb
  local name=$1 version=$2 mib=$3 tree="$tmp/build/$1"
  shift 3
  mkdir -p "$tree/DEBIAN" "$tree/usr/share/$name" "$tmp/debs"
  chmod 755 "$tree" "$tree/DEBIAN" "$tree/usr" "$tree/usr/share" "$tree/usr/share/$name"
  cat >"$tree/DEBIAN/control" <<CONTROL
Package: $name
Version: $version
Architecture: amd64
Maintainer: pulldeploy bench <bench@localhost>
Section: misc
Priority: optional
Installed-Size: $((mib * 1024 + 1))
Description: pulldeploy benchmark package ($mib MiB of random data)
 built by scripts/bench.sh
CONTROL
  echo "$version" >"$tree/usr/share/$name/VERSION"
  head -c $((mib * 1024 * 1024)) /dev/urandom >"$tree/usr/share/$name/payload"
  chmod 644 "$tree/DEBIAN/control" "$tree/usr/share/$name/VERSION" "$tree/usr/share/$name/payload"
  check "dpkg-deb --build $name" dpkg-deb --build --root-owner-group "$@" "$tree" "$tmp/debs/${name}_${version}_amd64.deb"
  rm -rf "$tree"
}
say "building benchapp (20 MiB) and bigapp (200 MiB)"
# Random data does not compress: gzip -1 only frames it. bigapp is not compressed at all (gzip
# would take ~5 s to build it, and its figure is memory, not time).
build_deb benchapp 1.0 20 -Zgzip -z1
build_deb bigapp 1.0 200 -Znone

# --- aptly publishes straight to moto's S3 ------------------------------------------------------
say "publishing with aptly to s3://$bucket/$prefix"
mkdir -p "$tmp/aptly/home"
cat >"$tmp/aptly/aptly.conf" <<JSON
{
  "rootDir": "$tmp/aptly/root",
  "architectures": [],
  "dependencyFollowSuggests": false,
  "dependencyFollowRecommends": false,
  "gpgDisableSign": false,
  "gpgDisableVerify": false,
  "gpgProvider": "gpg",
  "downloadSourcePackages": false,
  "S3PublishEndpoints": {
    "bench": {
      "region": "us-east-1",
      "bucket": "$bucket",
      "endpoint": "$moto",
      "awsAccessKeyID": "test",
      "awsSecretAccessKey": "test",
      "prefix": "",
      "acl": "private",
      "forceSigV2": false,
      "forceVirtualHostedStyle": false,
      "debug": false
    }
  }
}
JSON
aptly_() { env -i PATH="$PATH" HOME="$tmp/aptly/home" GNUPGHOME="$GNUPGHOME" LC_ALL=C aptly -config="$tmp/aptly/aptly.conf" "$@"; }
check "aptly repo create" aptly_ repo create -component=main bench
check "aptly repo add" aptly_ repo add bench "$tmp/debs/benchapp_1.0_amd64.deb" "$tmp/debs/bigapp_1.0_amd64.deb"
t0=$EPOCHREALTIME
check "aptly publish repo" aptly_ publish repo -batch -gpg-key="$fpr" -distribution=production \
  -component=main -architectures=amd64,all bench "s3:bench:$prefix"
publish_us=$(us_since "$t0")
repo_http="$moto/$bucket/$prefix"
check "reading the published Packages index anonymously" \
  curl -sf -o "$tmp/Packages" "$repo_http/dists/production/main/binary-amd64/Packages"
benchapp_path="$(awk '/^Package: /{p=$2} /^Filename: /{ if (p=="benchapp") print $2 }' "$tmp/Packages")"
[ -n "$benchapp_path" ] || die "benchapp not in the published Packages index"
deb_bytes=$(stat -c %s "$tmp/debs/benchapp_1.0_amd64.deb")
big_bytes=$(stat -c %s "$tmp/debs/bigapp_1.0_amd64.deb")
rm -f "$tmp/debs/"*.deb  # moto holds them now

# --- nodes, sandbox roots, apt sandboxes ---------------------------------------------------------
mkroot() {  # DIR: an empty dpkg root
  mkdir -p "$1/var/lib/dpkg/info" "$1/var/lib/dpkg/updates" "$1/var/lib/dpkg/triggers" "$1/var/log"
  chmod 755 "$1"
  : >"$1/var/lib/dpkg/status"
}

installed_ok() {  # ROOT PKG: dpkg says "ii"
  [ "$(dpkg-query --admindir="$1/var/lib/dpkg" -W -f='${db:Status-Abbrev}' "$2" 2>/dev/null)" = "ii " ]
}

node_config() {  # NODEDIR PKG ENDPOINT FILE
  cat >"$4" <<TOML
[repository]
url = "s3://$bucket/$prefix"
endpoint = "$3"
region = "us-east-1"
suite = "production"
architecture = "amd64"
keyring = "$tmp/public.asc"

[agent]
packages = ["$2"]
interval = "1s"
jitter = "0s"
state_dir = "$1/state"
cache_dir = "$1/cache"

[install]
root = "$1/root"

[health]
listen = "127.0.0.1:0"
TOML
}

mknode() {  # NAME PKG -> node dir (fresh root, no state, no cache), config.toml against moto
  local dir="$tmp/nodes/$1"
  mkdir -p "$dir"
  mkroot "$dir/root"
  node_config "$dir" "$2" "$moto" "$dir/config.toml"
  echo "$dir"
}

# pd IMDS_ENDPOINT LOGLEVEL ARGS...: the agent with credentials only from IMDS.
pd() {
  local imds=$1 level=$2
  shift 2
  env -i PATH="$PATH" HOME="$tmp/home" AWS_EC2_METADATA_SERVICE_ENDPOINT="$imds" \
    AWS_CONFIG_FILE="$tmp/empty" AWS_SHARED_CREDENTIALS_FILE="$tmp/empty" \
    PULLDEPLOY_LOG="$level" "$bin" "$@"
}

mkapt() {  # NAME -> apt node dir with its own root at NODE/root (as AptSandbox in tests/common/apt.rs)
  local n="$tmp/apt/$1" arch
  mkdir -p "$n/etc/apt.conf.d" "$n/empty" "$n/state/lists/partial" "$n/cache/archives/partial" "$n/log"
  mkroot "$n/root"
  arch="$(dpkg --print-architecture)"
  cat >"$n/apt.conf" <<CONF
Dir::Etc::main "$n/empty/apt.conf";
Dir::Etc::Parts "$n/etc/apt.conf.d";
Dir::Etc::SourceList "$n/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::Etc::Preferences "/nonexistent";
Dir::Etc::PreferencesParts "$n/empty";
Dir::Etc::Trusted "/nonexistent";
Dir::Etc::TrustedParts "$n/empty";
Dir::Etc::netrc "/nonexistent";
Dir::Etc::netrcparts "$n/empty";
Dir::State "$n/state/";
Dir::State::Lists "$n/state/lists/";
Dir::State::status "$n/root/var/lib/dpkg/status";
Dir::Cache "$n/cache/";
Dir::Log "$n/log/";
APT::Architecture "$arch";
APT::Architectures { "$arch"; };
APT::Sandbox::User "root";
Acquire::Languages "none";
Acquire::Retries "0";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dpkg::Use-Pty "false";
Dpkg::Progress-Fancy "false";
DPkg::Options { "--root=$n/root"; "--log=$n/root/var/log/dpkg.log"; "--force-script-chrootless"; "--force-not-root"; };
CONF
  echo "deb [signed-by=$tmp/public.asc] $repo_http production main" >"$n/sources.list"
  echo "$n"
}

apt_() {  # APTNODE ARGS...
  local n=$1
  shift
  env -i PATH="$PATH" HOME="$n" APT_CONFIG="$n/apt.conf" LC_ALL=C DEBIAN_FRONTEND=noninteractive apt-get -q "$@"
}

get() { sed -n "s/^$1=//p" "$tmp/poll.sum"; }  # a value from summarize-poll
access_count() { python3 "$lib" access-count "$tmp/moto.log"; }
access_since() { python3 "$lib" access-since "$tmp/moto.log" "$1"; }

s3_request_list() {  # access lines on stdin -> "N: METHOD key STATUS, ..." (S3 only, prefix cut)
  awk -v pre="/$bucket/$prefix/" '$2 !~ /^\/latest\// {
      p = $2; sub(/\?.*/, "", p); if (index(p, pre) == 1) p = substr(p, length(pre) + 1)
      out = out (n++ ? ", " : "") $1 " " p " " $3
    } END { printf "%d: %s", n, out }'
}

proc_cpu_ticks() {  # PID -> "utime+stime cutime+cstime" (clock ticks)
  sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13, $14 + $15 }'
}
proc_kib() {  # PID FIELD -> kB
  awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

# start_run CONFIG LOG: `pulldeploy run` (PULLDEPLOY_LOG=info) in the background, its pid in
# $run_pid; returns once it logged that it serves /healthz.
start_run() {
  local pid exe
  # Not through the pd function: a backgrounded function runs in a forked bash, and $! would be
  # that bash, not the agent. `env` execs the agent, so $! is the agent's pid.
  env -i PATH="$PATH" HOME="$tmp/home" AWS_EC2_METADATA_SERVICE_ENDPOINT="$moto" \
    AWS_CONFIG_FILE="$tmp/empty" AWS_SHARED_CREDENTIALS_FILE="$tmp/empty" \
    PULLDEPLOY_LOG=info "$bin" run --config "$1" </dev/null >/dev/null 2>"$2" &
  pid=$!
  pids+=("$pid")
  run_pid=$pid
  for _ in $(seq 300); do
    grep -q 'serving /healthz addr=127.0.0.1:' "$2" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat "$2" >&2; die "pulldeploy run exited during startup"; }
    sleep 0.1
  done
  grep -q 'serving /healthz addr=127.0.0.1:' "$2" || { cat "$2" >&2; die "pulldeploy run did not log 'serving /healthz' within 30 s"; }
  # The /proc figures below must be the agent's own.
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  [ "$exe" = "$bin_real" ] || die "pid $pid is '$exe', not the agent $bin_real: refusing to measure the wrong process"
}

# ================================================================================================
# 1. Unchanged poll
# ================================================================================================
say "1. unchanged poll: preparing an up-to-date node and an up-to-date apt"
steady="$(mknode steady benchapp)"
check "pulldeploy once (first install on the steady node)" pd "$moto" warn once --config "$steady/config.toml"
grep -q '^installed benchapp' "$tmp/last.out" || die "first pulldeploy once printed '$(cat "$tmp/last.out")', expected 'installed benchapp ...'"
installed_ok "$steady/root" benchapp || die "benchapp not installed (ii) in the steady node's root after pulldeploy once"
steady_apt="$(mkapt steady)"
check "apt-get update (steady apt)" apt_ "$steady_apt" update
check "apt-get install benchapp (steady apt)" apt_ "$steady_apt" -y install benchapp
installed_ok "$steady_apt/root" benchapp || die "benchapp not installed (ii) by apt-get"

# 1a: through a byte-counting proxy (S3 and IMDS), requests counted in moto's own access log.
python3 "$lib" proxy "$moto_port" "$tmp/proxy.log" >"$tmp/proxy.out" 2>"$tmp/proxy.err" &
proxy_pid=$!
pids+=("$proxy_pid")
proxy_port=""
for _ in $(seq 100); do
  proxy_port="$(sed -n 's/^listening \([0-9][0-9]*\)$/\1/p' "$tmp/proxy.out")"
  [ -n "$proxy_port" ] && break
  kill -0 "$proxy_pid" 2>/dev/null || { cat "$tmp/proxy.err" >&2; die "the counting proxy exited"; }
  sleep 0.1
done
[ -n "$proxy_port" ] || die "the counting proxy did not start"
proxy="http://127.0.0.1:$proxy_port"
: >>"$tmp/proxy.log"
node_config "$steady" benchapp "$proxy" "$steady/config-proxy.toml"
check "pulldeploy once (warm-up through the proxy)" pd "$proxy" warn once --config "$steady/config-proxy.toml"
warmup_out="$(cat "$tmp/last.out")"

say "1a. requests and bytes of one unchanged 'pulldeploy once' ($runs runs)"
a_req=() a_body=() a_imds=() a_imds_body=() a_status_ok=1 a_outputs=""
for i in $(seq "$runs"); do
  m=$(access_count)
  p=$(wc -l <"$tmp/proxy.log")
  check "pulldeploy once (unchanged, through the proxy)" pd "$proxy" warn once --config "$steady/config-proxy.toml"
  out="$(cat "$tmp/last.out")"
  a_outputs+="$out;"
  access_since "$m" >"$tmp/poll.moto"
  python3 "$lib" proxy-since "$tmp/proxy.log" "$p" >"$tmp/poll.proxy"
  python3 "$lib" summarize-poll "$tmp/poll.moto" "$tmp/poll.proxy" >"$tmp/poll.sum"
  a_req+=("$(get s3_requests)")
  a_body+=("$(get s3_body_bytes)")
  a_imds+=("$(get imds_requests)")
  a_imds_body+=("$(get imds_body_bytes)")
  [ "$(get s3_statuses)" = 304 ] || a_status_ok=0
  [ "$out" = unchanged ] || a_status_ok=0
  a_last_paths="$(get s3_paths)"
  a_last_imds="$(get imds_paths)"
done
stop_pid "$proxy_pid"

say "1b. wall time: unchanged 'pulldeploy once' vs unchanged 'apt-get update' ($runs runs each)"
b_pd=() b_apt=() b_apt_req=()
for i in $(seq "$runs"); do
  t0=$EPOCHREALTIME
  check "pulldeploy once (unchanged)" pd "$moto" warn once --config "$steady/config.toml"
  b_pd+=("$(us_since "$t0")")
  [ "$(cat "$tmp/last.out")" = unchanged ] || die "unchanged pulldeploy once printed '$(cat "$tmp/last.out")'"
  m=$(access_count)
  t0=$EPOCHREALTIME
  check "apt-get update (up to date)" apt_ "$steady_apt" update
  b_apt+=("$(us_since "$t0")")
  b_apt_req+=("$(access_since "$m" | grep -vc ' /latest/' || true)")
done

say "1c. 'pulldeploy run' on the up-to-date node for ${cpu_seconds}s (CPU, IMDS, idle RSS)"
clk_tck=$(getconf CLK_TCK)
m_start=$(access_count)
start_run "$steady/config.toml" "$tmp/run-steady.log"
rss_startup=$(proc_kib "$run_pid" VmRSS)
first_cycle=0
for _ in $(seq 300); do
  if access_since "$m_start" | grep -q "/dists/production/InRelease"; then first_cycle=1; break; fi
  kill -0 "$run_pid" 2>/dev/null || { cat "$tmp/run-steady.log" >&2; die "pulldeploy run exited"; }
  sleep 0.1
done
((first_cycle)) || { cat "$tmp/run-steady.log" >&2; die "pulldeploy run made no request for InRelease within 30 s"; }
sleep 0.5  # let the first cycle finish
rss_window_start=$(proc_kib "$run_pid" VmRSS)
m0=$(access_count)
read -r cpu0 ccpu0 < <(proc_cpu_ticks "$run_pid")
python3 "$lib" thread-ns "$run_pid" >"$tmp/ns0"
sleep "$cpu_seconds"
read -r cpu1 ccpu1 < <(proc_cpu_ticks "$run_pid")
python3 "$lib" thread-ns "$run_pid" >"$tmp/ns1"
access_since "$m0" >"$tmp/window.moto"
kill -0 "$run_pid" 2>/dev/null || { cat "$tmp/run-steady.log" >&2; die "pulldeploy run died during the CPU window"; }
idle_rss=$(proc_kib "$run_pid" VmRSS)
idle_hwm=$(proc_kib "$run_pid" VmHWM)
idle_threads=$(proc_kib "$run_pid" Threads)
idle_anon=$(proc_kib "$run_pid" RssAnon)
idle_file=$(proc_kib "$run_pid" RssFile)
stop_pid "$run_pid"
access_since "$m_start" >"$tmp/run.moto"
c_cycles=$(grep -c "/dists/production/InRelease" "$tmp/window.moto" || true)
c_s3=$(grep -vc ' /latest/' "$tmp/window.moto" || true)
c_non304=$(grep -v ' /latest/' "$tmp/window.moto" | grep -vc ' 304$' || true)
c_imds_window=$(grep -c ' /latest/' "$tmp/window.moto" || true)
c_imds_total=$(grep -c ' /latest/' "$tmp/run.moto" || true)
c_imds_paths="$({ grep ' /latest/' "$tmp/run.moto" || true; } | awk '{ print $1 " " $2 " " $3 }' | sort | uniq -c | awk '{ printf "%s %s %s x%s; ", $2, $3, $4, $1 }')"
c_warn=$(grep -cE ' (WARN|ERROR) ' "$tmp/run-steady.log" || true)
read -r c_ns c_ns_same c_ns_new c_ns_gone < <(python3 "$lib" thread-ns-delta "$tmp/ns0" "$tmp/ns1")
c_ns_ms_per_cycle=$(awk -v t="$c_ns" -v n="$c_cycles" 'BEGIN { printf "%.3f", t / 1e6 / n }')
c_ticks=$((cpu1 - cpu0))
c_child_ticks=$((ccpu1 - ccpu0))
((c_cycles > 0)) || die "no poll cycle in the ${cpu_seconds}s window"
c_ms_per_cycle=$(awk -v t="$c_ticks" -v hz="$clk_tck" -v n="$c_cycles" 'BEGIN { printf "%.2f", t * 1000 / hz / n }')
c_child_ms_per_cycle=$(awk -v t="$c_child_ticks" -v hz="$clk_tck" -v n="$c_cycles" 'BEGIN { printf "%.2f", t * 1000 / hz / n }')
c_resolution=$(awk -v hz="$clk_tck" -v n="$c_cycles" 'BEGIN { printf "%.2f", 1000 / hz / n }')

# ================================================================================================
# 2. Fresh node to installed
# ================================================================================================
say "2. fresh node to installed: pulldeploy vs curl+dpkg floor vs apt-get ($runs runs each)"
f_pd=() f_floor=() f_apt=()
fresh_pd() {
  local node
  node="$(mknode "fresh-pd-$1" benchapp)"
  local m
  m=$(access_count)
  local t0=$EPOCHREALTIME
  check "pulldeploy once (fresh node)" pd "$moto" warn once --config "$node/config.toml"
  f_pd+=("$(us_since "$t0")")
  f_pd_reqs="$(access_since "$m" | s3_request_list)"
  grep -q '^installed benchapp' "$tmp/last.out" || die "fresh pulldeploy once printed '$(cat "$tmp/last.out")'"
  installed_ok "$node/root" benchapp || die "benchapp not installed (ii) by pulldeploy once"
  rm -rf "$node"
}
fresh_floor() {
  local r="$tmp/floor-$1"
  mkroot "$r/root"
  local t0=$EPOCHREALTIME
  check "curl (floor)" curl -sf -o "$r/benchapp.deb" "$repo_http/$benchapp_path"
  check "dpkg -i (floor)" dpkg --root="$r/root" --force-not-root --force-script-chrootless \
    --log="$r/root/var/log/dpkg.log" -i "$r/benchapp.deb"
  f_floor+=("$(us_since "$t0")")
  installed_ok "$r/root" benchapp || die "benchapp not installed (ii) by dpkg -i"
  rm -rf "$r"
}
fresh_apt() {
  local n
  n="$(mkapt "fresh-$1")"
  local m
  m=$(access_count)
  local t0=$EPOCHREALTIME
  check "apt-get update (fresh apt)" apt_ "$n" update
  check "apt-get install benchapp (fresh apt)" apt_ "$n" -y install benchapp
  f_apt+=("$(us_since "$t0")")
  f_apt_reqs="$(access_since "$m" | s3_request_list)"
  installed_ok "$n/root" benchapp || die "benchapp not installed (ii) by apt-get"
  rm -rf "$n"
}
for i in $(seq "$runs"); do
  case $((i % 3)) in  # rotate the order, so no contender always goes first
    1) fresh_pd "$i"; fresh_floor "$i"; fresh_apt "$i" ;;
    2) fresh_floor "$i"; fresh_apt "$i"; fresh_pd "$i" ;;
    0) fresh_apt "$i"; fresh_pd "$i"; fresh_floor "$i" ;;
  esac
done

# ================================================================================================
# 3. Memory while installing a 200 MiB package
# ================================================================================================
say "3. peak RSS of 'pulldeploy run' installing bigapp (200 MiB) ($runs runs)"
g_hwm=() g_rss=() g_anon=() g_us=()
for i in $(seq "$runs"); do
  node="$(mknode "big-$i" bigapp)"
  t0=$EPOCHREALTIME
  start_run "$node/config.toml" "$node/run.log"
  pid=$run_pid
  done_=0
  for _ in $(seq 3000); do  # up to 300 s
    if grep -q 'installed and healthy package=bigapp' "$node/run.log"; then done_=1; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if ((!done_)); then cat "$node/run.log" >&2; die "pulldeploy run did not log 'installed and healthy package=bigapp'"; fi
  g_us+=("$(us_since "$t0")")
  g_hwm+=("$(proc_kib "$pid" VmHWM)")
  g_rss+=("$(proc_kib "$pid" VmRSS)")
  g_anon+=("$(proc_kib "$pid" RssAnon)")
  stop_pid "$pid"
  installed_ok "$node/root" bigapp || die "bigapp not installed (ii) by pulldeploy run"
  rm -rf "$node"
done

# ================================================================================================
# Report
# ================================================================================================
cpu_model="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
pd_version="$("$bin" --version 2>/dev/null || echo "pulldeploy (--version failed)")"
# (sed, not head: head exits early, the writer gets SIGPIPE, and pipefail makes that an error)
apt_version="$(apt-get --version | sed -n 1p)"
moto_version="$(python3 -c 'import moto; print(moto.__version__)')"
aptly_version="$(aptly version 2>/dev/null | sed -n 1p)"
dpkg_version="$(dpkg --version | sed -n '1s/.*version \([^ ]*\).*/\1/p')"

read -r a_req_med a_req_min a_req_max < <(stats "${a_req[@]}")
read -r a_body_med a_body_min a_body_max < <(stats "${a_body[@]}")
read -r a_imds_med a_imds_min a_imds_max < <(stats "${a_imds[@]}")
read -r a_imdsb_med _ _ < <(stats "${a_imds_body[@]}")
read -r b_pd_med b_pd_min b_pd_max < <(stats "${b_pd[@]}")
read -r b_apt_med b_apt_min b_apt_max < <(stats "${b_apt[@]}")
read -r b_aptreq_med _ _ < <(stats "${b_apt_req[@]}")
read -r f_pd_med f_pd_min f_pd_max < <(stats "${f_pd[@]}")
read -r f_floor_med f_floor_min f_floor_max < <(stats "${f_floor[@]}")
read -r f_apt_med f_apt_min f_apt_max < <(stats "${f_apt[@]}")
read -r g_hwm_med g_hwm_min g_hwm_max < <(stats "${g_hwm[@]}")
read -r g_rss_med _ _ < <(stats "${g_rss[@]}")
read -r g_anon_med _ _ < <(stats "${g_anon[@]}")
read -r g_us_med g_us_min g_us_max < <(stats "${g_us[@]}")

mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
b_ratio=$(ratio "$b_pd_med" "$b_apt_med")
f_ratio_pd=$(ratio "$f_pd_med" "$f_floor_med")
f_ratio_apt=$(ratio "$f_apt_med" "$f_floor_med")

verdict v_1a "1a unchanged poll = 1 S3 request answered 304" \
  "$([ "$a_req_min" = "$a_req_max" ] && [ "${a_req_med%.*}" = 1 ] && ((a_status_ok)) && echo 1 || echo 0)"
verdict v_1a_b "1a unchanged poll transfers no S3 body bytes" "$(le "$a_body_max" 0 && echo 1 || echo 0)"
verdict v_1b "1b unchanged 'once' well under 'apt-get update' (<= 0.5x)" "$(le "$b_ratio" 0.5 && echo 1 || echo 0)"
# Judged on the larger of the two figures (ticks include exited threads; schedstat is finer).
verdict v_1c "1c daemon CPU per unchanged poll < 2 ms" "$(lt "$c_ms_per_cycle" 2 && lt "$c_ns_ms_per_cycle" 2 && echo 1 || echo 0)"
verdict v_1c_i "1c credentials fetched once (no IMDS request during the window)" "$([ "$c_imds_window" = 0 ] && echo 1 || echo 0)"
verdict v_2 "2  fresh install pulldeploy/floor <= 1.5" "$(le "$f_ratio_pd" 1.5 && echo 1 || echo 0)"
verdict v_3p "3  peak RSS (VmHWM) installing 200 MiB < 20 MiB" "$(lt "$g_hwm_max" 20480 && echo 1 || echo 0)"
verdict v_3i "3  idle RSS (VmRSS) of run < 12 MiB" "$(lt "$idle_rss" 12288 && echo 1 || echo 0)"

row() { printf '%-44s %-28s %-28s %-24s %s\n' "$@"; }
cat <<HEADER

== pulldeploy benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ))
load       : loadavg $load_start at start, $(cut -d' ' -f1-3 /proc/loadavg) at end (other work on the machine skews times)
machine    : $(nproc) CPUs, ${cpu_model:-unknown CPU}, Linux $(uname -r) ($(uname -m))
versions   : $pd_version; $apt_version; moto $moto_version; dpkg $dpkg_version; $aptly_version
repository : s3://$bucket/$prefix in moto $moto (loopback), published by aptly in $(fmt_ms "$publish_us"),
             signed ed25519; benchapp .deb $((deb_bytes / 1024)) KiB (gzip), bigapp .deb $((big_bytes / 1024)) KiB (uncompressed); random payloads
method     : medians (min-max) over $runs runs; agent credentials from moto's IMDSv2 only; apt sandboxed
             (APT_CONFIG, http path-style, signed-by); dpkg into fresh sandbox roots; clock ticks $clk_tck/s

HEADER
row "measurement" "pulldeploy" "apt-get" "target" "result"
row "-----------" "----------" "-------" "------" "------"
row "1a S3 requests per unchanged once" "$a_req_med ($a_req_min-$a_req_max), all 304: $([ "$a_status_ok" = 1 ] && echo yes || echo NO)" "" "1, answered 304" "$v_1a"
row "1a S3 body bytes per unchanged once" "$a_body_med ($a_body_min-$a_body_max)" "" "0" "$v_1a_b"
row "1a IMDS requests per once process" "$a_imds_med ($a_imds_min-$a_imds_max), ${a_imdsb_med} body B" "" "(info)" ""
row "1b wall time, unchanged" "$(fmt_range_ms "$b_pd_med" "$b_pd_min" "$b_pd_max")" "$(fmt_range_ms "$b_apt_med" "$b_apt_min" "$b_apt_max")" "<= 0.5x apt (got ${b_ratio}x)" "$v_1b"
row "1b S3 requests per unchanged poll" "$a_req_med" "$b_aptreq_med (apt-get update)" "(info)" ""
row "1c daemon CPU per unchanged poll" "$c_ms_per_cycle ms ticks, $c_ns_ms_per_cycle ms ns" "" "< 2 ms" "$v_1c"
row "1c IMDS requests during the window" "$c_imds_window in $c_cycles polls" "" "0 (fetched once)" "$v_1c_i"
row "2  fresh node -> installed (20 MiB)" "$(fmt_range_s "$f_pd_med" "$f_pd_min" "$f_pd_max")" "$(fmt_range_s "$f_apt_med" "$f_apt_min" "$f_apt_max")" "pd/floor <= 1.5" "$v_2"
row "2  floor: curl + dpkg -i" "$(fmt_range_s "$f_floor_med" "$f_floor_min" "$f_floor_max")" "" "" ""
row "2  ratio to floor" "${f_ratio_pd}x" "${f_ratio_apt}x" "<= 1.5x" "$v_2"
row "3  peak RSS (VmHWM) installing 200 MiB" "$(mib "$g_hwm_med") (max $(mib "$g_hwm_max"))" "" "< 20 MiB" "$v_3p"
row "3  idle RSS (VmRSS) after $c_cycles polls" "$(mib "$idle_rss") (VmHWM $(mib "$idle_hwm"))" "" "< 12 MiB" "$v_3i"

cat <<DETAILS

details:
  1a last unchanged poll, S3      : ${a_last_paths//;/ }
  1a last unchanged poll, IMDS    : ${a_last_imds//;/ }
  1a 'once' outputs               : ${a_outputs//;/ }(warm-up through the proxy: $warmup_out)
  1c window                       : ${cpu_seconds}s, $c_cycles InRelease polls, $c_s3 S3 requests ($c_non304 not 304),
                                    $c_ticks ticks in the agent (+$c_child_ticks in reaped children);
                                    resolution $c_resolution ms per poll (1 tick / $c_cycles polls);
                                    schedstat (ns, per thread): $c_ns_ms_per_cycle ms per poll ($c_ns_same threads
                                    throughout, $c_ns_new new, $c_ns_gone exited = time lost)
  1c IMDS over the whole run      : $c_imds_total requests: ${c_imds_paths:-none}
  1c daemon threads, WARN/ERROR   : $idle_threads threads; $c_warn WARN/ERROR log lines
  1c VmRSS of run                 : $(mib "$rss_startup") when /healthz is up, $(mib "$rss_window_start") after the first poll,
                                    $(mib "$idle_rss") after $c_cycles more polls = RssAnon $(mib "$idle_anon") + RssFile $(mib "$idle_file")
                                    (RssFile: pages of the $((bin_bytes / 1048576)) MiB binary and shared libraries)
  2  S3 requests, fresh pulldeploy: $f_pd_reqs
  2  S3 requests, fresh apt-get   : $f_apt_reqs
  3  start -> 'installed' (200MiB): $(fmt_range_s "$g_us_med" "$g_us_min" "$g_us_max"); VmRSS right after: $(mib "$g_rss_med") (RssAnon $(mib "$g_anon_med"))
DETAILS

misses=0
echo
echo "summary:"
for v in "${verdicts[@]}"; do
  echo "  $v"
  case $v in MISS*) misses=$((misses + 1)) ;; esac
done
echo "  => $((${#verdicts[@]} - misses)) of ${#verdicts[@]} targets met; $misses missed"
