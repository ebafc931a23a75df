#!/usr/bin/env bash
# Network benchmark (issue 12): iperf3 TCP throughput between the test guest on
# a virtio-net-pci NIC over a tap and the host, host -> guest and guest -> host,
# qomvm against QEMU -M pc, with vhost=off and vhost=on, in one environment.
# See usage().
set -euo pipefail

# shellcheck disable=SC2034 # read by scripts/lib/debian.sh
QOMVM_PROG=bench-net
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
SELF=$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/debian.sh disable=SC1091
. "$SCRIPT_DIR/lib/debian.sh"
# shellcheck source=scripts/lib/bench.sh disable=SC1091
. "$SCRIPT_DIR/lib/bench.sh"

time_s=10
mem=512
smp=1
qomvm_bin=
assets=
build=1
vmms="qomvm qemu"
vhosts="off on"
inside=0
env_note=

usage() {
    cat <<'EOF'
Usage: scripts/bench-net.sh [options]

Measures TCP throughput with iperf3 between the test guest
(scripts/guest-assets.sh: the Debian cloud kernel, the busybox initramfs and
the disk image rootfs.ext4, which carries iperf3) and the host, over a tap,
with qomvm and with QEMU, vhost=off and vhost=on, one after the other, and
prints for each run:

  host->guest  iperf3 -c GUEST -t S     (the host sends): Gbit/s received
  guest->host  iperf3 -c GUEST -t S -R  (the guest sends): Gbit/s received

and the ratios qomvm/QEMU (>1: qomvm is faster) for each vhost setting.

The tap (qtap0, 192.168.76.1/24) lives in a network namespace of the
benchmark's own (unshare -n), so no address of the host is touched; the guest
is 192.168.76.2. Both VMMs get the same guest and devices:
  -M pc -m 512 -smp 1 -nographic -no-reboot -kernel vmlinuz -initrd initramfs.cpio.gz
  -append "console=ttyS0 panic=-1 quiet qomvm.root=/dev/vda ro
           qomvm.net=192.168.76.2/24 qomvm.nettest=iperf3:2"
  -drive file=rootfs.ext4,if=none,id=root,format=raw,readonly=on
  -device virtio-blk-pci,drive=root
  -netdev tap,id=n0,ifname=qtap0,script=no,downscript=no,vhost=off|on
  -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56
QEMU is qemu-system-x86_64 with -accel kvm in addition. The host's iperf3 is
the guest's (the assets' host-tools/iperf3: Debian's iperf3 3.12).

On hardware KVM everything runs directly (as root: the namespace and the tap
need it). Where /dev/kvm is PVM or unusable, all runs go inside ONE
scripts/nested-kvm.sh run (an L1 Linux under QEMU TCG with SVM+NPT): guest
code and L1's own network stack then run at TCG speed, so absolute figures
are not hardware figures; compare the ratios. vhost=on is skipped (with a
note) where /dev/vhost-net is missing.

A run whose measurement fails is repeated once on a fresh boot (the report
says so: in the rig, a TCP transfer was seen stalling with either VMM). If
the repeat fails too, or a VMM refuses the command line, that is reported with
the VMM's last output lines and the exit status is 1; the other runs still go
ahead.

Options:
  --time S          seconds per iperf3 direction (default 10)
  -m MiB            guest RAM (default 512)
  --smp N           guest vCPUs (default 1: in the rig, whose L1 has 2 vCPUs for
                    the guest, iperf3 and vhost alike, a 2-vCPU QEMU guest stalled
                    with RCU warnings in every guest->host run)
  --qomvm PATH      qomvm binary (default: target/release/qomvm, built with
                    cargo build --release first unless --no-build)
  --assets DIR      guest assets (default: target/guest-assets, brought up
                    to date with scripts/guest-assets.sh)
  --only VMM        run only qomvm or only qemu
  --vhost off|on    run only this vhost setting
  --no-build        do not run cargo build
  -h, --help        this text

Needs python3 (to read iperf3's JSON output) and iproute2.
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --time) time_s=${2:?--time needs a value}; shift 2 ;;
        -m | --mem) mem=${2:?-m needs a value}; shift 2 ;;
        --smp) smp=${2:?--smp needs a value}; shift 2 ;;
        --qomvm) qomvm_bin=${2:?--qomvm needs a value}; shift 2 ;;
        --assets) assets=${2:?--assets needs a value}; shift 2 ;;
        --only) vmms=${2:?--only needs qomvm or qemu}; shift 2 ;;
        --vhost) vhosts=${2:?--vhost needs off or on}; shift 2 ;;
        --no-build) build=0; shift ;;
        # Internal: set when the script re-runs itself in its namespace (and the rig).
        --inside) inside=1; env_note=${2:?--inside needs a value}; shift 2 ;;
        --time=* | --mem=* | --smp=* | --qomvm=* | --assets=* | --only=* | --vhost=*)
            opt=${1%%=*}; set -- "$opt" "${1#*=}" "${@:2}" ;;
        *) usage >&2; qomvm_die "unknown argument $1" ;;
    esac
