#!/usr/bin/env bash
# Instructions per instance in the distributed runtime's busiest processes (the api, the
# approval pool, the action pool), counted by valgrind's callgrind: what `bench`'s timings
# cannot show on a shared VM, whose speed drifts by ±20 % between minutes
# (docs/benchmarks.md, round 28). The counterpart of scripts/bench-instructions.sh, which
# counts the embedded runtime.
#
#   scripts/bench-instructions-distributed.sh [BINARY] [SMALL] [LARGE] [RATE]
#
# Starts a deployment on a fresh database beside DATABASE_URL (an admin URL, e.g. the
# testkit's: `eval "$(cargo run -q --release -p workflow-testkit --example services)"`) and on
# KAFKA_BOOTSTRAP_SERVERS, topics under a prefix of its own: the api and the two pools under
# callgrind, the other pools, the scheduler and a PayOS sandbox natively. Then `bench --url`
# at RATE instances/s (default 10: callgrind runs a process ~50 times slower): a warm-up of
# 60, SMALL (default 150) and LARGE (default 300) instances, and an idle window as long as
# the difference of the two runs. Each process's counters are zeroed after the warm-up and
# dumped after each run and the idle window (`callgrind_control`), so
#   per instance = (LARGE's count - SMALL's - idle) / (LARGE - SMALL)
# leaves out each run's setup and the work that goes with time rather than instances
# (heartbeats, polls, sweeps). Paced runs: per-message costs that saturation would share
# among a group or a batch are counted whole. SHA-256 counts several times its share of time
# (valgrind runs ring's AVX code, not the SHA extensions), as in scripts/bench-instructions.sh.
# Profiles stay in $OUT_DIR (default a temporary directory): cg.PID.1 (SMALL), .2 (LARGE),
# .3 (idle), for `callgrind_annotate`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN="$(realpath "${1:-target/release/payos-workflows}")"
SMALL="${2:-150}"
LARGE="${3:-300}"
RATE="${4:-10}"
OUT_DIR="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
: "${DATABASE_URL:?an admin DATABASE_URL is needed to create a database for the run}"
: "${KAFKA_BOOTSTRAP_SERVERS:?KAFKA_BOOTSTRAP_SERVERS is needed}"
for tool in valgrind callgrind_control psql curl; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 1; }
done
if [ "$LARGE" -le "$SMALL" ]; then
    echo "LARGE ($LARGE) must be more than SMALL ($SMALL)" >&2
    exit 1
fi

run="$(date +%s%N)"
db="instr_$run"
ADMIN_URL="$DATABASE_URL"
export PGOPTIONS="${PGOPTIONS:--c client_min_messages=warning}"
psql -q "$ADMIN_URL" -c "CREATE DATABASE $db" >/dev/null
export DATABASE_URL="${ADMIN_URL%/*}/$db"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
API_PORT="$(port)"
SANDBOX_PORT="$(port)"
export WORKFLOWS_TOPIC_PREFIX="instr-$run." WORKFLOWS_ADMIN_TOKEN="adm_$run" \
    WORKFLOWS_LISTEN="127.0.0.1:$API_PORT" PAYOS_API_URL="http://127.0.0.1:$SANDBOX_PORT" \
    PAYOS_API_KEY=bench WORKFLOWS_EGRESS_ALLOW=127.0.0.1/32 RUST_LOG=warn \
    MIMALLOC_PURGE_DELAY="${MIMALLOC_PURGE_DELAY:-10000}"

pids=()
counted=()
stop() {
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
}
trap stop EXIT

"$BIN" migrate >/dev/null
"$BIN" topics >/dev/null
"$BIN" sandbox --listen "127.0.0.1:$SANDBOX_PORT" >"$OUT_DIR/sandbox.log" 2>&1 &
pids+=($!)
under_callgrind() {
    local name="$1"
    shift
    valgrind --tool=callgrind --callgrind-out-file="$OUT_DIR/cg.%p" "$BIN" "$@" \
        >"$OUT_DIR/$name.log" 2>&1 &
    pids+=($!)
    counted+=("$name:$!")
}
under_callgrind api api
under_callgrind approval worker --pool approval
under_callgrind action worker --pool action
for pool in condition wait notification transfers; do
    "$BIN" worker --pool "$pool" >"$OUT_DIR/worker-$pool.log" 2>&1 &
    pids+=($!)
done
"$BIN" scheduler >"$OUT_DIR/scheduler.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 180); do
    curl -sf -o /dev/null "http://127.0.0.1:$API_PORT/readyz" && break
    sleep 1
done
curl -sf -o /dev/null "http://127.0.0.1:$API_PORT/readyz" || { echo "the api never got ready" >&2; exit 1; }

bench() {
    "$BIN" bench --runtime distributed --url "http://127.0.0.1:$API_PORT" \
        --database-url "$DATABASE_URL" --admin-token "$WORKFLOWS_ADMIN_TOKEN" --no-probe \
        --rate "$RATE" --instances "$1" >"$OUT_DIR/bench.$1.out" 2>&1 \
        || { echo "bench --instances $1 failed:" >&2; tail -5 "$OUT_DIR/bench.$1.out" >&2; exit 1; }
}
control() {
    for entry in "${counted[@]}"; do
        callgrind_control "$@" "${entry#*:}" >/dev/null 2>&1
    done
}

# The pools join their consumer groups after the api answers.
bench 60
control -z
bench "$SMALL"
control -d small
start=$(date +%s)
bench "$LARGE"
control -d large
# Idle for as long as the larger run took beyond the smaller one's length at RATE.
idle=$(( $(date +%s) - start - SMALL / RATE ))
sleep "$(( idle > 1 ? idle : 1 ))"
control -d idle

total() { grep -E '^(summary|totals):' "$1" | head -1 | awk '{print $2}'; }
echo "instructions per instance (paced at $RATE/s, $SMALL and $LARGE instances, idle ${idle}s):"
sum=0
for entry in "${counted[@]}"; do
    name="${entry%%:*}"
    pid="${entry#*:}"
    small=$(total "$OUT_DIR/cg.$pid.1")
    large=$(total "$OUT_DIR/cg.$pid.2")
    quiet=$(total "$OUT_DIR/cg.$pid.3")
    per=$(( (large - small - quiet) / (LARGE - SMALL) ))
    sum=$(( sum + per ))
    printf '  %-9s %9d   (profiles %s/cg.%s.{1,2,3})\n' "$name" "$per" "$OUT_DIR" "$pid"
done
printf '  %-9s %9d\n' total "$sum"
