#!/usr/bin/env bash
# Run a host command inside an L1 Linux VM that has a working /dev/kvm, for
# hosts without usable hardware KVM (e.g. PVM). See usage() and
# docs/testing-without-kvm.md.
set -euo pipefail

QOMVM_PROG=nested-kvm
QOMVM_DIE_STATUS=125
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/debian.sh
. "$SCRIPT_DIR/lib/debian.sh"

KERNEL_META=linux-image-amd64
# Bump when the L1 initramfs layout or its /init changes (forces a rebuild).
L1_FORMAT=6
# Modules for the L1 kernel, loaded in this order; built-in or absent ones are
# skipped (what is needed is verified when L1 boots).
L1_MODULES="irqbypass kvm ccp kvm-amd virtio_ring virtio virtio_pci_modern_dev
virtio_pci_legacy_dev virtio_pci 9pnet 9pnet_virtio netfs fscache 9p overlay
virtio_console tun veth tap vhost_iotlb vhost vhost_net"
# Loaded only for --scratch: a loop device and ext4 (crc32c for its checksums).
L1_SCRATCH_MODULES="loop crc16 mbcache jbd2 crc32c_generic ext4"
# Host environment variables passed to COMMAND (extended regex on the name).
ENV_PASS='^(PATH|HOME|USER|LOGNAME|LANG|LC_[A-Z]+|TZ|TERM|RUST_[A-Z_]+|CARGO_[A-Z0-9_]*|QOMVM_[A-Za-z0-9_]*)$'

smp=2
mem=6G
timeout=600
cpu=${NESTED_KVM_CPU:-qemu64,+svm,+npt}
machine=${NESTED_KVM_MACHINE:-q35}
logfile=
interactive=0
rw_dirs=()
scratch=

usage() {
    cat <<'EOF'
Usage: scripts/nested-kvm.sh [options] -- COMMAND [ARGS...]

Runs COMMAND (a host command) inside an L1 Linux VM that provides /dev/kvm
(AMD SVM with nested paging, emulated by QEMU TCG), for hosts whose own
/dev/kvm cannot run ordinary guests (PVM) or that have none.

L1 sees the host's root file system read-only (9p) under a tmpfs overlay:
every host file is visible, writes succeed but are discarded when L1 ends.
COMMAND runs as root in the host's current directory, with stdin /dev/null and
the host's PATH, HOME, USER, LOGNAME, LANG, LC_*, TZ, TERM, RUST_*, CARGO_* and
QOMVM_* variables.

COMMAND's stdout and stderr (merged) are streamed to this script's stdout;
L1's own console goes to a log that is shown only on failure. The exit status
is COMMAND's. Other statuses:
  124  --timeout expired, or L1 stalled: its console showed no sign of life
       (init prints one every 10 s) for 180 s, or for 45 s while its CPUs
       were idle, or its kernel reported RCU stalls or a CPU soft-locked for
       a minute (L1 is killed)
  125  the rig failed: bad usage, a missing tool or package, or L1 did not
       boot/mount (its console log is printed)
  130/143  interrupted by SIGINT/SIGTERM (L1 is killed)

Options:
  --smp N        L1 vCPUs (default 2)
  --mem SIZE     L1 RAM, QEMU syntax (default 6G; allocated lazily on the host;
                 room for an L2 guest with -m 5G)
  --timeout S    kill L1 after S seconds (default 600)
  --cpu MODEL    L1 CPU model (default qemu64,+svm,+npt; env NESTED_KVM_CPU)
  (env NESTED_KVM_QEMU, NESTED_KVM_QEMU_DATA: another QEMU binary for L1 and its
  data directory, QEMU's -L; session 38 tried Debian's backported QEMU 10.0.2: its
  TCG showed the same nested triple faults and L1 kernel panics as 7.2's)
  --log FILE     keep L1's console log (kernel + init messages) in FILE
  --rw DIR       share the host directory DIR read-write: L1 mounts it (9p,
                 cache=mmap) at the same path over the overlay, so COMMAND's
                 writes there reach the host and stay after the run, and
                 files there can be opened with O_DIRECT (QEMU's and qomvm's
                 cache=none), which L1's tmpfs overlay refuses. Repeatable.
                 Each I/O is a round trip to the host: slow (tens of ms).
  --scratch SIZE an empty ext4 file system of SIZE (QEMU syntax, e.g. 2G) at
                 /scratch in L1 (also in $NESTED_KVM_SCRATCH), kept in L1's
                 memory (a loop device over a tmpfs file), so it is fast and
                 takes O_DIRECT; lost when L1 ends. Count it in --mem.
  --interactive  connect this terminal to COMMAND's stdin too (raw mode, for an
                 interactive guest console such as qomvm -nographic; Ctrl-C
                 goes to COMMAND)
  -h, --help     this text
The environment variable NESTED_KVM_MACHINE sets L1's machine type (default
q35). --timeout counts from L1's start, after any one-time build.

