#!/usr/bin/env bash
# The trap-cost experiment (docs/benchmarks.md): the guest's `bench` mode natively and under the
# VMM with both shadow policies, all under `-icount shift=0,sleep=off` (the TSC counts retired
# instructions, so every number is deterministic), then the judged policy again once per
# ablation (host switches changed from their defaults, to measure what the defaults buy). Writes
# bench/results.csv and bench/ablation.csv (each starting with `# ` lines: the run metadata and
# the units), the metadata again as bench/results.meta, and bench/results.png, and prints the
# markdown tables. Run it as `./run-qemu.sh --bench`.
#
#   bench/run.sh [--trap-cost C] [guest bench words: iters=N (default 1000), op=NAME]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/bench"
LOGS="$OUT/logs"
trap_cost=700
# The policy the VMM uses by default is the one the targets are judged on.
judged=cached
# The ablation runs: the judged policy with these host options added, one entry a line. Each
# runs as vmm-<policy>-<options, '=' and ' ' written '-'> and becomes a column of the ablation
# table named by its options.
ablations=(
    "fastpath=off"
    "unsync=off"
    "shadow_share=off"
    "emulator_fill=off"
    "prefetch=on"
    "fastpath=off unsync=off shadow_share=off emulator_fill=off"
)
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
# The iterations are always named, so that the metadata says them.
[[ " ${words[*]-} " == *" iters="* ]] || words=(iters=1000 "${words[@]}")

mkdir -p "$LOGS"
cd "$ROOT"
# What was measured, taken before the build: the commit, "-dirty" when tracked files differ
# from it (the experiment's own outputs excepted: a rerun rewrites them).
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$commit" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no -- . \
        ':(exclude)bench/results.*' ':(exclude)bench/ablation.csv')" ]; then
    commit+=-dirty
fi
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
run vmm-svm --append backend=svm -- bench "${words[@]}"
ablation_args=()
for options in "${ablations[@]}"; do
    name="vmm-$judged-${options//[= ]/-}"
    run "$name" --append "shadow=$judged $options" -- bench "${words[@]}"
    ablation_args+=(--ablation "$options" "$LOGS/$name.log")
done

# The -icount setting as run-qemu.sh passes it to QEMU (its one `qemu+=(-icount ...)` line).
icount=$(sed -n 's/^ *qemu+=(-icount \(.*\))$/\1/p' "$ROOT/run-qemu.sh")
[ -n "$icount" ] || { echo "bench/run.sh: cannot find run-qemu.sh's -icount setting" >&2; icount=unknown; }
# One sidecar for both CSVs: they come from the same runs.
{
    echo "commit=$commit"
    echo "qemu=$(qemu-system-x86_64 --version | head -n 1)"
    echo "icount=$icount"
    echo "trap_cost=$trap_cost"
    echo "guest_words=${words[*]}"
    echo "judged=$judged"
    echo "ablations=$(IFS=';'; echo "${ablations[*]}")"
    echo "date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "units=instructions per op under -icount shift=0 (each CSV's '# units:' line names every column's)"
} > "$OUT/results.meta"

cargo run --quiet --release --bin bench-report -- \
    "$LOGS/native.log" "$LOGS/vmm-flush.log" "$LOGS/vmm-cached.log" \
    --judged "$judged" --trap-cost "$trap_cost" --csv "$OUT/results.csv" --meta "$OUT/results.meta" \
    "${ablation_args[@]}" --ablation-csv "$OUT/ablation.csv" \
    --svm "$LOGS/vmm-svm.log" --backends-csv "$OUT/backends.csv"

if ! command -v gnuplot >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench/run.sh: installing gnuplot-nox with apt-get for the chart" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox >/dev/null 2>&1 || echo "bench/run.sh: could not install gnuplot-nox" >&2
    fi
fi
if command -v gnuplot >/dev/null 2>&1; then
    gnuplot -e "csv='$OUT/results.csv'; png='$OUT/results.png'; trap_cost=$trap_cost; judged='$judged'" \
        "$OUT/plot.gp"
    echo "bench/run.sh: wrote $OUT/results.csv, $OUT/ablation.csv, $OUT/backends.csv, $OUT/results.meta and $OUT/results.png" >&2
else
    echo "bench/run.sh: wrote $OUT/results.csv, $OUT/ablation.csv, $OUT/backends.csv and $OUT/results.meta (no gnuplot: install gnuplot-nox for the chart)" >&2
fi
