#!/usr/bin/env bash
# Checks a disk image for the pattern the test guest's qomvm.disktest=DEV:SEED
# mode writes (scripts/guest-assets.sh --help describes it), with qemu-io, and
# prints the md5 the guest prints with QOMVM-DISKTEST-OK. A reference for tests
# that recompute the pattern themselves.
set -euo pipefail

QOMVM_PROG=disktest-check
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/debian.sh
. "$SCRIPT_DIR/lib/debian.sh"

usage() {
    cat <<'USAGE'
Usage: scripts/disktest-check.sh [-f FORMAT] [--print] IMAGE SEED [SIZE]

Reads IMAGE (raw or qcow2; FORMAT as qemu-io's -f, default: probed) with
qemu-io "read -P" over the regions that qomvm.disktest=DEV:SEED writes and
prints "disktest-check: OK <md5>" (the md5 the guest prints after
QOMVM-DISKTEST-OK), or the mismatches and exit status 1. SIZE is the disk's
size in bytes as the guest saw it (default: IMAGE's virtual size).

--print only prints the qemu-io commands (one "read -P 0xNN OFFSET LENGTH" per
4 KiB piece) and the md5, without reading IMAGE; with "write" in place of
"read" they recreate the pattern in an image of your own.
USAGE
}

fmt='' print=0
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        -f) fmt=${2:?-f needs a format}; shift 2 ;;
        --print) print=1; shift ;;
        -*) QOMVM_DIE_STATUS=2 qomvm_die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[[ $# -ge 2 && $# -le 3 ]] || QOMVM_DIE_STATUS=2 qomvm_die "usage: disktest-check.sh [-f FORMAT] [--print] IMAGE SEED [SIZE]"
image=$1 seed=$2 size=${3:-}
[[ $seed =~ ^[0-9]+$ ]] || qomvm_die "SEED must be a number, got '$seed'"
qomvm_need_cmd qemu-io qemu-utils
qomvm_need_cmd qemu-img qemu-utils
if [[ -z $size ]]; then
    size=$(qemu-img info ${fmt:+-f "$fmt"} --output=json "$image" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p' | head -n1)
    [[ -n $size ]] || qomvm_die "cannot read the virtual size of $image"
fi
((size >= 16777216)) || qomvm_die "the disk must have at least 16 MiB, got $size bytes"

# The regions (offset:length) and the piece rule: see guest-assets.sh --help.
regions="0:65536 1044480:1056768 4193792:2097152 $((size - 131072)):131072"
export LC_ALL=C
# pieces: "OFFSET LENGTH BYTE" of each piece, in order
pieces() {
    local r off len p n k=0
    for r in $regions; do
        off=${r%:*} len=${r#*:}
        for ((p = 0; p < len; p += 4096)); do
            n=$((len - p))
            ((n <= 4096)) || n=4096
            echo "$((off + p)) $n $(((seed + k) % 251 + 1))"
            k=$((k + 1))
        done
    done
}
cmds=()
while read -r off n b; do
    cmds+=(-c "read -P $(printf '0x%02x' "$b") $off $n")
done < <(pieces)
sum=$(pieces | while read -r _ n b; do
    printf -v s '%*s' "$n" ''
    printf -v c '%b' "\\x$(printf '%02x' "$b")"
    printf '%s' "${s// /"$c"}" # (quoted: bash 5.2 reads & in a bare replacement)
done | md5sum)
sum=${sum%% *}

if [[ $print == 1 ]]; then
    for ((i = 1; i < ${#cmds[@]}; i += 2)); do printf '%s\n' "${cmds[i]}"; done
    echo "md5 $sum"
    exit 0
fi
out=$(qemu-io -r ${fmt:+-f "$fmt"} "${cmds[@]}" "$image" 2>&1) || true
if grep -q -e 'Pattern verification failed' -e 'error' -e 'Error' <<<"$out"; then
    grep -e 'Pattern verification failed' -e 'rror' <<<"$out" | head -n 20 >&2
    echo "disktest-check: MISMATCH ($(grep -c 'Pattern verification failed' <<<"$out") pieces differ)"
    exit 1
fi
echo "disktest-check: OK $sum"
