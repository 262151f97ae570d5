#!/usr/bin/env bash
# Run the distributed runtime locally, in one command: PostgreSQL and Kafka as local processes
# (the test harness's, see crates/testkit), the topics, then the api, one worker per pool and
# the scheduler as separate processes, with the PayOS sandbox of `dev` standing in for PayOS.
# Ctrl-C stops the processes (SIGTERM: each drains its in-flight work). Logs: ./.distributed/.
#
#   scripts/distributed.sh            # api on http://127.0.0.1:8080
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p payos-workflows
BIN=target/release/payos-workflows
mkdir -p .distributed
eval "$(cargo run -q --release -p workflow-testkit --example services)"
export WORKFLOWS_ADMIN_TOKEN="${WORKFLOWS_ADMIN_TOKEN:-adm_local}"
export WORKFLOWS_LISTEN="${WORKFLOWS_LISTEN:-127.0.0.1:8080}"
export WORKFLOWS_EGRESS_ALLOW="${WORKFLOWS_EGRESS_ALLOW:-127.0.0.1/32}"
export PAYOS_API_KEY="${PAYOS_API_KEY:-sandbox}"
# The allocator keeps memory unused for 10 s before giving it back (crates/payos-workflows/src/allocator.rs).
export MIMALLOC_PURGE_DELAY="${MIMALLOC_PURGE_DELAY:-10000}"
echo "DATABASE_URL=$DATABASE_URL"
echo "KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS"

"$BIN" migrate --database-url "$DATABASE_URL"
"$BIN" topics

pids=()
stop() {
    trap - EXIT INT TERM # once: a signal's trap and then the exit's would both run it
    echo "stopping: ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}
trap stop EXIT INT TERM

# A PayOS sandbox for the action pool, unless PAYOS_API_URL names a real one.
if [[ -z "${PAYOS_API_URL:-}" ]]; then
    export PAYOS_API_URL="http://127.0.0.1:8099"
    "$BIN" sandbox --listen 127.0.0.1:8099 >.distributed/sandbox.log 2>&1 &
    pids+=($!)
fi
"$BIN" api >.distributed/api.log 2>&1 &
pids+=($!)
for pool in approval condition action wait notification transfers; do
    "$BIN" worker --pool "$pool" >".distributed/worker-$pool.log" 2>&1 &
    pids+=($!)
done
"$BIN" scheduler >.distributed/scheduler.log 2>&1 &
pids+=($!)

echo "api: http://$WORKFLOWS_LISTEN  (admin token: $WORKFLOWS_ADMIN_TOKEN)  logs: .distributed/"
echo "Ctrl-C to stop"
wait
