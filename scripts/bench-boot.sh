#!/usr/bin/env bash
# Boot benchmark: qomvm against QEMU (-M pc and -M microvm) on the same Linux
# guest, in one environment. See usage() and docs/boot-benchmark.md.
set -euo pipefail

# shellcheck disable=SC2034 # read by scripts/lib/debian.sh
QOMVM_PROG=bench-boot
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
SELF=$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")
# shellcheck source=scripts/lib/debian.sh disable=SC1091
. "$SCRIPT_DIR/lib/debian.sh"
# shellcheck source=scripts/lib/bench.sh disable=SC1091
. "$SCRIPT_DIR/lib/bench.sh"

MARKER=QOMVM-GUEST-READY
APPEND="console=ttyS0 panic=-1 quiet qomvm.timeline=1"
# microvm as QEMU's docs/system/i386/microvm.rst trims it (no option ROMs, no
# legacy PIT/PIC/RTC), keeping the ISA serial port for console=ttyS0. With the
# default rtc=on the Debian cloud kernel's rtc_cmos probe fails after a
# timeout that costs seconds under the nested rig.
MICROVM_MACHINE=microvm,x-option-roms=off,pit=off,pic=off,rtc=off

runs=3
warmup=1
mem=256
smp=1
boot_timeout=180
qomvm_bin=
assets=
build=1
with_qemu=1
inside=0
firmware=0
kernel_file=vmlinuz
env_note=
rig_smp=2

usage() {
    cat <<'EOF'
Usage: scripts/bench-boot.sh [options]

Boots the test guest (scripts/guest-assets.sh: Debian cloud kernel + busybox
initramfs that prints QOMVM-GUEST-READY and powers off) with each VMM and
measures, per boot:

  ready   process start -> "QOMVM-GUEST-READY" on the VMM's console (stdout)
  exit    process start -> the VMM process has exited (the guest powered off)
  RSS     peak resident set size of the VMM process (ru_maxrss from wait4,
          the figure /usr/bin/time -v calls "Maximum resident set size")
  KVM_RUN qomvm only: its own "first KVM_RUN N ms after process start" log
          line (RUST_LOG=boot=info), counted from the start of main()

VMMs (same kernel, initrd, -m, -smp and
 -nographic -no-reboot -append "console=ttyS0 panic=-1 quiet"):
  qomvm         qomvm -M pc
  qemu-pc       qemu-system-x86_64 -M pc -accel kvm
  qemu-microvm  qemu-system-x86_64 -M microvm,x-option-roms=off,pit=off,pic=off,rtc=off -accel kvm
The QEMU ones are skipped when qemu-system-x86_64 is not installed; a VMM
whose first boot fails is reported and left out of the remaining rounds.

With --firmware the guest is the GRUB disk image instead (guest-assets.sh's
boot-disk.qcow2, a fresh qcow2 overlay per boot): SeaBIOS, GRUB, the same
kernel and /init, "-smbios type=11,value=quiet" for GRUB's kernel command
line, and no -kernel; the VMMs are qomvm -M pc and qemu-pc (same -drive and
-device virtio-blk-pci,bootindex=1), and "ready" then counts firmware and
boot loader too.

Boots run one at a time, round-robin over the VMMs (so drift hits all of them
alike); warm-up rounds are discarded. The output is a table of medians with
ratios against qomvm (e.g. qemu-pc/qomvm), the per-boot figures, and the
environment.

Environment: on hardware KVM everything runs directly. When /dev/kvm is PVM
(/sys/module/kvm_pvm exists) or unusable, the whole benchmark runs inside ONE
scripts/nested-kvm.sh run (an L1 Linux under QEMU TCG with SVM+NPT): all VMMs
see the same L1, but guest code runs at TCG speed, so absolute times are not
hardware figures; compare the ratios.

Options:
  --runs N          measured boots per VMM (default 3)
  --warmup N        discarded boots per VMM before them (default 1)
  -m MiB            guest RAM in MiB (default 256)
  --smp N           guest vCPUs (default 1)
  --boot-timeout S  kill a boot after S seconds (default 180)
  --qomvm PATH      qomvm binary (default: target/release/qomvm, built with
                    cargo build --release first unless --no-build)
  --assets DIR      guest assets directory (default: target/guest-assets,
                    brought up to date with scripts/guest-assets.sh)
  --no-build        do not run cargo build
  --no-qemu         benchmark qomvm only
  --firmware        boot the disk image through SeaBIOS and GRUB (see above)
  --vmlinux         -kernel the uncompressed ELF kernel (guest-assets.sh's vmlinux,
                    the payload of the same vmlinuz) instead of the bzImage, for
                    every VMM, entered through its PVH note (QEMU: through
                    firmware); no guest runs the kernel's decompressor
  -h, --help        this text

Needs python3 (timestamps and wait4); QEMU is optional.
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --runs) runs=${2:?--runs needs a value}; shift 2 ;;
        --warmup) warmup=${2:?--warmup needs a value}; shift 2 ;;
        -m | --mem) mem=${2:?-m needs a value}; shift 2 ;;
        --smp) smp=${2:?--smp needs a value}; shift 2 ;;
        --boot-timeout) boot_timeout=${2:?--boot-timeout needs a value}; shift 2 ;;
        --qomvm) qomvm_bin=${2:?--qomvm needs a value}; shift 2 ;;
        --assets) assets=${2:?--assets needs a value}; shift 2 ;;
        --no-build) build=0; shift ;;
        --no-qemu) with_qemu=0; shift ;;
        --firmware) firmware=1; shift ;;
        --vmlinux) kernel_file=vmlinux; shift ;;
        # Internal: set when the script re-runs itself inside the nested rig.
        --inside) inside=1; env_note=${2:?--inside needs a value}; shift 2 ;;
        --runs=* | --warmup=* | --mem=* | --smp=* | --boot-timeout=* | --qomvm=* | --assets=*)
            opt=${1%%=*}; set -- "$opt" "${1#*=}" "${@:2}" ;;
        *) usage >&2; qomvm_die "unknown argument $1" ;;
    esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || qomvm_die "--runs wants a positive number, got '$runs'"
