#!/usr/bin/env bash
# Disk benchmark (issue 11): fio in the test guest on a virtio-blk-pci disk (or a
# scsi-hd on virtio-scsi-pci) with cache=none and an iothread, qomvm against QEMU -M pc on fresh copies of the
# same image, in one environment. See usage().
set -euo pipefail

# shellcheck disable=SC2034 # read by scripts/lib/debian.sh
QOMVM_PROG=bench-fio
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
SELF=$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/debian.sh disable=SC1091
. "$SCRIPT_DIR/lib/debian.sh"
# shellcheck source=scripts/lib/bench.sh disable=SC1091
. "$SCRIPT_DIR/lib/bench.sh"

runtime=10
size=512M
format=raw
mem=512
smp=2
bus=virtio
qomvm_bin=
assets=
build=1
vmms="qomvm qemu"
workdir=
inside=0
env_note=

usage() {
    cat <<'EOF'
Usage: scripts/bench-fio.sh [options]

Runs fio inside the test guest (scripts/guest-assets.sh: the Debian cloud
kernel, the busybox initramfs and the disk image rootfs.ext4, which carries
fio) on a benchmark disk, with qomvm and with QEMU, one after the other, and
prints for each:

  randread  4 KiB random reads, iodepth 32 (libaio, O_DIRECT): IOPS
  seqwrite  1 MiB sequential writes, iodepth 4 (libaio, O_DIRECT): MB/s

and the ratios qomvm/QEMU (>1: qomvm is faster). fio runs seqwrite first,
then randread, each for --runtime seconds, over the whole benchmark disk.

Both VMMs get the same guest and devices:
  -M pc -m 512 -smp 2 -nographic -no-reboot -kernel vmlinuz -initrd initramfs.cpio.gz
  -append "console=ttyS0 panic=-1 quiet qomvm.root=/dev/vda ro qomvm.fio=/dev/vdb qomvm.fio.runtime=S"
  -drive file=rootfs.ext4,if=none,id=root,format=raw,readonly=on
  -device virtio-blk-pci,drive=root
  -object iothread,id=io0
  -drive file=bench.img,if=none,id=d0,format=raw|qcow2,cache=none
  -device virtio-blk-pci,drive=d0,iothread=io0
or with --bus scsi, the benchmark disk a SCSI disk (qomvm.fio=/dev/sda qomvm.ata=1):
  -device virtio-scsi-pci,id=scsi0,iothread=io0
  -device scsi-hd,bus=scsi0.0,drive=d0
QEMU is qemu-system-x86_64 with -accel kvm in addition. The benchmark disk is
filled with data (0xa5) before the run, so that reads hit allocated blocks;
each VMM gets its own fresh copy of it.

On hardware KVM everything runs directly. Where /dev/kvm is PVM or unusable,
both VMMs run inside ONE scripts/nested-kvm.sh run (an L1 Linux under QEMU TCG
with SVM+NPT), with the disk copies in the rig's in-memory scratch file system
(nested-kvm.sh --scratch: L1's own overlay cannot do O_DIRECT). Guest code
then runs at TCG speed: absolute figures are not hardware figures, compare
the ratios.

If a VMM refuses the command line or the guest's fio fails, that is reported
with the VMM's last output lines and the exit status is 1; the other VMM
still runs.

Options:
  --runtime S       seconds per fio job (default 10)
  --size SIZE       benchmark disk size, in MiB or with a K/M/G suffix (default 512M)
  --format F        raw or qcow2 (default raw; qcow2 is fully allocated)
  -m MiB            guest RAM (default 512)
  --smp N           guest vCPUs (default 2)
  --bus B           virtio (virtio-blk-pci, the default) or scsi (scsi-hd on
                    virtio-scsi-pci)
  --qomvm PATH      qomvm binary (default: target/release/qomvm, built with
                    cargo build --release first unless --no-build)
  --assets DIR      guest assets (default: target/guest-assets, brought up
                    to date with scripts/guest-assets.sh)
  --only VMM        run only qomvm or only qemu
  --workdir DIR     where the images go (default: a new directory under
                    ${TMPDIR:-/tmp}, removed afterwards; needs 2x SIZE)
  --no-build        do not run cargo build
  -h, --help        this text

Needs python3 (to read fio's JSON output) and qemu-img.
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --runtime) runtime=${2:?--runtime needs a value}; shift 2 ;;
        --size) size=${2:?--size needs a value}; shift 2 ;;
        --format) format=${2:?--format needs a value}; shift 2 ;;
        -m | --mem) mem=${2:?-m needs a value}; shift 2 ;;
        --smp) smp=${2:?--smp needs a value}; shift 2 ;;
        --bus) bus=${2:?--bus needs a value}; shift 2 ;;
        --qomvm) qomvm_bin=${2:?--qomvm needs a value}; shift 2 ;;
        --assets) assets=${2:?--assets needs a value}; shift 2 ;;
        --only) vmms=${2:?--only needs qomvm or qemu}; shift 2 ;;
        --workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
        --no-build) build=0; shift ;;
        # Internal: set when the script re-runs itself inside the nested rig.
        --inside) inside=1; env_note=${2:?--inside needs a value}; shift 2 ;;
        --runtime=* | --size=* | --format=* | --mem=* | --smp=* | --bus=* | --qomvm=* | --assets=* | --only=* | --workdir=*)
            opt=${1%%=*}; set -- "$opt" "${1#*=}" "${@:2}" ;;
        *) usage >&2; qomvm_die "unknown argument $1" ;;
    esac
