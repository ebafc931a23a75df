#!/usr/bin/env bash
# Boots the project's test guest (the Debian cloud kernel and a busybox initramfs, built
# from Debian packages by guest-assets.sh) on qomvm's pc machine, to an interactive shell on
# this terminal. Ctrl-A x quits; Ctrl-A h lists the other escapes.
#
# On a host with hardware KVM qomvm runs directly; where /dev/kvm is PVM or missing, it runs
# inside the nested-KVM rig (scripts/nested-kvm.sh), since a stock Linux guest needs a
# hardware-style KVM.
#
# Usage: scripts/boot-guest.sh [QOMVM OPTIONS...]   (e.g. -smp 4 -m 2G)
set -euo pipefail
cd "$(dirname "$0")/.."

assets=target/guest-assets
scripts/guest-assets.sh "$assets" >&2
cargo build --release --quiet --bin qomvm
qomvm=$PWD/target/release/qomvm

args=(-M pc -m 512 -smp 2 -nographic
    -kernel "$PWD/$assets/vmlinuz" -initrd "$PWD/$assets/initramfs.cpio.gz"
    -append "console=ttyS0 quiet qomvm.shell=1" "$@")

if [[ -e /sys/module/kvm_pvm || ! -w /dev/kvm ]]; then
    echo "boot-guest: no hardware KVM here: running qomvm inside the nested-KVM rig" >&2
    exec scripts/nested-kvm.sh --interactive --timeout 86400 -- "$qomvm" "${args[@]}"
fi
exec "$qomvm" "${args[@]}"
