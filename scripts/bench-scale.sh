#!/usr/bin/env bash
# Start-up cost against machine size: qomvm -M pc with -smp 64 -m 64G against
# -smp 1 -m 128M. See usage().
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

SMALL=(-smp 1 -m 128M)
LARGE=(-smp 64 -m 64G)
# The issue's bound on large/small, for both figures.
LIMIT=1.5

runs=5
warmup=1
qomvm_bin=
build=1

usage() {
    cat <<'EOF'
Usage: scripts/bench-scale.sh [options]

Starts qomvm -M pc with -smp 1 -m 128M ("small") and with -smp 64 -m 64G
("large"), alternately, and measures per start:

  KVM_RUN  process start -> CPU 0's first KVM_RUN, from qomvm's own log line
           "first KVM_RUN N ms after process start" (RUST_LOG=boot=info,
           counted from the start of main())
  RSS      peak resident set size of the process (/usr/bin/time's %M, from
           wait4's ru_maxrss)

The machine's firmware is a 64 KiB ROM made here whose reset vector writes to
isa-debug-exit, so qomvm exits (status 1) right after its first KVM_RUN. The
figures are the cost of creating the machine (RAM, vCPUs, devices, firmware
tables) and nothing of a guest's.

Prints the medians of the measured starts for each size, the ratios
large/small, and whether each ratio is below 1.5 (issue 16); the exit status
is 1 if one is not. Needs a usable /dev/kvm (PVM or hardware; runs directly,
not in the nested rig) and /usr/bin/time.

Options:
  --runs N      measured starts per size (default 5)
  --warmup N    discarded starts per size before them (default 1)
  --qomvm PATH  qomvm binary (default: target/release/qomvm, built with
                cargo build --release first unless --no-build)
  --no-build    do not run cargo build
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
    --runs) runs=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --qomvm) qomvm_bin=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench-scale: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$qomvm_bin" ]; then
    qomvm_bin=${CARGO_TARGET_DIR:-$REPO/target}/release/qomvm
    if [ "$build" = 1 ]; then
        (cd "$REPO" && cargo build --release --bin qomvm)
    fi
fi
[ -x "$qomvm_bin" ] || { echo "bench-scale: no qomvm binary at $qomvm_bin" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "bench-scale: /usr/bin/time is needed (Debian package time)" >&2; exit 2; }
if ! [ -r /dev/kvm ] || ! [ -w /dev/kvm ]; then
    echo "bench-scale: /dev/kvm is not usable here" >&2
    exit 2
fi

# The firmware: at f000:fff0, `mov dx, 0x501; out dx, al` (isa-debug-exit's port) then `hlt`.
rom=$(mktemp "${TMPDIR:-/tmp}/bench-scale-rom.XXXXXX")
trap 'rm -f "$rom"' EXIT
{
    head -c 65520 /dev/zero
    printf '\272\001\005\356\364'
    head -c 11 /dev/zero
} >"$rom"

# One start; prints "KVM_RUN_MS RSS_KB".
one() {
    local log kvm_run rss
    log=$(RUST_LOG=boot=info timeout 60 /usr/bin/time -f 'bench-scale-rss-kb %M' \
        "$qomvm_bin" -M pc "$@" -bios "$rom" -device isa-debug-exit -display none -no-reboot \
        </dev/null 2>&1 >/dev/null || true)
    kvm_run=$(sed -n 's/.*first KVM_RUN \([0-9.]*\) ms after process start.*/\1/p' <<<"$log" | head -n1)
    rss=$(sed -n 's/^bench-scale-rss-kb \([0-9]*\)$/\1/p' <<<"$log" | tail -n1)
    if [ -z "$kvm_run" ] || [ -z "$rss" ]; then
        echo "bench-scale: qomvm -M pc $* did not reach its first KVM_RUN; its output:" >&2
        printf '%s\n' "$log" | tail -n 20 >&2
        exit 1
    fi
    echo "$kvm_run $rss"
}

median() {
    sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

small_runs=()
large_runs=()
for ((i = 0; i < warmup + runs; i++)); do
    # Alternate which size goes first, so drift hits both alike.
    if ((i % 2 == 0)); then
        s=$(one "${SMALL[@]}")
        l=$(one "${LARGE[@]}")
    else
        l=$(one "${LARGE[@]}")
        s=$(one "${SMALL[@]}")
    fi
    if ((i >= warmup)); then
        small_runs+=("$s")
        large_runs+=("$l")
        echo "start $((i - warmup + 1)): small KVM_RUN ${s% *} ms RSS ${s#* } KiB; large KVM_RUN ${l% *} ms RSS ${l#* } KiB"
    fi
done

small_run=$(printf '%s\n' "${small_runs[@]}" | cut -d' ' -f1 | median)
small_rss=$(printf '%s\n' "${small_runs[@]}" | cut -d' ' -f2 | median)
large_run=$(printf '%s\n' "${large_runs[@]}" | cut -d' ' -f1 | median)
large_rss=$(printf '%s\n' "${large_runs[@]}" | cut -d' ' -f2 | median)

status=0
verdict() { # NAME SMALL LARGE UNIT
    local ratio ok
    ratio=$(awk -v a="$3" -v b="$2" 'BEGIN { printf "%.2f", a / b }')
    ok=$(awk -v r="$ratio" -v l="$LIMIT" 'BEGIN { print (r < l) ? "ok" : "OVER" }')
    [ "$ok" = ok ] || status=1
    printf '%-8s small %10s %-3s large %10s %-3s ratio %sx (< %sx: %s)\n' "$1" "$2" "$4" "$3" "$4" "$ratio" "$LIMIT" "$ok"
}
echo
echo "qomvm -M pc, medians of $runs starts each (after $warmup warm-up), small = ${SMALL[*]}, large = ${LARGE[*]}:"
verdict KVM_RUN "$small_run" "$large_run" ms
verdict RSS "$small_rss" "$large_rss" KiB
if [ -d /sys/module/kvm_pvm ]; then
    echo "environment: $(nproc) CPUs, /dev/kvm is PVM; $(uname -r)"
else
    echo "environment: $(nproc) CPUs, hardware KVM; $(uname -r)"
fi
exit $status