With cargo, every test binary can run in the rig:
  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/scripts/nested-kvm.sh --" cargo test

Everything comes from Debian packages: qemu-system-x86 (installed with
apt-get when missing and running as root), linux-image-amd64 and
busybox-static (downloaded, never installed). The L1 kernel and initramfs are
cached in ${XDG_CACHE_HOME:-$HOME/.cache}/qomvm/nested.
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --smp) smp=${2:?--smp needs a value}; shift 2 ;;
        --mem) mem=${2:?--mem needs a value}; shift 2 ;;
        --timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
        --cpu) cpu=${2:?--cpu needs a value}; shift 2 ;;
        --log) logfile=${2:?--log needs a value}; shift 2 ;;
        --interactive) interactive=1; shift ;;
        --rw) rw_dirs+=("${2:?--rw needs a directory}"); shift 2 ;;
        --scratch) scratch=${2:?--scratch needs a size}; shift 2 ;;
        --smp=* | --mem=* | --timeout=* | --cpu=* | --log=* | --rw=* | --scratch=*)
            opt=${1%%=*}; set -- "$opt" "${1#*=}" "${@:2}" ;;
        --) shift; break ;;
        -*) qomvm_die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || qomvm_die "no COMMAND given (usage: nested-kvm.sh [options] -- COMMAND [ARGS...]; see --help)"
[[ $smp =~ ^[1-9][0-9]*$ ]] || qomvm_die "--smp wants a positive number, got '$smp'"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || qomvm_die "--timeout wants a positive number of seconds, got '$timeout'"
[[ $mem =~ ^[1-9][0-9]*[kKmMgGtT]?$ ]] || qomvm_die "--mem wants a size like 6G or 4096M, got '$mem'"
[[ -z $scratch || $scratch =~ ^[1-9][0-9]*[kKmMgGtT]?$ ]] || qomvm_die "--scratch wants a size like 2G or 512M, got '$scratch'"
for i in "${!rw_dirs[@]}"; do
    [[ -d ${rw_dirs[i]} ]] || qomvm_die "--rw ${rw_dirs[i]}: not a directory"
    rw_dirs[i]=$(cd "${rw_dirs[i]}" && pwd -P)
    [[ ${rw_dirs[i]} != / && ${rw_dirs[i]} != *$'\n'* ]] || qomvm_die "--rw ${rw_dirs[i]}: not sharable"
done

qomvm_need_cmd qemu-system-x86_64 qemu-system-x86
qomvm_need_cmd apt-get apt
qomvm_need_cmd dpkg-deb dpkg
qomvm_need_cmd xz xz-utils
qomvm_need_cmd gzip gzip

# ---------------------------------------------------------------- L1 build --

