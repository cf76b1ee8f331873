#!/usr/bin/env bash
# Builds the gateway with profile-guided optimisation (PGO): what the Dockerfile ships and
# what compare.sh and scaling.sh measure by default.
#
#   bash benches/pgo.sh        # prints the optimised binary's path as its last line
#
# 1. builds the `dist` profile instrumented (-Cprofile-generate) into target/pgo-generate;
# 2. trains it on loopback, ~1.5 min: the mock upstream and the instrumented gateway under
#    wrk (HTTP/1.1 at 32 and 128 connections, HTTPS) and h2load (HTTP/2 over TLS) answering
#    cache hits, then curl for misses, other endpoints, writes and refusals; three times:
#    the limiter off (as compare.sh runs it); on (the default) with 10,000 more clients
#    (wrk rotating their tokens) and a JWT client (HS256 tokens: first checks, the
#    remembered path, bad signatures); and in cluster mode with the shared cache (Redis on
#    loopback: skipped, and built as cold code, without redis-server);
# 3. merges the profile with llvm-profdata (rustup's llvm-tools component, which matches
#    rustc's LLVM; installed if absent);
# 4. builds `dist` again with -Cprofile-use into target/pgo, and checks the binary.
#
# Why: a cache hit is ~20,000 instructions spread over hyper, tokio, tower and the
# gateway's steps; laid out and inlined by where the time goes, it takes ~19 % fewer
# instructions and ~40 % fewer instruction-cache misses (callgrind) and ~20 % less CPU per
# request (benches/COMPARE.md, twelfth session). What the training never runs (JWKS fetching,
# the admin listener, reloads) is built for size, as cold code: correct, somewhat slower than
# without PGO.
#
# The profile's file name carries its hash, so RUSTFLAGS change with the profile and cargo
# rebuilds every crate with the new one (it does not track the profile file itself).
#
# Knobs (environment):
#   PROFILE=dist       the cargo profile to build (both builds)
#   TRAIN_SECONDS=4    seconds per load run (twelve runs)
#   CLIENTS=10000      clients in the limiter-on training config, one load run over all of them
#   BASE_PORT=28280    four consecutive loopback ports from here (plain, TLS, mock, Redis)
#   SKIP_INSTALL=1     do not apt-get anything (fail if a tool is missing)
#   KEEP_WORK=1        keep the temporary directory (configs, logs, raw profiles)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROFILE=${PROFILE:-dist}
TRAIN_SECONDS=${TRAIN_SECONDS:-4}
CLIENTS=${CLIENTS:-10000}
BASE_PORT=${BASE_PORT:-28280}
TOKEN="rgw-pgo-token-0001"
UPSTREAM_KEY="demo-upstream-key" # src/mock_upstream.rs DEFAULT_API_KEY
PRIORITY=none # training wants every path run, not a fair measurement

