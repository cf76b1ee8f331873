#!/usr/bin/env bash
# Side by side: rungen-gateway vs nginx proxy_cache answering the same cache hit
# (issue 9, deliverable 2). One command; see benches/COMPARE.md.
#
#   bash benches/compare.sh
#
# Installs nginx, wrk, h2load (nghttp2-client) and openssl from Debian if absent,
# builds the shipped binary (benches/pgo.sh), starts the mock upstream, the gateway and nginx on
# loopback, pins each server to one core and the load generator to another, warms
# both caches, runs interleaved rounds (gateway, nginx, gateway, nginx, ...) and
# prints per target the median req/s, p50, p99, server CPU us/request and the
# gateway/nginx ratios against the issue's targets. Every process it starts is
# stopped by PID on exit.
#
# Knobs (environment):
#   DURATION=10      seconds per run
#   ROUNDS=3         rounds per scenario and target (each round: gateway then nginx)
#   SERVER_CPU=0     core for the servers (gateway, nginx)
#   LOAD_CPU=1       core for the load generator (and the mock upstream, idle on hits)
#   BASE_PORT=28080  five (nine with FLOOR=1) consecutive loopback ports from here
#   SCENARIOS="h1-32 h1-128 h1-tls-32 h2-tls-32x10 paced-h1-32"
#                    h1-N: HTTP/1.1, N connections, each sending its next request as soon as
#                    the answer is in (closed loop: the faster server also drives wrk
#                    harder, and near its own core's limit wrk's p99 varies from run to
#                    run for any server, nginx answering from memory included; see
#                    COMPARE.md, fifteenth session). paced-h1-N: the same with PACE_MS between a
#                    connection's requests, so both servers see the same offered load
#                    (~N * 1000 / PACE_MS req/s at most), well below either's limit: the
#                    p99 of equal work. Its req/s ratio is ~1 by construction (no verdict).
#   PACE_MS=2        think time of the paced scenarios (wrk's timers are whole ms)
#   FLOOR=1          also measure "nginx-memory": the same nginx worker answering the
#                    same body from memory (`return 200`, no token map, no cache) —
#                    the floor the issue names ("a hit served from memory should get
#                    close to that floor"); ports BASE_PORT+5 (plain), +6 (TLS);
#                    and "hyper-floor": benches/hyper_floor.rs, hyper with the
#                    gateway's runtime, allocator and TLS answering the same body
#                    as a constant (what the stack costs before any gateway step);
#                    ports BASE_PORT+7 (plain), +8 (TLS)
#   SKIP_INSTALL=1   do not apt-get anything (fail if a tool is missing)
#   PROFILE=dist     the cargo profile to build and measure: dist (what ships: release
#                    with LTO; slower to build) or release
#   PGO=1            (default) measure the profile-guided build of benches/pgo.sh (what
#                    the Dockerfile ships; target/pgo/$PROFILE/rungen-gateway); PGO=0
#                    the plain target/$PROFILE/rungen-gateway. The hyper floor is plain.
#   SKIP_BUILD=1     use the binary already built (see PGO)
#   GATEWAY_BIN=path use this gateway binary (implies SKIP_BUILD)
#   RESULTS=file     also write every run as TSV there (default: under /tmp)
#   KEEP_WORK=1      keep the temporary directory (configs, logs)
#   PRIORITY=rt      rt (default as root): chrt -f 20; nice: nice -n -20; none
#   RT_THROTTLE=off  with PRIORITY=rt: lift the kernel's real-time throttling
#                    (sched_rt_runtime_us = -1) for the run, restored on exit;
#                    "keep" leaves it (then every server stalls ~50 ms a second
#                    and p99 measures the stall, not the server)
#
#   bash benches/compare.sh --summary RESULTS.tsv   re-prints the tables of an earlier run
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BASE_PORT=${BASE_PORT:-28080}
SCENARIOS=${SCENARIOS:-"h1-32 h1-128 h1-tls-32 h2-tls-32x10 paced-h1-32"}
PACE_MS=${PACE_MS:-2}
PROFILE=${PROFILE:-dist}
TOKEN="rgw-bench-token-0001"
UPSTREAM_KEY="demo-upstream-key" # src/mock_upstream.rs DEFAULT_API_KEY

