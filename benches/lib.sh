# Shared by benches/compare.sh, scaling.sh and cluster.sh (sourced, not run).
# Before sourcing, a script sets LOG_TAG (its name in log lines). It gets:
#   log/die                      stderr lines "[<tag> HH:MM:SS] ..."
#   PIDS, WORK, cleanup on exit  every PID in PIDS stopped (TERM, then KILL after 5 s), then
#                                any other process the script started (a load generator),
#                                WORK removed unless KEEP_WORK is set, real-time
#                                throttling restored if rt_throttle_lift changed it
#   PRIORITY, PRIO, pin, start_pinned
#   rt_throttle_lift             SCHED_FIFO without the kernel's 50 ms/s stall (RT_THROTTLE)

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$LOG_TAG" -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# On a shared machine, give the servers and the load generator priority over other work.
# As root: SCHED_FIFO (chrt -f 20), so that a server woken by a request does not wait
# behind a compiler. PRIORITY=nice uses nice -n -20 instead, PRIORITY=none neither.
# Not root: none.
PRIORITY=${PRIORITY:-rt}
[[ $(id -u) -eq 0 ]] || PRIORITY=none
case $PRIORITY in
  rt) PRIO=(chrt -f 20) ;;
  nice) PRIO=(nice -n -20) ;;
  *) PRIO=() ;;
esac
# pin CPU CMD...: run CMD on core CPU (foreground). start_pinned CPU CMD... &: the same as
# a background job whose $! is CMD's own PID (exec), so it can be stopped and measured.
pin() { local cpu=$1; shift; taskset -c "$cpu" "${PRIO[@]}" "$@"; }
start_pinned() { local cpu=$1; shift; exec taskset -c "$cpu" "${PRIO[@]}" "$@"; }

CLK_TCK=$(getconf CLK_TCK)
# "utime stime" in clock ticks, summed over the given processes (gone ones count 0).
proc_ticks() { # pid...
  local u=0 s=0 pid f
  for pid in "$@"; do
    # fields after the ")" of comm: state is field 3, utime 14, stime 15
    f=$(sed -e 's/^.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
    set -- $f
    u=$((u + ${12})); s=$((s + ${13}))
  done
  echo "$u $s"
}

# The kernel gives SCHED_FIFO tasks 95% of each second by default (sched_rt_runtime_us):
# the rest of the second a saturated server is parked, and p99 shows that ~50 ms stall
# for every server alike. RT_THROTTLE=off (default) lifts it for the run; keep leaves it.
# cleanup restores it on exit, Ctrl-C and TERM; after a `kill -9` of the script, restore it
# by hand: echo 950000 > /proc/sys/kernel/sched_rt_runtime_us
RT_THROTTLE=${RT_THROTTLE:-off}
RT_RUNTIME_FILE=/proc/sys/kernel/sched_rt_runtime_us
RT_RUNTIME_SAVED=""
rt_throttle_lift() {
  if [[ $PRIORITY == rt && $RT_THROTTLE == off && -w $RT_RUNTIME_FILE ]]; then
    local was
    was=$(cat "$RT_RUNTIME_FILE")
    if [[ $was != -1 ]] && echo -1 >"$RT_RUNTIME_FILE"; then
      RT_RUNTIME_SAVED=$was
      log "real-time throttling lifted for the run ($RT_RUNTIME_FILE was $was)"
    fi
  elif [[ $PRIORITY == rt ]]; then
    log "real-time throttling left as is ($RT_RUNTIME_FILE = $(cat "$RT_RUNTIME_FILE" 2>/dev/null)): p99 includes its stalls"
  fi
}

PIDS=()
WORK="" # the script's temporary directory, once it makes one
# TERM every descendant of $1, deepest first: what is left after the servers in PIDS are
# stopped is a load generator (wrk, h2load) running in a subshell, when the script is
# stopped by a signal to it alone rather than to its process group (Ctrl-C).
kill_descendants() { # pid
  local child
  for child in $(pgrep -P "$1"); do
    kill_descendants "$child"
    kill -TERM "$child" 2>/dev/null
  done
}
cleanup() {
  local rc=$?
  set +e
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  kill_descendants $$
  if [[ -n "$RT_RUNTIME_SAVED" ]]; then
    echo "$RT_RUNTIME_SAVED" >"$RT_RUNTIME_FILE" && log "real-time throttling restored ($RT_RUNTIME_FILE = $RT_RUNTIME_SAVED)"
  fi
  if [[ -n "$WORK" && -d "$WORK" ]]; then
    if [[ -n "${KEEP_WORK:-}" ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# The end every bench gateway config shares: the admin listener ($1: an address or "off"),
# no file watching, warn-level JSON logs, and the scope "personal" whose key is read from
# $WORK/upstream.key.
gateway_config_tail() {
  cat <<EOF
[admin]
listen = "$1"

[reload]
watch = false

[logging]
level = "warn"
format = "json"

[[teams]]
name = "personal"
api_key = { file = "$WORK/upstream.key" }
EOF
}

# gateway_bin: sets BIN, the gateway binary a bench measures. GATEWAY_BIN if set; else with
# PGO=1 (the default: what the Dockerfile ships) the profile-guided build benches/pgo.sh makes
# (target/pgo/$PROFILE/rungen-gateway), with PGO=0 the plain target/$PROFILE/rungen-gateway.
# SKIP_BUILD=1 takes what is built. PROFILE=dist unless set.
gateway_bin() {
  local target_dir=${CARGO_TARGET_DIR:-$ROOT/target} profile=${PROFILE:-dist}
  if [[ -n "${GATEWAY_BIN:-}" ]]; then
    BIN=$GATEWAY_BIN
  elif [[ ${PGO:-1} == 1 ]]; then
    BIN=$target_dir/pgo/$profile/rungen-gateway
    if [[ -z "${SKIP_BUILD:-}" ]]; then
      log "benches/pgo.sh: the profile-guided $profile build (PGO=0 measures the plain one)"
      PROFILE=$profile bash "$ROOT/benches/pgo.sh" >/dev/null
    fi
  else
    BIN=$target_dir/$profile/rungen-gateway
    if [[ -z "${SKIP_BUILD:-}" ]]; then
      log "cargo build --profile $profile"
      (cd "$ROOT" && cargo build --profile "$profile" --locked --quiet --bin rungen-gateway)
    fi
  fi
  [[ -x "$BIN" ]] || die "no gateway binary at $BIN"
  log "gateway binary: $BIN"
}
