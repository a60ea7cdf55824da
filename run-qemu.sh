#!/usr/bin/env bash
# Builds the kernels and boots them in QEMU: the one way to start this VMM.
#
#   ./run-qemu.sh                 the host kernel (the VMM) with the guest kernel as its module
#   ./run-qemu.sh --native        the guest kernel alone on bare QEMU, no VMM
#   ./run-qemu.sh -- bench        words after -- are the guest's own command line
#   ./run-qemu.sh --bench         the trap-cost experiment (bench/run.sh): CSV, table, chart
#   ./run-qemu.sh --lab N         grade teaching lab N (src/bin/grade.rs, docs/labs/README.md)
#   ./run-qemu.sh --iso           target/trapvmm.iso (GRUB, the VMM, the guest), booted from CD
#
# Exit status: 0 guest success, 1 guest failure, 3 host panic, 4 guest stopped by the VMM,
# 2 anything else (bad usage, configuration error, timeout, QEMU failure).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TARGET=x86_64-unknown-none
# The kernels' build: optimised (with debug info) by default; --debug-build sets these again.
PROFILE=release
TARGET_DIR="$ROOT/target/qemu"
BIN_DIR="$TARGET_DIR/$TARGET/release"

usage() {
    cat <<'EOF'
usage: ./run-qemu.sh [options] [-- guest words...]

Boots the trap-and-emulate VMM (the host kernel) in QEMU with a guest as its Multiboot module.

options:
  --help             show this help and exit
  --native           boot the guest kernel itself on bare QEMU (no VMM)
  --bench            the trap-cost experiment: the guest's bench natively and under the VMM
                     (both shadow policies, the ablation runs, then backend=svm) with --icount;
                     writes bench/results.csv, bench/ablation.csv, bench/backends.csv,
                     bench/results.meta and bench/results.png, prints the tables (words after --
                     go to the guest's bench)
  --trap-cost C      with --bench: cycles of one trap round trip for the modelled column (700)
  --guest PATH       run this guest ELF instead of the built guest-kernel
  --kernel PATH      boot this host kernel (VMM) image instead of the built one
  --mem MiB          guest RAM in MiB, 4..3072 (default 32); QEMU gets 96 MiB more for the
                     VMM (with --native, 1 MiB more for the firmware's tables)
  --icount           deterministic instruction counting (-icount shift=0,sleep=off): rdtsc
                     then counts retired instructions (host option icount=on: the VMM's report
                     says instructions); without it, cycle figures follow the host's clock
                     and differ by up to 25x between runs
  --gdb              QEMU waits for gdb on localhost:1234 and prints the gdb command to use
                     (both kernels' symbols); no timeout unless --timeout is given
                     (docs/debugging.md walks through one trap)
  --debug-build      build the VMM unoptimised, with debug assertions and full debug info, into
                     target/qemu-debug (the guests stay optimised); for stepping with --gdb
  --trace[=KINDS]    the VMM prints one line per trap, the first 1000 (host option trace=1000);
                     KINDS, comma-separated, keeps only these (host option trace_kinds=):
                       pf cr3 syscall io irq exception insn (docs/debugging.md);
                     start later with --append "trace_skip=N" (pass over N traps of those kinds)
                     or "trace_from=TEXT" (from the guest's first console line containing TEXT)
  --timeout S        stop QEMU after S seconds (default 120, none with --gdb); a timeout exits
                     with status 2
  --append "k=v ..." extra host command-line options (timer_hz=, mem=, trace=, trace_kinds=,
                     trace_skip=, trace_from=, shadow=, emulator_fill=, profile=, fastpath=,
                     unsync=, shadow_share=, prefetch=, icount=, watchdog=, debug=, mode=,
                     backend=trap|svm: svm runs the guest under AMD SVM with nested paging,
                     docs/hardware-assist.md; values and defaults in README.md, "Options");
                     a bad one is refused with
                     the valid ones listed. mem=N overrides --mem for the host only (QEMU
                     keeps --mem's size; a note says so); debug=panic is a test hook: the
                     host panics on purpose right after reading its command line, to
                     exercise the panic path (exit status 3)
  --iso              write target/trapvmm.iso, a BIOS-bootable CD image: GRUB boots the VMM
                     with the guest (--guest) as its Multiboot module and the host command line
                     this run would use (mem=32 by default; --mem, --trace, --append and the
                     guest words go into the GRUB entry), then boot it in QEMU from the CD.
                     Needs grub-mkrescue (Debian: grub-pc-bin, xorriso, mtools; installed with
                     apt-get when missing and run as root). The VMM prints on COM1 only
  --no-build         do not run cargo build first (the tests build once, then use this)
  --lab N            grade teaching lab N: build the VMM with your code (labs/labN_*.rs),
                     run the lab's checks, print one line per check and a score; exit status
                     0 only when all pass (docs/labs/README.md; an unknown N lists the labs)
  --reference        with --lab: run the same checks against the reference implementation
  -- words...        everything after -- is passed to the guest's command line

exit status: 0 guest success, 1 guest failure, 3 host panic, 4 guest stopped by the VMM,
             2 anything else (bad usage, configuration error, timeout, a reset)
EOF
}

die_usage() {
    echo "run-qemu.sh: $1" >&2
    usage >&2
    exit 2
}

native=0 iso=0 bench=0 trap_cost=700 guest="" kernel="" mem=32 icount=0 gdb=0 debug_build=0 trace=0 trace_kinds="" timeout_s=120 timeout_given=0 append="" build=1
lab="" reference=0 other_options=0
guest_words=()
while [ $# -gt 0 ]; do
    case "$1" in
        --lab|--reference) ;;
        *) other_options=1 ;;
    esac
    case "$1" in
        --help|-h) usage; exit 0 ;;
        --native) native=1 ;;
        --iso) iso=1 ;;
        --bench) bench=1 ;;
        --trap-cost) [ $# -ge 2 ] || die_usage "--trap-cost needs a number"; trap_cost=$2; shift ;;
        --guest) [ $# -ge 2 ] || die_usage "--guest needs a path"; guest=$2; shift ;;
        --kernel) [ $# -ge 2 ] || die_usage "--kernel needs a path"; kernel=$2; shift ;;
        --lab) [ $# -ge 2 ] || die_usage "--lab needs a lab number"; lab=$2; shift ;;
        --reference) reference=1 ;;
        --mem) [ $# -ge 2 ] || die_usage "--mem needs a size in MiB"; mem=$2; shift ;;
        --icount) icount=1 ;;
        --gdb) gdb=1 ;;
        --debug-build) debug_build=1 ;;
        --trace) trace=1 ;;
        # The kernel checks the names (an unknown one is a configuration error listing them).
        --trace=*) trace=1; trace_kinds=${1#--trace=}
            [ -n "$trace_kinds" ] || die_usage "--trace= needs trace kinds: pf cr3 syscall io irq exception insn" ;;
        --timeout) [ $# -ge 2 ] || die_usage "--timeout needs seconds"; timeout_s=$2; timeout_given=1; shift ;;
        --append) [ $# -ge 2 ] || die_usage "--append needs a string"; append=$2; shift ;;
        --no-build) build=0 ;;
        --) shift; guest_words=("$@"); break ;;
        *) die_usage "unknown option '$1'" ;;
    esac
    shift