done
[[ $runtime =~ ^[1-9][0-9]*$ ]] || qomvm_die "--runtime wants a positive number of seconds, got '$runtime'"
[[ $mem =~ ^[1-9][0-9]*$ ]] || qomvm_die "-m wants a size in MiB (a number), got '$mem'"
[[ $smp =~ ^[1-9][0-9]*$ ]] || qomvm_die "--smp wants a positive number, got '$smp'"
[[ $format == raw || $format == qcow2 ]] || qomvm_die "--format wants raw or qcow2, got '$format'"
[[ $bus == virtio || $bus == scsi ]] || qomvm_die "--bus wants virtio or scsi, got '$bus'"
case $vmms in
    qomvm | qemu | "qomvm qemu") ;;
    *) qomvm_die "--only wants qomvm or qemu, got '$vmms'" ;;
esac
[[ $size =~ ^[1-9][0-9]*[kKmMgG]?$ ]] || qomvm_die "--size wants a size like 512M or 2G, got '$size'"
case $size in
    *[kK]) bytes=$((${size%?} * 1024)) ;;
    *[mM]) bytes=$((${size%?} * 1024 * 1024)) ;;
    *[gG]) bytes=$((${size%?} * 1024 * 1024 * 1024)) ;;
    *) bytes=$((size * 1024 * 1024)) ;;
esac
((bytes >= 64 << 20 && bytes % (1 << 20) == 0)) || qomvm_die "--size wants whole MiB, at least 64M, got '$size'"

PYTHON=$(command -v python3 || true)
[[ -n $PYTHON ]] || qomvm_die "python3 not found (install the Debian package python3)"
qomvm_need_cmd qemu-img qemu-utils

vm_timeout=$((2 * runtime + 300))

# ------------------------------------------------------------ preparation --