# Writes L1's /init (busybox sh).
write_l1_init() {
    cat >"$1" <<'EOF'
#!/bin/busybox sh
# qomvm nested-kvm L1 /init (generated by scripts/nested-kvm.sh).
# Console (ttyS0) output goes to the host's log file, not to the user.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { read -r up _ </proc/uptime; echo "qomvm-l1: [$up] $*"; }
say "init started"
# A sign of life every 10 s: the host tells a stalled L1 (QEMU's TCG has been seen to
# stop running it for good) from one that is only slow, and ends it early.
( while sleep 10; do say alive; done ) &
st_dev=
finish() { # finish STATUS: report STATUS to the host and power off
    say "exit status $1"
    [ -n "$st_dev" ] && echo "$1" >"$st_dev"
    poweroff -f
    sleep 5
    exit 1
}
fatal() { say "FATAL: $*"; finish 125; }

for m in $(cat /etc/qomvm-modules); do
    [ -f "/lib/modules/$m.ko" ] || continue
    insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done

# virtio-serial ports: qomvm.out (COMMAND's output), qomvm.status.
out_dev= i=0
while :; do
    for d in /sys/class/virtio-ports/*; do
        [ -f "$d/name" ] || continue
        case $(cat "$d/name") in
            qomvm.out) out_dev=/dev/${d##*/} ;;
            qomvm.status) st_dev=/dev/${d##*/} ;;
        esac
    done
    [ -n "$out_dev" ] && [ -n "$st_dev" ] && [ -c "$out_dev" ] && [ -c "$st_dev" ] && break
    i=$((i + 1))
    [ $i -gt 200 ] && { st_dev=; fatal "virtio-serial ports qomvm.out/qomvm.status not found"; }
    sleep 0.05
done

say "modules loaded, virtio-serial ports found"
[ -c /dev/kvm ] || fatal "/dev/kvm missing (kvm/kvm-amd not loaded; CPU without svm?)"

mkdir -p /mnt/host /mnt/rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /mnt/host ||
    fatal "mounting the host root (9p) failed"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot ||
    fatal "overlay mount failed"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
ln -sf /proc/self/fd /newroot/dev/fd
ln -sf /proc/self/fd/0 /newroot/dev/stdin
ln -sf /proc/self/fd/1 /newroot/dev/stdout
ln -sf /proc/self/fd/2 /newroot/dev/stderr
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mkdir -p /newroot/tmp && chmod 1777 /newroot/tmp
mkdir -p /newroot/run/qomvm
say "host root mounted"
# --rw DIR: host directories shared read-write, at their own paths.
if [ -f /qomvm/rw ]; then
    while read -r tag dir; do
        mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap "$tag" "/newroot$dir" ||
            fatal "mounting the read-write share $dir failed"
    done </qomvm/rw
fi
# --scratch SIZE: ext4 on a loop device over a tmpfs file, at /scratch.
if [ -f /qomvm/scratch ]; then
    for m in $(cat /etc/qomvm-scratch-modules); do
        insmod "/lib/modules/$m.ko" || say "insmod $m failed"
    done
    mkdir -p /mnt/scratch /newroot/scratch
    mount -t tmpfs -o size=100% tmpfs /mnt/scratch
    truncate -s "$(cat /qomvm/scratch)" /mnt/scratch/img || fatal "creating the scratch file failed"
    losetup /dev/loop0 /mnt/scratch/img || fatal "losetup for the scratch disk failed"
    # (the host's mkfs; noinit_itable: no background zeroing, the file reads as zeroes)
    chroot /newroot /sbin/mkfs.ext4 -q -O ^has_journal /dev/loop0 ||
        fatal "mkfs.ext4 of the scratch disk failed"
    mount -t ext4 -o noinit_itable /dev/loop0 /newroot/scratch || fatal "mounting the scratch disk failed"
    chmod 1777 /newroot/scratch
    say "scratch file system mounted"
fi
cp /qomvm/cmd.sh /newroot/run/qomvm/cmd.sh || fatal "no per-run command (/qomvm/cmd.sh)"

say "running command"
if [ -e /qomvm/interactive ]; then
    # A virtio console port opens once: read and write through one descriptor.
    env -i /bin/busybox chroot /newroot /bin/sh /run/qomvm/cmd.sh <>"$out_dev" >&0 2>&1
else
    env -i /bin/busybox chroot /newroot /bin/sh /run/qomvm/cmd.sh </dev/null >"$out_dev" 2>&1
fi
finish $?
EOF
    chmod 755 "$1"
}

# True when the vmlinux ELF has the Xen PVH entry note
# (name "Xen", type 18 = XEN_ELFNOTE_PHYS32_ENTRY) that QEMU boots directly.
has_pvh_note() {
    LC_ALL=C grep -qaP '\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00' "$1"
}