done

if [ -n "$lab" ]; then
    [ "$other_options" = 0 ] || die_usage "--lab takes no other option than --reference"
    # The grader builds what it grades and boots QEMU through this script (--no-build).
    grade_args=("$lab")
    [ "$reference" = 0 ] || grade_args+=(--reference)
    exec cargo run --quiet --manifest-path "$ROOT/Cargo.toml" --bin grade -- "${grade_args[@]}"
fi
[ "$reference" = 0 ] || die_usage "--reference goes with --lab N"

[[ "$mem" =~ ^[0-9]+$ ]] && [ "$mem" -ge 4 ] && [ "$mem" -le 3072 ] \
    || die_usage "--mem must be a number of MiB between 4 and 3072, not '$mem'"
[[ "$timeout_s" =~ ^[0-9]+$ ]] && [ "$timeout_s" -ge 1 ] \
    || die_usage "--timeout must be a positive number of seconds, not '$timeout_s'"
[[ "$trap_cost" =~ ^[0-9]+$ ]] || die_usage "--trap-cost must be a whole number of cycles, not '$trap_cost'"
if [ "$debug_build" = 1 ]; then
    [ "$bench" = 0 ] || die_usage "--bench measures the optimised VMM; it cannot take --debug-build"
    PROFILE=kernel-debug    # Cargo.toml, [profile.kernel-debug]
    TARGET_DIR="$ROOT/target/qemu-debug"
    BIN_DIR="$TARGET_DIR/$TARGET/$PROFILE"
