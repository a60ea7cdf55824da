#!/usr/bin/env bash
# The trap-cost experiment (docs/benchmarks.md): the guest's `bench` mode natively and under the
# VMM with both shadow policies, all under `-icount shift=0,sleep=off` (the TSC counts retired
# instructions, so every number is deterministic). Writes bench/results.csv and
# bench/results.png and prints a markdown table. Run it as `./run-qemu.sh --bench`.
#
#   bench/run.sh [--trap-cost C] [guest bench words, e.g. iters=1000]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/bench"
LOGS="$OUT/logs"
trap_cost=700
# The policy the VMM uses by default is the one the targets are judged on.
judged=cached
words=()
while [ $# -gt 0 ]; do
    case "$1" in
        --trap-cost) [ $# -ge 2 ] || { echo "bench/run.sh: --trap-cost needs a number" >&2; exit 2; }
                     trap_cost=$2; shift ;;
        -*) echo "bench/run.sh: unknown option '$1' (valid: --trap-cost C, then guest words such as iters=N)" >&2; exit 2 ;;
        *) words+=("$1") ;;
    esac
    shift
done
[ ${#words[@]} -gt 0 ] || words=(iters=1000)

mkdir -p "$LOGS"
cd "$ROOT"
# One build, then every run with --no-build.
(cargo build --quiet --release --target x86_64-unknown-none --target-dir "$ROOT/target/qemu" \
    -p kernel -p guest-kernel) || { echo "bench/run.sh: build failed" >&2; exit 2; }

run() {
    local name=$1; shift
    echo "bench/run.sh: $name ..." >&2
    if ! ./run-qemu.sh --no-build --icount --timeout 900 "$@" > "$LOGS/$name.log" 2>&1; then
        echo "bench/run.sh: the $name run failed; its output is in $LOGS/$name.log" >&2
        exit 1
    fi
}
run native --native -- bench "${words[@]}"
run vmm-flush --append shadow=flush -- bench "${words[@]}"
run vmm-cached --append shadow=cached -- bench "${words[@]}"

cargo run --quiet --release --bin bench-report -- \
    "$LOGS/native.log" "$LOGS/vmm-flush.log" "$LOGS/vmm-cached.log" \
    --judged "$judged" --trap-cost "$trap_cost" --csv "$OUT/results.csv"

if ! command -v gnuplot >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench/run.sh: installing gnuplot-nox with apt-get for the chart" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox >/dev/null 2>&1 || echo "bench/run.sh: could not install gnuplot-nox" >&2
    fi
fi
if command -v gnuplot >/dev/null 2>&1; then
    gnuplot -e "csv='$OUT/results.csv'; png='$OUT/results.png'" "$OUT/plot.gp"
    echo "bench/run.sh: wrote $OUT/results.csv and $OUT/results.png" >&2
else
    echo "bench/run.sh: wrote $OUT/results.csv (no gnuplot: install gnuplot-nox for the chart)" >&2
fi
