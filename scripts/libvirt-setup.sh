#!/usr/bin/env bash
# Install and start Debian 12's libvirt (9.0) for driving qomvm with virsh, on machines
# without systemd: root only, idempotent.
#
#   scripts/libvirt-setup.sh          install if missing, configure, start virtlogd + libvirtd
#   scripts/libvirt-setup.sh --stop   stop the daemons this script started
#
# Configuration: libvirtd runs QEMU-like emulators as root (user/group "root" in
# /etc/libvirt/qemu.conf), since /dev/kvm is root-only here (and, with
# QOMVM_LIBVIRT_NAMESPACES=off, without a private /dev per domain), and logs its QEMU driver
# (log_filters "1:qemu") to /var/log/libvirt/libvirtd.log, where the probe and each
# domain's QMP conversation can be read. The daemons' pids are kept in
# /run/qomvm-libvirt/, so --stop ends only what this script started.
set -euo pipefail

prog=libvirt-setup
state=/run/qomvm-libvirt
log() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (installs packages, starts system daemons)"

# pid_alive FILE: the pid in FILE names a live process whose command is the daemon
# named by FILE's basename (so a recycled pid is not mistaken for ours).
pid_alive() {
    local file=$1 pid name
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    name=$(basename "$file" .pid)
    [[ -r /proc/$pid/comm ]] && [[ $(</proc/"$pid"/comm) == "$name" ]]
}

stop_daemon() {
    local name=$1 file=$state/$1.pid pid
    if pid_alive "$file"; then
        pid=$(<"$file")
        log "stopping $name (pid $pid)"
        kill "$pid"
        for _ in $(seq 50); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        [[ -d /proc/$pid ]] && die "$name (pid $pid) did not exit"
    fi
    rm -f "$file"
}

if [[ ${1:-} == --stop ]]; then
    stop_daemon libvirtd
    stop_daemon virtlogd
    exit 0
elif [[ $# -gt 0 ]]; then
    die "usage: $0 [--stop]"
fi

if ! command -v libvirtd >/dev/null || ! command -v virsh >/dev/null; then
    log "installing libvirt-daemon-system and libvirt-clients"
    apt-get update -qq >&2
    # policy-rc.d: the packages' maintainer scripts must not try to start services.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libvirt-daemon-system libvirt-clients >/dev/null
fi

# set_conf FILE KEY VALUE: KEY = VALUE in a libvirt config file, replacing an active or
# commented-out line for KEY, appending otherwise.
set_conf() {
    local file=$1 key=$2 value=$3
    if grep -qE "^[# ]*$key *=" "$file"; then
        sed -i -E "0,/^[# ]*$key *=.*/s||$key = $value|" "$file"
    else
        printf '%s = %s\n' "$key" "$value" >>"$file"
    fi
}
set_conf /etc/libvirt/qemu.conf user '"root"'
set_conf /etc/libvirt/qemu.conf group '"root"'
# QOMVM_LIBVIRT_NAMESPACES=off: no private /dev for each domain (inside the nested rig,
# whose L1 sees the host's root through 9p, libvirt's copy of /dev lacks L1's /dev/kvm).
if [[ ${QOMVM_LIBVIRT_NAMESPACES:-} == off ]]; then
    set_conf /etc/libvirt/qemu.conf namespaces '[]'
fi
set_conf /etc/libvirt/libvirtd.conf log_filters '"1:qemu 1:libvirt 4:object 4:json 4:event 4:util"'
set_conf /etc/libvirt/libvirtd.conf log_outputs '"1:file:/var/log/libvirt/libvirtd.log"'

mkdir -p "$state" /var/log/libvirt

# start_daemon NAME: start NAME -d unless ours is running; wait for its pid file.
start_daemon() {
    local name=$1 file=$state/$1.pid
    if pid_alive "$file"; then
        log "$name already running (pid $(<"$file"))"
        return 0
    fi
    if pgrep -x "$name" >/dev/null; then
        die "a $name not started by this script is running; stop it first"
    fi
    rm -f "$file"
    "$name" -d -p "$file"
    for _ in $(seq 100); do
        pid_alive "$file" && break
        sleep 0.1
    done
    pid_alive "$file" || die "$name did not start"
    log "started $name (pid $(<"$file"))"
}
start_daemon virtlogd
start_daemon libvirtd

# libvirtd accepts connections once its socket exists. (`virsh uri`, not `version`: the
# latter fails with "Cannot find suitable emulator" where no qemu-system-* is installed.)
for _ in $(seq 100); do
    virsh -c qemu:///system uri >/dev/null 2>&1 && exit 0
    sleep 0.2
done
die "libvirtd does not answer on qemu:///system"