build_l1() { # build_l1 DIR KDEB BBDEB
    local dir=$1 kdeb=$2 bbdeb=$3 work m f kver pats=()
    work=$(mktemp -d "$QOMVM_CACHE/nested/.build.XXXXXX")
    qomvm_log "building the L1 kernel and initramfs (once; cached in $dir)"
    for m in $L1_MODULES $L1_SCRATCH_MODULES; do
        pats+=("*/${m//[-_]/[-_]}.ko*")
    done
    deb_extract "$kdeb" "$work/k" './boot/vmlinuz-*' './lib/modules/*/modules.builtin' "${pats[@]}"
    f=$(find "$work/k/boot" -name 'vmlinuz-*' | head -n1)
    [[ -n $f ]] || qomvm_die "no boot/vmlinuz-* in $(basename "$kdeb")"
    kver=${f##*/vmlinuz-}
    if qomvm_extract_vmlinux "$f" "$work/vmlinux" && has_pvh_note "$work/vmlinux"; then
        mv "$work/vmlinux" "$work/kernel"
        echo vmlinux-pvh >"$work/kernel-kind"
    else
        qomvm_log "no PVH-capable vmlinux could be extracted; booting the bzImage"
        rm -f "$work/vmlinux"
        cp "$f" "$work/kernel"
        echo bzImage >"$work/kernel-kind"
    fi

    deb_extract "$bbdeb" "$work/bb" './bin/busybox'
    local root=$work/root moddir=$work/k/lib/modules/$kver
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,mnt,qomvm,lib/modules}
    cp "$work/bb/bin/busybox" "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    : >"$root/etc/qomvm-modules"
    : >"$root/etc/qomvm-scratch-modules"
    for m in $L1_MODULES $L1_SCRATCH_MODULES; do
        f=$(find "$moddir" \( -name "$m.ko*" -o -name "${m//-/_}.ko*" \) | head -n1)
        if [[ -z $f ]]; then
            if grep -qE "/(${m}|${m//-/_})\.ko$" "$moddir/modules.builtin" 2>/dev/null; then
                qomvm_log "module $m is built into $kver"
            else
                qomvm_log "warning: module $m not found in $(basename "$kdeb"); skipped"
            fi
            continue
        fi
        case $f in
            *.ko) cp "$f" "$root/lib/modules/$m.ko" ;;
            *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
            *.ko.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
            *.ko.zst) qomvm_need_cmd zstd zstd; zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
            *) qomvm_die "unknown module format: $f" ;;
        esac
        if [[ " ${L1_SCRATCH_MODULES//$'\n'/ } " == *" $m "* ]]; then
            echo "$m" >>"$root/etc/qomvm-scratch-modules"
        else
            echo "$m" >>"$root/etc/qomvm-modules"
        fi
    done
    write_l1_init "$root/init"
    qomvm_mkcpio "$root" "$work/initramfs.cpio.gz" "$work/bb/bin/busybox"
    cp "$work/bb/bin/busybox" "$work/busybox"
    echo "$kver" >"$work/kernel-version"

    # One rename per file: a concurrent run that already opened the old files
    # keeps reading them.
    mkdir -p "$dir"
    for f in kernel kernel-kind initramfs.cpio.gz busybox kernel-version; do
        mv -f "$work/$f" "$dir/$f"
    done
    rm -rf "$work"
}

kpkg=$(deb_kernel_package "$KERNEL_META")
l1dir=$QOMVM_CACHE/nested/$kpkg
stamp=$l1dir/inputs
ready() { # ready INPUTS: the cache entry was built from INPUTS, is complete and up to date
    local f
    [[ -f $stamp && $(cat "$stamp") == "$1" ]] || return 1
    for f in kernel kernel-kind initramfs.cpio.gz busybox; do
        [[ -s $l1dir/$f && ! ${BASH_SOURCE[0]} -nt $l1dir/$f && ! $SCRIPT_DIR/lib/debian.sh -nt $l1dir/$f ]] ||
            return 1
    done
}
# Fast path (no lock, no download): apt's candidates are the .debs the cache
# entry was built from.
if ! ready "format=$L1_FORMAT $(deb_file_name "$kpkg") $(deb_file_name busybox-static)"; then
    mkdir -p "$QOMVM_CACHE/nested"
    qomvm_lock "$QOMVM_CACHE/.lock"
    kdeb=$(deb_fetch "$kpkg")
    bbdeb=$(deb_fetch busybox-static)
    inputs="format=$L1_FORMAT $(basename "$kdeb") $(basename "$bbdeb")"
    if ! ready "$inputs"; then
        build_l1 "$l1dir" "$kdeb" "$bbdeb"
        printf '%s\n' "$inputs" >"$stamp"
    fi
    # Only the build needs the lock: other runs may share the cache while L1 runs.
    qomvm_unlock
