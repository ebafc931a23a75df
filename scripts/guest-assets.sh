#!/usr/bin/env bash
# Build the test guest for qomvm from Debian packages: the Debian cloud kernel,
# a busybox initramfs with the kernel's virtio modules, an ext4 disk image
# with busybox and fio, and a disk that the firmware boots through GRUB. See
# usage() below and docs/testing-without-kvm.md.
set -euo pipefail

QOMVM_PROG=guest-assets
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/debian.sh
. "$SCRIPT_DIR/lib/debian.sh"

KERNEL_META=linux-image-cloud-amd64
# Also exported: Debian's generic kernel, which has CONFIG_DEVPORT (/dev/port),
# for portfuzz in the nested-KVM rig (see the portfuzz notes in usage()).
GENERIC_META=linux-image-amd64
# Bump when the initramfs layout, the disk image or /init changes (forces a rebuild).
ASSETS_FORMAT=28
# Modules of the cloud kernel carried in the initramfs (with whatever they
# depend on, read from each module's modinfo "depends="), loaded by /init in
# dependency order. The cloud kernel builds ext4 (and crc32c, jbd2, mbcache)
# in, so the disk image needs no file system module.
GUEST_MODULES="virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
virtio_blk virtio_net virtio_rng virtio_balloon virtio_console"
# The SCSI-layer drivers: IDE (PIIX3 IDE, disks, CD-ROMs) and virtio-scsi, carried
# too but loaded only with qomvm.ata=1: probing the IDE ports costs every other boot
# time on the rig.
ATA_MODULES="ata_piix sd_mod sr_mod virtio_scsi"
# The generic kernel's USB hosts (UHCI, xHCI), HID and mass storage drivers (the cloud kernel has no
# USB), with evdev to read the input devices and sd for the disks: loaded with
# qomvm.usb=1 under vmlinuz-generic.
USB_MODULES="uhci_hcd xhci_pci usbhid hid_generic evdev usb_storage sd_mod"
# The cloud kernel's virtio input driver and evdev to read its devices: loaded with
# qomvm.virtioinput=1.
INPUT_MODULES="virtio_input evdev"
# The generic kernel's drivers for the Intel 82540EM (QEMU's default NIC, e1000) and the
# RTL8139C+ (libvirt's default, rtl8139; 8139cp, as Linux binds QEMU's card) (the cloud
# kernel has neither), and its virtio disk and ext4 drivers (modules there, built into the
# cloud kernel; ext4 asks for a crc32c driver by name, not as a dependency) so that the
# root disk mounts beside it (scripts/bench-net.sh --nic
# e1000): loaded with qomvm.e1000=1 under vmlinuz-generic.
NIC_MODULES="e1000 8139cp virtio_pci virtio_blk crc32c_generic ext4"
# The generic kernel's virtio GPU driver (DRM, with its framebuffer console; the cloud
# kernel has no DRM): loaded with qomvm.gpu=1 under vmlinuz-generic.
GPU_MODULES="virtio_pci virtio_gpu"
# The disk image's size (a sparse file; its content is about 85 MB, mostly
# fio's libraries: Debian's fio links librbd, libgfapi, libnbd and friends).
ROOTFS_SIZE=256M
# The boot disk's size (sparse): 1 MiB for the MBR and GRUB's core.img, then
# partition 1 with the same files as rootfs.ext4 plus /boot.
BOOTDISK_SIZE=256M

usage() {
    cat <<'EOF'
Usage: scripts/guest-assets.sh [-h] OUTDIR

Builds the qomvm test guest from Debian packages (apt-get download +
dpkg-deb; nothing is installed, no root needed for the build itself):

  OUTDIR/vmlinuz            Debian cloud kernel (linux-image-cloud-amd64 ->
                            linux-image-<ver>-cloud-amd64, boot/vmlinuz-*)
  OUTDIR/vmlinux            the same kernel uncompressed (the ELF inside
                            vmlinuz's payload): entered without its decompressor
  OUTDIR/initramfs.cpio.gz  busybox-static initramfs with the cloud kernel's
                            virtio modules (virtio_pci, virtio_blk, virtio_net,
                            virtio_rng, virtio_balloon, virtio_console and their
                            dependencies)
  OUTDIR/rootfs.ext4        raw ext4 disk image (256 MiB, sparse): busybox, the
                            same /init, the modules, and fio and iperf3 with the
                            shared libraries they need (from Debian's packages)
  OUTDIR/boot-disk.qcow2    a disk that the firmware boots (no -kernel): an
                            MBR with GRUB's boot.img, GRUB's core.img (from
                            grub-pc-bin, made by grub-common's grub-mkimage)
                            in the gap before partition 1, which starts at
                            1 MiB (type 0x83, bootable) and holds the ext4 of
                            rootfs.ext4 plus /boot: vmlinuz, initramfs.cpio.gz,
                            grub/i386-pc/ (GRUB's modules), grub/grub.cfg
                            (256 MiB; see "The boot disk" below)
  OUTDIR/host-tools/        the host's end of the network tests: busybox (nc,
                            ping) and iperf3 (the guest's, run through the
                            dynamic loader beside its libraries in lib/)
  OUTDIR/kernel-version     the kernel release used, e.g. 6.1.0-48-cloud-amd64
  OUTDIR/vmlinuz-generic    Debian generic kernel (linux-image-amd64), which
                            has /dev/port; same initramfs (the modules are the
                            cloud kernel's, so it has no virtio disks)
  OUTDIR/kernel-version-generic  its release, e.g. 6.1.0-48-amd64

The initramfs /init mounts proc, sysfs and devtmpfs, loads the modules,
switches to a disk if qomvm.root= asks for one, prints
  QOMVM-GUEST-READY
  nproc: N
  MemTotal: NNN kB
  pci: 0000:00:01.0 0x8086:0x7000   (one line per PCI function the kernel found)
  acpi: rsdp 0x00000000000F5A60     (from the kernel's "ACPI: RSDP" line, or
                                    "acpi: rsdp none")
  acpi: tables APIC DSDT FACP FACS  (the files in /sys/firmware/acpi/tables,
                                    sorted, or "acpi: tables none")
  dmi: uuid U serial S vendor V     (/sys/class/dmi/id's product_uuid,
                                    product_serial, sys_vendor: blanks inside a
                                    value as _, "-" when missing or empty)
  blk: vda 268435456 ro=0           (one line per disk: name, bytes, read-only)
  irq: 24: 0 12 PCI-MSI-edge virtio0-req.0  (one line per virtio interrupt, as
                                    /proc/interrupts shows it)
  timeline: acpi 0.412345           (only with qomvm.timeline=1: the kernel's
                                    clock when each boot phase ended, from
                                    dmesg; "timeline: ready S" is the line
                                    /init logs right before the marker)
and then, depending on the kernel command line:
  (default)          powers off (prints QOMVM-POWEROFF, then poweroff -f; every
                     mode below that "powers off" does the same)
  qomvm.shell=1      runs an interactive shell on the console; powers off
                     when it exits
  qomvm.reboot=1     prints QOMVM-REBOOTING and reboots (reboot -f)
  qomvm.reboot=once  (needs qomvm.root= on a writable disk) when the disk has
                     no /var/lib/qomvm/rebooted: creates it, prints "boot: 1"
                     and QOMVM-REBOOTING, reboots; when it has: removes it,
                     prints "boot: 2", powers off. Without a writable root:
                     QOMVM-REBOOT-FAILED: ..., powers off
  qomvm.panic=1      prints QOMVM-PANICKING and crashes the kernel (sysrq c)
  qomvm.portfuzz=1   writes random bytes to every I/O port 0..0xffff except
                     the console UART and the ports that reset or power off
                     the machine, prints QOMVM-PORTFUZZ-DONE, powers off
                     (or QOMVM-PORTFUZZ-FAILED: ... if a write faulted)
  qomvm.root=DEV     (with any mode) mounts DEV (ext4; read-only when DEV is
                     read-only or the command line says "ro") and continues
                     from the /init on it (switch_root), so qomvm.shell=1 gets a
                     shell whose files persist on the disk; prints
                     "root: DEV rw|ro" after the pci lines, or
                     QOMVM-ROOT-FAILED: ... and stays in the initramfs
  qomvm.usb=1        (with vmlinuz-generic) loads the USB host, HID and mass
                     storage drivers first, so USB disks are there for the modes
  qomvm.e1000=1      (with vmlinuz-generic) loads the e1000 and 8139cp (rtl8139)
                     network drivers and the virtio disk and ext4 drivers first
  qomvm.usbinput=1   qomvm.usb=1, then prints "usb: product NAME" for each USB
                     device, "usb: ready" with the tablet's and keyboard's event
                     devices open, each tablet event ("usb: tablet TYPE CODE
                     VALUE", hex) to the first EV_SYN, "usb: keyboard open",
                     then keyboard events until KEY_A goes down (each waits up
                     to 60 s)
  qomvm.virtioinput=1
                     loads the virtio input and evdev drivers, then prints
                     "vinput: name NAME" for each input device and the same
                     events as qomvm.usbinput=1 from the virtio tablet and
                     keyboard ("vinput: ready", "vinput: tablet ...",
                     "vinput: keyboard open", "vinput: keyboard ...")
  qomvm.gpu=1        (with vmlinuz-generic) loads the virtio GPU driver, prints
                     "gpu: connector NAME STATUS MODES..." and "gpu: fb NAME
                     W,H BPP", writes QOMVM-GPU-TEXT at the framebuffer
                     console's top left ("gpu: text shown"), waits for Return
                     on the console's keyboard, fills the framebuffer with
                     0x808080 with the console unbound ("gpu: filled") and
                     waits for Return again
  qomvm.disktest=DEV:SEED
                     writes the SEED pattern (below) to DEV with O_DIRECT and
                     fsync, reads it back with O_DIRECT, compares, prints
                     QOMVM-DISKTEST-OK <md5 of the bytes written> or
                     QOMVM-DISKTEST-FAILED: <reason>; powers off
  qomvm.readonlytest=DEV
                     reads DEV's first 4 KiB and writes them back (O_DIRECT,
                     fsync): prints QOMVM-WRITE-REFUSED when the kernel refuses
                     (read-only disk, I/O error), else QOMVM-WRITE-ACCEPTED;
                     DEV's content is unchanged either way; powers off
  qomvm.discardtest=DEV
                     writes 0x5a over [1 MiB, 3 MiB) of DEV, checks it, runs
                     blkdiscard -o 1048576 -l 1048576 DEV, checks that
                     [2 MiB, 3 MiB) still holds 0x5a, reads [1 MiB, 2 MiB) back
                     and prints QOMVM-DISCARDTEST-OK zeroes|data|mixed (what
                     the discarded range reads as), or
                     QOMVM-DISCARDTEST-FAILED: <reason>; powers off
  qomvm.writeloop=DEV
                     prints QOMVM-WRITELOOP-BEGIN, then writes 1 MiB pieces
                     of random data over DEV with O_DIRECT, round and round,
                     until the VMM is stopped (for crash-consistency tests)
  qomvm.migtest=DEV:GENS:PORT:HOST
                     (for migration tests; with qomvm.net=) mounts the ext4 on
                     DEV at /mnt, receives one TCP connection on PORT into
                     /mnt/recv.bin in the background ("migtest: listening on
                     tcp port PORT" once listening), then for each generation
                     G of GENS writes 1 MiB of random data to /mnt/genG with
                     fsync, drops the page cache, checks every generation so
                     far against its SHA-256, pings HOST once and prints
                       QOMVM-MIGTEST G ok|FAILED ping=ok|lost [reason]
                     then waits for the connection to end (10 min at most):
                       QOMVM-MIGTEST-RECV BYTES SHA256
                     unmounts and prints QOMVM-MIGTEST-OK (every generation
                     ok, at most one ping lost) or QOMVM-MIGTEST-FAILED:
                     <reason>; powers off
  qomvm.net=dhcp|ADDR/PREFIX[,GW]
                     (with any mode) brings the first network interface (eth0,
                     virtio-net) up, by DHCP (busybox udhcpc) or with a fixed
                     address and an optional default route, then prints
                       net: eth0 10.0.2.15/24 52:54:00:12:34:56
                       net: gw 10.0.2.2        (or "none")
                       net: dns 10.0.2.3       (DHCP only)
                     or QOMVM-NET-FAILED: <reason>
  qomvm.nettest=STEP,STEP,...
                     runs the steps in order (ADDR an IPv4 address, MIB a
                     number of MiB, random data from /dev/urandom; every
                     listening step prints "nettest: listening on tcp port
                     PORT" once its socket is open, so the host may connect),
                     then prints QOMVM-NETTEST-DONE and powers off:
                       ping:ADDR      ping -c 3: QOMVM-PING-OK ADDR or
                                      QOMVM-PING-FAILED ADDR: <reason>
                       recv:PORT      accepts one TCP connection and reads it to
                                      its end: QOMVM-RECV PORT BYTES SHA256
                       serve:PORT:MIB prints "nettest: serving BYTES SHA256 on
                                      tcp port PORT", sends MIB MiB to one
                                      connection: QOMVM-SERVED PORT
                       get:ADDR:PORT  connects, reads to the end:
                                      QOMVM-GOT ADDR:PORT BYTES SHA256
                       put:ADDR:PORT:MIB  connects, sends MIB MiB:
                                      QOMVM-PUT ADDR:PORT BYTES SHA256
                       rng            rng: current=<rng_current>
                                      available=<rng_available, commas>
                                      read=<bytes> <hex>  (32 bytes from
                                      /dev/hwrng, 10 s at most)
                       mem:N          N lines, one a second: mem: MemTotal=K
                                      MemFree=K MemAvailable=K kB
                       iperf3:N[:PORT]  iperf3 -s -1 N times (port 5201; needs
                                      qomvm.root=, iperf3 is on the disk),
                                      "nettest: iperf3 server I listening on
                                      tcp port PORT" before each
                       sleep:S        sleeps S seconds
                       irqmove        from here to the end, moves the virtio
                                      queues' IRQs between CPUs 0 and 1 ten
                                      times a second (each move masks and
                                      rewrites the MSI-X vector), then
                                      QOMVM-IRQMOVE moves=N
                     a step that cannot run prints QOMVM-NETTEST-FAILED: ...
                     and the next one runs
  qomvm.fio=DEV      runs fio (from the disk image: needs qomvm.root=) on DEV
                     with O_DIRECT and libaio: job "seqwrite" (1 MiB sequential
                     writes, iodepth 4) then job "randread" (4 KiB random
                     reads, iodepth 32), each qomvm.fio.runtime=S seconds
                     (default 10) over qomvm.fio.size=BYTES of DEV (default:
                     all of it); prints QOMVM-FIO-BEGIN, fio's JSON output,
                     QOMVM-FIO-END, then QOMVM-FIO-DONE or
                     QOMVM-FIO-FAILED: <reason>; powers off

The disktest pattern, so the host can check the image: four regions
(offset:length in bytes; SIZE is DEV's size, at least 16 MiB)
  0:65536  1044480:1056768  4193792:2097152  SIZE-131072:131072
(the second crosses 1 MiB and 2 MiB, the third starts 512 bytes before 4 MiB,
so none of its 4 KiB pieces is page-aligned), cut into 4096-byte pieces from
each region's start. Piece k, counted from 0 over all regions in this order
(818 pieces), is filled with the byte (SEED + k) % 251 + 1, never 0. The
md5 printed is that of all pieces in order. Check with
  qemu-io -r -f FMT -c "read -P 0xNN OFF 4096" ... IMAGE
(one -c per piece; qemu-io prints "Pattern verification failed" on a
mismatch), or write the same pieces into a copy of the original image with
"write -P" and qemu-img compare it with IMAGE.

The boot disk (boot-disk.qcow2): SeaBIOS (or any PC BIOS) loads boot.img from
sector 0, which loads core.img from sector 1 (biosdisk, part_msdos and ext2
built in, prefix (hd0,msdos1)/boot/grub), which reads /boot/grub/grub.cfg: a
serial console (COM1, 115200), timeout 1 s, one entry that boots
  /boot/vmlinuz console=ttyS0 panic=-1 qomvm.root=/dev/vda1 ARGS
with /boot/initramfs.cpio.gz. ARGS is the SMBIOS OEM string (type 11; with
several, the last), e.g. QEMU's
  -smbios type=11,value='qomvm.reboot=once qomvm.net=dhcp'
(a comma inside the value is written ",,"), else qomvm.shell=1; GRUB then
prints "error: no structure matched the given options." (no type 11 table).
GRUB prints "QOMVM-GRUB: booting with ARGS" before it loads the kernel. The
disk's root is /dev/vda1 when it is the guest's first virtio-blk disk.

portfuzz writes through /dev/port when the kernel has it (vmlinuz-generic),
else with a tiny iopl helper (the cloud kernel lacks CONFIG_DEVPORT). The
helper's user-space port I/O faults inside scripts/nested-kvm.sh (a QEMU TCG
limitation), so under that rig use vmlinuz-generic for portfuzz.

Downloaded .debs are cached in ${XDG_CACHE_HOME:-$HOME/.cache}/qomvm/debs;
a rerun with unchanged inputs only checks and exits.
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) QOMVM_DIE_STATUS=2 qomvm_die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[[ $# -eq 1 ]] || QOMVM_DIE_STATUS=2 qomvm_die "usage: guest-assets.sh [-h] OUTDIR (see --help)"
OUTDIR=$1

# mkfs.ext4 is in /sbin, which a user's PATH may lack.
PATH=$PATH:/usr/sbin:/sbin
qomvm_need_cmd apt-get apt
qomvm_need_cmd dpkg-deb dpkg
qomvm_need_cmd gzip gzip
qomvm_need_cmd readelf binutils
qomvm_need_cmd mkfs.ext4 e2fsprogs
qomvm_need_cmd qemu-img qemu-utils

mkdir -p "$OUTDIR" || qomvm_die "cannot create $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

# Writes the /init of the test guest (busybox sh); the disk image gets the same
# file, which runs again there after qomvm.root= switched to the disk.
write_init() {
    cat >"$1" <<'EOF'
#!/bin/busybox sh
# qomvm test guest /init (generated by scripts/guest-assets.sh; its usage()
# documents the modes and their markers). Runs first from the initramfs, then,
# with qomvm.root=DEV, again from DEV's /init with QOMVM_STAGE=root.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=${TERM:-vt100}
if [ "$QOMVM_STAGE" != root ]; then
    /bin/busybox --install -s
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
else
    # The disk may be read-only: scratch files go to a tmpfs.
    mount -t tmpfs -o mode=1777 tmpfs /tmp
fi

off() {
    sync
    [ "$QOMVM_STAGE" = root ] && mount -o remount,ro / 2>/dev/null
    # Tests require this line: a crash before it, or a power-off that fails after it
    # (then the kernel panics: "Attempted to kill init"), is not a clean power-off.
    echo QOMVM-POWEROFF
    poweroff -f
    # poweroff failed (no ACPI?): let init exit; with panic=-1 the kernel
    # reboots, and with -no-reboot QEMU then exits.
    sleep 1
    exit 1
}

mode=ready modearg= root= rootro= fio_runtime=10 fio_size= net= timeline= ata= cdsum= cdchange= vport= hotplug= hotnic= usb= usbinput= e1000= vinput= gpu= resize=
for arg in $(cat /proc/cmdline); do
    case $arg in
        qomvm.shell=1) mode=shell ;;
        qomvm.portfuzz=1) mode=portfuzz ;;
        qomvm.reboot=1) mode=reboot ;;
        qomvm.reboot=once) mode=rebootonce ;;
        qomvm.panic=1) mode=panic ;;
        qomvm.root=*) root=${arg#*=} ;;
        qomvm.disktest=*) mode=disktest modearg=${arg#*=} ;;
        qomvm.readonlytest=*) mode=readonlytest modearg=${arg#*=} ;;
        qomvm.discardtest=*) mode=discardtest modearg=${arg#*=} ;;
        qomvm.writeloop=*) mode=writeloop modearg=${arg#*=} ;;
        qomvm.fio=*) mode=fio modearg=${arg#*=} ;;
        qomvm.fio.runtime=*) fio_runtime=${arg#*=} ;;
        qomvm.fio.size=*) fio_size=${arg#*=} ;;
        qomvm.net=*) net=${arg#*=} ;;
        qomvm.nettest=*) mode=nettest modearg=${arg#*=} ;;
        qomvm.migtest=*) mode=migtest modearg=${arg#*=} ;;
        qomvm.timeline=1) timeline=1 ;;
        qomvm.ata=1) ata=1 ;;
        qomvm.cdsum=*) cdsum=${arg#*=} ;;
        qomvm.cdchange=*) cdchange=${arg#*=} ;;
        qomvm.resize=*) resize=${arg#*=} ;;
        qomvm.vport=*) vport=${arg#*=} ;;
        qomvm.hotplug=*) hotplug=${arg#*=} ;;
        qomvm.hotnic=1) hotnic=1 ;;
        qomvm.usb=1) usb=1 ;;
        qomvm.usbinput=1) usb=1 usbinput=1 ;;
        qomvm.e1000=1) e1000=1 ;;
        qomvm.virtioinput=1) vinput=1 ;;
        qomvm.gpu=1) gpu=1 ;;
        ro) rootro=1 ;;
        rw) rootro= ;;
    esac