# log/die, PIDS + WORK + cleanup on exit, PRIORITY/pin/start_pinned, rt_throttle_lift.
LOG_TAG=compare
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# summarize RESULTS.tsv: the median table and the ratios (also: compare.sh --summary FILE).
summarize() {
awk -F'\t' '
  NR == 1 { next }
  { key = $2 SUBSEP $3; n[key]++; rps[key, n[key]] = $5; p50[key, n[key]] = $6; p99[key, n[key]] = $7; cpu[key, n[key]] = $8; util[key, n[key]] = $9; bad[key] += $10; lg[key, n[key]] = $12; p90[key, n[key]] = $13
    cu[key, n[key]] = ($14 == "" ? -1 : $14); cs[key, n[key]] = ($15 == "" ? -1 : $15)
    rrps[$2, $3, $1] = $5; rcpu[$2, $3, $1] = $8; rp99[$2, $3, $1] = $7 + 0; if ($1 + 0 > maxr) maxr = $1 + 0
    if (!($2 in seen)) { seen[$2] = 1; order[++ns] = $2 }
    if (!($3 in tseen)) { tseen[$3] = 1; tord[++nt] = $3 } }
  function med(arr, key, cnt,   i, j, v, tmp) {
    for (i = 1; i <= cnt; i++) v[i] = arr[key, i] + 0
    for (i = 2; i <= cnt; i++) { tmp = v[i]; j = i - 1; while (j >= 1 && v[j] > tmp) { v[j + 1] = v[j]; j-- } v[j + 1] = tmp }
    return (cnt % 2) ? v[(cnt + 1) / 2] : (v[cnt / 2] + v[cnt / 2 + 1]) / 2
  }
  # "v1, v2, ... | max/min": the runs of one target in order, and their spread.
  function spread(arr, key, cnt, fmt,   i, v, out, lo, hi) {
    for (i = 1; i <= cnt; i++) {
      v = arr[key, i] + 0; out = out (i > 1 ? ", " : "") sprintf(fmt, v)
      if (i == 1 || v < lo) lo = v; if (v > hi) hi = v
    }
    return sprintf("%s | %.2f", out, (lo > 0 ? hi / lo : 0))
  }
  END {
    printf "| scenario | server | req/s | p50 ms | p90 ms | p99 ms | CPU us/req | user | kernel | server core %% | load gen core %% | 1e6/(CPU us/req) | errors |\n"
    printf "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    for (s = 1; s <= ns; s++) {
      sc = order[s]
      for (ti = 1; ti <= nt; ti++) {
        t = tord[ti]; k = sc SUBSEP t; c = n[k]
        R[t] = med(rps, k, c); P5[t] = med(p50, k, c); P90[t] = med(p90, k, c); P9[t] = med(p99, k, c); C[t] = med(cpu, k, c); U[t] = med(util, k, c); L[t] = med(lg, k, c)
        # user/kernel split: absent (-1) in results written before it was recorded
        CU[t] = med(cu, k, c); CS[t] = med(cs, k, c)
        printf "| %s | %s | %.0f | %.3f | %.3f | %.3f | %.2f | %s | %s | %.0f | %.0f | %.0f | %d |\n", sc, t, R[t], P5[t], P90[t], P9[t], C[t], (CU[t] < 0 ? "-" : sprintf("%.2f", CU[t])), (CS[t] < 0 ? "-" : sprintf("%.2f", CS[t])), U[t], L[t], 1e6 / C[t], bad[k]
      }
      rr = R["gateway"] / R["nginx"]; pr = P9["gateway"] / P9["nginx"]; cr = C["gateway"] / C["nginx"]
      # Paired: the gateway/nginx ratio within each round (the two runs are seconds
      # apart, so most of the drift of a shared machine cancels), then the median.
      m = 0
      for (r = 1; r <= maxr; r++)
        if (rrps[sc, "nginx", r] > 0 && rcpu[sc, "nginx", r] > 0 && (sc SUBSEP "gateway" SUBSEP r) in rrps) {
          m++; PRR[sc, m] = rrps[sc, "gateway", r] / rrps[sc, "nginx", r]; PRC[sc, m] = rcpu[sc, "gateway", r] / rcpu[sc, "nginx", r]
        }
      paired = (m ? sprintf(" %.2fx | %.2fx |", med(PRR, sc, m), med(PRC, sc, m)) : " - | - |")
      # Paced: equal offered load, so req/s and CPU per request (idle wakeups, no batching)
      # are not the throughput targets; p99 is the latency of the same work.
      pac = (sc ~ /^paced-/)
      line[s] = sprintf("| %s | %.2fx %s | %.2fx %s | %.2fx %s |", sc, rr, (pac ? "(equal load)" : rr >= 1.5 ? "met" : "MISSED"), pr, (pr <= 1.0 ? "met" : "MISSED"), cr, (pac ? "(partial load)" : cr <= 2 / 3 ? "met" : "MISSED")) sprintf(" %.2fx | %.2fx |", P5["gateway"] / P5["nginx"], P90["gateway"] / P90["nginx"]) paired
      if ("nginx-memory" in tseen)
        fline[s] = sprintf("| %s | %.2fx | %.2fx | %s | %.2fx |", sc, C["nginx"] / C["nginx-memory"], C["gateway"] / C["nginx-memory"], (CU["gateway"] < 0 || CU["nginx-memory"] <= 0) ? "-" : sprintf("%.2fx", CU["gateway"] / CU["nginx-memory"]), R["gateway"] / R["nginx-memory"])
      # The CPU target (2/3 of nginx proxy_cache) against what hyper alone costs: below 1.0x,
      # the target asks for less than the stack spends answering a constant.
      if ("hyper-floor" in tseen)
        hline[s] = sprintf("| %s | %.2f | %.2f | %.2fx | %.2fx | %.2f | %.2fx |", sc, C["hyper-floor"], C["nginx"] * 2 / 3, C["nginx"] * 2 / 3 / C["hyper-floor"], C["gateway"] / C["hyper-floor"], C["gateway"] - C["hyper-floor"], R["hyper-floor"] / R["nginx"])
    }
    printf "\n| scenario | req/s gateway/nginx (target >= 1.5x) | p99 gateway/nginx (target <= 1.0x) | CPU/req gateway/nginx (target <= 0.67x) | p50 gateway/nginx | p90 gateway/nginx | req/s, paired by round (median) | CPU/req, paired by round (median) |\n"
    printf "|---|---|---|---|---:|---:|---:|---:|\n"
    for (s = 1; s <= ns; s++) print line[s]
    if ("nginx-memory" in tseen) {
      printf "\n| scenario | CPU/req nginx proxy_cache / nginx from memory (the issue: about 2x) | CPU/req gateway / nginx from memory | user CPU/req gateway / nginx from memory | req/s gateway / nginx from memory |\n"
      printf "|---|---:|---:|---:|---:|\n"
      for (s = 1; s <= ns; s++) print fline[s]
    }
    if ("hyper-floor" in tseen) {
      printf "\n| scenario | hyper floor CPU us/req | CPU target: 2/3 of nginx proxy_cache, us/req | target / hyper floor | gateway / hyper floor | gateway - hyper floor, us/req | req/s hyper floor / nginx |\n"
      printf "|---|---:|---:|---:|---:|---:|---:|\n"
      for (s = 1; s <= ns; s++) print hline[s]
    }
    # The spread: on a shared machine one run can be far from the others.
    printf "\n| scenario | server | req/s of each run, in order | max/min | p99 ms of each run, in order | max/min |\n|---|---|---|---:|---|---:|\n"
    for (s = 1; s <= ns; s++) {
      for (ti = 1; ti <= nt; ti++) {
        t = tord[ti]; k = order[s] SUBSEP t
        printf "| %s | %s | %s | %s |\n", order[s], t, spread(rps, k, n[k], "%.0f"), spread(p99, k, n[k], "%.3f")
      }
    }
    # p99 round by round: each target against nginx proxy_cache in the same round (seconds
    # apart). A floor (nginx from memory, hyper alone) that does less work than nginx
    # proxy_cache yet reads a higher p99 in a round measures the machine in that round.
    printf "\n| scenario | rounds whose p99 is <= nginx proxy_cache in the same round:"
    for (ti = 1; ti <= nt; ti++) if (tord[ti] != "nginx") printf " %s |", tord[ti]
    printf " p99 gateway/nginx, each round |\n|---|"
    for (ti = 1; ti <= nt; ti++) if (tord[ti] != "nginx") printf "---:|"
    printf "---|\n"
    for (s = 1; s <= ns; s++) {
      sc = order[s]; printf "| %s |", sc
      for (ti = 1; ti <= nt; ti++) {
        t = tord[ti]; if (t == "nginx") continue
        met = 0; all = 0
        for (r = 1; r <= maxr; r++)
          if (rp99[sc, t, r] > 0 && rp99[sc, "nginx", r] > 0) { all++; if (rp99[sc, t, r] <= rp99[sc, "nginx", r]) met++ }
        printf " %d of %d |", met, all
      }
      runs = ""
      for (r = 1; r <= maxr; r++)
        if (rp99[sc, "gateway", r] > 0 && rp99[sc, "nginx", r] > 0)
          { v = rp99[sc, "gateway", r] / rp99[sc, "nginx", r]; runs = runs (runs == "" ? "" : ", ") (v < 0.01 ? "<0.01x" : sprintf("%.2fx", v)) }
      printf " %s |\n", runs
    }
  }' "$1"
  echo
  echo "server core % near 100: the server was the bottleneck; well below 100 with the load generator near 100: the"
  echo "load generator was, and req/s and latency then understate the difference between the servers."
  echo "1e6/(CPU us/req) is the req/s one fully used server core would give at the measured cost per request."
}
if [[ ${1:-} == --summary ]]; then
  [[ -f ${2:-} ]] || die "usage: compare.sh --summary RESULTS.tsv"
  summarize "$2"
  exit 0