done
[[ $time_s =~ ^[1-9][0-9]*$ ]] || qomvm_die "--time wants a positive number of seconds, got '$time_s'"
[[ $mem =~ ^[1-9][0-9]*$ ]] || qomvm_die "-m wants a size in MiB (a number), got '$mem'"
[[ $smp =~ ^[1-9][0-9]*$ ]] || qomvm_die "--smp wants a positive number, got '$smp'"
case $vmms in
    qomvm | qemu | "qomvm qemu") ;;
    *) qomvm_die "--only wants qomvm or qemu, got '$vmms'" ;;
esac
case $vhosts in
    off | on | "off on") ;;
    *) qomvm_die "--vhost wants off or on, got '$vhosts'" ;;
esac

PYTHON=$(command -v python3 || true)
[[ -n $PYTHON ]] || qomvm_die "python3 not found (install the Debian package python3)"
qomvm_need_cmd ip iproute2

vm_timeout=$((2 * time_s + 400))

# ------------------------------------------------------------ preparation --

if [[ $inside == 0 ]]; then
    if [[ " $vmms " == *" qomvm "* ]]; then
        qomvm_bin=$(bench_qomvm_binary "$qomvm_bin" "$build") || exit 1
    fi
    if [[ " $vmms " == *" qemu "* ]]; then
        qomvm_need_cmd qemu-system-x86_64 qemu-system-x86
    fi
    assets=$(bench_assets "$assets" vmlinuz initramfs.cpio.gz rootfs.ext4 host-tools/iperf3) || exit 1

    args=(--time "$time_s" -m "$mem" --smp "$smp" --assets "$assets" --only "$vmms" --vhost "$vhosts")
    [[ -z $qomvm_bin ]] || args+=(--qomvm "$qomvm_bin")
    if why=$(bench_rig_reason); then
        qomvm_log "$why: running every VMM inside one scripts/nested-kvm.sh run"
        runs=$(($(wc -w <<<"$vmms") * $(wc -w <<<"$vhosts")))
        rc=0
        "$SCRIPT_DIR/nested-kvm.sh" --timeout $((2 * runs * vm_timeout + 300)) -- \
            unshare -n "$SELF" --inside "$why" "${args[@]}" || rc=$?
        exit "$rc"
    fi
    [[ $(id -u) == 0 ]] || qomvm_die "run as root: the benchmark makes a network namespace and a tap"
    rc=0
    unshare -n "$SELF" --inside "direct (hardware KVM)" "${args[@]}" || rc=$?
    exit "$rc"
fi

# ---------------------------------------------------------- the benchmark --
# (--inside: in a network namespace of its own, in the rig's L1 or directly on
# a host with hardware KVM)

kvm_usable || qomvm_die "/dev/kvm is not usable here"
[[ -n $assets ]] || qomvm_die "internal: --inside without --assets"
ip link set lo up
iperf3=$assets/host-tools/iperf3
work=$(mktemp -d "${TMPDIR:-/tmp}/qomvm-bench-net.XXXXXX")
trap 'rm -rf "$work"' EXIT