done

# wait_dev DEV: wait up to 10 s for the block device DEV to appear.
wait_dev() {
    i=0
    while [ ! -b "$1" ]; do
        i=$((i + 1))
        [ $i -gt 200 ] && return 1
        sleep 0.05
    done
}

# load_modules LIST: insmod the modules LIST names (paths under /lib/modules/KVER, in
# dependency order, after a "# KVER" line), if this kernel is theirs; says so if not.
load_modules() {
    kver=$(uname -r)
    if [ "$(head -n1 "$1")" = "# $kver" ]; then
        grep -v '^#' "$1" | while read -r m; do
            insmod "/lib/modules/$kver/$m" || echo "qomvm: insmod $m failed"
        done
    else
        echo "qomvm: no modules of ${1#/etc/} for kernel $kver in this initramfs"
    fi
}

# The cloud kernel's virtio modules; qomvm.ata=1: the IDE and virtio-scsi drivers too;
# qomvm.usb=1: the generic kernel's USB and HID drivers; qomvm.e1000=1: its e1000 driver.
if [ "$QOMVM_STAGE" != root ] && [ -f /etc/qomvm-modules ]; then
    load_modules /etc/qomvm-modules
    [ -n "$ata" ] && [ -f /etc/qomvm-modules-ata ] && load_modules /etc/qomvm-modules-ata
    [ -n "$usb" ] && [ -f /etc/qomvm-modules-usb ] && load_modules /etc/qomvm-modules-usb
    [ -n "$e1000" ] && [ -f /etc/qomvm-modules-nic ] && load_modules /etc/qomvm-modules-nic
    [ -n "$vinput" ] && [ -f /etc/qomvm-modules-input ] && load_modules /etc/qomvm-modules-input
    [ -n "$gpu" ] && [ -f /etc/qomvm-modules-gpu ] && load_modules /etc/qomvm-modules-gpu
fi

# qomvm.cdsum=DEV: the MD5 of a CD's whole medium, read through the block device.
if [ "$QOMVM_STAGE" != root ] && [ -n "$cdsum" ]; then
    if wait_dev "$cdsum"; then
        echo "cdsum: $(md5sum <"$cdsum" | cut -d' ' -f1) $(blockdev --getsize64 "$cdsum")"
    else
        echo "cdsum: $cdsum did not appear"
    fi
fi

# qomvm.cdchange=N (with qomvm.cdsum=DEV): N times, wait up to 60 s for the medium to
# change (each open of the device makes sr check for a media change) and print the new
# one's MD5 and size, or "cdsum: none" while no medium is in.
if [ "$QOMVM_STAGE" != root ] && [ -n "$cdsum" ] && [ -n "$cdchange" ]; then
    last=$(blockdev --getsize64 "$cdsum" 2>/dev/null || echo none)
    n=0
    while [ $n -lt "$cdchange" ]; do
        i=0
        now=$last
        while [ "$now" = "$last" ] && [ $i -lt 120 ]; do
            sleep 0.5
            now=$(blockdev --getsize64 "$cdsum" 2>/dev/null || echo none)
            i=$((i + 1))
        done
        if [ "$now" = none ]; then
            echo "cdsum: none"
        else
            # The size seen first can be the old medium's: sr revalidates the capacity
            # when the device is opened, so read it again after md5sum did.
            sum=$(md5sum <"$cdsum" | cut -d' ' -f1)
            now=$(blockdev --getsize64 "$cdsum" 2>/dev/null || echo none)
            echo "cdsum: $sum $now"
        fi
        last=$now
        n=$((n + 1))
    done
fi