fi

# --- tools -------------------------------------------------------------------------
need_pkgs=()
command -v nginx >/dev/null || need_pkgs+=(nginx)
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v h2load >/dev/null || need_pkgs+=(nghttp2-client)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v taskset >/dev/null || need_pkgs+=(util-linux)
command -v curl >/dev/null || need_pkgs+=(curl)
if ((${#need_pkgs[@]})); then
  [[ -z "${SKIP_INSTALL:-}" ]] || die "missing: ${need_pkgs[*]} (SKIP_INSTALL is set)"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  log "installing from Debian: ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
# Debian's nginx package may start a system nginx on :80; it is not ours and is left alone.

NCPU=$(nproc --all)
((NCPU >= 2)) || log "warning: fewer than 2 cores; server and load generator share one"
((SERVER_CPU < NCPU && LOAD_CPU < NCPU)) || die "SERVER_CPU/LOAD_CPU out of range (cores: $NCPU)"
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

# --- build -------------------------------------------------------------------------
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
gateway_bin
# FLOOR=1: the hyper-only server (a bench target), built with the same $PROFILE as the gateway.
if [[ -n "${FLOOR:-}" && -z "${HYPER_FLOOR_BIN:-}" ]]; then
  if [[ -z "${SKIP_BUILD:-}" ]]; then
    log "cargo build --profile $PROFILE --bench hyper_floor"
    HYPER_FLOOR_BIN=$(cd "$ROOT" && cargo build --profile "$PROFILE" --quiet --bench hyper_floor --message-format=json |
      grep -o '"executable":"[^"]*hyper_floor[^"]*"' | tail -n 1 | cut -d'"' -f4)
  else
    HYPER_FLOOR_BIN=$(ls -t "$TARGET_DIR/$PROFILE"/deps/hyper_floor-* 2>/dev/null | grep -v '\.d$' | head -n 1)
  fi
fi
[[ -z "${FLOOR:-}" || -x "${HYPER_FLOOR_BIN:-}" ]] || die "no hyper_floor binary (build it: cargo build --profile $PROFILE --bench hyper_floor)"

WORK=$(mktemp -d /tmp/rgw-compare.XXXXXX)
chmod 755 "$WORK"
RESULTS=${RESULTS:-/tmp/rgw-compare-$(date +%Y%m%d-%H%M%S).tsv}

GW_PLAIN=$BASE_PORT
GW_TLS=$((BASE_PORT + 1))
NGX_PLAIN=$((BASE_PORT + 2))
NGX_TLS=$((BASE_PORT + 3))
MOCK_PORT=$((BASE_PORT + 4))
MEM_PLAIN=$((BASE_PORT + 5))
MEM_TLS=$((BASE_PORT + 6))
HF_PLAIN=$((BASE_PORT + 7))
HF_TLS=$((BASE_PORT + 8))
TARGETS="gateway nginx"
PORTS="$GW_PLAIN $GW_TLS $NGX_PLAIN $NGX_TLS $MOCK_PORT"
if [[ -n "${FLOOR:-}" ]]; then
  TARGETS="gateway nginx nginx-memory hyper-floor"; PORTS="$PORTS $MEM_PLAIN $MEM_TLS $HF_PLAIN $HF_TLS"
fi
for p in $PORTS; do
  if ss -Hltn "sport = :$p" | grep -q .; then die "port $p is in use (set BASE_PORT)"; fi
done

# --- throwaway certificate ---------------------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 2 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
printf '%s' "$UPSTREAM_KEY" >"$WORK/upstream.key"
TOKEN_SHA=$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)

# --- configs -----------------------------------------------------------------------
# paced-h1-*: wrk waits PACE_MS before each of a connection's requests.
cat >"$WORK/paced.lua" <<'EOF'
local pace = tonumber(os.getenv("PACE_MS"))
function delay() return pace end
EOF
cat >"$WORK/gateway.toml" <<EOF
# Generated by benches/compare.sh
[server]
listen = "127.0.0.1:$GW_TLS"
plaintext_listen = "127.0.0.1:$GW_PLAIN"
drain_delay = "0s"
shutdown_timeout = "2s"
max_connections_per_ip = 4096
max_requests_per_connection = 0

[server.tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"

[upstream]
base_url = "http://127.0.0.1:$MOCK_PORT"

[cache]
enabled = true
max_bytes = 67108864

[cache.routes."/app"]
ttl = "5s"

[rate_limit]
enabled = false

$(gateway_config_tail "off")

[[clients]]
name = "bench"
token_sha256 = "$TOKEN_SHA"
teams = ["personal"]
EOF
"$BIN" check-config --config "$WORK/gateway.toml" >/dev/null || die "generated gateway config is invalid"

mkdir -p "$WORK/nginx"
sed -e "s#@WORK@#$WORK#g" -e "s#@MOCK_PORT@#$MOCK_PORT#g" -e "s#@TOKEN@#$TOKEN#g" \
  -e "s#@UPSTREAM_KEY@#$UPSTREAM_KEY#g" -e "s#@NGX_PLAIN_PORT@#$NGX_PLAIN#g" \
  -e "s#@NGX_TLS_PORT@#$NGX_TLS#g" "$ROOT/benches/nginx/nginx.conf.template" >"$WORK/nginx.conf"

# --- start -------------------------------------------------------------------------
# The PID we hold must be the server itself (not a wrapper shell), or we could not stop it.
check_pid() { # pid
  local exe; exe=$(readlink "/proc/$1/exe" 2>/dev/null) || die "process $1 is gone (see $WORK/*.log)"
  [[ $exe != */bash && $exe != */taskset && $exe != */nice && $exe != */chrt ]] || die "pid $1 is $exe, not the server"
}
wait_port() { # port
  for _ in $(seq 100); do
    ss -Hltn "sport = :$1" | grep -q . && return 0
    sleep 0.1
  done
  die "nothing listens on port $1"
}

start_pinned "$LOAD_CPU" "$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
MOCK_PID=$!; PIDS+=("$MOCK_PID")
wait_port "$MOCK_PORT"; check_pid "$MOCK_PID"

# FLOOR=1: the same body, answered by nginx from memory (the template includes floor-*.conf).
if [[ -n "${FLOOR:-}" ]]; then
  body=$(curl -sf -H "x-api-key: $UPSTREAM_KEY" "http://127.0.0.1:$MOCK_PORT/app") || die "could not fetch the body from the mock"
  printf '%s' "$body" >"$WORK/body.json"
  [[ $body != *'$'* ]] || die "the body has a '\$' (nginx would read a variable)"
  # nginx quoted strings: escape backslashes, then single quotes.
  body=${body//\\/\\\\}; body=${body//\'/\\\'}
  cat >"$WORK/floor-memory.conf" <<EOF
# Generated by benches/compare.sh (FLOOR=1): the body from memory, nothing else.
server {
    listen 127.0.0.1:$MEM_PLAIN backlog=4096;
    listen 127.0.0.1:$MEM_TLS ssl http2 backlog=4096;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:1m;
    http2_max_concurrent_streams 128;
    location /app {
        return 200 '$body';
    }
}
EOF
fi
nginx -t -q -p "$WORK/nginx" -c "$WORK/nginx.conf" 2>"$WORK/nginx-t.log" || { cat "$WORK/nginx-t.log" >&2; die "nginx config invalid"; }

start_pinned "$SERVER_CPU" "$BIN" serve --config "$WORK/gateway.toml" >"$WORK/gateway.log" 2>&1 &
GW_PID=$!; PIDS+=("$GW_PID")
wait_port "$GW_PLAIN"; wait_port "$GW_TLS"; check_pid "$GW_PID"

start_pinned "$SERVER_CPU" nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" >"$WORK/nginx.out" 2>&1 &
NGX_PID=$!; PIDS+=("$NGX_PID")
wait_port "$NGX_PLAIN"; wait_port "$NGX_TLS"; check_pid "$NGX_PID"
if [[ -n "${FLOOR:-}" ]]; then
  wait_port "$MEM_PLAIN"; wait_port "$MEM_TLS"
  start_pinned "$SERVER_CPU" "$HYPER_FLOOR_BIN" --listen "127.0.0.1:$HF_PLAIN" --tls-listen "127.0.0.1:$HF_TLS" \
    --body "$WORK/body.json" --cert "$WORK/cert.pem" --key "$WORK/key.pem" >"$WORK/hyper-floor.log" 2>&1 &
  HF_PID=$!; PIDS+=("$HF_PID")
  wait_port "$HF_PLAIN"; wait_port "$HF_TLS"; check_pid "$HF_PID"
  log "hyper floor pid $HF_PID :$HF_PLAIN/:$HF_TLS(tls)"
fi
log "mock pid $MOCK_PID :$MOCK_PORT, gateway pid $GW_PID :$GW_PLAIN/:$GW_TLS(tls), nginx master pid $NGX_PID :$NGX_PLAIN/:$NGX_TLS(tls)"
log "gateway worker threads: $(ls /proc/$GW_PID/task | wc -l) threads; nginx workers: $(pgrep -P "$NGX_PID" | tr '\n' ' ')"

# --- helpers -----------------------------------------------------------------------
# "utime stime" (clock ticks) of a process and, for nginx, its worker/cache processes.
cpu_ticks() { # target
  if [[ $1 == gateway ]]; then proc_ticks "$GW_PID"
  elif [[ $1 == hyper-floor ]]; then proc_ticks "$HF_PID"; else
    # shellcheck disable=SC2046 # one PID per word
    proc_ticks "$NGX_PID" $(pgrep -P "$NGX_PID")
  fi
}
url() { # target proto
  local port
  case "$1:$2" in
    gateway:http) port=$GW_PLAIN ;; gateway:https) port=$GW_TLS ;;
    nginx:http) port=$NGX_PLAIN ;; nginx:https) port=$NGX_TLS ;;
    nginx-memory:http) port=$MEM_PLAIN ;; nginx-memory:https) port=$MEM_TLS ;;
    hyper-floor:http) port=$HF_PLAIN ;; hyper-floor:https) port=$HF_TLS ;;
  esac
  echo "$2://127.0.0.1:$port/app"
}
# wrk latency "1.23ms" / "850.00us" / "1.02s" -> ms
to_ms() { awk -v v="$1" 'BEGIN{ n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'; }