append="console=ttyS0 panic=-1 quiet qomvm.root=/dev/vda ro qomvm.net=192.168.76.2/24 qomvm.nettest=iperf3:2"
# shellcheck disable=SC2054 # the commas are QEMU's
common=(-M pc -m "$mem" -smp "$smp" -nographic -no-reboot
    -kernel "$assets/vmlinuz" -initrd "$assets/initramfs.cpio.gz" -append "$append"
    -drive "file=$assets/rootfs.ext4,if=none,id=root,format=raw,readonly=on"
    -device virtio-blk-pci,drive=root
    -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56)

# Gbit/s received, from iperf3's JSON (the client's end.sum_received).
read -r -d '' PY_PARSE <<'EOF' || true
import json, sys
try:
    j = json.load(open(sys.argv[1]))
    if "error" in j:
        sys.exit(j["error"])
    print("%.3f" % (j["end"]["sum_received"]["bits_per_second"] / 1e9))
except (ValueError, KeyError) as e:
    sys.exit("iperf3's JSON output is incomplete or missing (%s; iperf3 ended by its time limit?)" % e)
EOF

# await CONSOLE REGEX PID: waits (up to 300 s) until CONSOLE shows REGEX while PID runs.
await() {
    local i=0
    until grep -qE "$2" "$1"; do
        kill -0 "$3" 2>/dev/null || return 1
        i=$((i + 1))
        ((i <= 3000)) || return 1
        sleep 0.1
    done
}

# measure VMM VHOST ATTEMPT: boots VMM with vhost=VHOST, runs iperf3 both ways, and
# records partial[VMM-VHOST-h2g] and [...-g2h] (Gbit/s) for each direction measured, and
# failed[VMM-VHOST] (why) on a failure, for which it returns non-zero.
measure() {
    local v=$1 vh=$2 attempt=$3
    local run=$v-$vh con=$work/$v-$vh-$attempt.console
    local -a cmd opt
    local pid why h2g g2h dir n out rc
    case $v in
        qomvm) cmd=("$qomvm_bin") ;;
        qemu) cmd=("$(command -v qemu-system-x86_64)" -accel kvm) ;;
    esac
    cmd+=("${common[@]}" -netdev "tap,id=n0,ifname=qtap0,script=no,downscript=no,vhost=$vh")
    if ! { ip tuntap add dev qtap0 mode tap && ip addr add 192.168.76.1/24 dev qtap0 &&
        ip link set qtap0 up; }; then
        qomvm_die "cannot make the tap qtap0"
    fi
    qomvm_log "$run: $(printf '%q ' "${cmd[@]}")"
    timeout -k 5 "$vm_timeout" "${cmd[@]}" </dev/null >"$con" 2>&1 &
    pid=$!
    why='' h2g='' g2h=''
    unset "partial[$run-h2g]" "partial[$run-g2h]"
    for dir in h2g g2h; do
        n=1 opt=()
        [[ $dir == g2h ]] && n=2 opt=(-R)
        if ! await "$con" "iperf3 server $n listening" $pid; then
            why="the guest's iperf3 server $n never listened"
            break
        fi
        # (a stalled transfer would keep iperf3 waiting for ever)
        timeout -k 5 $((time_s + 60)) "$iperf3" -c 192.168.76.2 -t "$time_s" -J "${opt[@]}" \
            >"$work/$run-$dir.json" 2>&1 || true
        if ! out=$("$PYTHON" -c "$PY_PARSE" "$work/$run-$dir.json" 2>&1); then
            why="iperf3 $dir: $out"
            break
        fi
        printf -v "$dir" '%s' "$out"
        partial[$run-$dir]=$out
    done
    [[ -z $why ]] || kill $pid 2>/dev/null || true
    rc=0
    wait $pid || rc=$?
    ip link del qtap0 2>/dev/null || true
    if [[ -z $why ]]; then
        qomvm_log "$run: host->guest $h2g Gbit/s, guest->host $g2h Gbit/s (exit status $rc)"
        return 0
    fi
    failed[$run]="$why; exit status $rc"
    qomvm_log "$run: FAILED ($why). Last console lines:"
    tail -n 12 "$con" | tr -d '\r' | sed 's/^/    /' >&2
    return 1
}

cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
qomvm_log "environment: $env_note; CPU: $cpu_model ($(nproc) CPUs)"
declare -A failed retried partial
for vh in $vhosts; do
    if [[ $vh == on && ! -c /dev/vhost-net ]]; then
        for v in $vmms; do failed[$v-$vh]="skipped: no /dev/vhost-net"; done
        qomvm_log "vhost=on: skipped (no /dev/vhost-net here)"
        continue
    fi
    for v in $vmms; do
        run=$v-$vh
        measure "$v" "$vh" 1 && continue
        # In the rig (TCG L1) one TCP transfer was seen stalling for over a minute, with
        # QEMU and with qomvm alike: a failed run is repeated once, on a fresh boot, and
        # the first failure stays in the report.
        qomvm_log "$run: repeating the run once"
        retried[$run]=${failed[$run]}
        unset "failed[$run]"
        measure "$v" "$vh" 2 || true
    done
done

# ----------------------------------------------------------------- report --

echo
echo "iperf3 benchmark: virtio-net-pci on a tap, TCP, $time_s s per direction"
echo "Environment: $env_note"
if [[ $env_note == nested* ]]; then
    echo "  L1: $cpu_model, $(nproc) vCPUs (the rig's QEMU TCG CPU; guest code and L1's"
    echo "  network stack run at TCG speed: compare the ratios, not the figures)"
else
    echo "  CPU: $cpu_model, $(nproc) CPUs"
fi
echo "Guest: $(cat "$assets/kernel-version" 2>/dev/null || echo '?'), -m $mem -smp $smp, iperf3 from rootfs.ext4"
[[ " $vmms " != *" qomvm "* ]] || echo "qomvm: $qomvm_bin"
[[ " $vmms " != *" qemu "* ]] || echo "QEMU: $(qemu-system-x86_64 --version | head -n1)"
echo
printf '  %-18s %20s %20s\n' "VMM" "host->guest Gbit/s" "guest->host Gbit/s"
for vh in $vhosts; do
    for v in $vmms; do
        printf '  %-18s %20s %20s\n' "$v vhost=$vh" "${partial[$v-$vh-h2g]:--}" "${partial[$v-$vh-g2h]:--}"
    done
    if [[ " $vmms " == *" qomvm "* && " $vmms " == *" qemu "* ]]; then
        # A direction's ratio where both VMMs measured it (a failed run keeps the
        # direction that completed).
        awk -v qa="${partial[qomvm-$vh-h2g]:-}" -v qb="${partial[qomvm-$vh-g2h]:-}" \
            -v ea="${partial[qemu-$vh-h2g]:-}" -v eb="${partial[qemu-$vh-g2h]:-}" -v vh="$vh" '
            function ratio(q, e) { return (q != "" && e > 0) ? sprintf("%.2f", q / e) : "-" }
            BEGIN { printf "  %-18s %20s %20s\n", "qomvm/QEMU vhost=" vh, ratio(qa, ea), ratio(qb, eb) }'
    fi
done
status=0
for vh in $vhosts; do
    for v in $vmms; do
        if [[ -n ${retried[$v-$vh]:-} ]]; then
            echo "NOTE: $v vhost=$vh: the first run failed (${retried[$v-$vh]}); the figures are the second run's"
        fi
        if [[ -n ${failed[$v-$vh]:-} ]]; then
            echo "NOTE: $v vhost=$vh: ${failed[$v-$vh]}"
            [[ ${failed[$v-$vh]} == skipped:* ]] || status=1
        fi
    done
done
exit "$status"