fi
if [ "$iso" = 1 ]; then
    [ "$native" = 0 ] || die_usage "--iso holds the VMM; --native boots the guest with no VMM"
    [ "$bench" = 0 ] || die_usage "--iso and --bench are separate runs"
    # icount=on would label the costs as instructions on every machine the ISO boots.
    [ "$icount" = 0 ] || die_usage "--icount is a QEMU setting; the ISO boots on machines without it"
fi
if [ "$bench" = 1 ]; then
    exec "$ROOT/bench/run.sh" --trap-cost "$trap_cost" "${guest_words[@]}"
fi
if [ -n "$guest" ] && [ -d "$guest" ]; then
    die_usage "--guest: '$guest' is a directory, not a guest ELF file"
fi
if [ -n "$guest" ] && [ ! -f "$guest" ]; then
    die_usage "--guest: no such file '$guest'"
fi
if [ -n "$kernel" ] && [ ! -f "$kernel" ]; then
    die_usage "--kernel: no such file '$kernel'"
fi
if [ "$native" = 1 ] && [ -n "$kernel" ]; then
    die_usage "--kernel is the VMM's image; --native runs the guest with no VMM"
fi
if [ "$native" = 1 ] && { [ "$trace" = 1 ] || [ -n "$append" ]; }; then
    die_usage "--trace and --append configure the VMM; --native runs the guest with no VMM"
fi

# apt_install WHAT PACKAGE...: WHAT is missing; install the Debian packages with apt-get when
# run as root, otherwise say how and exit 2.
apt_install() {
    local what=$1
    shift
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run-qemu.sh: $what is missing; installing $* with apt-get" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >&2 \
            || { echo "run-qemu.sh: apt-get could not install $*" >&2; exit 2; }
    else
        echo "run-qemu.sh: $what is missing; install it with:" >&2
        echo "    sudo apt-get install -y $*" >&2
        exit 2
    fi
}

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    apt_install qemu-system-x86_64 qemu-system-x86
fi

# grub-mkrescue (grub-common) makes the ISO from GRUB's BIOS modules (grub-pc-bin) with xorriso;
# mtools' mformat writes the image's FAT part.
GRUB_BIOS_DIR=/usr/lib/grub/i386-pc
iso_tools_present() {
    command -v grub-mkrescue >/dev/null 2>&1 && [ -f "$GRUB_BIOS_DIR/cdboot.img" ] \
        && command -v xorriso >/dev/null 2>&1 && command -v mformat >/dev/null 2>&1
}
if [ "$iso" = 1 ] && ! iso_tools_present; then
    apt_install "grub-mkrescue with GRUB's BIOS modules" grub-pc-bin xorriso mtools
    iso_tools_present \
        || { echo "run-qemu.sh: grub-mkrescue, $GRUB_BIOS_DIR, xorriso or mformat still missing" >&2; exit 2; }
fi

if [ "$build" = 1 ]; then
    # rustup installs rust-toolchain.toml's targets only with a new toolchain: an existing one
    # may lack the bare-metal target ("can't find crate for `core`").
    if command -v rustup >/dev/null 2>&1 \
        && ! (cd "$ROOT" && rustup target list --installed 2>/dev/null) | grep -qx "$TARGET"; then
        echo "run-qemu.sh: adding the $TARGET target to the pinned toolchain" >&2
        (cd "$ROOT" && rustup target add "$TARGET") >&2 || { echo "run-qemu.sh: cannot add $TARGET" >&2; exit 2; }
    fi
    # A separate target directory, so this nested cargo never waits on an outer one's lock.
    (cd "$ROOT" && cargo build --quiet --profile "$PROFILE" --target "$TARGET" --target-dir "$TARGET_DIR" \
        -p kernel -p guest-kernel -p test-guests) || { echo "run-qemu.sh: build failed" >&2; exit 2; }