[[ $warmup =~ ^[0-9]+$ ]] || qomvm_die "--warmup wants a number, got '$warmup'"
[[ $mem =~ ^[1-9][0-9]*$ ]] || qomvm_die "-m wants a size in MiB (a number), got '$mem'"
[[ $smp =~ ^[1-9][0-9]*$ ]] || qomvm_die "--smp wants a positive number, got '$smp'"
[[ $boot_timeout =~ ^[1-9][0-9]*$ ]] || qomvm_die "--boot-timeout wants a positive number, got '$boot_timeout'"

PYTHON=$(command -v python3 || true)
[[ -n $PYTHON ]] || qomvm_die "python3 not found (install the Debian package python3)"

# ------------------------------------------------------------ preparation --

# (inside the rig, --qomvm and --assets name what the outer run prepared)
qomvm_bin=$(bench_qomvm_binary "$qomvm_bin" "$build") || exit 1
if [[ $firmware == 1 ]]; then
    [[ $kernel_file == vmlinuz ]] || qomvm_die "--vmlinux and --firmware do not go together"
    assets=$(bench_assets "$assets" boot-disk.qcow2) || exit 1
    qomvm_need_cmd qemu-img qemu-utils
else
    assets=$(bench_assets "$assets" "$kernel_file" initramfs.cpio.gz) || exit 1
fi

if [[ $inside == 0 ]]; then
    if why=$(bench_rig_reason); then
        qomvm_log "$why: running the whole benchmark inside one scripts/nested-kvm.sh run"
        nvmm=3
        [[ $firmware == 0 ]] || nvmm=2
        [[ $with_qemu == 1 ]] || nvmm=1
        rig_timeout=$(((runs + warmup) * nvmm * boot_timeout + 300))
        args=(--inside "$why" --runs "$runs" --warmup "$warmup" -m "$mem" --smp "$smp"
            --boot-timeout "$boot_timeout" --qomvm "$qomvm_bin" --assets "$assets")
        [[ $with_qemu == 1 ]] || args+=(--no-qemu)
        [[ $firmware == 0 ]] || args+=(--firmware)
        [[ $kernel_file == vmlinuz ]] || args+=(--vmlinux)
        exec "$SCRIPT_DIR/nested-kvm.sh" --smp "$rig_smp" --timeout "$rig_timeout" -- "$SELF" "${args[@]}"
    fi
    env_note="direct (hardware KVM)"
