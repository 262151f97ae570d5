#!/usr/bin/env bash
# Instructions per instance of the embedded seed workload, counted by valgrind's callgrind:
# a figure that does not move with the host's noise, for comparing two builds of the engine
# where `bench`'s timings (±30 % run to run on a shared VM) cannot see a few per cent.
#
#   scripts/bench-instructions.sh [BINARY] [SMALL] [LARGE]
#
# Runs `BINARY bench --runtime embedded` under callgrind at SMALL and LARGE instances (default
# 400 and 800) and prints the difference divided by LARGE - SMALL: the instructions one more
# instance costs, the run's setup left out. The engine, the PayOS sandbox and the bench's
# driver are all counted, and so is the bench reading the latencies back after the run.
# Profiles stay in $OUT_DIR (default a temporary directory) for `callgrind_annotate`.
# Instruction counts weigh every instruction alike: SIMD-heavy code (SHA-256) counts far more
# than its share of time, so confirm a change found here with `bench` timings, paired.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN="${1:-target/release/payos-workflows}"
SMALL="${2:-400}"
LARGE="${3:-800}"
OUT_DIR="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"

if ! command -v valgrind >/dev/null; then
    echo "valgrind is not installed (Debian: apt-get install valgrind)" >&2
    exit 1
fi
if [ ! -x "$BIN" ]; then
    cargo build --release -p payos-workflows
fi
if [ "$LARGE" -le "$SMALL" ]; then
    echo "LARGE ($LARGE) must be more than SMALL ($SMALL)" >&2
    exit 1
fi

# The host probe (round 19) would add the same work to both counts; builds older than it lack
# the flag.
PROBE_FLAG=()
if "$BIN" bench --help 2>/dev/null | grep -q -- '--no-probe'; then
    PROBE_FLAG=(--no-probe)
fi

count() {
    local n="$1" out="$OUT_DIR/callgrind.$1"
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$BIN" bench --runtime embedded "${PROBE_FLAG[@]}" --instances "$n" >"$OUT_DIR/bench.$n.json" 2>"$OUT_DIR/valgrind.$n.log"
    # "==PID== Collected : N" is the run's total of instructions executed.
    grep -E '^==[0-9]+== Collected : ' "$OUT_DIR/valgrind.$n.log" | awk '{print $4}'
}

small=$(count "$SMALL")
large=$(count "$LARGE")
per=$(( (large - small) / (LARGE - SMALL) ))
echo "instructions: $SMALL instances $small, $LARGE instances $large"
echo "instructions per instance: $per"
echo "profiles: $OUT_DIR/callgrind.$SMALL $OUT_DIR/callgrind.$LARGE"