fi

# grub_quote WORD: WORD as one single-quoted word of a GRUB script (sh rules: ' becomes '\'').
grub_quote() {
    local q="'\\''"
    printf "'%s'" "${1//\'/$q}"
}

# make_iso ISO KERNEL GUEST CMDLINE: a BIOS-bootable CD image whose GRUB boots KERNEL (the VMM)
# by Multiboot with CMDLINE and GUEST as its module, as QEMU's -kernel/-append/-initrd do.
make_iso() {
    local iso=$1 kernel=$2 guest=$3 cmdline=$4 dir name word args="" log
    local -a words
    dir=$(mktemp -d)
    mkdir -p "$dir/boot/grub"
    cp "$kernel" "$dir/boot/trapvmm"
    name=$(basename "$guest")
    cp "$guest" "$dir/boot/$name"
    read -ra words <<<"$cmdline"
    for word in "${words[@]}"; do args+=" $(grub_quote "$word")"; done
    cat >"$dir/boot/grub/grub.cfg" <<GRUB_CFG
# Written by run-qemu.sh --iso. The words after the kernel's path are the host command line
# (GRUB 2 passes them without the path); the module is the guest, named by its string, as
# QEMU's -initrd names it. The VMM prints on COM1 only.
set timeout=2
menuentry $(grub_quote "trapvmm: the trap-and-emulate VMM running $name") {
    multiboot /boot/trapvmm$args
    module $(grub_quote "/boot/$name") $(grub_quote "/boot/$name")
}
GRUB_CFG
    log=$(grub-mkrescue -o "$iso.tmp" "$dir" 2>&1) \
        || { echo "run-qemu.sh: grub-mkrescue failed:" >&2; echo "$log" >&2; rm -rf "$dir"; exit 2; }
    rm -rf "$dir"
    mv "$iso.tmp" "$iso"
    echo "run-qemu.sh: wrote $iso (GRUB entry: multiboot /boot/trapvmm$args)" >&2
}

[ -n "$kernel" ] || kernel="$BIN_DIR/kernel"
guest_kernel="$BIN_DIR/guest-kernel"
[ -n "$guest" ] || guest="$guest_kernel"

# -cpu: QEMU's TCG "max" CPU with Intel's vendor string (the guest kernel uses SYSENTER in
# 64-bit mode, which QEMU allows only for Intel) and, named so a QEMU that changes its defaults
# fails loudly, AMD SVM with nested paging for backend=svm (docs/hardware-assist.md).
qemu=(qemu-system-x86_64
    -machine q35 -cpu max,vendor=GenuineIntel,svm=on,npt=on
    -serial stdio -display none -monitor none -no-reboot
    -device isa-debug-exit,iobase=0xf4,iosize=0x04)
if [ "$icount" = 1 ]; then
    qemu+=(-icount shift=0,sleep=off)
fi

if [ "$native" = 1 ]; then
    [ -f "$guest" ] || die_usage "guest image '$guest' not found (build failed?)"
    # QEMU boots a kernel natively only through a Multiboot 1 header (magic 0x1BADB002) in the
    # first 8 KiB; without one it fails with a raw "PVH ELF Note" error, so say what is wrong.
    if ! head -c 8192 "$guest" | od -An -tx1 -v | tr -d ' \n' | grep -q "02b0ad1b"; then
        echo "run-qemu.sh: '$guest' has no Multiboot 1 header in its first 8 KiB, so it cannot boot natively" >&2
        echo "    (docs/writing-a-guest.md, \"The image\"; under the VMM, without --native, it needs none)" >&2
        exit 2
    fi
    # The firmware (SeaBIOS) keeps the top 132 KiB of RAM for its tables and the Multiboot
    # loader's mem_upper leaves them out, so QEMU gets one MiB more than --mem: the guest then
    # sees at least --mem MiB natively too (--mem 32: 32 MiB + 892 KiB), as under the VMM.
    qemu+=(-m "$((mem + 1))" -kernel "$guest" -append "${guest_words[*]:-}")
    symbols="$guest"