# qomvm.resize=DEV,...: prints the disks' sizes in sectors ("resize: ready DEV N ..."), then
# waits up to 120 s for each to change, printing "resize: DEV N" as it does, with nothing
# opening them: virtio-blk's configuration interrupt and virtio-scsi's PARAM_CHANGE event
# (a rescan) are what update them. "resize: unchanged DEV..." names those that did not.
if [ "$QOMVM_STAGE" != root ] && [ -n "$resize" ]; then
    devs=$(echo "$resize" | tr , ' ')
    line="resize: ready"
    for d in $devs; do
        wait_dev "/dev/$d" || echo "resize: /dev/$d did not appear"
        eval "was_$d=\$(cat /sys/block/$d/size 2>/dev/null)"
        line="$line $d $(cat /sys/block/$d/size 2>/dev/null)"
    done
    echo "$line"
    left=$devs i=0
    while [ -n "$left" ] && [ $i -lt 240 ]; do
        sleep 0.5
        i=$((i + 1))
        next=
        for d in $left; do
            now=$(cat "/sys/block/$d/size" 2>/dev/null)
            eval "was=\$was_$d"
            if [ "$now" != "$was" ]; then echo "resize: $d $now"; else next="$next $d"; fi
        done
        left=$next
    done
    [ -z "$left" ] || echo "resize: unchanged$left"
fi

# qomvm.vport=NAME: the virtio-serial port named NAME (as a guest agent finds its
# channel, by /sys/class/virtio-ports/*/name; there is no udev for the
# /dev/virtio-ports/NAME link): says hello on it, which waits for the host side to
# open, then prints the line the host answers.
if [ "$QOMVM_STAGE" != root ] && [ -n "$vport" ]; then
    dev= i=0
    while [ -z "$dev" ] && [ $i -lt 200 ]; do
        for p in /sys/class/virtio-ports/*; do
            [ "$(cat "$p/name" 2>/dev/null)" = "$vport" ] && dev=/dev/${p##*/}
        done
        [ -n "$dev" ] && [ -c "$dev" ] && break
        dev=
        i=$((i + 1))
        sleep 0.05
    done
    if [ -z "$dev" ]; then
        echo "vport: no port named $vport; ports:" /sys/class/virtio-ports/*
        for p in /sys/class/virtio-ports/*/name; do echo "vport: $p: $(cat "$p" 2>&1)"; done
        dmesg | grep -i -E 'virtio|vport|hvc' | tail -n 20 | sed 's/^/vport: dmesg: /'
    else
        echo "vport: $dev is $vport"
        exec 3<>"$dev"
        echo "QOMVM-VPORT-HELLO" >&3
        read -r line <&3
        echo "vport: got $line"
        exec 3>&-
        # The host's monitor sends at most one VSERPORT_CHANGE a second: the close's
        # goes out before the power-off.
        sleep 2
    fi
fi

# qomvm.hotplug=DEV[:N]: the PCI slots the kernel's ACPI hotplug driver found (from the
# DSDT), then N times (1 by default): up to 300 s for DEV to be plugged in (device_add),
# its MD5 and size; up to 300 s for it to go (device_del: the kernel lets the device go
# and ejects the slot). Then up to 300 s more for the host to look and quit.
if [ "$QOMVM_STAGE" != root ] && [ -n "$hotplug" ]; then
    hpdev=${hotplug%%:*} hpn=1
    [ "$hpdev" != "$hotplug" ] && hpn=${hotplug#*:}
    echo "hotplug: slots $(ls /sys/bus/pci/slots 2>/dev/null | sort -n | tr '\n' ' ')"
    n=0
    while [ $n -lt "$hpn" ]; do
        n=$((n + 1))
        echo "hotplug: waiting for $hpdev ($n)"
        i=0
        while [ ! -b "$hpdev" ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
        if [ ! -b "$hpdev" ]; then
            echo "hotplug: $hpdev did not appear"
            dmesg | grep -i -E 'pci|acpiphp|virtio' | tail -n 20 | sed 's/^/hotplug: dmesg: /'
            break
        fi
        echo "hotplug: $hpdev $(md5sum <"$hpdev" | cut -d' ' -f1) $(blockdev --getsize64 "$hpdev")"
        i=0
        while [ -b "$hpdev" ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
        if [ -b "$hpdev" ]; then
            echo "hotplug: $hpdev still there"
            break
        fi
        echo "hotplug: $hpdev gone ($n)"
    done
    # The host looks at the machine now, then quits it (QMP `quit`).
    sleep 300
fi

# usb_event: reads one input event (24 bytes on x86-64) from descriptor 3 within 60 s
# and prints its type, code and value in hex, or "none".
usb_event() {
    # shellcheck disable=SC2046 # the bytes as positional parameters
    set -- $(timeout 60 dd bs=24 count=1 <&3 2>/dev/null | od -An -v -tx1)
    if [ $# -lt 24 ]; then
        echo none
    else
        echo "${18}${17} ${20}${19} ${24}${23}${22}${21}"
    fi
}

# input_find TABLET KEYBOARD: waits up to 10 s for the input devices whose names contain
# TABLET and KEYBOARD, and sets tab and kbd to their event devices.
input_find() {
    tab= kbd= i=0
    while { [ ! -c "$tab" ] || [ ! -c "$kbd" ]; } && [ $i -lt 200 ]; do
        for e in /sys/class/input/event*; do
            case "$(cat "$e/device/name" 2>/dev/null)" in
                *"$1"*) tab=/dev/input/${e##*/} ;;
                *"$2"*) kbd=/dev/input/${e##*/} ;;
            esac
        done
        i=$((i + 1))
        sleep 0.05
    done
}

# input_events TAG: the events of the devices input_find found: "TAG: ready" once both
# are open, then each tablet event up to the first report's end (EV_SYN), then "TAG:
# keyboard open" and keyboard events until KEY_A goes down (the host sends them after
# "TAG: ready").
input_events() {
    tag=$1
    if [ ! -c "$tab" ] || [ ! -c "$kbd" ]; then
        echo "$tag: input devices missing (tablet '$tab', keyboard '$kbd')"
        dmesg | grep -i -E 'usb|uhci|hid|input|virtio' | tail -n 20 | sed "s/^/$tag: dmesg: /"
        return
    fi
    exec 3<"$tab"
    echo "$tag: ready"
    n=0
    while [ $n -lt 16 ]; do
        ev=$(usb_event)
        echo "$tag: tablet $ev"
        case "$ev" in none | "0000 "*) break ;; esac
        n=$((n + 1))
    done
    exec 3<"$kbd"
    echo "$tag: keyboard open"
    n=0
    while [ $n -lt 24 ]; do
        ev=$(usb_event)
        echo "$tag: keyboard $ev"
        case "$ev" in none | "0001 001e 00000001") break ;; esac
        n=$((n + 1))
    done
    exec 3<&-
}

# qomvm.usbinput=1: the USB devices the kernel enumerated (their product strings), then
# the events of the USB tablet and keyboard.
if [ "$QOMVM_STAGE" != root ] && [ -n "$usbinput" ]; then
    input_find "USB Tablet" "USB Keyboard"
    for p in /sys/bus/usb/devices/*/product; do
        echo "usb: product $(cat "$p")"
    done
    input_events usb
fi

# qomvm.virtioinput=1: the input devices' names, then the events of the virtio tablet
# and keyboard.
if [ "$QOMVM_STAGE" != root ] && [ -n "$vinput" ]; then
    input_find "QEMU Virtio Tablet" "QEMU Virtio Keyboard"
    for n in /sys/class/input/input*/name; do
        echo "vinput: name $(cat "$n")"
    done
    input_events vinput
fi

# qomvm.gpu=1: the virtio GPU's connectors and framebuffer, then text on its console and
# a grey framebuffer, each shown until Return comes from the console's keyboard (the host
# takes a screendump of each).
if [ "$QOMVM_STAGE" != root ] && [ -n "$gpu" ]; then
    i=0
    while [ ! -e /dev/fb0 ] && [ $i -lt 200 ]; do
        i=$((i + 1))
        sleep 0.05
    done
    for c in /sys/class/drm/card*-*; do
        [ -e "$c/status" ] && echo "gpu: connector ${c##*/} $(cat "$c/status") $(tr '\n' ' ' <"$c/modes")"
    done
    if [ -e /dev/fb0 ]; then
        size=$(cat /sys/class/graphics/fb0/virtual_size)
        echo "gpu: fb $(cat /sys/class/graphics/fb0/name) $size $(cat /sys/class/graphics/fb0/bits_per_pixel)"
        echo 0 >/sys/class/graphics/fbcon/cursor_blink
        printf '\033[2J\033[HQOMVM-GPU-TEXT\n' >/dev/tty1
        echo "gpu: text shown"
        read -r _ </dev/tty1
        for v in /sys/class/vtconsole/vtcon*; do
            grep -q 'frame buffer' "$v/name" && echo 0 >"$v/bind"
        done
        w=${size%,*} h=${size#*,}
        dd if=/dev/zero bs=$((w * 4)) count="$h" 2>/dev/null | tr '\000' '\200' >/dev/fb0
        echo "gpu: filled"
        read -r _ </dev/tty1
    else
        echo "gpu: no framebuffer"
        dmesg | grep -i -E 'drm|virtio|fb' | tail -n 20 | sed 's/^/gpu: dmesg: /'
    fi
fi

# qomvm.root=DEV: continue from DEV's /init.
if [ "$QOMVM_STAGE" != root ] && [ -n "$root" ]; then
    why=
    if ! wait_dev "$root"; then
        why="$root did not appear"
    else
        opt=rw
        [ -n "$rootro" ] && opt=ro
        [ "$(cat "/sys/class/block/${root##*/}/ro" 2>/dev/null)" = 1 ] && opt=ro
        mkdir -p /newroot
        if ! mount -t ext4 -o "$opt" "$root" /newroot; then
            why="mounting $root ($opt) failed"
        elif [ ! -x /newroot/init ]; then
            why="$root has no /init"
            umount /newroot
        fi
    fi
    if [ -z "$why" ]; then
        mount --move /proc /newroot/proc
        mount --move /sys /newroot/sys
        mount --move /dev /newroot/dev
        export QOMVM_STAGE=root QOMVM_ROOT="$root $opt"
        exec switch_root /newroot /init
    fi
    echo "QOMVM-ROOT-FAILED: $why; staying in the initramfs"
fi

# qomvm.timeline=1: the marker's moment in the kernel log, on printk's clock (a shell
# builtin: no process started before it).
[ -n "$timeline" ] && echo "<6>qomvm: ready" >/dev/kmsg
echo QOMVM-GUEST-READY
echo "nproc: $(nproc)"
awk '/^MemTotal:/ { print "MemTotal: " $2 " kB" }' /proc/meminfo
for dev in /sys/bus/pci/devices/*; do
    [ -e "$dev/vendor" ] && echo "pci: ${dev##*/} $(cat "$dev/vendor"):$(cat "$dev/device")"
done
# The firmware's tables: the RSDP's address as the kernel found it, the ACPI
# tables (files; not the data/ and dynamic/ directories) and SMBIOS type 1.
rsdp=$(dmesg | sed -n 's/.*ACPI: RSDP \(0x[0-9A-Fa-f]*\).*/\1/p' | head -n1)
echo "acpi: rsdp ${rsdp:-none}"
tables=
for t in /sys/firmware/acpi/tables/*; do
    [ -f "$t" ] && tables="$tables${tables:+ }${t##*/}"
done
echo "acpi: tables ${tables:-none}"
# dmi_id FILE: /sys/class/dmi/id/FILE trimmed, inner blanks as _, "-" when
# missing or empty.
dmi_id() {
    v=$(sed 's/^[[:space:]]*//; s/[[:space:]]*$//; s/[[:space:]][[:space:]]*/_/g' "/sys/class/dmi/id/$1" 2>/dev/null)
    echo "${v:--}"
}
echo "dmi: uuid $(dmi_id product_uuid) serial $(dmi_id product_serial) vendor $(dmi_id sys_vendor)"
for b in /sys/block/*; do
    [ -e "$b/size" ] && echo "blk: ${b##*/} $(($(cat "$b/size") * 512)) ro=$(cat "$b/ro")"
done
[ -n "$QOMVM_ROOT" ] && echo "root: $QOMVM_ROOT"
# Interrupts of virtio devices: "PCI-MSI" (MSI-X) or "IO-APIC" (INTx) says how they come.
awk '/virtio/ { $1 = $1; print "irq: " $0 }' /proc/interrupts
# qomvm.timeline=1: when the boot's phases ended, by the kernel's clock (printk's time
# stamps, which "quiet" keeps out of the console but not out of dmesg): the first line
# of each milestone, "timeline: NAME SECONDS", the marker's own line ("ready") last.
if [ -n "$timeline" ]; then
    dmesg | awk '
        function at(name) {
            if (!(name in seen)) { seen[name] = 1; t = $0; sub(/^\[ */, "", t); sub(/\].*/, "", t); print "timeline: " name " " t }
        }
        /Memory: [0-9]+K\/[0-9]+K available/ { at("early-setup") }
        /tsc: (Detected|Fast TSC calibration|Using PIT calibration)/ { at("tsc-known") }
        /Console: colour/ { at("console") }
        /APIC: Switch to symmetric I\/O mode/ { at("ioapic-setup") }
        /Calibrating delay|lpj=/ { at("delay-loop") }
        /smp: Brought up/ { at("cpus-up") }
        /ACPI: Interpreter enabled/ { at("acpi") }
        /PCI host bridge to bus/ { at("pci-scan") }
        /clocksource: Switched to clocksource/ { at("clocksource") }
        /Serial: 8250\/16550 driver/ { at("serial-driver") }
        /Freeing unused kernel image/ { at("kernel-init-done") }
        /Run \/init as init process/ { at("run-init") }
        /qomvm: ready$/ { at("ready") }
    '
fi

# netif: the first network interface other than lo (virtio_net names it eth0).
netif() {
    for n in /sys/class/net/*; do
        n=${n##*/}
        [ "$n" != lo ] && [ -e "/sys/class/net/$n" ] && { echo "$n"; return 0; }
    done
    return 1
}

# netup dhcp|ADDR/PREFIX[,GW]: brings the first network interface up, by DHCP
# (busybox udhcpc) or with a fixed address; prints "net: IFACE ADDR/PREFIX MAC",
# "net: gw GW|none", "net: dns ADDR..." (DHCP only), or QOMVM-NET-FAILED: ...
netup() {
    i=0
    until ifc=$(netif); do
        i=$((i + 1))
        [ $i -gt 100 ] && { echo "QOMVM-NET-FAILED: no network interface appeared"; return 1; }
        sleep 0.1
    done
    ip link set lo up
    ip link set "$ifc" up || { echo "QOMVM-NET-FAILED: ip link set $ifc up"; return 1; }
    case $1 in
    dhcp)
        # udhcpc's event script: the lease's address, default route and DNS.
        cat >/tmp/udhcpc.script <<'SCRIPT'
#!/bin/sh
case $1 in
deconfig) ip -4 addr flush dev "$interface" ;;
bound | renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface" && break; done
    if [ -n "$dns" ]; then
        for d in $dns; do echo "nameserver $d"; done >/etc/resolv.conf 2>/dev/null
        echo "$dns" >/tmp/udhcpc.dns
    fi
    ;;