fi

# ------------------------------------------------------------------ the run --

# One L1 at a time on this host: two would share its few cores and both time out.
# The lock is the host's (not the cache's), held until this script exits.
rig_lock=${NESTED_KVM_LOCK:-/tmp/qomvm-nested-kvm.lock}
exec {rig_lock_fd}>"$rig_lock"
if ! flock -n "$rig_lock_fd"; then
    qomvm_log "waiting for another nested-kvm run on this host to finish ($rig_lock)"
    flock "$rig_lock_fd"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qomvm-nested.XXXXXX")
qpid=
saved_stty=
# shellcheck disable=SC2317 # cleanup and stop_l1 run from traps
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_l1
    if [[ -n ${catpid:-} ]]; then kill "$catpid" 2>/dev/null || true; fi
    if [[ -n $saved_stty ]]; then stty "$saved_stty" 2>/dev/null || true; fi
    if [[ -n $logfile && -f $tmp/console.log ]]; then cp "$tmp/console.log" "$logfile" || true; fi
    rm -rf "$tmp"
    exit "$rc"
}
# shellcheck disable=SC2317
stop_l1() {
    [[ -n $qpid ]] || return 0
    local i
    kill -TERM -- "-$qpid" 2>/dev/null || kill -TERM "$qpid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        kill -0 "$qpid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$qpid" 2>/dev/null || kill -KILL "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
    qpid=
}
trap cleanup EXIT
trap 'qomvm_log "interrupted"; exit 130' INT
trap 'qomvm_log "terminated"; exit 143' TERM

# Quote a string for POSIX sh (single quotes; ' becomes '\'').
shq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# Per-run data: /qomvm/cmd.sh in an extra cpio appended to the cached initrd.
cwd=$(pwd -P)
mkdir -p "$tmp/run/qomvm"
{
    echo "# generated by scripts/nested-kvm.sh"
    echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    while IFS= read -r name; do
        [[ $name =~ $ENV_PASS ]] || continue
        echo "export $name=$(shq "${!name}")"
    done < <(compgen -e)
    [[ -z $scratch ]] || echo "export NESTED_KVM_SCRATCH=/scratch"
    echo "cd $(shq "$cwd") || { echo $(shq "nested-kvm: cannot cd to $cwd in L1") >&2; exit 125; }"
    printf 'exec'
    for a in "$@"; do printf ' %s' "$(shq "$a")"; done
    printf '\n'
} >"$tmp/run/qomvm/cmd.sh"
if ((interactive)); then
    : >"$tmp/run/qomvm/interactive"
fi
if [[ -n $scratch ]]; then
    echo "$scratch" >"$tmp/run/qomvm/scratch"
fi
virtfs_rw=()
for i in "${!rw_dirs[@]}"; do
    echo "rw$i ${rw_dirs[i]}" >>"$tmp/run/qomvm/rw"
    virtfs_rw+=(-virtfs "local,path=${rw_dirs[i]//,/,,},mount_tag=rw$i,security_model=none,multidevs=remap")
done
qomvm_mkcpio "$tmp/run" "$tmp/run.cpio.gz" "$l1dir/busybox"
cat "$l1dir/initramfs.cpio.gz" "$tmp/run.cpio.gz" >"$tmp/initrd"