fi
kvm_usable || qomvm_die "/dev/kvm is not usable here"

# ------------------------------------------------------------ the helpers --

# run TIMEOUT MARKER CONSOLE STDERR -- CMD...: starts CMD with stdin /dev/null,
# stdout to a pipe it reads (copied to CONSOLE) and stderr to STDERR; prints
# "READY_MS EXIT_MS MAXRSS_KIB STATUS" (READY_MS "-" if MARKER never came,
# STATUS the exit code or -SIGNAL). Times count from just before the spawn.
# CONSOLE.host gets "NAME SECONDS" for each of the console milestones below
# that showed up (what the firmware and the boot loader print before the
# kernel's clock starts), in host time from the spawn.
read -r -d '' PY_RUN <<'EOF' || true
import os, select, subprocess, sys, time
timeout, marker, console, errf = float(sys.argv[1]), sys.argv[2].encode(), sys.argv[3], sys.argv[4]
cmd = sys.argv[6:]
milestones = [("firmware-banner", b"SeaBIOS (version"), ("boot-device", b"Booting from "),
              ("loader-boots-linux", b"QOMVM-GRUB: booting")]
seen = {}
with open(console, "wb") as con, open(errf, "wb") as err:
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    fd = p.stdout.fileno()
    ready, tail, killed = None, b"", False
    while True:
        left = t0 + timeout - time.monotonic()
        if left <= 0:
            p.kill(); killed = True; break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        data = os.read(fd, 65536)
        if not data:
            break
        if ready is None:
            now, window = time.monotonic(), tail + data
            for name, text in milestones:
                if name not in seen and text in window:
                    seen[name] = now - t0
            if marker in window:
                ready = now
            tail = window[-64:]
        con.write(data)
with open(console + ".host", "w") as host:
    for name, t in seen.items():
        host.write("%s %.3f\n" % (name, t))
    _, status, ru = os.wait4(p.pid, 0)
    t_exit = time.monotonic()
code = os.waitstatus_to_exitcode(status)
if killed:
    code = "timeout"
ms = lambda t: "%.1f" % ((t - t0) * 1e3)
print(ms(ready) if ready is not None else "-", ms(t_exit), ru.ru_maxrss, code)
EOF

# summary RESULTS: the tables. RESULTS lines: "VMM READY EXIT RSS KVMRUN".
read -r -d '' PY_SUMMARY <<'EOF' || true
import statistics, sys
order, rows = [], {}
for line in open(sys.argv[1]):
    f = line.split()
    if not f:
        continue
    if f[0] not in rows:
        order.append(f[0]); rows[f[0]] = []
    rows[f[0]].append(f[1:])
def col(vmm, i):
    v = [float(r[i]) for r in rows[vmm] if r[i] != "-"]
    return statistics.median(v) if v else None
fmt = lambda v, d=0: "-" if v is None else "%.*f" % (d, v)
print("Medians (%s):" % ", ".join("%s: %d boots" % (v, len(rows[v])) for v in order))
print("  %-14s %10s %10s %14s %18s" % ("VMM", "ready ms", "exit ms", "peak RSS MiB", "first KVM_RUN ms"))
for v in order:
    rss = col(v, 2)
    print("  %-14s %10s %10s %14s %18s" % (v, fmt(col(v, 0)), fmt(col(v, 1)),
          fmt(rss / 1024 if rss is not None else None, 1), fmt(col(v, 3), 1)))
base = "qomvm"
if base in rows and len(order) > 1:
    print()
    print("Ratios of medians against qomvm (>1: qomvm is faster / smaller):")
    print("  %-20s %8s %8s %8s" % ("", "ready", "exit", "RSS"))
    for v in order:
        if v == base:
            continue
        r = []
        for i in range(3):
            a, b = col(v, i), col(base, i)
            r.append("-" if a is None or not b else "%.2f" % (a / b))
        print("  %-20s %8s %8s %8s" % (v + "/" + base, *r))