esac
SCRIPT
        chmod 755 /tmp/udhcpc.script
        if ! udhcpc -i "$ifc" -s /tmp/udhcpc.script -f -n -q -t 10 -T 2 >/tmp/udhcpc.log 2>&1; then
            echo "QOMVM-NET-FAILED: no DHCP lease on $ifc: $(tail -n1 /tmp/udhcpc.log)"
            return 1
        fi
        ;;
    */*)
        gw=${1#*,}
        [ "$gw" = "$1" ] && gw=
        ip addr add "${1%%,*}" dev "$ifc" || { echo "QOMVM-NET-FAILED: ip addr add ${1%%,*} dev $ifc"; return 1; }
        if [ -n "$gw" ]; then
            ip route add default via "$gw" || { echo "QOMVM-NET-FAILED: ip route add default via $gw"; return 1; }
        fi
        ;;
    *)
        echo "QOMVM-NET-FAILED: want qomvm.net=dhcp or qomvm.net=ADDR/PREFIX[,GW], got '$1'"
        return 1
        ;;
    esac
    echo "net: $ifc $(ip -4 -o addr show dev "$ifc" | awk '{ print $4; exit }') $(cat "/sys/class/net/$ifc/address")"
    echo "net: gw $(ip route | awk '$1 == "default" { print $3; f = 1; exit } END { if (!f) print "none" }')"
    [ -f /tmp/udhcpc.dns ] && echo "net: dns $(cat /tmp/udhcpc.dns)"
    return 0
}
[ -n "$net" ] && netup "$net"

# qomvm.hotnic=1: up to 300 s for a network interface to be plugged in (netdev_add,
# device_add), which then gets its address by DHCP ("net: ..." lines); then up to 300 s
# for it to go (device_del), and up to 300 s more for the host to look and quit.
if [ "$QOMVM_STAGE" != root ] && [ -n "$hotnic" ]; then
    echo "hotnic: waiting"
    i=0
    until netif >/dev/null || [ $i -ge 3000 ]; do sleep 0.1; i=$((i + 1)); done
    if ifc=$(netif); then
        netup dhcp
        i=0
        while [ -e "/sys/class/net/$ifc" ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
        if [ -e "/sys/class/net/$ifc" ]; then
            echo "hotnic: $ifc still there"
        else
            echo "hotnic: $ifc gone"
        fi
    else
        echo "hotnic: no interface appeared"
    fi
    sleep 300
fi

# uptime_s: seconds since boot; elapsed T0 T1: T1 - T0 with one decimal.
uptime_s() {
    read -r up _ </proc/uptime
    echo "$up"
}
elapsed() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'
}

# lasterr FILE: the last line of a dd's stderr that is not its record counts.
lasterr() {
    grep -v -e ' records in$' -e ' records out$' "$1" | tail -n1
}

# The disktest regions, "offset:length:dd block size" (SIZE = the disk's size).
disktest_regions() {
    echo "0:65536:512 1044480:1056768:65536 4193792:2097152:1048576 $(($1 - 131072)):131072:4096"
}

# disktest DEV:SEED (see the pattern in guest-assets.sh's usage)
disktest() {
    dev=${1%:*} seed=${1##*:}
    [ "$dev" != "$1" ] || seed=
    case $seed in
        '' | *[!0-9]*) echo "QOMVM-DISKTEST-FAILED: want qomvm.disktest=DEV:SEED (SEED a number), got '$1'"; return ;;
    esac
    wait_dev "$dev" || { echo "QOMVM-DISKTEST-FAILED: $dev not found"; return; }
    size=$(blockdev --getsize64 "$dev")
    [ "$size" -ge 16777216 ] || { echo "QOMVM-DISKTEST-FAILED: $dev has $size bytes, want at least 16 MiB"; return; }
    regions=$(disktest_regions "$size")
    d=/tmp/disktest
    rm -rf $d && mkdir -p $d
    echo "disktest: $dev ($size bytes), seed $seed, regions $regions"
    awk -v seed="$seed" -v regions="$regions" -v dir=$d 'BEGIN {
        n = split(regions, r, " "); k = 0
        for (i = 1; i <= n; i++) {
            split(r[i], f, ":"); len = f[2]; file = dir "/" i
            for (p = 0; p < len; p += 4096) {
                s = sprintf("%c", (seed + k) % 251 + 1); k++
                while (length(s) < 4096) s = s s
                m = len - p; if (m > 4096) m = 4096
                printf "%s", substr(s, 1, m) >file
            }
            close(file)
        }
    }'
    t0=$(uptime_s)
    i=0
    for r in $regions; do
        i=$((i + 1)) off=${r%%:*} len=${r#*:} bs=${r##*:}
        len=${len%:*}
        [ "$(wc -c <$d/$i)" -eq "$len" ] || { echo "QOMVM-DISKTEST-FAILED: internal: region $i pattern has $(wc -c <$d/$i) bytes, want $len"; return; }
        dd if=$d/$i of="$dev" bs="$bs" seek="$off" oflag=seek_bytes,direct conv=notrunc,fsync 2>$d/err ||
            { echo "QOMVM-DISKTEST-FAILED: writing $len bytes at $off: $(lasterr $d/err)"; return; }
    done
    t1=$(uptime_s)
    i=0
    for r in $regions; do
        i=$((i + 1)) off=${r%%:*} len=${r#*:} bs=${r##*:}
        len=${len%:*}
        dd if="$dev" of=$d/r$i bs="$bs" skip="$off" count="$len" iflag=skip_bytes,count_bytes,direct 2>$d/err ||
            { echo "QOMVM-DISKTEST-FAILED: reading $len bytes at $off: $(lasterr $d/err)"; return; }
        if ! cmp $d/$i $d/r$i >$d/err 2>&1; then
            echo "QOMVM-DISKTEST-FAILED: $len bytes at $off read back differently: $(head -n1 $d/err)"
            return
        fi
    done
    t2=$(uptime_s)
    sum=$(cat $d/1 $d/2 $d/3 $d/4 | md5sum)
    rm -rf $d
    echo "disktest: writes took $(elapsed "$t0" "$t1") s, reads $(elapsed "$t1" "$t2") s"
    echo "QOMVM-DISKTEST-OK ${sum%% *}"
}

readonlytest() {
    dev=$1
    wait_dev "$dev" || { echo "QOMVM-READONLYTEST-FAILED: $dev not found"; return; }
    echo "readonlytest: $dev ro=$(cat "/sys/class/block/${dev##*/}/ro")"
    dd if="$dev" of=/tmp/blk0 bs=4096 count=1 iflag=direct 2>/tmp/err ||
        { echo "QOMVM-READONLYTEST-FAILED: reading $dev: $(lasterr /tmp/err)"; return; }
    if dd if=/tmp/blk0 of="$dev" bs=4096 count=1 oflag=direct conv=notrunc,fsync 2>/tmp/err; then
        echo QOMVM-WRITE-ACCEPTED
    else
        echo "readonlytest: $(lasterr /tmp/err)"
        echo QOMVM-WRITE-REFUSED
    fi
}

# writeloop DEV: 1 MiB O_DIRECT writes of changing data over DEV, round and round, until
# the VMM is stopped from outside (the crash-consistency test kills it).
writeloop() {
    dev=$1
    wait_dev "$dev" || { echo "QOMVM-WRITELOOP-FAILED: $dev did not appear"; return; }
    size=$(($(cat "/sys/class/block/${dev##*/}/size") / 2048))
    dd if=/dev/urandom of=/tmp/chunk bs=1048576 count=1 2>/dev/null
    echo QOMVM-WRITELOOP-BEGIN
    pass=0
    while :; do
        i=0
        while [ $i -lt "$size" ]; do
            dd if=/tmp/chunk of="$dev" bs=1048576 seek=$i count=1 oflag=direct conv=notrunc 2>/dev/null ||
                { echo "QOMVM-WRITELOOP-FAILED: write at $i MiB"; return; }
            i=$((i + 1))
        done
        pass=$((pass + 1))
        echo "writeloop: pass $pass done"
    done
}