# One run. Prints: reqs req_per_s p50_ms p99_ms cpu_us_per_req server_core_pct bad loadgen_core_pct p90_ms
# user_us_per_req sys_us_per_req
run_one() { # target scenario
  local target=$1 scen=$2 out="$WORK/run.out" before after reqs rps p50 p90 p99 bad=0 t0 t1 TIMEFORMAT='%U %S'
  before=$(cpu_ticks "$target"); t0=$(date +%s.%N)
  [[ -z "${DEBUG_STAT:-}" ]] || grep -E '^cpu[01] ' /proc/stat >&2
  case $scen in
    h1-* | paced-h1-*)
      local conns=${scen##*-} proto=http script=()
      [[ $scen == h1-tls-* ]] && proto=https
      # Equal offered load: each connection waits PACE_MS between its requests (see SCENARIOS).
      [[ $scen == paced-* ]] && script=(-s "$WORK/paced.lua")
      { time pin "$LOAD_CPU" env PACE_MS="$PACE_MS" wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 5s --latency \
        "${script[@]}" -H "Authorization: Bearer $TOKEN" "$(url "$target" "$proto")" >"$out" 2>&1; } 2>"$WORK/time.out"
      t1=$(date +%s.%N); after=$(cpu_ticks "$target")
      reqs=$(awk '/requests in/ {print $1}' "$out")
      rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
      p50=$(to_ms "$(awk '$1=="50%" {print $2}' "$out")")
      p90=$(to_ms "$(awk '$1=="90%" {print $2}' "$out")")
      p99=$(to_ms "$(awk '$1=="99%" {print $2}' "$out")")
      bad=$(awk '/Non-2xx/ {s+=$NF} /Socket errors/ {gsub(/,/,""); s+=$4+$6+$8+$10} END {print s+0}' "$out")
      ;;
    h2-tls-*)
      local spec=${scen#h2-tls-} conns streams
      conns=${spec%x*}; streams=${spec#*x}
      { time pin "$LOAD_CPU" h2load -t1 -c"$conns" -m"$streams" -D "$DURATION" \
        -H "authorization: Bearer $TOKEN" --log-file="$WORK/h2.log" "$(url "$target" https)" >"$out" 2>&1; } 2>"$WORK/time.out"
      t1=$(date +%s.%N); after=$(cpu_ticks "$target")
      reqs=$(awk '/^requests:/ {print $8}' "$out")
      rps=$(awk '/^finished in/ {print $4}' "$out")
      bad=$(awk '/^requests:/ {print $10+$12+$14}' "$out")
      grep -q 'Application protocol: h2' "$out" || bad=$((bad + 1))
      read -r p50 p90 p99 < <(awk -F'\t' '$2==200 {print $3}' "$WORK/h2.log" | sort -n |
        awk '{a[NR]=$1} END {if (NR==0) {print "nan nan nan"; exit} i50=int(NR*0.50); if(i50<1)i50=1; i90=int(NR*0.90); if(i90<1)i90=1; i99=int(NR*0.99); if(i99<1)i99=1; printf "%.3f %.3f %.3f\n", a[i50]/1000, a[i90]/1000, a[i99]/1000}')
      rm -f "$WORK/h2.log"
      ;;
    *) die "unknown scenario $scen" ;;
  esac
  [[ -z "${DEBUG_STAT:-}" ]] || grep -E '^cpu[01] ' /proc/stat >&2
  [[ -n "$reqs" && "$reqs" -gt 0 ]] || { cat "$out" >&2; die "$target $scen: no requests completed"; }
  local u0 s0 u1 s1
  read -r u0 s0 <<<"$before"; read -r u1 s1 <<<"$after"
  awk -v r="$reqs" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v du=$((u1 - u0)) -v ds=$((s1 - s0)) -v hz="$CLK_TCK" \
      -v t0="$t0" -v t1="$t1" -v bad="$bad" -v lg="$(awk '{print $1 + $2}' "$WORK/time.out")" -v p90="$p90" \
      'BEGIN { cpu_s=(du+ds)/hz; printf "%d %.0f %s %s %.2f %.0f %d %.0f %s %.2f %.2f\n", r, rps, p50, p99, cpu_s*1e6/r, 100*cpu_s/(t1-t0), bad, 100*lg/(t1-t0), p90, du/hz*1e6/r, ds/hz*1e6/r }'
}

