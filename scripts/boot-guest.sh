#!/usr/bin/env bash
# Boots the project's test guest (the Debian cloud kernel and a busybox initramfs, built
# from Debian packages by guest-assets.sh) on qomvm's pc machine, to an interactive shell on
# this terminal. Ctrl-A x quits; Ctrl-A h lists the other escapes.
#
# The shell runs on a persistent disk: target/guest-disk/disk.qcow2, a qcow2 overlay over
# the assets' rootfs.ext4 (busybox, fio; see guest-assets.sh --help), created on first use
# and attached as virtio-blk-pci with cache=none; the guest mounts it as its root
# (qomvm.root=/dev/vda), so files written there are kept from one boot to the next. The
# overlay is recreated (the old one kept as disk.qcow2.old) when rootfs.ext4 is rebuilt.
# Delete target/guest-disk to start afresh.
#
# On a host with hardware KVM qomvm runs directly; where /dev/kvm is PVM or missing, it runs
# inside the nested-KVM rig (scripts/nested-kvm.sh), since a stock Linux guest needs a
# hardware-style KVM; the rig shares target/guest-disk read-write so the disk persists.
#
# The guest has user networking (QEMU's default, libslirp; no root needed): a virtio-net-pci
# NIC, `-nic user,model=virtio-net-pci,hostfwd=tcp::2222-:22`, configured by DHCP at boot
# (qomvm.net=dhcp: 10.0.2.15, gateway 10.0.2.2, DNS 10.0.2.3), so the guest can ping the
# gateway, wget/nc out, and a listener on the guest's port 22 is reached through the host's
# port 2222 (the test guest has no sshd of its own; `nc -l -p 22 -e sh` in the guest answers
# `nc localhost 2222` on the host). Inside the rig, "the host" is the rig's L1: it has no
# network of its own, so the guest reaches only L1's loopback, and port 2222 is L1's.
#
# Usage: scripts/boot-guest.sh [--no-disk] [--no-net] [--qemu] [QOMVM OPTIONS...]
#                                                             (e.g. -smp 4 -m 2G)
#   --no-disk  no disk: the shell runs in the initramfs (nothing persists)
#   --no-net   no network device
#   --qemu     run the same command line with qemu-system-x86_64 -accel kvm instead of qomvm
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC2034 # read by scripts/lib/debian.sh
QOMVM_PROG=boot-guest
# shellcheck source=scripts/lib/debian.sh disable=SC1091
. scripts/lib/debian.sh

disk=1 net=1 vmm=qomvm
while [[ $# -gt 0 ]]; do
    case $1 in
        --no-disk) disk=0; shift ;;
        --no-net) net=0; shift ;;
        --qemu) vmm=qemu; shift ;;
        *) break ;;
    esac
done

assets=target/guest-assets
scripts/guest-assets.sh "$assets" >&2
if [[ $vmm == qemu ]]; then
    bin=(qemu-system-x86_64 -accel kvm)
else
    qomvm_need_cargo .
    cargo build --release --quiet --bin qomvm
    bin=("$PWD/target/release/qomvm")
fi

args=(-M pc -m 512 -smp 2 -nographic
    -kernel "$PWD/$assets/vmlinuz" -initrd "$PWD/$assets/initramfs.cpio.gz")
append="console=ttyS0 quiet qomvm.shell=1"
if [[ $net == 1 ]]; then
    # shellcheck disable=SC2054 # the commas are QEMU's
    args+=(-nic user,model=virtio-net-pci,hostfwd=tcp::2222-:22)
    append+=" qomvm.net=dhcp"
else
    # Without it -M pc would get its default card (e1000 on user networking).
    args+=(-nic none)
fi
rig=(scripts/nested-kvm.sh --interactive --timeout 86400)
if [[ $disk == 1 ]]; then
    command -v qemu-img >/dev/null || { echo "boot-guest: qemu-img not found (Debian package qemu-utils)" >&2; exit 1; }
    dir=$PWD/target/guest-disk
    base=$PWD/$assets/rootfs.ext4
    mkdir -p "$dir"
    # The overlay is only valid over the rootfs.ext4 it was made on.
    id=$(stat -c '%s %Y' "$base")
    if [[ ! -f $dir/disk.qcow2 || $(cat "$dir/base-id" 2>/dev/null) != "$id" ]]; then
        if [[ -f $dir/disk.qcow2 ]]; then
            mv -f "$dir/disk.qcow2" "$dir/disk.qcow2.old"
            echo "boot-guest: $base was rebuilt: new disk (the old one is $dir/disk.qcow2.old)" >&2
        fi
        qemu-img create -q -f qcow2 -b "$base" -F raw "$dir/disk.qcow2"
        echo "$id" >"$dir/base-id"
    fi
    # shellcheck disable=SC2054 # the commas are QEMU's
    args+=(-drive "file=$dir/disk.qcow2,if=none,id=disk0,format=qcow2,cache=none"
        -device virtio-blk-pci,drive=disk0)
    append+=" qomvm.root=/dev/vda"
    rig+=(--rw "$dir")
fi
args+=(-append "$append")
args+=("$@")

if [[ -e /sys/module/kvm_pvm || ! -w /dev/kvm ]]; then
    echo "boot-guest: no hardware KVM here: running $vmm inside the nested-KVM rig" >&2
    exec "${rig[@]}" -- "${bin[@]}" "${args[@]}"
fi
exec "${bin[@]}" "${args[@]}"