if [[ $inside == 0 ]]; then
    if [[ " $vmms " == *" qomvm "* ]]; then
        qomvm_bin=$(bench_qomvm_binary "$qomvm_bin" "$build") || exit 1
    fi
    if [[ " $vmms " == *" qemu "* ]]; then
        qomvm_need_cmd qemu-system-x86_64 qemu-system-x86
    fi
    assets=$(bench_assets "$assets" vmlinuz initramfs.cpio.gz rootfs.ext4) || exit 1

    if [[ -z $workdir ]]; then
        workdir=$(mktemp -d "${TMPDIR:-/tmp}/qomvm-bench-fio.XXXXXX")
        trap 'rm -rf "$workdir"' EXIT
    fi
    mkdir -p "$workdir" && workdir=$(cd "$workdir" && pwd -P)

    # The benchmark disk: SIZE bytes of 0xa5 (each VMM gets a fresh copy).
    qomvm_log "preparing the $size benchmark disk ($format) in $workdir"
    head -c "$bytes" /dev/zero | tr '\0' '\245' >"$workdir/base.raw"
    if [[ $format == qcow2 ]]; then
        qemu-img convert -f raw -O qcow2 "$workdir/base.raw" "$workdir/base.img"
        rm -f "$workdir/base.raw"
    else
        mv "$workdir/base.raw" "$workdir/base.img"
    fi

    args=(--runtime "$runtime" --size "$size" --format "$format" -m "$mem" --smp "$smp" --bus "$bus"
        --assets "$assets" --only "$vmms" --workdir "$workdir")
    [[ -z $qomvm_bin ]] || args+=(--qomvm "$qomvm_bin")
    if why=$(bench_rig_reason); then
        qomvm_log "$why: running both VMMs inside one scripts/nested-kvm.sh run"
        # The disk copies go to the rig's in-memory scratch file system (L1's
        # overlay refuses O_DIRECT, and a --rw share costs a host round trip per I/O).
        scratch_mib=$(((bytes >> 20) + 256))
        rig_mib=$((scratch_mib + 3 * 1024))
        ((rig_mib >= 6144)) || rig_mib=6144
        rc=0
        "$SCRIPT_DIR/nested-kvm.sh" --scratch "${scratch_mib}M" --mem "${rig_mib}M" \
            --timeout $((2 * vm_timeout + 300)) -- "$SELF" --inside "$why" "${args[@]}" || rc=$?
        exit "$rc"
    fi
    rc=0
    "$SELF" --inside "direct (hardware KVM)" "${args[@]}" || rc=$?
    exit "$rc"
fi

# ---------------------------------------------------------- the benchmark --
# (--inside: in the rig's L1, or directly on a host with hardware KVM)

kvm_usable || qomvm_die "/dev/kvm is not usable here"
[[ -n $workdir && -n $assets ]] || qomvm_die "internal: --inside without --workdir/--assets"

# The benchmark disk as the guest names it: the second virtio disk, or the first SCSI one
# (qomvm.ata=1 loads virtio_scsi and sd).
case $bus in
    virtio) fio_dev="/dev/vdb" ;;
    scsi) fio_dev="/dev/sda qomvm.ata=1" ;;
esac
append="console=ttyS0 panic=-1 quiet qomvm.root=/dev/vda ro qomvm.fio=$fio_dev qomvm.fio.runtime=$runtime"
# shellcheck disable=SC2054 # the commas are QEMU's
common=(-M pc -m "$mem" -smp "$smp" -nographic -no-reboot
    -kernel "$assets/vmlinuz" -initrd "$assets/initramfs.cpio.gz" -append "$append"
    -drive "file=$assets/rootfs.ext4,if=none,id=root,format=raw,readonly=on"
    -device virtio-blk-pci,drive=root
    -object iothread,id=io0)
# The fresh copies: in the rig's scratch file system, else in the work directory.
imgdir=${NESTED_KVM_SCRATCH:-$workdir}
declare -A cmdline
for v in $vmms; do
    # shellcheck disable=SC2054
    disk=(-drive "file=$imgdir/$v.img,if=none,id=d0,format=$format,cache=none")
    case $bus in
        virtio) disk+=(-device virtio-blk-pci,drive=d0,iothread=io0) ;;
        scsi) disk+=(-device virtio-scsi-pci,id=scsi0,iothread=io0 -device scsi-hd,bus=scsi0.0,drive=d0) ;;
    esac
    case $v in
        qomvm) cmdline[$v]="$(printf '%q ' "$qomvm_bin" "${common[@]}" "${disk[@]}")" ;;
        qemu) cmdline[$v]="$(printf '%q ' "$(command -v qemu-system-x86_64)" -accel kvm "${common[@]}" "${disk[@]}")" ;;
    esac
done

# The figures from the console: "randread_iops seqwrite_MBps" (fio's JSON
# between QOMVM-FIO-BEGIN and QOMVM-FIO-END), or a reason on stderr and status 1.
read -r -d '' PY_PARSE <<'EOF' || true
import json, sys
text = open(sys.argv[1], "rb").read().decode("utf-8", "replace").replace("\r", "")
if "QOMVM-FIO-BEGIN" not in text or "QOMVM-FIO-END" not in text:
    fail = [l for l in text.splitlines() if "QOMVM-FIO-FAILED" in l or "QOMVM-ROOT-FAILED" in l]
    sys.exit("no fio output on the console" + (": " + fail[0] if fail else ""))