check_hit() { # target proto
  local h
  h=$(curl -sk -o /dev/null -D - -H "Authorization: Bearer $TOKEN" "$(url "$1" "$2")")
  echo "$h" | grep -qi '^HTTP/[0-9.]* 200' || { echo "$h" >&2; die "$1 $2: not 200"; }
  echo "$h" | grep -i '^cache-status' | tr -d '\r'
}

# --- warm up -----------------------------------------------------------------------
log "warming both caches"
for t in gateway nginx; do
  for p in http https; do curl -sk -o /dev/null -H "Authorization: Bearer $TOKEN" "$(url $t $p)"; done
done
sleep 0.3
for t in gateway nginx; do
  for p in http https; do log "  $t $p: $(check_hit $t $p)"; done
done
gw_len=$(curl -s -H "Authorization: Bearer $TOKEN" "$(url gateway http)" | wc -c)
ngx_len=$(curl -s -H "Authorization: Bearer $TOKEN" "$(url nginx http)" | wc -c)
log "body bytes: gateway $gw_len, nginx $ngx_len"
[[ $gw_len -eq $ngx_len ]] || die "the two bodies differ in size"
if [[ -n "${FLOOR:-}" ]]; then
  mem_len=$(curl -s "$(url nginx-memory http)" | wc -c)
  mem_h2=$(curl -sk -o /dev/null -w '%{http_version}' --http2 "$(url nginx-memory https)")
  log "body bytes: nginx from memory $mem_len (https: HTTP/$mem_h2)"
  [[ $mem_len -eq $gw_len ]] || die "nginx's body from memory differs in size"
  hf_len=$(curl -s "$(url hyper-floor http)" | wc -c)
  hf_h2=$(curl -sk -o /dev/null -w '%{http_version}' --http2 "$(url hyper-floor https)")
  log "body bytes: hyper floor $hf_len (https: HTTP/$hf_h2)"
  [[ $hf_len -eq $gw_len ]] || die "the hyper floor's body differs in size"
