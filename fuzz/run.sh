#!/usr/bin/env bash
# Coverage-guided fuzzing of the emulator and the shadow MMU with libFuzzer on the pinned stable
# toolchain (docs/fuzzing.md).
#
#   ./fuzz/run.sh emulator 600        fuzz the emulator for 600 seconds on one core
#   ./fuzz/run.sh shadow_mmu 600      the same for the shadow MMU
#   ./fuzz/run.sh --merge emulator    minimize the working corpus into fuzz/corpus/emulator
#
# Exit status: 0 nothing found (also when interrupted with Ctrl-C), 1 a crash was found (the
# input is in target/fuzz/artifacts/), 2 bad usage or a failed build.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGETS=(emulator shadow_mmu)
HOST=x86_64-unknown-linux-gnu
OUT="$ROOT/target/fuzz"

usage() {
    cat <<'EOF'
usage: ./fuzz/run.sh TARGET [SECONDS] [-- libFuzzer options...]
       ./fuzz/run.sh --merge TARGET

Fuzzes TARGET (emulator or shadow_mmu) for SECONDS (default 600) on one core with libFuzzer,
starting from the committed corpus fuzz/corpus/TARGET; the inputs it keeps go to
target/fuzz/corpus/TARGET, a crash to target/fuzz/artifacts/TARGET/. At the end it prints
the number of executions.

options:
  --help            show this help and exit
  --merge TARGET    replace fuzz/corpus/TARGET by a small set of its inputs and the working
                    corpus's that covers every edge they cover (libFuzzer -merge=1, then a
                    greedy set cover; needs python3); crash-* and plant-* files are kept
  -- OPTIONS        passed to libFuzzer as they are (e.g. -- -runs=1000000 -max_len=512)
EOF
}

die() {
    echo "fuzz/run.sh: $*" >&2
    echo "valid targets: ${TARGETS[*]}; valid options: --help, --merge TARGET, -- libFuzzer options (see --help)" >&2
    exit 2
}

valid_target() {
    local t
    for t in "${TARGETS[@]}"; do
        [[ "$1" == "$t" ]] && return 0
    done
    return 1
}

# The harness built with SanitizerCoverage through stable rustc flags (what cargo-fuzz passes,
# minus the nightly-only sanitizer): 8-bit edge counters, the PC table and comparison tracing
# that libFuzzer reads. Built for the host target explicitly, so the flags reach the harness
# and the libraries but not build scripts or proc macros.
build() {
    local flags=(
        -Cpasses=sancov-module
        -Cllvm-args=-sanitizer-coverage-level=4
        -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
        -Cllvm-args=-sanitizer-coverage-pc-table
        -Cllvm-args=-sanitizer-coverage-trace-compares
        --cfg fuzzing
    )
    RUSTFLAGS="${flags[*]}" cargo build --release --quiet \
        --manifest-path "$ROOT/fuzz/libfuzzer/Cargo.toml" \
        --target "$HOST" --target-dir "$OUT/build" --bin "$1" ||
        { echo "fuzz/run.sh: the build of $1 failed" >&2; exit 2; }
    echo "$OUT/build/$HOST/release/$1"
}

merge=false
target=""
seconds=600
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --help | -h) usage; exit 0 ;;
        --merge)
            [[ $# -ge 2 ]] || die "--merge needs a target"
            merge=true; target=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -*) die "unknown option '$1'" ;;
        *)
            if [[ -z "$target" ]]; then
                target=$1
            elif [[ "$1" =~ ^[0-9]+$ ]] && [[ "$seconds" == 600 ]]; then
                seconds=$1
            else
                die "unexpected argument '$1'"
            fi
            shift ;;
    esac
done
[[ -n "$target" ]] || { usage >&2; die "no target given"; }
valid_target "$target" || die "unknown target '$target'"
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -gt 0 ]] || die "SECONDS must be a positive number"

bin=$(build "$target")
seeds="$ROOT/fuzz/corpus/$target"
work="$OUT/corpus/$target"
artifacts="$OUT/artifacts/$target"
mkdir -p "$work" "$artifacts"

if $merge; then
    # libFuzzer's merge keeps the inputs that add an edge (counters off: edges, not hit
    # counts), taken smallest first; fuzz/cover.py then keeps a greedy set cover of those,
    # a fraction of them. Crash reproducers (crash-*) stay as they are: they are regression
    # inputs, whatever they cover.
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    mkdir "$scratch/merged"
    "$bin" -merge=1 -use_counters=0 "$scratch/merged" "$seeds" "$work" 2>&1 |
        grep -E "MERGE-OUTER: [0-9]+ new files" || true
    find "$seeds" -maxdepth 1 -type f ! -name 'crash-*' ! -name 'plant-*' -delete
    python3 "$ROOT/fuzz/cover.py" "$bin" "$scratch/merged" "$seeds"
    echo "fuzz/corpus/$target: $(find "$seeds" -maxdepth 1 -type f | wc -l) inputs"
    exit 0
fi

# One process, one core (-jobs/-workers unset); the committed corpus seeds the working one.
status=0
"$bin" "$work" "$seeds" -max_total_time="$seconds" -artifact_prefix="$artifacts/" \
    -print_final_stats=1 "${extra[@]}" 2>&1 | tee "$OUT/$target.log" |
    grep -vE '^#[0-9]+\s+(NEW|REDUCE|pulse)' || true
grep -q "Done [0-9]* runs" "$OUT/$target.log" || status=1
runs=$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$OUT/$target.log" | grep -oE '[0-9]+$' || echo 0)
echo "fuzz/run.sh: $target: $runs executions in this run (log: target/fuzz/$target.log)"
if [[ $status -ne 0 ]]; then
    if grep -q "libFuzzer: run interrupted" "$OUT/$target.log"; then
        # Ctrl-C (SIGINT): libFuzzer stops early and still prints its counts; nothing failed.
        echo "fuzz/run.sh: $target: interrupted before ${seconds} s; no failure" >&2
        exit 0
    fi
    echo "fuzz/run.sh: $target: crash; the input is in target/fuzz/artifacts/$target/" >&2
fi
exit $status