print()
print("Per boot (ready ms / exit ms / peak RSS MiB / first KVM_RUN ms):")
for v in order:
    print("  %-14s %s" % (v, "  ".join("%s/%s/%.1f/%s" % (r[0], r[1], float(r[2]) / 1024, r[3])
                                           for r in rows[v])))
EOF

# timeline TIMELINE [host]: the guest's phases side by side. TIMELINE lines: "VMM NAME
# SECONDS" (NAME a milestone of /init's qomvm.timeline=1 lines, in the guest kernel's
# clock, or "before-kernel": host time from the spawn to that clock's start). With
# "host", the milestones are console lines in host time from the spawn (PY_RUN's
# CONSOLE.host, then "kernel-clock-starts" and "ready").
read -r -d '' PY_TIMELINE <<'EOF' || true
import statistics, sys
host = sys.argv[2:] == ["host"]
order, vmms, at = [], [], {}
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) != 3:
        continue
    vmm, name, t = f[0], f[1], float(f[2])
    if vmm not in vmms:
        vmms.append(vmm)
    if name not in order:
        order.append(name)
    at.setdefault((vmm, name), []).append(t)
def med(vmm, name):
    v = at.get((vmm, name))
    return statistics.median(v) if v else None
# Milestones in the order of the first VMM's boot (by time), "before-kernel" first.
first = vmms[0]
order.sort(key=lambda n: (n != "before-kernel", med(first, n) if med(first, n) is not None else 1e9))
if host:
    print("Before the kernel (medians, seconds): 'at' is host time from the spawn to a line on the")
    print("console (SeaBIOS's banner, its boot message, the boot loader's last line before Linux),")
    print("to the start of the guest kernel's clock (see below) and to the ready marker; 'phase' is")
    print("the time since the previous one; the ratio is qomvm's phase over the other VMM's.")
else:
    print("Guest timeline (medians, seconds): 'at' is the guest kernel's clock when the phase ended")
    print("(printk time stamps; 'before-kernel' is host time from the spawn to that clock's start:")
    print("VMM start-up, firmware, boot loader, decompression); 'phase' is the time since the previous")
    print("milestone; the ratio is qomvm's phase over the other VMM's (<1: qomvm is faster there).")
head = "  %-17s" % "milestone" + "".join("%24s" % (v + " at/phase") for v in vmms)
others = [v for v in vmms if v != "qomvm"]
if "qomvm" in vmms:
    head += "".join("%21s" % ("qomvm/" + v) for v in others)
print(head)
prev = {v: 0.0 for v in vmms}
for name in order:
    row = "  %-17s" % name
    phase = {}
    for v in vmms:
        t = med(v, name)
        if t is None:
            row += "%24s" % "-"
            continue
        phase[v] = t if name == "before-kernel" else t - prev[v]
        if name != "before-kernel":
            prev[v] = t
        row += "%24s" % ("%.3f/%.3f" % (t, phase[v]))
    if "qomvm" in vmms:
        for v in others:
            a, b = phase.get("qomvm"), phase.get(v)
            row += "%21s" % ("-" if a is None or not b or b <= 0 else "%.2f" % (a / b))
    print(row)
EOF

# ----------------------------------------------------------- the benchmark --