fi
for t in $TARGETS; do
  pin "$LOAD_CPU" wrk -t1 -c32 -d2s -H "Authorization: Bearer $TOKEN" "$(url $t http)" >/dev/null 2>&1
  pin "$LOAD_CPU" wrk -t1 -c32 -d2s -H "Authorization: Bearer $TOKEN" "$(url $t https)" >/dev/null 2>&1
done
mock_before=$(curl -s "http://127.0.0.1:$MOCK_PORT/_mock/stats" | grep -o '"total":[0-9]*' | cut -d: -f2)

# --- interleaved rounds ------------------------------------------------------------
rt_throttle_lift
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $ROUNDS rounds x {$SCENARIOS} x {${TARGETS// /, }} x ${DURATION}s"
printf 'round\tscenario\ttarget\trequests\treq_per_s\tp50_ms\tp99_ms\tcpu_us_per_req\tserver_core_pct\tbad\tloadavg1\tloadgen_core_pct\tp90_ms\tuser_us_per_req\tsys_us_per_req\n' >"$RESULTS"
for ((r = 1; r <= ROUNDS; r++)); do
  for scen in $SCENARIOS; do
    for t in $TARGETS; do
      read -r reqs rps p50 p99 cpu util bad lgutil p90 ucpu scpu < <(run_one "$t" "$scen")
      la=$(cut -d' ' -f1 /proc/loadavg)
      printf '%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$scen" "$t" "$reqs" "$rps" "$p50" "$p99" "$cpu" "$util" "$bad" "$la" "$lgutil" "$p90" "$ucpu" "$scpu" >>"$RESULTS"
      log "round $r $scen $t: $rps req/s, p50 ${p50} ms, p90 ${p90} ms, p99 ${p99} ms, ${cpu} us/req (user ${ucpu}, kernel ${scpu}), server core ${util}%, load generator core ${lgutil}%, bad $bad, loadavg $la"
    done
  done
done
mock_after=$(curl -s "http://127.0.0.1:$MOCK_PORT/_mock/stats" | grep -o '"total":[0-9]*' | cut -d: -f2)
log "upstream requests during the measured runs (both servers, refreshes every 5 s): $((mock_after - mock_before))"

# --- summary -----------------------------------------------------------------------
echo
echo "rungen-gateway vs nginx $(nginx -v 2>&1 | sed 's#.*/##') proxy_cache — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc --all) cores, server core $SERVER_CPU, load core $LOAD_CPU"
echo "gateway: $BIN built $(date -u -r "$BIN" +%Y-%m-%dT%H:%MZ); work tree at $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && [[ -n $(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && echo ' + uncommitted src changes'); medians of $ROUNDS runs of ${DURATION}s; raw runs: $RESULTS"
echo
summarize "$RESULTS"