else
    [ -f "$kernel" ] || die_usage "host kernel '$kernel' not found (build failed?)"
    # The host learns the guest's RAM from mem=; an --append mem= would silently override --mem
    # (QEMU is still sized from --mem), so it wins only with a note saying so. The tests use it
    # to give the host a size the machine cannot hold.
    append_mem=""
    read -ra append_words <<<"$append"
    for word in "${append_words[@]}"; do
        case "$word" in
            --) break ;;
            mem=*) append_mem=${word#mem=} ;;
        esac
    done
    if [ -n "$append_mem" ]; then
        echo "run-qemu.sh: note: --append mem=$append_mem overrides --mem $mem for the host;" \
            "QEMU still gets --mem + 96 MiB ($((mem + 96)) MiB). Use --mem alone to size both." >&2
        host_cmdline=""
    else
        host_cmdline="mem=$mem"
    fi
    [ "$trace" = 1 ] && host_cmdline+=" trace=1000"
    [ -n "$trace_kinds" ] && host_cmdline+=" trace_kinds=$trace_kinds"
    # The host cannot see QEMU's -icount; told, its report labels costs as instructions.
    [ "$icount" = 1 ] && host_cmdline+=" icount=on"
    [ -n "$append" ] && host_cmdline+=" $append"
    host_cmdline=${host_cmdline# }
    [ ${#guest_words[@]} -gt 0 ] && host_cmdline+=" -- ${guest_words[*]}"
    # QEMU RAM: the guest's plus room for the host kernel, shadow page tables and heap.
    qemu+=(-m "$((mem + 96))")
    if [ "$iso" = 1 ]; then
        make_iso "$ROOT/target/trapvmm.iso" "$kernel" "$guest" "$host_cmdline"
        qemu+=(-cdrom "$ROOT/target/trapvmm.iso")
    else
        qemu+=(-kernel "$kernel" -append "$host_cmdline")
        if [ -f "$guest" ]; then
            # QEMU splits -initrd at commas: a path with a comma cannot be a module.
            [[ "$guest" != *,* ]] || die_usage "--guest: the path must not contain a comma"
            qemu+=(-initrd "$guest")
        fi
    fi
    symbols="$kernel"
fi

if [ "$gdb" = 1 ]; then
    qemu+=(-s -S)
    # Both symbol files: the VMM's and the guest's (their own names do not collide, and their
    # addresses do not overlap: the VMM lives in the top 2 GiB, slot 511).
    gdb_command="gdb -q $symbols"
    # (add-symbol-file asks "(y or n)" unless confirmations are off.)
    [ "$native" = 1 ] \
        || gdb_command+=" -ex 'set confirm off' -ex 'add-symbol-file $guest' -ex 'set confirm on'"
    echo "run-qemu.sh: QEMU waits for gdb on localhost:1234; in another terminal run:" >&2
    echo "    $gdb_command -ex 'target remote localhost:1234'" >&2
    if [ "$timeout_given" = 0 ]; then
        echo "run-qemu.sh: no timeout while debugging (--timeout S sets one)" >&2
        timeout_s=0     # timeout(1): a duration of 0 disables it
    fi
fi

set +e
timeout --foreground "$timeout_s" "${qemu[@]}"
status=$?
set -e

# isa-debug-exit makes QEMU exit with (code << 1) | 1; see boot::exit_code.
case $status in
    33) exit 0 ;;   # 0x10 guest success
    35) exit 1 ;;   # 0x11 guest failure
    37) exit 3 ;;   # 0x12 host panic
    39) exit 4 ;;   # 0x13 guest stopped by the VMM
    41) exit 2 ;;   # 0x14 configuration error (the kernel printed why)
    # With -no-reboot a reset ends QEMU with status 0 and no exit code from the kernel.
    0) echo "run-qemu.sh: the machine reset without an exit code (a triple fault?)" >&2; exit 2 ;;
    124) echo "run-qemu.sh: timed out after ${timeout_s}s" >&2; exit 2 ;;
    *) echo "run-qemu.sh: QEMU exited with status $status" >&2; exit 2 ;;
esac