# shellcheck disable=SC2054 # the commas are QEMU's
qemu=("${NESTED_KVM_QEMU:-qemu-system-x86_64}"
    ${NESTED_KVM_QEMU_DATA:+-L "$NESTED_KVM_QEMU_DATA"}
    -accel tcg,thread=multi -M "$machine" -cpu "$cpu" -smp "$smp" -m "$mem"
    -nodefaults -no-user-config -display none -no-reboot -name qomvm-l1,debug-threads=on
    -kernel "$l1dir/kernel" -initrd "$tmp/initrd"
    -append "console=ttyS0 quiet loglevel=4 panic=-1 rdinit=/init 8250.nr_uarts=1 tsc=reliable sysrq_always_enabled"
    -monitor "unix:$tmp/hmp.sock,server=on,wait=off"
    -chardev "file,id=con,path=$tmp/console.log" -serial chardev:con
    -d cpu_reset -D "$tmp/resets.log"
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
    "${virtfs_rw[@]}"
    -device virtio-serial-pci,id=vser
    -chardev stdio,id=out,signal=off
    -device virtserialport,bus=vser.0,chardev=out,name=qomvm.out
    -chardev "file,id=st,path=$tmp/status"
    -device virtserialport,bus=vser.0,chardev=st,name=qomvm.status)
# QEMU gets its own session (so the whole group can be killed and terminal
# signals do not reach it) and, where setpriv can, dies with this script.
launch=(setsid)
if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then
    launch+=(setpriv --pdeathsig KILL)
fi
# QEMU's stdin is a FIFO that this script holds open and never writes: with
# /dev/null the stdio chardev would see EOF, report the port closed, and
# COMMAND's writes would block forever.
mkfifo "$tmp/stdin"
exec {stdin_hold}<>"$tmp/stdin"
if ((interactive)); then
    # QEMU makes its stdout non-blocking; on a terminal that would also make our stdin
    # non-blocking (one open file shared by both), so its output goes through a pipe.
    "${launch[@]}" "${qemu[@]}" <"$tmp/stdin" 2>"$tmp/qemu.log" {stdin_hold}>&- > >(cat) &
else
    "${launch[@]}" "${qemu[@]}" <"$tmp/stdin" 2>"$tmp/qemu.log" {stdin_hold}>&- &
fi
qpid=$!
catpid=
if ((interactive)); then
    # Keystrokes go to COMMAND's stdin through QEMU's stdin FIFO; the terminal is raw so
    # that Ctrl-C, Ctrl-A and friends reach COMMAND, and is restored by cleanup.
    if [[ -t 0 ]]; then
        saved_stty=$(stty -g)
        stty raw -echo
    fi
    cat <&0 >"$tmp/stdin" &
    catpid=$!
fi

show_logs() {
    {
        # A panic's trace can be longer than the tail below: its start says what failed.
        local first
        first=$(grep -n -m1 -E 'Kernel panic|BUG:|Oops:|general protection fault|double fault|invalid opcode:|WARNING: CPU:|rcu: INFO:' \
            "$tmp/console.log" 2>/dev/null | cut -d: -f1 || true)
        if [[ -n $first ]]; then
            echo "---- L1 console from its first failure report (line $first, 60 lines) ----"
            sed -n "${first},$((first + 59))p" "$tmp/console.log" || true
        fi
        # SysRq-L's answer to a stall (stall_record): every CPU's backtrace.
        first=$(grep -n -m1 'sysrq: Show backtrace' "$tmp/console.log" 2>/dev/null | cut -d: -f1 || true)
        if [[ -n $first ]]; then
            echo "---- L1 console from SysRq-L (line $first, 100 lines) ----"
            sed -n "${first},$((first + 99))p" "$tmp/console.log" || true
        fi
        echo "---- L1 console ($tmp/console.log, last 60 lines but signs of life) ----"
        # (The serial console ends its lines with CR LF.)
        grep -v '^qomvm-l1: \[[0-9.]*\] alive' "$tmp/console.log" 2>/dev/null | tail -n 60 || true
        grep '^qomvm-l1: \[[0-9.]*\] alive' "$tmp/console.log" 2>/dev/null | tail -n 1 |
            tr -d '\r' | sed 's/ alive$/ last sign of life/' || true
        if [[ -s $tmp/hmp.log ]]; then
            echo "---- L1's CPUs at the stall (QEMU's monitor, info registers -a) ----"
            grep -E '^(CPU#|RAX|RSI|R8 |R12|RIP|CS |SS |CR0|EFER)' "$tmp/hmp.log" || tail -n 3 "$tmp/hmp.log"
        fi
        if [[ -s $tmp/qemu.log ]]; then
            echo "---- qemu stderr ----"
            tail -n 20 "$tmp/qemu.log"
        fi
        echo "----"
    } >&2
}

