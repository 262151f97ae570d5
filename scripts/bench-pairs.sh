#!/usr/bin/env bash
# Compare two builds with `bench`, run alternately: this host's speed drifts by ±15–25 % within
# an hour (other tenants), so only runs taken minutes apart, binary against binary, compare.
#
#   scripts/bench-pairs.sh A B PAIRS [bench arguments...]
#   scripts/bench-pairs.sh /tmp/before target/release/payos-workflows 6 --runtime embedded --instances 3000
#   scripts/bench-pairs.sh /tmp/before target/release/payos-workflows 6 --runtime distributed --instances 3000
#
# Each pair runs A then B, the next B then A (a drift within a pair favours neither side). A
# distributed run gets a database of its own, created beside DATABASE_URL's (an admin URL, e.g.
# the testkit's: `eval "$(cargo run -q --release -p workflow-testkit --example services)"`),
# migrated by that run's binary and dropped afterwards; the broker should be warm (a cold JVM
# makes the first runs slow). Prints one line per run, then each build's medians and how many
# pairs B won on throughput. `--no-probe` is added when the binary knows it.
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n '2,14p' "$0" >&2
    exit 2
fi
A="$1"
B="$2"
PAIRS="$3"
shift 3
for bin in "$A" "$B"; do
    [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }
done
DISTRIBUTED=0
for arg in "$@"; do
    [ "$arg" = "distributed" ] && DISTRIBUTED=1
done
if [ "$DISTRIBUTED" = 1 ]; then
    : "${DATABASE_URL:?a distributed run needs DATABASE_URL (an admin URL) and KAFKA_BOOTSTRAP_SERVERS}"
    : "${KAFKA_BOOTSTRAP_SERVERS:?a distributed run needs KAFKA_BOOTSTRAP_SERVERS}"
    command -v psql >/dev/null || { echo "psql is needed to create each run's database" >&2; exit 2; }
fi
export PGOPTIONS="${PGOPTIONS:--c client_min_messages=warning}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# run LABEL BIN N: one bench run, its JSON line appended to $OUT/LABEL.
run() {
    local label="$1" bin="$2" n="$3" db url probe=()
    shift 3
    if "$bin" bench --help 2>/dev/null | grep -q -- '--no-probe'; then
        probe=(--no-probe)
    fi
    if [ "$DISTRIBUTED" = 1 ]; then
        db="bench_pairs_$$_$n"
        url="${DATABASE_URL%/*}/$db"
        psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
        "$bin" migrate --database-url "$url" >/dev/null
        "$bin" bench "$@" "${probe[@]}" --database-url "$url" >"$OUT/run.$n" 2>"$OUT/err.$n" || true
        psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $db" >/dev/null || true
    else
        "$bin" bench "$@" "${probe[@]}" >"$OUT/run.$n" 2>"$OUT/err.$n" || true
    fi
    local last
    last="$(tail -n 1 "$OUT/run.$n")"
    if [[ "$last" != "{"* ]]; then
        echo "$label: the run failed; its stderr:" >&2
        tail -n 20 "$OUT/err.$n" >&2
        exit 1
    fi
    echo "$last" >>"$OUT/$label"
    python3 -c '
import json, sys
j = json.loads(sys.argv[2])
step, pg, kafka = j["step_latency_ms"], j.get("postgres_cpu_s_per_1000"), j.get("kafka_cpu_s_per_1000")
services = "" if pg is None else "  postgres %.2f kafka %.2f" % (pg, kafka)
print("%s %8.0f/s  step p50 %s p99 %s ms  cpu/1000 %.2f%s" % (sys.argv[1], j["instances_per_s"], step["p50"], step["p99"], j["cpu_s_per_1000"], services))
' "$label" "$last"
}

n=0
for pair in $(seq 1 "$PAIRS"); do
    if [ $((pair % 2)) = 1 ]; then order=(A B); else order=(B A); fi
    for label in "${order[@]}"; do
        n=$((n + 1))
        if [ "$label" = A ]; then run A "$A" "$n" "$@"; else run B "$B" "$n" "$@"; fi
    done
done

python3 - "$OUT/A" "$OUT/B" <<'EOF'
import json, statistics, sys
runs = [[json.loads(l) for l in open(path)] for path in sys.argv[1:3]]
def med(rs, f):
    vals = [f(r) for r in rs if f(r) is not None]
    return statistics.median(vals) if vals else None
figures = [
    ("instances/s", lambda r: r["instances_per_s"]),
    ("step p50 ms", lambda r: r["step_latency_ms"]["p50"]),
    ("step p99 ms", lambda r: r["step_latency_ms"]["p99"]),
    ("e2e p99 ms", lambda r: r["e2e_latency_ms"]["p99"]),
    ("cpu s/1000", lambda r: r["cpu_s_per_1000"]),
    ("postgres s/1000", lambda r: r.get("postgres_cpu_s_per_1000")),
    ("kafka s/1000", lambda r: r.get("kafka_cpu_s_per_1000")),
]
print("medians          A          B")
for name, f in figures:
    a, b = med(runs[0], f), med(runs[1], f)
    if a is None or b is None:
        continue
    print(f"{name:<15} {a:>9.2f}  {b:>9.2f}")
wins = sum(b["instances_per_s"] > a["instances_per_s"] for a, b in zip(*runs))
print(f"B faster in {wins} of {len(runs[0])} pairs")
EOF