work=$(mktemp -d "${TMPDIR:-/tmp}/qomvm-bench-boot.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Local copies: inside the rig this keeps the 9p share out of the boots.
kver=$(cat "$assets/kernel-version" 2>/dev/null || echo unknown)
if [[ $firmware == 1 ]]; then
    cp --sparse=always "$assets/boot-disk.qcow2" "$work/"
    # @OVERLAY@: boot() makes a fresh overlay of the image for each boot.
    common=(-m "$mem" -smp "$smp" -nographic -no-reboot
        -drive "file=@OVERLAY@,if=none,id=d0,format=qcow2"
        -device virtio-blk-pci,drive=d0,bootindex=1 -smbios "type=11,value=quiet qomvm.timeline=1")
else
    cp "$assets/$kernel_file" "$assets/initramfs.cpio.gz" "$work/"
    common=(-m "$mem" -smp "$smp" -nographic -no-reboot
        -kernel "$work/$kernel_file" -initrd "$work/initramfs.cpio.gz" -append "$APPEND")
fi
vmms=(qomvm)
declare -A cmdline
cmdline[qomvm]="$(printf '%q ' "$qomvm_bin" -M pc "${common[@]}")"
qemu=$(command -v qemu-system-x86_64 || true)
if [[ $with_qemu == 1 ]]; then
    if [[ -n $qemu ]]; then
        vmms+=(qemu-pc)
        cmdline[qemu-pc]="$(printf '%q ' "$qemu" -M pc -accel kvm "${common[@]}")"
        if [[ $firmware == 0 ]]; then
            vmms+=(qemu-microvm)
            cmdline[qemu-microvm]="$(printf '%q ' "$qemu" -M "$MICROVM_MACHINE" -accel kvm "${common[@]}")"
        fi
    else
        qomvm_log "qemu-system-x86_64 not installed (Debian package qemu-system-x86): QEMU skipped"
    fi
fi

# boot VMM ROUND: one boot; appends to $work/results unless a warm-up round.
declare -A dropped
boot() {
    local vmm=$1 round=$2 out ready exit_ms rss code kvmrun=- label
    local con=$work/$vmm.$round.console err=$work/$vmm.$round.stderr
    local -a cmd
    eval "cmd=(${cmdline[$vmm]})"
    if [[ $firmware == 1 ]]; then
        local overlay=$work/$vmm.$round.qcow2
        qemu-img create -q -f qcow2 -b "$work/boot-disk.qcow2" -F qcow2 "$overlay" ||
            qomvm_die "qemu-img create of the overlay failed"
        cmd=("${cmd[@]//@OVERLAY@/$overlay}")
    fi
    if [[ $vmm == qomvm ]]; then
        cmd=(env RUST_LOG=boot=info "${cmd[@]}")
    fi
    out=$("$PYTHON" -c "$PY_RUN" "$boot_timeout" "$MARKER" "$con" "$err" -- "${cmd[@]}") ||
        qomvm_die "the timing helper failed"
    read -r ready exit_ms rss code <<<"$out"
    if [[ $vmm == qomvm ]]; then
        kvmrun=$(sed -n 's/.*first KVM_RUN \([0-9.]*\) ms after process start.*/\1/p' "$err" | head -n1)
        kvmrun=${kvmrun:--}
    fi
    if ((round < warmup)); then label="warm-up $((round + 1))/$warmup"; else label="run $((round - warmup + 1))/$runs"; fi
    if [[ $code != 0 || $ready == - ]]; then
        local why="exit status $code"
        [[ $code != timeout ]] || why="killed after $boot_timeout s"
        [[ $ready == - ]] && why+=", no $MARKER on the console"
        qomvm_log "$vmm $label: FAILED ($why); left out from now on. Last console/stderr lines:"
        { tail -n 8 "$con" | tr -d '\r'; tail -n 8 "$err"; } | sed 's/^/    /' >&2
        dropped[$vmm]="$why, at $label"
        return 0
    fi
    local extra=
    [[ $vmm != qomvm ]] || extra=", first KVM_RUN $kvmrun ms"
    qomvm_log "$vmm $label: ready $ready ms, exit $exit_ms ms, peak RSS $((rss / 1024)) MiB$extra"
    if ((round >= warmup)); then
        echo "$vmm $ready $exit_ms $rss $kvmrun" >>"$work/results"
        # The guest's own phases; "ready" (the kernel's clock at the marker) also gives
        # the time before that clock started.
        tr -d '\r' <"$con" | sed -n "s/^timeline: \([a-z-]*\) \([0-9.]*\)$/$vmm \1 \2/p" >>"$work/timeline"
        local up
        up=$(tr -d '\r' <"$con" | sed -n 's/^timeline: ready \([0-9.]*\)$/\1/p' | head -n1)
        [[ -z $up ]] || awk -v r="$ready" -v u="$up" -v v="$vmm" \
            'BEGIN { printf "%s before-kernel %.3f\n", v, r / 1000 - u }' >>"$work/timeline"
        # The console's milestones before the kernel, in host time.
        if [[ -s $con.host ]]; then
            sed "s/^/$vmm /" "$con.host" >>"$work/host-timeline"
            [[ -z $up ]] || awk -v r="$ready" -v u="$up" -v v="$vmm" \
                'BEGIN { printf "%s kernel-clock-starts %.3f\n", v, r / 1000 - u }' >>"$work/host-timeline"
            awk -v r="$ready" -v v="$vmm" 'BEGIN { printf "%s ready %.3f\n", v, r / 1000 }' \
                >>"$work/host-timeline"
        fi
    fi
}

cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
cpu_flags=$(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo | head -n1)
ncpu=$(nproc)
virt=
[[ " $cpu_flags " == *" svm "* ]] && virt+=" svm"
[[ " $cpu_flags " == *" npt "* ]] && virt+=" npt"
[[ " $cpu_flags " == *" vmx "* ]] && virt+=" vmx"
[[ " $cpu_flags " == *" ept "* ]] && virt+=" ept"

qomvm_log "environment: $env_note; CPU: $cpu_model ($ncpu CPUs,$virt)"
for v in "${vmms[@]}"; do qomvm_log "$v: ${cmdline[$v]}"; done

: >"$work/results"
for ((round = 0; round < warmup + runs; round++)); do
    for v in "${vmms[@]}"; do
        [[ -z ${dropped[$v]:-} ]] || continue
        boot "$v" "$round"
    done
done

# ----------------------------------------------------------------- report --

echo
echo "Boot benchmark: $runs boot(s) per VMM after $warmup warm-up boot(s), round-robin"
echo "Environment: $env_note"
if [[ $inside == 1 ]]; then
    echo "  L1: $cpu_model, $ncpu vCPUs,$virt (the rig's QEMU TCG CPU model, not the host CPU;"
    echo "  guest code runs at TCG speed: absolute times are not hardware figures, compare ratios)"
else
    echo "  CPU: $cpu_model, $ncpu CPUs,$virt"
fi
echo "  Kernel $(uname -r); /dev/kvm from $(awk '$1 ~ /^kvm_(amd|intel|pvm)$/ {print $1}' /proc/modules | head -n1)"
if [[ $firmware == 1 ]]; then
    echo "Guest: boot-disk.qcow2 (SeaBIOS, GRUB, $kver, the busybox initramfs, root on vda1), -m $mem -smp $smp -nographic -no-reboot"
else
    echo "Guest: $kver ($kernel_file) + busybox initramfs, -m $mem -smp $smp -append \"$APPEND\" -nographic -no-reboot"
fi
rev=
if [[ $qomvm_bin == "$REPO/target/release/qomvm" ]]; then
    rev=$(git -C "$REPO" describe --always --dirty 2>/dev/null || true)
fi
echo "qomvm: $qomvm_bin${rev:+ (git $rev)}"
if [[ -n $qemu && $with_qemu == 1 ]]; then
    echo "QEMU: $("$qemu" --version | head -n1); qemu-microvm is -M $MICROVM_MACHINE"
fi
for v in "${vmms[@]}"; do
    [[ -z ${dropped[$v]:-} ]] || echo "NOTE: $v failed (${dropped[$v]}); its later boots were skipped"
done
echo
if [[ -s $work/results ]]; then
    "$PYTHON" -c "$PY_SUMMARY" "$work/results"
    if [[ -s $work/host-timeline ]]; then
        echo
        "$PYTHON" -c "$PY_TIMELINE" "$work/host-timeline" host
    fi
    if [[ -s $work/timeline ]]; then
        echo
        "$PYTHON" -c "$PY_TIMELINE" "$work/timeline"
    fi
else
    echo "No successful boots."
fi
for v in "${vmms[@]}"; do
    [[ -z ${dropped[$v]:-} ]] || exit 1
done