now_us() { printf '%s\n' "${EPOCHREALTIME//[!0-9]/}"; }
deadline=$(($(now_us) + timeout * 1000000))
# L1's console grows at least every 10 s once init runs (its sign of life), and L1's
# kernel reaches init well within this: longer silence is a stalled L1.
stall_s=180
# A shorter silence is a stall when L1's CPUs are idle meanwhile: an idle L1 would have
# run its heartbeat. Seen in the rig: a CPU halted in L1 with its timer interrupts (and
# NMIs) never delivered again by QEMU's TCG, the other CPU idle with nothing to do.
idle_stall_s=45
# Asks L1's QEMU monitor (HMP) each COMMAND and prints the answers; best effort (for
# the record of a stall), 10 s at most.
hmp() {
    local py
    py=$(command -v python3) || { echo "(no python3: QEMU's monitor not asked)"; return 0; }
    timeout 10 "$py" - "$tmp/hmp.sock" "$@" <<'PY' || echo "(QEMU's monitor did not answer)"
import re, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
def answer():
    buf = b""
    while not buf.endswith(b"(qemu) "):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    # The monitor's readline echoes the command with terminal escapes.
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", buf.decode(errors="replace"))
    return text.rsplit("(qemu) ", 1)[0]
answer()
for cmd in sys.argv[2:]:
    s.sendall(cmd.encode() + b"\n")
    lines = answer().replace("\r", "").split("\n")
    print("(qemu) " + cmd)
    print("\n".join(l for l in lines[1:] if l.strip()))
PY
}

# One line per thread of L1's QEMU: thread id, state, CPU ticks used, name.
qemu_threads() {
    local t stat
    for t in /proc/"$qpid"/task/*; do
        stat=$(cat "$t/stat" 2>/dev/null) || continue
        # Fields after the parenthesised name: state is the 1st, utime and stime the 12th/13th.
        # shellcheck disable=SC2086 # split on purpose
        set -- ${stat##*) }
        printf '%s %s %s %s\n' "${t##*/}" "$1" "$((${12} + ${13}))" "$(cat "$t/comm" 2>/dev/null)"
    done
}

# Whether L1's vCPU threads used (almost) no CPU over 2 s: under 5 ticks each.
l1_idle() {
    local before after tid state ticks name prev
    before=$(qemu_threads)
    sleep 2
    after=$(qemu_threads)
    while read -r tid state ticks name; do
        [[ $name == CPU* ]] || continue
        prev=$(awk -v t="$tid" '$1 == t { print $3 }' <<<"$before")
        ((ticks - ${prev:-0} < 5)) || return 1
    done <<<"$after"
    grep -q ' CPU ' <<<"$after"
}

# What a stalled L1 was doing, before it is killed: which of QEMU's threads ran in the
# last 2 s (a vCPU thread using no CPU is QEMU stuck, one using it all is L1 or its
# nested guest looping), where each L1 CPU is (QEMU's monitor), and every L1 CPU's
# backtrace (SysRq-L through L1's keyboard, when L1 still takes interrupts). The summary
# goes to stderr as nested-kvm lines; the monitor's answer into hmp.log.
stall_record() {
    local before tid state ticks name prev line
    [[ -n $qpid ]] && kill -0 "$qpid" 2>/dev/null || return 0
    before=$(qemu_threads)
    sleep 2
    while read -r tid state ticks name; do
        [[ $name == CPU* || $name == qemu-system-x86 ]] || continue
        prev=$(awk -v t="$tid" '$1 == t { print $3 }' <<<"$before")
        qomvm_log "stall: QEMU thread '$name' state $state, $((ticks - ${prev:-$ticks})) CPU ticks in 2 s"
    done < <(qemu_threads)
    hmp "info registers -a" >"$tmp/hmp.log" 2>&1
    # One line per CPU: "CPU#0 RIP=... RFL=... [flags] CPL=0 II=0 A20=1 SMM=0 HLT=0".
    awk '/^CPU#[0-9]+/ { cpu = $1 } /^RIP=/ { print cpu, $0 }' "$tmp/hmp.log" | while read -r line; do
        qomvm_log "stall: $line"
    done
    grep -q '^RIP=' "$tmp/hmp.log" || qomvm_log "stall: $(tail -n 1 "$tmp/hmp.log")"
    # SysRq-9 first: at the rig's loglevel=4 the backtraces (warnings) would not reach the console.
    hmp "sendkey alt-sysrq-9" "sendkey alt-sysrq-l" >/dev/null 2>&1
    sleep 5
}