body = text.split("QOMVM-FIO-BEGIN", 1)[1].split("QOMVM-FIO-END", 1)[0]
body = body[body.find("{"):body.rfind("}") + 1]
try:
    jobs = {j["jobname"]: j for j in json.loads(body)["jobs"]}
    print("%.0f %.1f" % (jobs["randread"]["read"]["iops"], jobs["seqwrite"]["write"]["bw_bytes"] / 1e6))
except (ValueError, KeyError) as e:
    sys.exit("fio's JSON output is incomplete (%s)" % e)
EOF

cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
qomvm_log "environment: $env_note; CPU: $cpu_model ($(nproc) CPUs)"
declare -A result failed
for v in $vmms; do
    con=$workdir/$v.console err=$workdir/$v.stderr
    eval "cmd=(${cmdline[$v]})"
    cp "$workdir/base.img" "$imgdir/$v.img" || qomvm_die "copying the disk to $imgdir failed"
    qomvm_log "$v: ${cmdline[$v]}"
    start=$EPOCHREALTIME
    rc=0
    timeout -k 5 "$vm_timeout" "${cmd[@]}" </dev/null >"$con" 2>"$err" || rc=$?
    rm -f "$imgdir/$v.img"
    secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    if out=$("$PYTHON" -c "$PY_PARSE" "$con" 2>&1); then
        result[$v]=$out
        read -r iops mbps <<<"$out"
        qomvm_log "$v: randread $iops IOPS, seqwrite $mbps MB/s ($secs s, exit status $rc)"
    else
        why="$out; exit status $rc"
        [[ $rc != 124 ]] || why="$out; killed after $vm_timeout s"
        if [[ $rc != 0 ]] && ! grep -q QOMVM-GUEST-READY "$con"; then
            why="exit status $rc before the guest's /init ran (command line refused?): $(tail -n1 "$err")"
        fi
        failed[$v]=$why
        qomvm_log "$v: FAILED ($why) after $secs s. Last stderr/console lines:"
        { tail -n 8 "$err"; tail -n 12 "$con" | tr -d '\r'; } | sed 's/^/    /' >&2
    fi
done

# ----------------------------------------------------------------- report --

echo
case $bus in
    virtio) device="virtio-blk-pci" ;;
    scsi) device="scsi-hd on virtio-scsi-pci" ;;
esac
echo "fio benchmark: $device, cache=none, iothread; $size $format disk; $runtime s per job"
echo "Environment: $env_note"
if [[ $env_note == nested* ]]; then
    echo "  L1: $cpu_model, $(nproc) vCPUs (the rig's QEMU TCG CPU; guest code runs at TCG"
    echo "  speed, the disk image is in L1's memory: compare the ratios, not the figures)"
else
    echo "  CPU: $cpu_model, $(nproc) CPUs"
fi
echo "Guest: $(cat "$assets/kernel-version" 2>/dev/null || echo '?'), -m $mem -smp $smp, fio from rootfs.ext4"
[[ " $vmms " != *" qomvm "* ]] || echo "qomvm: $qomvm_bin"
[[ " $vmms " != *" qemu "* ]] || echo "QEMU: $(qemu-system-x86_64 --version | head -n1)"
echo
printf '  %-8s %16s %16s\n' VMM "randread IOPS" "seqwrite MB/s"
for v in $vmms; do
    if [[ -n ${result[$v]:-} ]]; then
        read -r iops mbps <<<"${result[$v]}"
        printf '  %-8s %16s %16s\n' "$v" "$iops" "$mbps"
    else
        printf '  %-8s %16s %16s\n' "$v" FAILED FAILED
    fi
done
if [[ -n ${result[qomvm]:-} && -n ${result[qemu]:-} ]]; then
    read -r qi qm <<<"${result[qomvm]}"
    read -r ei em <<<"${result[qemu]}"
    awk -v qi="$qi" -v qm="$qm" -v ei="$ei" -v em="$em" 'BEGIN {
        printf "  %-8s %16s %16s\n", "qomvm/QEMU", (ei > 0 ? sprintf("%.2f", qi / ei) : "-"), (em > 0 ? sprintf("%.2f", qm / em) : "-") }'
fi
status=0
for v in $vmms; do
    if [[ -n ${failed[$v]:-} ]]; then
        echo "NOTE: $v failed: ${failed[$v]}"
        status=1
    fi
done
exit "$status"