discardtest() {
    dev=$1 d=/tmp/discardtest
    wait_dev "$dev" || { echo "QOMVM-DISCARDTEST-FAILED: $dev not found"; return; }
    rm -rf $d && mkdir -p $d
    q=/sys/class/block/${dev##*/}/queue
    echo "discardtest: $dev discard_max_bytes=$(cat $q/discard_max_bytes) discard_granularity=$(cat $q/discard_granularity)"
    head -c 1048576 /dev/zero >$d/zero
    tr '\0' Z <$d/zero >$d/z1 # Z is 0x5a
    cat $d/z1 $d/z1 >$d/z2
    dd if=$d/z2 of="$dev" bs=1048576 seek=1 oflag=direct conv=notrunc,fsync 2>$d/err ||
        { echo "QOMVM-DISCARDTEST-FAILED: writing [1 MiB, 3 MiB): $(lasterr $d/err)"; return; }
    dd if="$dev" of=$d/r bs=1048576 skip=1 count=2 iflag=direct 2>$d/err && cmp -s $d/z2 $d/r ||
        { echo "QOMVM-DISCARDTEST-FAILED: [1 MiB, 3 MiB) did not read back as written"; return; }
    blkdiscard -o 1048576 -l 1048576 "$dev" 2>$d/err ||
        { echo "QOMVM-DISCARDTEST-FAILED: $(lasterr $d/err)"; return; }
    dd if="$dev" of=$d/r bs=1048576 skip=2 count=1 iflag=direct 2>$d/err && cmp -s $d/z1 $d/r ||
        { echo "QOMVM-DISCARDTEST-FAILED: [2 MiB, 3 MiB) changed (the discard went past its range?)"; return; }
    dd if="$dev" of=$d/r bs=1048576 skip=1 count=1 iflag=direct 2>$d/err ||
        { echo "QOMVM-DISCARDTEST-FAILED: reading [1 MiB, 2 MiB) after the discard: $(lasterr $d/err)"; return; }
    if cmp -s $d/zero $d/r; then
        what=zeroes
    elif cmp -s $d/z1 $d/r; then
        what=data
    else
        what=mixed
    fi
    rm -rf $d
    echo "QOMVM-DISCARDTEST-OK $what"
}

runfio() {
    dev=$1
    command -v fio >/dev/null ||
        { echo "QOMVM-FIO-FAILED: no fio here: it is on the disk image (rootfs.ext4); boot with qomvm.root=/dev/vdX"; return; }
    wait_dev "$dev" || { echo "QOMVM-FIO-FAILED: $dev not found"; return; }
    size=${fio_size:-$(blockdev --getsize64 "$dev")}
    cat >/tmp/qomvm.fio <<JOBS
[global]
filename=$dev
ioengine=libaio
direct=1
size=$size
time_based=1
runtime=$fio_runtime
group_reporting=1

[seqwrite]
rw=write
bs=1M
iodepth=4
stonewall

[randread]
rw=randread
bs=4k
iodepth=32
norandommap=1
stonewall
JOBS
    echo "fio: $dev, $size bytes, ${fio_runtime} s per job"
    fio --output-format=json --output=/tmp/fio.json /tmp/qomvm.fio >/tmp/fio.log 2>&1
    rc=$?
    echo QOMVM-FIO-BEGIN
    cat /tmp/fio.json 2>/dev/null
    echo QOMVM-FIO-END
    if [ $rc = 0 ]; then
        echo QOMVM-FIO-DONE
    else
        tail -n 5 /tmp/fio.log
        echo "QOMVM-FIO-FAILED: fio exit status $rc"
    fi
}

# tcp_listening PORT: wait up to 10 s for a TCP listener on PORT.
tcp_listening() {
    i=0
    until netstat -ltn 2>/dev/null | awk -v p=":$1" '$4 ~ p "$" { f = 1 } END { exit !f }'; do
        i=$((i + 1))
        [ $i -gt 200 ] && return 1
        sleep 0.05
    done
}

# tcp_drained PORT: waits (up to 10 minutes) until no TCP connection of PORT still has
# data or its FIN to deliver. nc exits once the kernel has taken its data; a power-off
# right after would lose what is still queued (seen with a slow VMM build in the rig).
tcp_drained() {
    drain_n=0
    while netstat -tn 2>/dev/null | awk -v p=":$1" '($4 ~ p "$" || $5 ~ p "$") && ($3 != 0 || $6 == "FIN_WAIT1" || $6 == "CLOSING" || $6 == "LAST_ACK") { f = 1 } END { exit !f }'; do
        drain_n=$((drain_n + 1))
        [ $drain_n -gt 6000 ] && return 1
        sleep 0.1
    done
}

# sum_setup: counts what goes through /tmp/sum.fifo (tee's copy) into /tmp/sum.n;
# sum_wait waits for that count and sets sum_line to "BYTES SHA256" (the stream's
# sha256sum output went to /tmp/sum.sha). It must run in this shell, not in a $(...):
# a subshell cannot wait for the counter, so it read /tmp/sum.n before wc wrote it
# (CI saw "QOMVM-GOT 10.0.2.2:6001  <sha>", the count missing).
sum_setup() {
    rm -f /tmp/sum.fifo /tmp/sum.n /tmp/sum.sha
    mkfifo /tmp/sum.fifo
    wc -c </tmp/sum.fifo >/tmp/sum.n &
    sum_pid=$!
}
sum_wait() {
    wait $sum_pid
    sum_line="$(cat /tmp/sum.n 2>/dev/null) $(cut -d' ' -f1 /tmp/sum.sha 2>/dev/null)"
}

# migtest DEV:GENS:PORT:HOST (see usage): disk and network work that must carry on
# through a live migration without a gap.
migtest() {
    # shellcheck disable=SC2046 # split on the colons
    set -- $(echo "$1" | tr ':' ' ')
    dev=$1 gens=$2 port=$3 host=$4
    case $gens in
        '' | *[!0-9]*) echo "QOMVM-MIGTEST-FAILED: want qomvm.migtest=DEV:GENS:PORT:HOST"; return ;;
    esac
    wait_dev "$dev" || { echo "QOMVM-MIGTEST-FAILED: $dev not found"; return; }
    mkdir -p /mnt
    mount -t ext4 "$dev" /mnt || { echo "QOMVM-MIGTEST-FAILED: mounting $dev failed"; return; }
    nc -l -p "$port" -e /bin/sh -c 'cat >/mnt/recv.bin' &
    recv_pid=$!
    if ! tcp_listening "$port"; then
        kill $recv_pid 2>/dev/null
        umount /mnt
        echo "QOMVM-MIGTEST-FAILED: nc did not listen on port $port"
        return
    fi
    echo "migtest: listening on tcp port $port"
    bad=0 lost=0 g=1
    while [ $g -le "$gens" ]; do
        why=
        dd if=/dev/urandom of=/mnt/gen$g bs=1048576 count=1 conv=fsync 2>/tmp/dd.err ||
            why="writing gen$g: $(lasterr /tmp/dd.err)"
        sha256sum </mnt/gen$g | cut -d' ' -f1 >/mnt/gen$g.sha
        sync
        # Read back from the disk, not from the page cache.
        echo 3 >/proc/sys/vm/drop_caches
        k=1
        while [ $k -le $g ] && [ -z "$why" ]; do
            [ "$(sha256sum </mnt/gen$k | cut -d' ' -f1)" = "$(cat /mnt/gen$k.sha)" ] ||
                why="gen$k reads back wrong"
            k=$((k + 1))
        done
        ping=ok
        ping -c 1 -W 3 "$host" >/dev/null 2>&1 || { ping=lost; lost=$((lost + 1)); }
        if [ -z "$why" ]; then
            echo "QOMVM-MIGTEST $g ok ping=$ping"
        else
            bad=$((bad + 1))
            echo "QOMVM-MIGTEST $g FAILED ping=$ping $why"
        fi
        g=$((g + 1))
    done
    i=0
    while kill -0 $recv_pid 2>/dev/null && [ $i -lt 6000 ]; do
        i=$((i + 1))
        sleep 0.1
    done
    if kill -0 $recv_pid 2>/dev/null; then
        kill $recv_pid
        why="the transfer did not end"
    else
        echo "QOMVM-MIGTEST-RECV $(wc -c </mnt/recv.bin) $(sha256sum </mnt/recv.bin | cut -d' ' -f1)"
        why=
    fi
    umount /mnt || why="${why:-umount /mnt failed}"
    [ $bad -eq 0 ] || why="${why:-$bad generations failed}"
    [ $lost -le 1 ] || why="${why:-$lost pings lost}"
    if [ -z "$why" ]; then
        echo QOMVM-MIGTEST-OK
    else
        echo "QOMVM-MIGTEST-FAILED: $why"
    fi
}

# make_data MIB: MIB MiB of random bytes in /tmp/net.data; prints "BYTES SHA256".
make_data() {
    head -c $(($1 * 1048576)) /dev/urandom >/tmp/net.data
    echo "$(wc -c </tmp/net.data) $(sha256sum /tmp/net.data | cut -d' ' -f1)"
}

# nettest STEP,STEP,...: the network (and rng, balloon) scenario steps of
# guest-assets.sh's usage, in order; then QOMVM-NETTEST-DONE.
nettest() {
    irqmove_pid=
    for step in $(echo "$1" | tr ',' ' '); do
        # shellcheck disable=SC2046 # split on the colons
        set -- $(echo "$step" | tr ':' ' ')
        case $1 in
        ping)
            if ping -c 3 -W 3 "$2" >/tmp/ping.log 2>&1; then
                echo "QOMVM-PING-OK $2"
            else
                echo "QOMVM-PING-FAILED $2: $(tail -n1 /tmp/ping.log)"
            fi
            ;;
        recv)
            sum_setup
            nc -l -p "$2" -e /bin/sh -c 'tee /tmp/sum.fifo | sha256sum >/tmp/sum.sha' &
            pid=$!
            if tcp_listening "$2"; then
                echo "nettest: listening on tcp port $2"
                wait $pid
                sum_wait
                echo "QOMVM-RECV $2 $sum_line"
            else
                kill $pid $sum_pid 2>/dev/null
                echo "QOMVM-NETTEST-FAILED: recv: nc did not listen on port $2"
            fi
            ;;
        serve)
            echo "nettest: serving $(make_data "$3") on tcp port $2"
            nc -l -p "$2" -e cat /tmp/net.data &
            pid=$!
            if tcp_listening "$2"; then
                echo "nettest: listening on tcp port $2"
                wait $pid
                if tcp_drained "$2"; then
                    echo "QOMVM-SERVED $2"
                else
                    echo "QOMVM-NETTEST-FAILED: serve: data still queued on port $2 after 10 minutes"
                fi
            else
                kill $pid 2>/dev/null
                echo "QOMVM-NETTEST-FAILED: serve: nc did not listen on port $2"
            fi
            rm -f /tmp/net.data
            ;;
        get)
            sum_setup
            if nc -w 10 "$2" "$3" </dev/null | tee /tmp/sum.fifo | sha256sum >/tmp/sum.sha; then
                sum_wait
                echo "QOMVM-GOT $2:$3 $sum_line"
            else
                sum_wait
                echo "QOMVM-NETTEST-FAILED: get: nc $2 $3 failed"
            fi
            ;;
        put)
            d=$(make_data "$4")
            echo "nettest: sending $d to $2:$3"
            if nc -w 10 "$2" "$3" </tmp/net.data >/dev/null && tcp_drained "$3"; then
                echo "QOMVM-PUT $2:$3 $d"
            else
                echo "QOMVM-NETTEST-FAILED: put: nc $2 $3 failed"
            fi
            rm -f /tmp/net.data
            ;;
        rng)
            h=/sys/devices/virtual/misc/hw_random
            timeout 10 dd if=/dev/hwrng of=/tmp/rng bs=32 count=1 2>/dev/null
            echo "rng: current=$(cat $h/rng_current 2>/dev/null) available=$(cat $h/rng_available 2>/dev/null | xargs | tr ' ' ',')" \
                "read=$(wc -c </tmp/rng 2>/dev/null || echo 0) $(od -An -tx1 /tmp/rng 2>/dev/null | tr -d ' \n')"
            ;;
        mem)
            i=0
            while [ $i -lt "$2" ]; do
                awk '/^(MemTotal|MemFree|MemAvailable):/ { sub(":", "", $1); s = s " " $1 "=" $2 } END { print "mem:" s " kB" }' /proc/meminfo
                i=$((i + 1))
                sleep 1
            done
            ;;
        iperf3)
            command -v iperf3 >/dev/null ||
                { echo "QOMVM-NETTEST-FAILED: no iperf3 here: it is on the disk image (rootfs.ext4); boot with qomvm.root=/dev/vdX"; continue; }
            # (not i: tcp_listening counts with it)
            port=${3:-5201} k=0
            while [ $k -lt "$2" ]; do
                k=$((k + 1))
                iperf3 -s -1 -p "$port" >/tmp/iperf3.log 2>&1 &
                pid=$!
                if tcp_listening "$port"; then
                    echo "nettest: iperf3 server $k listening on tcp port $port"
                    wait $pid || { echo "QOMVM-NETTEST-FAILED: iperf3 server $k: $(tail -n1 /tmp/iperf3.log)"; break; }
                else
                    kill $pid 2>/dev/null
                    echo "QOMVM-NETTEST-FAILED: iperf3 -s did not listen on port $port"
                    break
                fi
            done
            ;;
        sleep) sleep "$2" ;;
        irqmove)
            irqs=$(awk -F: '/virtio[0-9]+-(input|output)/ { gsub(/ /, "", $1); print $1 }' /proc/interrupts | xargs)
            if [ -z "$irqs" ] || [ ! -d /sys/devices/system/cpu/cpu1 ]; then
                echo "QOMVM-NETTEST-FAILED: irqmove: no virtio queue IRQs, or one CPU"
                continue
            fi
            rm -f /tmp/irqmove.stop
            (
                n=0 cpu=1
                while [ ! -e /tmp/irqmove.stop ]; do
                    for q in $irqs; do
                        echo $cpu >"/proc/irq/$q/smp_affinity_list" 2>/dev/null && n=$((n + 1))
                    done
                    echo $n >/tmp/irqmove.count
                    cpu=$((1 - cpu))
                    sleep 0.1
                done
            ) &
            irqmove_pid=$!
            echo "nettest: moving IRQs $irqs between CPUs 0 and 1"
            ;;
        *) echo "QOMVM-NETTEST-FAILED: unknown step '$step'" ;;
        esac
    done
    if [ -n "$irqmove_pid" ]; then
        touch /tmp/irqmove.stop
        wait "$irqmove_pid"
        echo "QOMVM-IRQMOVE moves=$(cat /tmp/irqmove.count 2>/dev/null || echo 0)"
    fi
    echo QOMVM-NETTEST-DONE
}