# Ends the run as a stall (status 124): L1 killed, its logs shown, REASON told.
l1_stalled() {
    stall_record
    stop_l1
    show_logs
    qomvm_log "timed out: L1 stalled, $1 (L1 killed)"
    exit 124
}
console_size=-1
console_changed=$(now_us)
idle_checked=0
# When L1's kernel first reported a stall (below), and what it reported.
stall_seen=
stall_what=
while kill -0 "$qpid" 2>/dev/null; do
    size=$(stat -c %s "$tmp/console.log" 2>/dev/null || echo 0)
    if [[ -n $stall_seen ]] && (($(now_us) - stall_seen >= 15000000)); then
        l1_stalled "$stall_what"
    elif ((size != console_size)); then
        console_size=$size
        console_changed=$(now_us)
        idle_checked=0
        # L1's kernel saw one of its CPUs stop taking timer ticks, or stuck in a nested
        # guest's vCPU for a minute: seen when TCG never let go of that vCPU again; L1
        # does not recover (COMMAND's own limits stop with it, and its heartbeat may go
        # on, on the other CPU), so waiting for --timeout only wastes it. L1 gets 15 s
        # more to print the stuck CPU's backtrace, for the record.
        if [[ -z $stall_seen ]]; then
            if grep -Eqs 'rcu: INFO: .* (detected stalls on CPUs|self-detected stall on CPU)' "$tmp/console.log"; then
                stall_what="its kernel reports RCU stalls"
            elif grep -Eqs 'soft lockup - CPU#[0-9]+ stuck for ([6-9][0-9]|[1-9][0-9]{2,})s' "$tmp/console.log"; then
                stall_what="its kernel reports a CPU stuck for a minute"
            fi
            [[ -n $stall_what ]] && stall_seen=$(now_us)
        fi
    elif (($(now_us) - console_changed >= stall_s * 1000000)); then
        l1_stalled "no sign of life on its console for $stall_s s"
    elif (($(now_us) - console_changed >= idle_stall_s * 1000000)) && ((!idle_checked)); then
        idle_checked=1
        if l1_idle; then
            l1_stalled "no sign of life on its console for $idle_stall_s s, its CPUs idle"
        fi
    fi
    if (($(now_us) >= deadline)); then
        stop_l1
        if ! grep -q 'qomvm-l1: .* running command' "$tmp/console.log" 2>/dev/null; then
            show_logs
            qomvm_log "timed out after $timeout s before L1 started COMMAND (L1 killed)"
        else
            qomvm_log "timed out after $timeout s (L1 killed)"
        fi
        exit 124
    fi
    sleep 0.2
done
qrc=0
wait "$qpid" || qrc=$?
qpid=

status=$(tr -dc '0-9' <"$tmp/status" 2>/dev/null || true)
if [[ -z $status ]]; then
    show_logs
    # Under -no-reboot, L1 resetting (a panic with panic=-1, or a triple fault of QEMU's
    # TCG, which -d cpu_reset logs) ends QEMU with status 0.
    why=
    grep -q 'Triple fault' "$tmp/resets.log" 2>/dev/null && why=", L1's CPU triple-faulted"
    grep -q 'Kernel panic' "$tmp/console.log" 2>/dev/null && why=", L1's kernel panicked"
    qomvm_log "L1 ended without reporting COMMAND's exit status (qemu exit status $qrc$why)"
    exit 125
fi
if [[ $status == 125 ]] && grep -q 'qomvm-l1: FATAL' "$tmp/console.log" 2>/dev/null; then
    show_logs
    qomvm_log "L1 failed: $(grep -m1 'qomvm-l1: FATAL' "$tmp/console.log" | sed 's/.*FATAL: //')"
    exit 125
fi
exit "$status"