LOG_TAG=pgo
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# --- tools -------------------------------------------------------------------------
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v h2load >/dev/null || need_pkgs+=(nghttp2-client)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v curl >/dev/null || need_pkgs+=(curl)
if ((${#need_pkgs[@]})); then
  [[ -z "${SKIP_INSTALL:-}" ]] || die "missing: ${need_pkgs[*]} (SKIP_INSTALL is set)"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  log "installing from Debian: ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
SYSROOT=$(rustc --print sysroot)
HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$SYSROOT/lib/rustlib/$HOST/bin/llvm-profdata
if [[ ! -x $PROFDATA ]]; then
  log "rustup component add llvm-tools (llvm-profdata)"
  rustup component add llvm-tools >&2
fi
[[ -x $PROFDATA ]] || die "no llvm-profdata at $PROFDATA (rustup component add llvm-tools)"

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d /tmp/rgw-pgo.XXXXXX)
GW_PLAIN=$BASE_PORT
GW_TLS=$((BASE_PORT + 1))
MOCK_PORT=$((BASE_PORT + 2))
# bash's /dev/tcp, not ss: a container build stage may have no iproute2.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $GW_PLAIN $GW_TLS $MOCK_PORT; do
  if listening "$p"; then die "port $p is in use (set BASE_PORT)"; fi
done

# --- 1. instrumented build ---------------------------------------------------------
log "cargo build --profile $PROFILE, instrumented (target/pgo-generate)"
# A fixed path in RUSTFLAGS (or every run would rebuild every crate); each run of the
# binary names its own profile file with LLVM_PROFILE_FILE.
(cd "$ROOT" && RUSTFLAGS="-Cprofile-generate=$TARGET_DIR/pgo-generate/profraw" cargo build --profile "$PROFILE" --locked \
  --quiet --bin rungen-gateway --target-dir "$TARGET_DIR/pgo-generate")
TRAINEE=$TARGET_DIR/pgo-generate/$PROFILE/rungen-gateway
# Every run of it writes a profile: only the gateway's serving runs (below, each with its
# own file) are kept; check-config and the mock write theirs here, not merged.
export LLVM_PROFILE_FILE="$WORK/other-%p.profraw"

# --- 2. training -------------------------------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 2 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
printf '%s' "$UPSTREAM_KEY" >"$WORK/upstream.key"
TOKEN_SHA=$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)
# Signed tokens (HS256) for the JWT client: the first verification and the remembered path.
openssl rand -hex 24 | tr -d '\n' >"$WORK/jwt.secret"
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
jwt() { # subject [secret]
  local h p
  h=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
  p=$(printf '{"iss":"https://pgo.invalid","aud":"rungen-gateway","sub":"%s","exp":%d}' "$1" $(($(date +%s) + 3600)) | b64url)
  printf '%s.%s.%s' "$h" "$p" "$(printf '%s.%s' "$h" "$p" |
    openssl dgst -sha256 -mac HMAC -macopt "key:${2:-$(cat "$WORK/jwt.secret")}" -binary | b64url)"
}
config() { # setup: plain (limiter off), limiter, cluster
  local limiter=true cluster=""
  [[ $1 == plain ]] && limiter=false
  [[ $1 == cluster ]] && cluster=$'[cluster]\nredis_url = "redis://127.0.0.1:'"$REDIS_PORT"$'"\nkey_prefix = "pgo"\nshared_cache = true'
  cat <<EOF
# Generated by benches/pgo.sh
[server]
listen = "127.0.0.1:$GW_TLS"
plaintext_listen = "127.0.0.1:$GW_PLAIN"
drain_delay = "0s"
shutdown_timeout = "2s"
max_connections_per_ip = 4096

[server.tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"

[upstream]
base_url = "http://127.0.0.1:$MOCK_PORT"

[cache]
enabled = true

[cache.routes."/app"]
ttl = "2s"

[rate_limit]
enabled = $limiter
default = { per_second = 1000000, burst = 1000000 }
upstream_budget = { per_second = 1000000, burst = 1000000 }

$cluster

$(gateway_config_tail "off")

[[clients]]
name = "pgo"
token_sha256 = "$TOKEN_SHA"
teams = ["personal"]

[[clients]]
name = "pgo-web"
teams = ["personal"]
jwt = { issuer = "https://pgo.invalid", audience = "rungen-gateway", hmac_secret = { file = "$WORK/jwt.secret" } }

EOF
  # With the limiter on, $CLIENTS more clients, token i = rgw-pgo-client-<i, 5 digits>: the
  # per-client paths (token map, limiter and per-thread records) run cold with one client.
  if [[ $1 == limiter ]]; then
    if command -v python3 >/dev/null; then
      python3 - "$CLIENTS" <<'PY'
import hashlib, sys
for i in range(1, int(sys.argv[1]) + 1):
    t = "rgw-pgo-client-%05d" % i
    print('[[clients]]\nname = "c%05d"\ntoken_sha256 = "%s"\nteams = ["personal"]\n' % (i, hashlib.sha256(t.encode()).hexdigest()))
PY
    else
      for ((i = 1; i <= CLIENTS; i++)); do
        printf '[[clients]]\nname = "c%05d"\ntoken_sha256 = "%s"\nteams = ["personal"]\n\n' "$i" \
          "$(printf 'rgw-pgo-client-%05d' "$i" | sha256sum | cut -d' ' -f1)"
      done
    fi
  fi
}
cat >"$WORK/rotate.lua" <<'LUA'
-- wrk: rotate the Authorization header over N client tokens (N = first script arg).
local reqs, n, idx = {}, 1, 0
function init(args)
  n = tonumber(args[1]) or 1
  for i = 1, n do
    reqs[i] = wrk.format("GET", "/app", { ["Authorization"] = string.format("Bearer rgw-pgo-client-%05d", i) })
  end
end
function request()
  idx = idx % n + 1
  return reqs[idx]
end
LUA
wait_port() { # port
  for _ in $(seq 100); do
    listening "$1" && return 0
    sleep 0.1
  done
  die "nothing listens on port $1 (see $WORK/*.log)"
}

# The mock upstream runs from the instrumented binary too; its profile is not kept.
"$TRAINEE" mock-upstream --listen "127.0.0.1:$MOCK_PORT" \
  >"$WORK/mock.log" 2>&1 &
PIDS+=("$!")
wait_port "$MOCK_PORT"

auth=(-H "Authorization: Bearer $TOKEN")
SETUPS="plain limiter cluster"
REDIS_PORT=$((BASE_PORT + 3))
if ! command -v redis-server >/dev/null; then
  log "no redis-server: cluster mode is not trained (it is then built as cold code)"
  SETUPS="plain limiter"
fi
for setup in $SETUPS; do
  if [[ $setup == cluster ]]; then
    listening "$REDIS_PORT" && die "port $REDIS_PORT is in use (set BASE_PORT)"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
      >"$WORK/redis.log" 2>&1 &
    PIDS+=("$!")
    wait_port "$REDIS_PORT"
  fi
  config "$setup" >"$WORK/gateway-$setup.toml"
  "$TRAINEE" check-config --config "$WORK/gateway-$setup.toml" >/dev/null
  LLVM_PROFILE_FILE="$WORK/raw/gateway-%p.profraw" "$TRAINEE" serve \
    --config "$WORK/gateway-$setup.toml" >"$WORK/gateway-$setup.log" 2>&1 &
  gw=$!
  PIDS+=("$gw")
  wait_port "$GW_PLAIN"
  wait_port "$GW_TLS"
  # wrk and h2load exit non-zero on a refused connection: the training then stops here.
  if [[ $setup == cluster ]]; then
    log "training ($setup): hits over HTTP/1.1 (32 connections)"
    wrk -t1 -c32 -d"${TRAIN_SECONDS}s" "${auth[@]}" "http://127.0.0.1:$GW_PLAIN/app" >"$WORK/wrk.out"
  else
    log "training ($setup): hits over HTTP/1.1 (32, 128 connections), HTTPS, HTTP/2"
    wrk -t1 -c32 -d"${TRAIN_SECONDS}s" "${auth[@]}" "http://127.0.0.1:$GW_PLAIN/app" >"$WORK/wrk.out"
    wrk -t1 -c128 -d"${TRAIN_SECONDS}s" "${auth[@]}" "http://127.0.0.1:$GW_PLAIN/app" >>"$WORK/wrk.out"
    wrk -t1 -c32 -d"${TRAIN_SECONDS}s" "${auth[@]}" "https://127.0.0.1:$GW_TLS/app" >>"$WORK/wrk.out"
    h2load -c32 -m10 -D "$TRAIN_SECONDS" "${auth[@]}" "https://127.0.0.1:$GW_TLS/app" >"$WORK/h2load.out"
    grep -q "succeeded, 0 failed" "$WORK/h2load.out" || die "h2load saw failures (see $WORK/h2load.out)"
  fi
  if [[ $setup == limiter ]]; then
    log "training ($setup): hits from $CLIENTS clients"
    wrk -t1 -c32 -d"${TRAIN_SECONDS}s" -s "$WORK/rotate.lua" "http://127.0.0.1:$GW_PLAIN/app" -- "$CLIENTS" >>"$WORK/wrk.out"
  fi
  if [[ $setup != plain ]]; then
    log "training ($setup): signed tokens (first check, remembered, refused)"
    signed=$(jwt "user-0")
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $signed" "http://127.0.0.1:$GW_PLAIN/app")
    [[ $code == 200 ]] || die "the gateway refused the training's signed token ($code; see $WORK/gateway-$setup.log)"
    wrk -t1 -c32 -d"${TRAIN_SECONDS}s" -H "Authorization: Bearer $signed" "http://127.0.0.1:$GW_PLAIN/app" >>"$WORK/wrk.out"
    for i in $(seq 30); do
      curl -s -o /dev/null -H "Authorization: Bearer $(jwt "user-$i")" "http://127.0.0.1:$GW_PLAIN/app"
      curl -s -o /dev/null -H "Authorization: Bearer $(jwt "user-$i" not-the-secret-not-the-secret-0000)" "http://127.0.0.1:$GW_PLAIN/app"
    done
  fi
  log "training ($setup): misses, other endpoints, writes, refusals"
  for i in $(seq 200); do
    curl -s -o /dev/null "${auth[@]}" "http://127.0.0.1:$GW_PLAIN/app/app-$i"
    curl -s -o /dev/null "${auth[@]}" "http://127.0.0.1:$GW_PLAIN/app/app-$i/job/job-$i"
  done
  for i in $(seq 50); do
    curl -s -o /dev/null "${auth[@]}" -X POST -H "content-type: application/json" \
      --data '{"name":"pgo"}' "http://127.0.0.1:$GW_PLAIN/app"
    curl -s -o /dev/null -H "Authorization: Bearer wrong-token-$i" "http://127.0.0.1:$GW_PLAIN/app"
    curl -s -o /dev/null "${auth[@]}" "http://127.0.0.1:$GW_PLAIN/not-routed"
  done
  # The profile is written when the process exits: stop it and wait.
  kill -TERM "$gw"
  wait "$gw" || die "the instrumented gateway did not stop cleanly (see $WORK/gateway-$setup.log)"
  unset 'PIDS[-1]'
done

# --- 3. profile --------------------------------------------------------------------
shopt -s nullglob
raw=("$WORK"/raw/gateway-*.profraw)
((${#raw[@]})) || die "the training wrote no profile"
"$PROFDATA" merge -o "$WORK/merged.profdata" "${raw[@]}"
mkdir -p "$TARGET_DIR/pgo"
HASH=$(sha256sum "$WORK/merged.profdata" | cut -c1-16)
PROFILE_DATA=$TARGET_DIR/pgo/rungen-gateway-$HASH.profdata
mv "$WORK/merged.profdata" "$PROFILE_DATA"
# Older profiles are of no use once a newer one exists.
find "$TARGET_DIR/pgo" -maxdepth 1 -name 'rungen-gateway-*.profdata' ! -path "$PROFILE_DATA" -delete

# --- 4. optimised build ------------------------------------------------------------
log "cargo build --profile $PROFILE with the profile (target/pgo)"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-use=$PROFILE_DATA" cargo build --profile "$PROFILE" --locked \
  --quiet --bin rungen-gateway --target-dir "$TARGET_DIR/pgo")
BIN=$TARGET_DIR/pgo/$PROFILE/rungen-gateway
"$BIN" check-config --config "$WORK/gateway-limiter.toml" >/dev/null || die "the optimised binary refuses a good config"
log "built $BIN"
echo "$BIN"