case $mode in
shell)
    if [ -n "$QOMVM_ROOT" ]; then
        echo "qomvm: interactive shell on the disk ${QOMVM_ROOT% *} (files persist); 'exit' or 'poweroff -f' powers off"
    else
        echo "qomvm: interactive shell; 'exit' or 'poweroff -f' powers off"
    fi
    export PS1='qomvm# '
    setsid cttyhack sh
    off
    ;;
disktest) disktest "$modearg"; off ;;
readonlytest) readonlytest "$modearg"; off ;;
discardtest) discardtest "$modearg"; off ;;
writeloop) writeloop "$modearg"; off ;;
fio) runfio "$modearg"; off ;;
nettest) nettest "$modearg"; off ;;
migtest) migtest "$modearg"; off ;;
portfuzz)
    # Ports that are never written (inclusive ranges) and why:
    #   0x0020-0x0021  8259 PIC master, 0x00a0-0x00a1 slave: a random ICW2
    #                  moves the IRQ vectors onto exception vectors (bogus #PF,
    #                  the guest oopses)
    #   0x0064         i8042 command port: command 0xfe pulses the CPU reset line
    #   0x007e-0x007f  QEMU kvmvapic: a write makes QEMU (with KVM) patch guest
    #                  code at the current RIP (TPR patching for old Windows)
    #   0x0092         PS/2 system control port A: bit 0 is a fast CPU reset
    #   0x00f4-0x00f7  isa-debug-exit at the iobase tests commonly use: exits QEMU
    #   0x03f8-0x03ff  COM1, the console this script reports on
    #   0x0501-0x0502  isa-debug-exit at its default iobase: exits QEMU
    #   0x0600-0x067f  ICH9 (q35) ACPI PM block + TCO watchdog; 0x604 is PM1a_CNT
    #                  (SLP_EN powers off), also the shutdown port of
    #                  cloud-hypervisor/firecracker-style VMMs; TCO can reboot
    #   0x0cf9         reset control register: writes 0x06/0x0e reset
    #   0x4004         Bochs/old-QEMU PIIX ACPI PM1a_CNT: powers off
    #   0xb000-0xb03f  PIIX4 (-M pc) ACPI PM block, PM1a_CNT at 0xb004: powers off
    skip='0x0020-0x0021 0x0064-0x0064 0x007e-0x007f 0x0092-0x0092 0x00a0-0x00a1
          0x00f4-0x00f7 0x03f8-0x03ff 0x0501-0x0502 0x0600-0x067f 0x0cf9-0x0cf9
          0x4004-0x4004 0xb000-0xb03f'
    if [ -c /dev/port ]; then
        how="dd to /dev/port"
    else
        # Ring-3 port I/O (iopl): works on hardware KVM and plain TCG, but
        # every OUT faults (#GP, SIGSEGV) in an L2 guest of
        # scripts/nested-kvm.sh: QEMU 7.2 TCG's nested-SVM I/O permission
        # check (apparently it rejects the busy TSS type VMLOAD loads).
        how="qomvm-portout (iopl; this kernel has no /dev/port)"
    fi
    echo "qomvm: portfuzz: writing random bytes to I/O ports via $how"
    next=0 failed=
    for r in $skip 0x10000-0xffff; do
        lo=$((${r%-*})) hi=$((${r#*-}))
        if [ "$lo" -gt "$next" ]; then
            n=$((lo - next))
            printf 'qomvm: portfuzz: 0x%04x-0x%04x\n' "$next" "$((lo - 1))"
            if [ -c /dev/port ]; then
                dd if=/dev/urandom of=/dev/port bs=1 seek="$next" count="$n" conv=notrunc 2>/dev/null ||
                    failed=$next
            else
                /bin/qomvm-portout "$next" "$n" || failed=$next
            fi
            [ -n "$failed" ] && break
        fi
        next=$((hi + 1))
    done
    if [ -n "$failed" ]; then
        printf 'QOMVM-PORTFUZZ-FAILED: writing ports from 0x%04x via %s failed\n' "$failed" "$how"
    else
        echo QOMVM-PORTFUZZ-DONE
    fi
    off
    ;;
reboot)
    echo QOMVM-REBOOTING
    sync
    reboot -f
    ;;
rebootonce)
    # The first boot leaves a mark on the disk and reboots; the second removes it
    # and powers off.
    mark=/var/lib/qomvm/rebooted
    if [ "$QOMVM_STAGE" != root ] || [ "${QOMVM_ROOT##* }" != rw ]; then
        echo "QOMVM-REBOOT-FAILED: qomvm.reboot=once needs qomvm.root= on a writable disk"
    elif [ -e $mark ]; then
        echo "boot: 2"
        rm -f $mark
    else
        echo "boot: 1"
        if mkdir -p ${mark%/*} && : >$mark; then
            sync
            mount -o remount,ro / 2>/dev/null
            echo QOMVM-REBOOTING
            reboot -f
            sleep 1
            exit 1
        fi
        echo "QOMVM-REBOOT-FAILED: cannot create $mark"
    fi
    off
    ;;
panic)
    echo QOMVM-PANICKING
    # With panic=-1 the kernel reboots at once; under -no-reboot the VMM exits.
    echo c >/proc/sysrq-trigger
    ;;
*)
    off
    ;;
esac
EOF
    chmod 755 "$1"
}

# Writes /bin/qomvm-portout: a 287-byte static x86-64 ELF, used by portfuzz
# when the kernel has no /dev/port (the Debian cloud kernel is built without
# CONFIG_DEVPORT). `qomvm-portout START COUNT` calls iopl(3), fills a buffer
# with getrandom(GRND_INSECURE) and does `outb` of one random byte to each port
# START..START+COUNT-1; exit status 1 on bad arguments or iopl failure.
# The code bytes below are the GNU as encoding of the listed instructions.
write_portout() {
    local code=(
        # _start:
        488b0c24      # mov    (%rsp),%rcx          argc
        4883f903      # cmp    $3,%rcx
        756b          # jne    fail
        488b742410    # mov    16(%rsp),%rsi        argv[1]
        e86d000000    # call   atoi
        4989c4        # mov    %rax,%r12            start
        488b742418    # mov    24(%rsp),%rsi        argv[2]
        e860000000    # call   atoi
        4989c5        # mov    %rax,%r13            count
        4b8d042c      # lea    (%r12,%r13),%rax
        483d00000100  # cmp    $0x10000,%rax
        7745          # ja     fail                 start+count > 65536
        b8ac000000    # mov    $172,%eax            SYS_iopl
        bf03000000    # mov    $3,%edi
        0f05          # syscall
        4885c0        # test   %rax,%rax
        7534          # jne    fail
        bf00104000    # mov    $0x401000,%edi       buf (bss)
        4c89ee        # mov    %r13,%rsi            count
        ba04000000    # mov    $4,%edx              GRND_INSECURE
        b83e010000    # mov    $318,%eax            SYS_getrandom
        0f05          # syscall
        31db          # xor    %ebx,%ebx            i = 0
        # loop:
        4c39eb        # cmp    %r13,%rbx
        7310          # jae    done
        498d141c      # lea    (%r12,%rbx),%rdx     port = start + i
        8a8300104000  # mov    0x401000(%rbx),%al   buf[i]
        ee            # out    %al,(%dx)
        48ffc3        # inc    %rbx
        ebeb          # jmp    loop
        # done:
        31ff          # xor    %edi,%edi
        b83c000000    # mov    $60,%eax             SYS_exit(0)
        0f05          # syscall
        # fail:
        bf01000000    # mov    $1,%edi
        b83c000000    # mov    $60,%eax             SYS_exit(1)
        0f05          # syscall
        # atoi: decimal string at %rsi -> %rax, fail unless all digits and <= 65536
        31c0          # xor    %eax,%eax
        0fb60e        # 1: movzbl (%rsi),%ecx
        85c9          # test   %ecx,%ecx
        741c          # je     2f
        83e930        # sub    $'0',%ecx
        83f909        # cmp    $9,%ecx
        77e3          # ja     fail
        486bc00a      # imul   $10,%rax,%rax
        4801c8        # add    %rcx,%rax
        483d00000100  # cmp    $0x10000,%rax
        77d4          # ja     fail
        48ffc6        # inc    %rsi
        ebdd          # jmp    1b
        c3            # 2: ret
    )
    local hex codelen
    hex=$(printf '%s' "${code[@]}")
    codelen=$((${#hex} / 2))
    [[ $codelen == 167 ]] || qomvm_die "internal: portout code is $codelen bytes, expected 167"
    le() { # le BYTES VALUE: little-endian hex
        local i v=$2 out=
        for ((i = 0; i < $1; i++)); do
            out+=$(printf '%02x' $((v & 255)))
            v=$((v >> 8))
        done
        printf '%s' "$out"
    }
    local base=$((0x400000)) hdr=$((64 + 56))
    local elf
    elf=7f454c46020101000000000000000000         # e_ident: ELF64, LE, SysV
    elf+=$(le 2 2)$(le 2 62)$(le 4 1)              # ET_EXEC, EM_X86_64, EV_CURRENT
    elf+=$(le 8 $((base + hdr)))$(le 8 64)$(le 8 0) # e_entry, e_phoff, e_shoff
    elf+=$(le 4 0)$(le 2 64)$(le 2 56)$(le 2 1)     # e_flags, e_ehsize, e_phentsize, e_phnum
    elf+=$(le 2 64)$(le 2 0)$(le 2 0)               # e_shentsize, e_shnum, e_shstrndx
    elf+=$(le 4 1)$(le 4 7)$(le 8 0)                # PT_LOAD, RWX, p_offset
    elf+=$(le 8 "$base")$(le 8 "$base")             # p_vaddr, p_paddr
    elf+=$(le 8 $((hdr + codelen)))                 # p_filesz
    elf+=$(le 8 $((0x1000 + 0x10000)))              # p_memsz: buf at base+0x1000
    elf+=$(le 8 $((0x1000)))                        # p_align
    elf+=$hex
    # shellcheck disable=SC2001 # needs sed's back-reference
    printf '%b' "$(sed 's/../\\x&/g' <<<"$elf")" >"$1"
    chmod 755 "$1"
}


# copy_module KO DEST: copy a kernel module, decompressing .ko.xz/.gz/.zst to .ko.
copy_module() {
    case $1 in
        *.ko) cp "$1" "$2" ;;
        *.ko.xz) qomvm_need_cmd xz xz-utils; xz -dc "$1" >"$2" ;;
        *.ko.gz) gzip -dc "$1" >"$2" ;;
        *.ko.zst) qomvm_need_cmd zstd zstd; zstd -qdc "$1" >"$2" ;;
        *) qomvm_die "unknown module format: $1" ;;
    esac
}

# guest_modules KDEB KVER KDIR ROOT LIST MODULES [LIST2 MODULES2]...: copies MODULES
# (and each MODULES2) and the modules they depend on (modinfo "depends=") from KDEB
# (extracted at KDIR for its modules.builtin) into ROOT/lib/modules/KVER/ (same
# paths as in the package), writes a depmod-style modules.dep there (for
# modprobe) and the load order, dependencies first, to ROOT/etc/LIST (each
# MODULES2: what it needs beyond LIST, to ROOT/etc/LIST2; paths relative to the
# modules directory).
guest_modules() {
    local kdeb=$1 kver=$2 kdir=$3 root=$4 list=$5 mods=$6
    shift 6
    [[ $(($# % 2)) -eq 0 ]] || qomvm_die "guest_modules: a module list without its name"
    local -a extra=("$@")
    local x=$work/kmod p m d name k all=$mods
    local -A path deps state base_state in_dep
    local -a todo order=()
    for ((k = 1; k < ${#extra[@]}; k += 2)); do all+=" ${extra[k]}"; done
    # Module name (dashes as underscores) -> path in the package.
    while read -r p; do
        name=${p##*/}
        name=${name%%.ko*}
        path[${name//-/_}]=${p#./}
    done < <(dpkg-deb -c "$kdeb" | awk '{ print $6 }' | grep -E "^\./lib/modules/$kver/.*\.ko(\.(xz|gz|zst))?$")
    read -r -a todo <<<"$all"
    mkdir -p "$x" "$root/lib/modules/$kver" "$root/etc"
    while [[ ${#todo[@]} -gt 0 ]]; do
        m=${todo[0]}
        todo=("${todo[@]:1}")
        [[ -z ${deps[$m]+set} ]] || continue
        if [[ -z ${path[$m]:-} ]]; then
            grep -qE "/${m//_/[-_]}\.ko$" "$kdir/lib/modules/$kver/modules.builtin" 2>/dev/null &&
                { deps[$m]=; state[$m]=builtin; continue; }
            qomvm_die "module $m is neither in $(basename "$kdeb") nor built into $kver"
        fi
        deb_extract "$kdeb" "$x" "./${path[$m]}"
        p=${path[$m]%.ko*}.ko
        mkdir -p "$(dirname "$root/${p}")"
        copy_module "$x/${path[$m]}" "$root/$p"
        path[$m]=${p#lib/modules/"$kver"/}
        d=$(tr '\0' '\n' <"$root/$p" | sed -n 's/^depends=//p' | head -n1)
        d=${d//-/_}
        deps[$m]=${d//,/ }
        for d in ${deps[$m]}; do todo+=("$d"); done
    done
    _gm_visit() {
        local m=$1 d
        case ${state[$m]:-} in
            visited | builtin) return 0 ;;
            active) qomvm_die "module dependency cycle through $m" ;;
        esac
        state[$m]=active
        for d in ${deps[$m]}; do _gm_visit "$d"; done
        state[$m]=visited
        order+=("$m")
    }
    # _gm_write LIST: the load order visited so far into ROOT/etc/LIST, each module's
    # dependencies into modules.dep once.
    _gm_write() {
        local m d
        # The kernel the list is for, first: the initramfs carries two kernels' modules.
        echo "# $kver" >"$root/etc/$1"
        for m in "${order[@]}"; do
            echo "${path[$m]}" >>"$root/etc/$1"
            [[ -z ${in_dep[$m]:-} ]] || continue
            in_dep[$m]=1
            {
                printf '%s:' "${path[$m]}"
                for d in ${deps[$m]}; do [[ ${state[$d]} == builtin ]] || printf ' %s' "${path[$d]}"; done
                echo
            } >>"$root/lib/modules/$kver/modules.dep"
        done
    }
    : >"$root/lib/modules/$kver/modules.dep"
    read -r -a todo <<<"$mods"
    for m in "${todo[@]}"; do _gm_visit "$m"; done
    _gm_write "$list"
    qomvm_log "modules for $kver: ${order[*]}"
    for m in "${!state[@]}"; do base_state[$m]=${state[$m]}; done
    # Each further list: what its modules need beyond the first list's.
    for ((k = 0; k < ${#extra[@]}; k += 2)); do
        for m in "${!state[@]}"; do
            if [[ -n ${base_state[$m]+set} ]]; then state[$m]=${base_state[$m]}; else unset 'state[$m]'; fi
        done
        order=()
        for m in ${extra[k + 1]}; do _gm_visit "$m"; done
        _gm_write "${extra[k]}"
        qomvm_log "modules for $kver (${extra[k]}): ${order[*]}"
    done
}

# elf_needs FILE: the sonames FILE needs (DT_NEEDED) and the basename of its
# program interpreter, one per line.
elf_needs() {
    readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'
    readelf -l "$1" 2>/dev/null | sed -n 's|.*Requesting program interpreter: .*/\([^]/]*\)\]$|\1|p'
}

# add_program ROOT PKG BIN: copies BIN (a path in Debian package PKG, e.g.
# usr/bin/fio) into ROOT with every shared library it loads, taken from the
# Debian packages that PKG depends on (directly or not) and placed in
# ROOT/lib/x86_64-linux-gnu (the dynamic loader's default path; the loader
# itself is also linked as /lib64/ld-linux-x86-64.so.2). Only packages that
# supply a library are used; their names go to $work/used-debs.
add_program() {
    local root=$1 top=$2 bin=$3 x=$work/debs lib
    lib=$root/lib/x86_64-linux-gnu
    local p s f line pkg dep deb more
    local -A provider resolved fetched used graph
    local -a frontier=() want=()
    mkdir -p "$x" "$lib" "$root/lib64"
    # The Depends graph under PKG (one apt-cache call; virtual packages and
    # alternatives after the first are skipped).
    while IFS= read -r line; do
        case $line in
            ' '*Depends:\ \<*) ;;
            '  Depends: '* | ' |Depends: '* | '  PreDepends: '* | ' |PreDepends: '*)
                dep=${line#*: }
                graph[$pkg]+=" ${dep%%:*}" ;;
            ' '*) ;;
            *) pkg=$line; graph[$pkg]+= ;;
        esac
    done < <(_qomvm_memo "depends-$top" apt-cache depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances "$top" ||
        qomvm_die "apt-cache depends $top failed")
    # shellcheck disable=SC2048,SC2086 # word splitting of the package list is wanted
    deb_candidates_prefetch "$top" ${graph[*]}

    _ap_fetch() { # _ap_fetch PKG: download PKG and index the shared libraries it ships
        local deb
        fetched[$1]=1
        deb=$(deb_fetch "$1")
        while read -r f; do
            [[ -n ${provider[${f##*/}]:-} ]] || provider[${f##*/}]="$1 $f"
        done < <(dpkg-deb -c "$deb" | awk '
            # regular files and relative symlinks named like a shared library
            $1 ~ /^[-l]/ && $6 ~ /^\.\/(usr\/)?lib(64)?\/.*\.so(\.[0-9.]+)?$/ && ($7 != "->" || $8 !~ /^\//) { print $6 }')
    }
    _ap_use() { # _ap_use PKG: extract PKG; its dependencies may supply libraries
        local deb
        used[$1]=1
        deb=$(deb_fetch "$1")
        deb_extract "$deb" "$x/$1"
        # shellcheck disable=SC2206 # the list splits on spaces
        frontier+=(${graph[$1]:-})
        basename "$deb" >>"$work/used-debs"
    }
    _ap_fetch "$top"
    _ap_use "$top"
    mkdir -p "$root/$(dirname "$bin")"
    cp "$x/$top/$bin" "$root/$bin" || qomvm_die "no $bin in the $top package"
    mapfile -t want < <(elf_needs "$root/$bin")
    while :; do
        more=()
        for s in "${want[@]}"; do
            [[ -z ${resolved[$s]:-} ]] || continue
            if [[ -z ${provider[$s]:-} ]]; then more+=("$s"); continue; fi
            read -r p f <<<"${provider[$s]}"
            [[ -n ${used[$p]:-} ]] || _ap_use "$p"
            # Relative symlinks resolve inside the extracted package.
            cp -L "$x/$p/$f" "$lib/$s" || qomvm_die "copying $s from $p failed"
            resolved[$s]=$p
            mapfile -t -O "${#more[@]}" more < <(elf_needs "$lib/$s")
        done
        want=()
        for s in "${more[@]}"; do [[ -n ${resolved[$s]:-} ]] || want+=("$s"); done
        [[ ${#want[@]} -gt 0 ]] || break
        # Nothing fetched so far ships the rest: fetch the next dependency.
        local found=0
        for s in "${want[@]}"; do [[ -n ${provider[$s]:-} ]] && found=1; done
        if [[ $found == 0 ]]; then
            while [[ ${#frontier[@]} -gt 0 && -n ${fetched[${frontier[0]}]:-} ]]; do frontier=("${frontier[@]:1}"); done
            [[ ${#frontier[@]} -gt 0 ]] ||
                qomvm_die "$bin: no dependency of $top ships ${want[*]}"
            _ap_fetch "${frontier[0]}"
        fi
    done
    ln -sf ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"
    qomvm_log "$bin: $(wc -l <"$work/used-debs") packages, $(du -sk "$lib" | cut -f1) KiB of libraries"
}

# grub_tool DIR NAME: the path of GRUB's host tool NAME, extracted from
# grub-common into DIR, after checking that it runs here (it links a few shared
# libraries of the host: liblzma, libdevmapper...).
grub_tool() {
    local bin=$1/usr/bin/$2 so pkg missing=
    [[ -x $bin ]] || qomvm_die "no usr/bin/$2 in $(basename "$gcdeb")"
    "$bin" --version >/dev/null 2>&1 && { printf '%s\n' "$bin"; return 0; }
    for so in $(ldd "$bin" 2>/dev/null | awk '/not found/ { print $1 }'); do
        # Debian names a library's package after its soname: libfoo.so.1 is in
        # libfoo1, libfoo3.so.3 in libfoo3-3.
        pkg=${so%%.so*}
        if [[ $pkg == *[0-9] ]]; then pkg+=-${so#*.so.}; else pkg+=${so#*.so.}; fi
        missing+=" $so (Debian package $pkg)"
    done
    [[ -n $missing ]] &&
        qomvm_die "$2 from Debian's grub-common ($(basename "$gcdeb")) cannot run here: it needs${missing}; install that, or build on Debian 12"
    qomvm_die "$2 from Debian's grub-common ($(basename "$gcdeb")) cannot run here: $("$bin" --version 2>&1 | tail -n1)"
}

# le32 N: N as 4 little-endian bytes, in hex.
le32() {
    printf '%02x%02x%02x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255))
}

# chs LBA: LBA's cylinder/head/sector bytes in an MBR partition entry (255 heads,
# 63 sectors a track, as fdisk assumes; 1023/254/63 past cylinder 1023), in hex.
chs() {
    local c=$(($1 / (255 * 63))) h=$(($1 / 63 % 255)) s=$(($1 % 63 + 1))
    [[ $c -le 1023 ]] || { c=1023 h=254 s=63; }
    printf '%02x%02x%02x' "$h" $((s | ((c >> 8) << 6))) $((c & 255))
}

# put_bytes FILE OFFSET HEX: write the bytes HEX at OFFSET of FILE.
put_bytes() {
    # shellcheck disable=SC2001 # needs sed's back-reference
    printf '%b' "$(sed 's/../\\x&/g' <<<"$3")" |
        dd of="$1" bs=1 seek="$2" conv=notrunc status=none || qomvm_die "writing $1 at $2 failed"
}

# le_at FILE OFFSET BYTES: the unsigned little-endian number at OFFSET of FILE.
le_at() {
    od -An -t "u$3" -j "$2" -N "$3" --endian=little "$1" | tr -d ' '
}

# write_grub_cfg FILE: the boot disk's /boot/grub/grub.cfg.
write_grub_cfg() {
    cat >"$1" <<'EOF'
# qomvm test guest boot disk (generated by scripts/guest-assets.sh; its usage()
# says more).
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=1
set default=0

# The guest's qomvm.* switches: SMBIOS type 11 (OEM strings, -smbios
# type=11,value=...). Offset 4 of that structure is its string count, so
# --get-string 4 gives the last (with one, the only) string. Without a type 11
# table the command fails (and says so) and the default stays.
set qomvm_args=qomvm.shell=1
insmod smbios
smbios --type 11 --get-string 4 --set qomvm_args

menuentry 'Debian GNU/Linux (qomvm test guest)' {
    echo "QOMVM-GRUB: booting with $qomvm_args"
    linux /boot/vmlinuz console=ttyS0 panic=-1 qomvm.root=/dev/vda1 $qomvm_args
    initrd /boot/initramfs.cpio.gz
}
EOF
}

# build_boot_disk ROOTFS OUT: the firmware-bootable raw disk OUT from the root
# tree ROOTFS (with /boot filled in), laid out as grub-install does it on an
# MBR disk, with neither a loop device nor a mount.
build_boot_disk() {
    local tree=$1 out=$2 g=$work/grub mods core start=2048 size sectors blocks n
    mods=$g/usr/lib/grub/i386-pc
    core=$work/core.img
    deb_extract "$gpcdeb" "$g" './usr/lib/grub/i386-pc/*'
    deb_extract "$gcdeb" "$g" ./usr/bin/grub-mkimage ./usr/bin/grub-fstest ./usr/bin/grub-script-check
    [[ -s $mods/boot.img && -s $mods/diskboot.img && -s $mods/kernel.img ]] ||
        qomvm_die "no usr/lib/grub/i386-pc/{boot,diskboot,kernel}.img in $(basename "$gpcdeb")"
    local mkimage fstest scriptcheck
    mkimage=$(grub_tool "$g" grub-mkimage)
    fstest=$(grub_tool "$g" grub-fstest)
    scriptcheck=$(grub_tool "$g" grub-script-check)

    mkdir -p "$tree/boot/grub/i386-pc"
    cp "$mods"/*.mod "$mods"/*.lst "$tree/boot/grub/i386-pc/"
    write_grub_cfg "$tree/boot/grub/grub.cfg"
    "$scriptcheck" "$tree/boot/grub/grub.cfg" || qomvm_die "grub-script-check rejects the generated grub.cfg"

    "$mkimage" -O i386-pc -d "$mods" -p '(hd0,msdos1)/boot/grub' -o "$core" biosdisk part_msdos ext2 ||
        qomvm_die "grub-mkimage failed"
    # boot.img loads core.img's first sector (diskboot.img) from its kernel_sector
    # (0x5c, 1 unless patched), diskboot.img the rest from its blocklist at its end:
    # start 2, a length that grub-mkimage fills in, segment 0x820. That is where
    # the core.img goes, so no patching, as long as it fits before the partition.
    n=$((($(stat -c %s "$core") + 511) / 512))
    [[ $n -lt $start ]] || qomvm_die "core.img has $n sectors: more than the $((start - 1)) before partition 1"
    [[ $(le_at "$mods/boot.img" $((0x5c)) 8) == 1 ]] ||
        qomvm_die "boot.img's kernel sector is $(le_at "$mods/boot.img" $((0x5c)) 8), expected 1"
    [[ $(le_at "$core" $((0x1f4)) 8) == 2 && $(le_at "$core" $((0x1fc)) 2) == $((n - 1)) &&
        $(le_at "$core" $((0x1fe)) 2) == $((0x820)) ]] ||
        qomvm_die "core.img's blocklist is not 2+$((n - 1)) at 0x820"

    size=$(numfmt --from=iec "$BOOTDISK_SIZE")
    sectors=$((size / 512 - start))
    blocks=$((sectors / 8))
    rm -f "$out"
    truncate -s "$size" "$out"
    # The ext4 of partition 1, written at its offset. GRUB 2.06 reads the
    # incompat features filetype, extent, flex_bg, meta_bg, 64bit and encrypt
    # (Debian's also metadata_csum_seed) and ignores the compat and ro_compat
    # ones (has_journal, metadata_csum, orphan_file...): turn off the others
    # in case mke2fs.conf enables them. grub-fstest checks the result below.
    mkfs.ext4 -q -F -b 4096 -L qomvm-root -O ^metadata_csum_seed,^inline_data,^large_dir,^ea_inode,^casefold \
        -E offset=$((start * 512)),root_owner=0:0 -d "$tree" "$out" "$blocks" ||
        qomvm_die "mkfs.ext4 -E offset=$((start * 512)) -d failed"
    # Sector 0: boot.img's code (440 bytes), a disk signature ("qomv"), one partition
    # (bootable, type 0x83, from LBA start to the end), 0x55 0xaa.
    dd if="$mods/boot.img" of="$out" bs=440 count=1 conv=notrunc status=none || qomvm_die "writing boot.img failed"
    put_bytes "$out" 440 716f6d760000
    put_bytes "$out" 446 "80$(chs "$start")83$(chs $((start + blocks * 8 - 1)))$(le32 "$start")$(le32 $((blocks * 8)))"
    put_bytes "$out" 462 "$(printf '%096d' 0)55aa"
    # Sectors 1..n: core.img.
    dd if="$core" of="$out" bs=512 seek=1 conv=notrunc status=none || qomvm_die "writing core.img failed"

    # GRUB's own ext2 driver (grub-fstest, same source as ext2.mod) reads it back.
    local f
    for f in boot/vmlinuz boot/initramfs.cpio.gz boot/grub/grub.cfg boot/grub/i386-pc/normal.mod init; do
        "$fstest" "$out" cmp "(loop0,msdos1)/$f" "$tree/$f" >/dev/null ||
            qomvm_die "GRUB's ext2 driver (grub-fstest) cannot read /$f back from the boot disk"
    done
    qomvm_log "boot disk: core.img $n sectors, partition 1 at LBA $start, $blocks 4 KiB blocks"
}

kpkg=$(deb_kernel_package "$KERNEL_META")
gpkg=$(deb_kernel_package "$GENERIC_META")
qomvm_lock "$QOMVM_CACHE/.lock"
kdeb=$(deb_fetch "$kpkg")
gdeb=$(deb_fetch "$gpkg")
bbdeb=$(deb_fetch busybox-static)
gpcdeb=$(deb_fetch grub-pc-bin)
gcdeb=$(deb_fetch grub-common)

# The stamp: line 1 the format and the kernel, busybox and GRUB .debs, line 2 the
# .debs the disk image's programs came from (fio and its libraries).
stamp=$OUTDIR/.guest-assets.inputs
inputs="format=$ASSETS_FORMAT $(basename "$kdeb") $(basename "$gdeb") $(basename "$bbdeb")"
inputs+=" $(basename "$gpcdeb") $(basename "$gcdeb")"
uptodate=1
for f in vmlinuz vmlinux initramfs.cpio.gz rootfs.ext4 boot-disk.qcow2 kernel-version vmlinuz-generic \
    kernel-version-generic host-tools/busybox host-tools/iperf3; do
    out=$OUTDIR/$f
    if [[ ! -s $out || $kdeb -nt $out || $gdeb -nt $out || $bbdeb -nt $out ||
        $gpcdeb -nt $out || $gcdeb -nt $out ||
        ${BASH_SOURCE[0]} -nt $out || $SCRIPT_DIR/lib/debian.sh -nt $out ]]; then
        uptodate=0
    fi
done
if [[ $uptodate == 1 && -f $stamp ]]; then
    { read -r line1 && read -r line2; } <"$stamp" || line2=
    pkgs=()
    for f in $line2; do pkgs+=("${f%%_*}"); done
    [[ ${#pkgs[@]} == 0 ]] || deb_candidates_prefetch "${pkgs[@]}"
    if [[ $line1 != "$inputs" || ${#pkgs[@]} == 0 ||
        "$(deb_file_names "${pkgs[@]}" | tr '\n' ' ')" != "$line2 " ]]; then
        uptodate=0
    fi
else
    uptodate=0
fi
if [[ $uptodate == 1 ]]; then
    qomvm_log "up to date: $OUTDIR ($(cat "$OUTDIR/kernel-version"))"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/qomvm-guest-assets.XXXXXX")
trap 'rm -rf "$work"' EXIT

deb_extract "$kdeb" "$work/k" './boot/vmlinuz-*' './boot/config-*' './lib/modules/*/modules.builtin'
vmlinuz=$(find "$work/k/boot" -name 'vmlinuz-*' | head -n1)
[[ -n $vmlinuz ]] || qomvm_die "no boot/vmlinuz-* in $(basename "$kdeb")"
kver=${vmlinuz##*/vmlinuz-}
config=$work/k/boot/config-$kver
if [[ -f $config ]] && ! grep -q '^CONFIG_DEVPORT=y' "$config"; then
    qomvm_log "note: $kver has no CONFIG_DEVPORT (/dev/port); its portfuzz uses the iopl helper"
fi
if [[ -f $config ]] && ! grep -q '^CONFIG_EXT4_FS=y' "$config"; then
    qomvm_die "$kver does not build ext4 in; the disk image would need its modules in the initramfs"
fi
deb_extract "$gdeb" "$work/g" './boot/vmlinuz-*' './lib/modules/*/modules.builtin'
gvmlinuz=$(find "$work/g/boot" -name 'vmlinuz-*' | head -n1)
[[ -n $gvmlinuz ]] || qomvm_die "no boot/vmlinuz-* in $(basename "$gdeb")"
gkver=${gvmlinuz##*/vmlinuz-}

deb_extract "$bbdeb" "$work/bb" './bin/busybox'
bb=$work/bb/bin/busybox

# The initramfs.
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc}
cp "$bb" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
write_init "$root/init"
write_portout "$root/bin/qomvm-portout"
guest_modules "$kdeb" "$kver" "$work/k" "$root" qomvm-modules "${GUEST_MODULES//$'\n'/ }" \
    qomvm-modules-ata "$ATA_MODULES" qomvm-modules-input "$INPUT_MODULES"
guest_modules "$gdeb" "$gkver" "$work/g" "$root" qomvm-modules-usb "$USB_MODULES" \
    qomvm-modules-nic "$NIC_MODULES" qomvm-modules-gpu "$GPU_MODULES"
qomvm_mkcpio "$root" "$work/initramfs.cpio.gz" "$bb"

# The disk image: the same /init, busybox with its applet links made here (the
# disk may be mounted read-only), the modules, and fio with its libraries.
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,mnt}
cp "$bb" "$rootfs/bin/busybox"
"$bb" --list-full | while read -r f; do
    [[ $f == */* && ! -e $rootfs/$f ]] && ln -s /bin/busybox "$rootfs/$f"
done
cp "$root/init" "$rootfs/init"
cp "$root/bin/qomvm-portout" "$rootfs/bin/"
cp -a "$root/lib" "$rootfs/"
cp "$root/etc/qomvm-modules" "$rootfs/etc/"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\n' >"$rootfs/etc/group"
: >"$work/used-debs"
add_program "$rootfs" fio usr/bin/fio
# iperf3 (the network benchmark) goes to the disk image and, with its libraries,
# to host-tools/ for the host's end of the measurement.
add_program "$work/iperf3" iperf3 usr/bin/iperf3
cp -a --remove-destination "$work/iperf3/." "$rootfs/"
sort -u -o "$work/used-debs" "$work/used-debs"
ht=$work/host-tools
mkdir -p "$ht"
cp "$bb" "$ht/busybox"
cp -a "$work/iperf3/lib/x86_64-linux-gnu" "$ht/lib"
cp "$work/iperf3/usr/bin/iperf3" "$ht/lib/iperf3"
cat >"$ht/iperf3" <<'EOF'
#!/bin/sh
# The guest's iperf3 (Debian's, with its libraries from the same packages), run
# on the host through the dynamic loader next to it.
d=$(dirname "$(readlink -f "$0")")/lib
exec "$d/ld-linux-x86-64.so.2" --library-path "$d" "$d/iperf3" "$@"
EOF
chmod 755 "$ht/iperf3"
truncate -s "$ROOTFS_SIZE" "$work/rootfs.ext4"
mkfs.ext4 -q -F -b 4096 -L qomvm-root -E root_owner=0:0 -d "$rootfs" "$work/rootfs.ext4" ||
    qomvm_die "mkfs.ext4 -d failed"

# The boot disk: the same tree plus /boot (kernel, initramfs, GRUB).
mkdir -p "$rootfs/boot"
install -m 644 "$vmlinuz" "$rootfs/boot/vmlinuz"
install -m 644 "$work/initramfs.cpio.gz" "$rootfs/boot/initramfs.cpio.gz"
build_boot_disk "$rootfs" "$work/boot-disk.raw"
qemu-img convert -q -O qcow2 "$work/boot-disk.raw" "$work/boot-disk.qcow2" ||
    qomvm_die "qemu-img convert -O qcow2 of the boot disk failed"

install -m 644 "$vmlinuz" "$OUTDIR/vmlinuz.tmp" && mv -f "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinuz"
qomvm_extract_vmlinux "$vmlinuz" "$OUTDIR/vmlinux.tmp" || qomvm_die "could not take the vmlinux out of $vmlinuz"
mv -f "$OUTDIR/vmlinux.tmp" "$OUTDIR/vmlinux"
install -m 644 "$gvmlinuz" "$OUTDIR/vmlinuz-generic.tmp" &&
    mv -f "$OUTDIR/vmlinuz-generic.tmp" "$OUTDIR/vmlinuz-generic"
mv -f "$work/initramfs.cpio.gz" "$OUTDIR/initramfs.cpio.gz"
rm -rf "$OUTDIR/host-tools.tmp" && cp -a "$ht" "$OUTDIR/host-tools.tmp" &&
    rm -rf "$OUTDIR/host-tools" && mv "$OUTDIR/host-tools.tmp" "$OUTDIR/host-tools"
# (cp --sparse keeps the image's holes when $work is on another file system)
cp --sparse=always "$work/rootfs.ext4" "$OUTDIR/rootfs.ext4.tmp" && mv -f "$OUTDIR/rootfs.ext4.tmp" "$OUTDIR/rootfs.ext4"
cp "$work/boot-disk.qcow2" "$OUTDIR/boot-disk.qcow2.tmp" && mv -f "$OUTDIR/boot-disk.qcow2.tmp" "$OUTDIR/boot-disk.qcow2"
printf '%s\n' "$kver" >"$OUTDIR/kernel-version"
printf '%s\n' "$gkver" >"$OUTDIR/kernel-version-generic"
printf '%s\n%s\n' "$inputs" "$(tr '\n' ' ' <"$work/used-debs" | sed 's/ $//')" >"$stamp"
qomvm_log "built $OUTDIR: vmlinuz ($kver) and its vmlinux, vmlinuz-generic ($gkver), initramfs.cpio.gz, rootfs.ext4, boot-disk.qcow2"
