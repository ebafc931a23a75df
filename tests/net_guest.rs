//! Issue 12 in a real guest: the Debian test guest (`scripts/guest-assets.sh`) on
//! virtio-net-pci over a tap (`ifname=`, `vhost=on`, an `fd=` the test opened and passed
//! on), over user networking (DHCP, a connection out to a server of the host, `hostfwd`
//! in), and with virtio-rng-pci and virtio-balloon-pci.
//!
//! Each test is one scenario, a shell script that runs inside a network namespace of its
//! own (`unshare -n`: only its loopback and the taps it makes, never an address of the
//! host) in the nested-KVM rig, or directly on a host with hardware KVM (as root). The
//! guest runs /init's `qomvm.net=` and `qomvm.nettest=` steps and prints what it saw; the
//! host's end (busybox `nc` and `ping` from the assets' `host-tools/`) prints `host:` lines.
//!
//! `QOMVM_NET_TEST_VMM=qemu` runs the same scenarios on `qemu-system-x86_64 -accel kvm`, as
//! a reference for the guest side.

use std::process::Command;

mod guest_rig;
use guest_rig::{assets, host_or_rig, kvm_path, repo, text, Path_, BOOTS};

/// 64 MiB each way, as issue 12's acceptance asks.
const MIB: u32 = 64;

/// The VMM under test: qomvm's binary, or `qemu` (see the module's comment).
fn vmm() -> String {
    match std::env::var("QOMVM_NET_TEST_VMM").as_deref() {
        Ok("qemu") => "qemu".to_string(),
        _ => env!("CARGO_BIN_EXE_qomvm").to_string(),
    }
}

/// Shared by the scenarios. `boot NAME APPEND VMM-ARGS...` starts the guest in the
/// background (`-M pc -m $VM_MEM -smp 2`, console in NAME.log, `$VM_WRAP` before the VMM;
/// the kernel boots `quiet`: its info lines cost ~12 s a boot on the rig's serial port, and
/// its warnings, oopses and panics still print);
/// `await NAME REGEX [S]` waits for a console line (`await_n NAME REGEX N S` for the N-th);
/// `finish NAME` waits for the guest's
/// power-off and prints the console (`NAME: ` before each line) and the VMM's status;
/// `nc_ ADDR PORT` is busybox nc with a time limit; `sum FILE|-` prints "BYTES SHA256";
/// `qmp SOCKET JSON...` prints each command's reply.
const NET_PRELUDE: &str = r#"
set -u
mkdir -p "$QOMVM_WORK" && cd "$QOMVM_WORK" || exit 1
B=$QOMVM_ASSETS/host-tools/busybox
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3
ip link set lo up
VM_WRAP= VM_MEM=512 VM_KERNEL=vmlinuz
boot() {
    name=$1 append=$2
    shift 2
    if [ "$QOMVM_VMM" = qemu ]; then
        set -- qemu-system-x86_64 -accel kvm "$@"
    else
        set -- "$QOMVM_VMM" "$@"
    fi
    # shellcheck disable=SC2086 # VM_WRAP is a command prefix
    timeout 600 $VM_WRAP "$@" -M pc -m "$VM_MEM" -smp 2 -nographic -no-reboot \
        -kernel "$QOMVM_ASSETS/$VM_KERNEL" -initrd "$QOMVM_ASSETS/initramfs.cpio.gz" \
        -append "console=ttyS0 panic=-1 quiet $append" >"$name.log" 2>&1 </dev/null &
    vm=$!
    echo "host: $name: $VM_WRAP $*"
    # Shortly before the limit, where every VMM thread is (a hung guest is most often a
    # vCPU or I/O thread waiting on something): kept in the report.
    (
        exec >/dev/null 2>&1
        sleep 590
        threads "$vm" >"$name.threads"
    ) &
    watchdog=$!
}
# threads PID: each thread of PID's child (the VMM under `timeout`): name, state, the
# system call it is in, and its kernel stack where readable.
threads() {
    for p in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        for t in /proc/"$p"/task/*; do
            echo "host: thread $(cat "$t/comm") state=$(cut -d' ' -f3 "$t/stat") wchan=$(cat "$t/wchan") syscall=$(cut -d' ' -f1-2 "$t/syscall")"
            sed 's/^/host:     /' "$t/stack" 2>/dev/null | head -12
        done
    done
}
await() {
    i=0
    until grep -qE "$2" "$1.log"; do
        kill -0 $vm 2>/dev/null || { echo "host: $1: the VMM ended before '$2'"; return 1; }
        i=$((i + 1))
        [ $i -gt $((${3:-150} * 10)) ] && { echo "host: $1: no '$2' after ${3:-150} s"; return 1; }
        sleep 0.1
    done
}
# await_n NAME REGEX N S: the N-th matching console line, within S seconds.
await_n() {
    i=0
    until [ "$(grep -cE "$2" "$1.log")" -ge "$3" ]; do
        kill -0 $vm 2>/dev/null || { echo "host: $1: the VMM ended before '$2' ($3)"; return 1; }
        i=$((i + 1))
        [ $i -gt $(($4 * 10)) ] && { echo "host: $1: no '$2' ($3) after $4 s"; return 1; }
        sleep 0.1
    done
}
finish() {
    wait $vm
    st=$?
    pkill -P $watchdog 2>/dev/null
    kill $watchdog 2>/dev/null
    tr -d '\r' <"$1.log" | sed "s/^/$1: /"
    [ -s "$1.threads" ] && cat "$1.threads"
    echo "host: $1: vmm exit status $st"
}
# A client connection, ended after 300 s if it stalls.
nc_() {
    timeout 300 "$B" nc "$@"
}
sum() {
    if [ "$1" = - ]; then
        cat >sum.tmp
        set -- sum.tmp
    fi
    echo "$(wc -c <"$1") $(sha256sum <"$1" | cut -d' ' -f1)"
    rm -f sum.tmp
}
qmp() {
    "$PY" - "$@" <<'PYEOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
def reply():
    while True:
        m = json.loads(f.readline())
        if "event" not in m:
            return m
reply()
f.write('{"execute": "qmp_capabilities"}\n')
f.flush()
reply()
for c in sys.argv[2:]:
    f.write(c + "\n")
    f.flush()
    print(json.dumps(reply(), separators=(",", ":")))
PYEOF
}
# A tap in this namespace, 192.168.76.1/24, for the guest at 192.168.76.2.
tap_up() {
    ip tuntap add dev "$1" mode tap && ip addr add 192.168.76.1/24 dev "$1" && ip link set "$1" up
}
# tap_scenario NAME MIB NETDEV-OPTIONS...: the guest at 192.168.76.2 pings the host, takes
# MIB MiB from it (port 5001), sends MIB MiB back (port 5002); the host pings the guest.
# The card is $NIC (virtio-net-pci unless set); $NET_APPEND goes before the guest's options.
tap_scenario() {
    name=$1 mib=$2
    shift 2
    head -c $((mib * 1048576)) /dev/urandom >h2g.bin
    echo "host: $name: sending $(sum h2g.bin)"
    boot "$name" "${NET_APPEND:-}qomvm.net=192.168.76.2/24 qomvm.nettest=${NETTEST_FIRST:-}ping:192.168.76.1,recv:5001,serve:5002:$mib" \
        "$@" -device "${NIC:-virtio-net-pci}",netdev=n0,mac=52:54:00:12:34:56
    if await "$name" '^(net: |QOMVM-NET-FAILED)' 200; then
        if $B ping -c 3 -W 5 192.168.76.2 >ping.log 2>&1; then
            echo "host: $name: ping 192.168.76.2 ok"
        else
            echo "host: $name: ping 192.168.76.2 failed: $(tail -n1 ping.log)"
        fi
    fi
    await "$name" 'listening on tcp port 5001' &&
        { nc_ 192.168.76.2 5001 <h2g.bin >/dev/null || echo "host: $name: nc to port 5001 failed"; }
    await "$name" 'listening on tcp port 5002' 300 &&
        echo "host: $name: received $(nc_ 192.168.76.2 5002 </dev/null | sum -)"
    finish "$name"
    rm -f h2g.bin
}
"#;

/// Runs a network scenario (`script` after [`NET_PRELUDE`]) in a network namespace of its
/// own; returns its output, or `None` (with the reason printed) where it cannot run.
/// `timeout_s` must cover the VMM's own limit (600 s) and one stalled host connection
/// (300 s), so that a stall inside the scenario is reported as such, not as the rig's.
fn net_scenario(name: &str, script: &str, timeout_s: u32) -> Option<String> {
    let _one = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = match assets() {
        Ok(d) => d,
        Err(e) => panic!("guest assets: {e}"),
    };
    let work = match kvm_path() {
        // L1's overlay (memory): gone with L1.
        Path_::NestedRig => format!("/tmp/qomvm-net-{name}"),
        Path_::Direct => {
            let unshare = Command::new("unshare").args(["-n", "true"]).output();
            if !unshare.is_ok_and(|o| o.status.success()) {
                test_support::skip::skip(format!("{name} needs a network namespace of its own (unshare -n), which takes root here"));
                return None;
            }
            let w = repo().join("target/net-guest-tests").join(name);
            let _ = std::fs::remove_dir_all(&w);
            w.display().to_string()
        }
    };
    let envs = [
        ("QOMVM_VMM", vmm()),
        ("QOMVM_ASSETS", dir.display().to_string()),
        ("QOMVM_WORK", work),
    ];
    let script = format!("{NET_PRELUDE}\n{script}");
    eprintln!("net-guest: {:?}: scenario {name} on {}", kvm_path(), vmm());
    let run = || {
        let o = host_or_rig(
            &["/usr/bin/unshare", "-n", "/bin/sh", "-c", &script],
            &[],
            &envs,
            timeout_s,
        );
        (o.status.code(), text(&o))
    };
    let (mut status, mut out) = run();
    // A guest that stalled or triple-faulted before its /init ran never touched the network:
    // under the rig's TCG the kernel was seen stopping at "x86: Booting SMP configuration"
    // (as linux_guest.rs's disk scenarios saw it stop elsewhere in early boot), and once
    // triple-faulting 9 s into boot. Such a run says nothing about the network; it is
    // retried once, and reported.
    let stalled = out.contains("vmm exit status 124");
    // A double fault is the same cascade one step earlier: CI saw one in the migrate
    // scenario on the destination, 40 s and twelve busy generations after the migration
    // (its dump reads as a syscall entry finding GS already swapped, in a CPU state qomvm
    // had not set since the migration's load).
    let faulted = out.contains("triple fault (KVM_EXIT_SHUTDOWN)")
        || out.contains("traps: PANIC: double fault");
    let early = (stalled || faulted) && !out.contains("QOMVM-GUEST-READY");
    // In the rig, where QEMU's TCG emulates the SVM that L1's KVM runs the guest on, a guest
    // has also triple-faulted in the middle of a transfer (CI, the user scenario), and once
    // in 24 runs of the user scenario one vCPU stopped answering (RCU stalls, no NMI
    // backtrace) while the other ran on; the runs before and after passed, as QEMU's did.
    // On AMD the state after a shutdown is the reset state (KVM re-initialises the VMCB), so
    // a dump cannot say where. Such a run is retried once there, and what it showed (the
    // console's end, where each VMM thread was) goes to the report and `.ci/run`'s summary.
    // On hardware KVM a fault or stall after /init fails the test.
    let rig_failure = (stalled || faulted) && kvm_path() == Path_::NestedRig;
    if early || rig_failure {
        let threads: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("host: thread ") || l.contains("host:     "))
            .take(160)
            .collect();
        let tail: Vec<&str> = out
            .lines()
            .filter(|l| l.contains(": [") || l.contains("QOMVM-"))
            .rev()
            .take(if early { 3 } else { 12 })
            .collect();
        let what = match (early, faulted) {
            (true, _) => "the guest stalled or faulted before /init",
            (false, true) => "the guest's CPU faulted in the rig (a double or triple fault)",
            (false, false) => "the guest stopped making progress in the rig",
        };
        let evidence: Vec<&str> = tail.iter().rev().chain(threads.iter()).copied().collect();
        test_support::skip::retried(format!("scenario {name}: {what}; retrying once"), &evidence);
        (status, out) = run();
    }
    assert_eq!(status, Some(0), "scenario {name}:\n{out}");
    // What the guest and the host saw, for the record (shown with --nocapture).
    for l in out.lines().filter(|l| {
        ["host: ", "net: ", "QOMVM-", "nettest: ", "rng: ", "mem: "]
            .iter()
            .any(|m| l.contains(m))
    }) {
        println!("{name}: {}", l.trim_end());
    }
    Some(out)
}

/// The rest of the line of `out` that starts with `prefix`.
fn line_after<'a>(out: &'a str, prefix: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.trim().strip_prefix(prefix))
}

/// Checks a `tap_scenario` NAME: address and MAC, pings both ways, both transfers whole.
fn check_tap_scenario(out: &str, name: &str, mib: u32) {
    let has = |line: &str| assert!(out.contains(line), "no '{line}':\n{out}");
    has(&format!(
        "{name}: net: eth0 192.168.76.2/24 52:54:00:12:34:56"
    ));
    has(&format!("{name}: QOMVM-PING-OK 192.168.76.1"));
    has(&format!("host: {name}: ping 192.168.76.2 ok"));
    let bytes = u64::from(mib) << 20;
    let sent =
        line_after(out, &format!("host: {name}: sending ")).unwrap_or_else(|| panic!("{out}"));
    assert!(sent.starts_with(&format!("{bytes} ")), "{out}");
    let got = line_after(out, &format!("{name}: QOMVM-RECV 5001 "))
        .unwrap_or_else(|| panic!("the guest received nothing:\n{out}"));
    assert_eq!(got, sent, "host -> guest:\n{out}");
    let served = line_after(out, &format!("{name}: nettest: serving "))
        .and_then(|l| l.strip_suffix(" on tcp port 5002"))
        .unwrap_or_else(|| panic!("{out}"));
    let received = line_after(out, &format!("host: {name}: received "))
        .unwrap_or_else(|| panic!("the host received nothing:\n{out}"));
    assert_eq!(received, served, "guest -> host:\n{out}");
    has(&format!("{name}: QOMVM-NETTEST-DONE"));
    has(&format!("host: {name}: vmm exit status 0"));
}

/// A tap the VMM opens by name (`vhost=off`): the guest at 192.168.76.2 and the host's
/// 192.168.76.1 ping each other and move 64 MiB each way with matching SHA-256 sums.
#[test]
fn a_tap_carries_pings_both_ways_and_64_mib_each_way() {
    let Some(out) = net_scenario(
        "tap",
        &format!(
            "tap_up qtap0 || exit 1\n\
             tap_scenario tap {MIB} -netdev tap,id=n0,ifname=qtap0,script=no,downscript=no,vhost=off"
        ),
        1000,
    ) else {
        return;
    };
    check_tap_scenario(&out, "tap", MIB);
}

/// QEMU's default card, `e1000`, on the same tap: Linux's e1000 driver (the generic
/// kernel's) binds it, gets the link, and moves 16 MiB each way through its descriptor
/// rings, with the checksum offloads and TSO it turns on by default.
#[test]
fn an_e1000_carries_pings_both_ways_and_16_mib_each_way() {
    let Some(out) = net_scenario(
        "e1000",
        "tap_up qtap0 || exit 1\n\
         VM_KERNEL=vmlinuz-generic NIC=e1000 NET_APPEND='qomvm.e1000=1 '\n\
         tap_scenario e1000 16 -netdev tap,id=n0,ifname=qtap0,script=no,downscript=no",
        1000,
    ) else {
        return;
    };
    check_tap_scenario(&out, "e1000", 16);
}

/// libvirt's default card on pc, `rtl8139`, on the same tap: Linux binds QEMU's RTL8139C+
/// with 8139cp (the generic kernel's), which reads its MAC from the EEPROM, runs the C+
/// descriptor rings with checksum offload, and moves 16 MiB each way.
#[test]
fn an_rtl8139_carries_pings_both_ways_and_16_mib_each_way() {
    let Some(out) = net_scenario(
        "rtl8139",
        "tap_up qtap0 || exit 1\n\
         VM_KERNEL=vmlinuz-generic NIC=rtl8139 NET_APPEND='qomvm.e1000=1 '\n\
         tap_scenario rtl8139 16 -netdev tap,id=n0,ifname=qtap0,script=no,downscript=no",
        1000,
    ) else {
        return;
    };
    // The guest's eth0 has the card's MAC, which 8139cp reads only from the EEPROM.
    check_tap_scenario(&out, "rtl8139", 16);
}

/// The same over the kernel's vhost-net (`vhost=on`), where L1 or the host has
/// /dev/vhost-net, while the guest moves the queues' interrupts between its two CPUs ten
/// times a second: each move masks the MSI-X vector, so the worker's signals switch
/// between the vector's irqfd and qomvm's own path all along.
#[test]
fn a_tap_with_vhost_net_carries_pings_and_64_mib_each_way() {
    let Some(out) = net_scenario(
        "vhost",
        &format!(
            "if [ ! -c /dev/vhost-net ]; then echo 'host: skipped: no /dev/vhost-net'; exit 0; fi\n\
             tap_up qtap0 || exit 1\n\
             NETTEST_FIRST=irqmove, tap_scenario vhost {MIB} -netdev tap,id=n0,ifname=qtap0,script=no,downscript=no,vhost=on"
        ),
        1000,
    ) else {
        return;
    };
    if out.contains("host: skipped: no /dev/vhost-net") {
        test_support::skip::skip("no /dev/vhost-net where the guest runs");
        return;
    }
    check_tap_scenario(&out, "vhost", MIB);
    let moves: u32 = line_after(&out, "vhost: QOMVM-IRQMOVE moves=")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("the guest did not move its interrupts:\n{out}"));
    assert!(moves >= 20, "{moves} interrupt moves:\n{out}");
}

/// Issue 12's seed: a tap the caller opened (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`, as libvirt does) and a /dev/vhost-net descriptor, passed as
/// `-netdev tap,fd=N,vhost=on,vhostfd=M` with the seed's `-device` options (without
/// /dev/vhost-net: `fd=N` alone, and the vhost half is reported skipped).
#[test]
fn a_tap_passed_as_a_descriptor_carries_the_guest_traffic() {
    let Some(out) = net_scenario(
        "tapfd",
        r#"
tap_up qtap0 || exit 1
cat >tapfd.py <<'EOF'
# tapfd.py IFNAME VMM ARGS...: opens IFNAME's tap (and /dev/vhost-net) and execs the VMM
# with the descriptors inherited, @TAPFD@ and @VHOSTFD@ in ARGS replaced by their numbers.
import fcntl, os, struct, sys
TUNSETIFF, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x400454CA, 0x0002, 0x1000, 0x4000
tap = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tap, TUNSETIFF, struct.pack("16sH", sys.argv[1].encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
os.set_inheritable(tap, True)
vhost = -1
if any("@VHOSTFD@" in a for a in sys.argv):
    vhost = os.open("/dev/vhost-net", os.O_RDWR)
    os.set_inheritable(vhost, True)
args = [a.replace("@TAPFD@", str(tap)).replace("@VHOSTFD@", str(vhost)) for a in sys.argv[2:]]
os.execvp(args[0], args)
EOF
VM_WRAP="$PY tapfd.py qtap0"
if [ -c /dev/vhost-net ]; then
    netdev=tap,fd=@TAPFD@,id=hostnet0,vhost=on,vhostfd=@VHOSTFD@
else
    echo "host: skipped vhost: no /dev/vhost-net"
    netdev=tap,fd=@TAPFD@,id=hostnet0
fi
head -c 8388608 /dev/urandom >h2g.bin
echo "host: tapfd: sending $(sum h2g.bin)"
boot tapfd "qomvm.net=192.168.76.2/24 qomvm.nettest=ping:192.168.76.1,recv:5001,serve:5002:8" \
    -netdev "$netdev" -device virtio-net-pci,netdev=hostnet0,id=net0,mac=fa:16:3e:d1:2d:99,bus=pci.0,addr=0x3
await tapfd '^(net: |QOMVM-NET-FAILED)' 200 && { $B ping -c 3 -W 5 192.168.76.2 >ping.log 2>&1 && echo "host: tapfd: ping 192.168.76.2 ok"; }
await tapfd 'listening on tcp port 5001' && nc_ 192.168.76.2 5001 <h2g.bin >/dev/null
await tapfd 'listening on tcp port 5002' && echo "host: tapfd: received $(nc_ 192.168.76.2 5002 </dev/null | sum -)"
finish tapfd
"#,
        1000,
    ) else {
        return;
    };
    if out.contains("host: skipped vhost: no /dev/vhost-net") {
        test_support::skip::skip(
            "the vhostfd= half (the fd= half ran): no /dev/vhost-net where the guest runs",
        );
    }
    let has = |line: &str| assert!(out.contains(line), "no '{line}':\n{out}");
    has("tapfd: net: eth0 192.168.76.2/24 fa:16:3e:d1:2d:99");
    has("pci: 0000:00:03.0 0x1af4:0x1000");
    has("tapfd: QOMVM-PING-OK 192.168.76.1");
    has("host: tapfd: ping 192.168.76.2 ok");
    let sent = line_after(&out, "host: tapfd: sending ").unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        line_after(&out, "tapfd: QOMVM-RECV 5001 "),
        Some(sent),
        "{out}"
    );
    let served = line_after(&out, "tapfd: nettest: serving ")
        .and_then(|l| l.strip_suffix(" on tcp port 5002"))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        line_after(&out, "host: tapfd: received "),
        Some(served),
        "{out}"
    );
    has("host: tapfd: vmm exit status 0");
}

/// `-netdev user` (libslirp): the guest gets 10.0.2.15 by DHCP, pings the gateway, fetches
/// 4 MiB from a server of the host's loopback through 10.0.2.2 and sends 4 MiB to another,
/// and `hostfwd=tcp:127.0.0.1:5555-:5003` brings a connection of the host to the guest's
/// listener.
#[test]
fn user_networking_gives_dhcp_outbound_tcp_and_hostfwd() {
    let Some(out) = net_scenario(
        "user",
        r#"
head -c 4194304 /dev/urandom >out.bin
echo "host: user: serving $(sum out.bin)"
# The namespace has only its loopback: these listen on 127.0.0.1 and nothing else.
$B nc -l -p 6001 -e cat out.bin &
out=$!
$B nc -l -p 6002 -e sh -c 'cat >in.bin' &
in=$!
head -c 1048576 /dev/urandom >fwd.bin
echo "host: user: forwarding $(sum fwd.bin)"
boot user "qomvm.net=dhcp qomvm.nettest=ping:10.0.2.2,get:10.0.2.2:6001,put:10.0.2.2:6002:4,recv:5003" \
    -netdev user,id=u0,hostfwd=tcp:127.0.0.1:5555-:5003 -device virtio-net-pci,netdev=u0
await user 'listening on tcp port 5003' 300 && nc_ 127.0.0.1 5555 <fwd.bin >/dev/null
finish user
kill $out $in 2>/dev/null
[ -f in.bin ] && echo "host: user: received $(sum in.bin)"
"#,
        1000,
    ) else {
        return;
    };
    let has = |line: &str| assert!(out.contains(line), "no '{line}':\n{out}");
    let net = line_after(&out, "user: net: eth0 ").unwrap_or_else(|| panic!("{out}"));
    assert!(net.starts_with("10.0.2.15/24 "), "DHCP: {net}\n{out}");
    has("user: net: gw 10.0.2.2");
    has("user: QOMVM-PING-OK 10.0.2.2");
    let served = line_after(&out, "host: user: serving ").unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        line_after(&out, "user: QOMVM-GOT 10.0.2.2:6001 "),
        Some(served),
        "guest <- host server:\n{out}"
    );
    let put = line_after(&out, "user: QOMVM-PUT 10.0.2.2:6002 ").unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        line_after(&out, "host: user: received "),
        Some(put),
        "guest -> host server:\n{out}"
    );
    let fwd = line_after(&out, "host: user: forwarding ").unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        line_after(&out, "user: QOMVM-RECV 5003 "),
        Some(fwd),
        "hostfwd:\n{out}"
    );
    has("host: user: vmm exit status 0");
}

/// `mem: MemTotal=K MemFree=K MemAvailable=K kB` lines of the guest: (MemTotal, MemFree).
fn mem_lines(out: &str) -> Vec<(u64, u64)> {
    out.lines()
        .filter_map(|l| l.split_once("mem: ").map(|(_, m)| m))
        .filter_map(|m| {
            let field = |k: &str| -> Option<u64> {
                m.split_whitespace()
                    .find_map(|f| f.strip_prefix(k))
                    .and_then(|v| v.parse().ok())
            };
            Some((field("MemTotal=")?, field("MemFree=")?))
        })
        .collect()
}

/// virtio-rng-pci over `rng-random` feeds the guest's hw_random (`rng_current` names
/// virtio_rng, /dev/hwrng reads); virtio-balloon-pci takes memory from the guest when QMP
/// `balloon` asks for half of it, and `query-balloon` reports the new size.
#[test]
fn virtio_rng_feeds_hwrng_and_the_balloon_takes_half_the_memory() {
    let Some(out) = net_scenario(
        "rngballoon",
        r#"
boot rb "qomvm.nettest=rng,mem:30" -object rng-random,id=rng0,filename=/dev/urandom \
    -device virtio-rng-pci,rng=rng0 -device virtio-balloon-pci,id=balloon0 \
    -qmp "unix:$PWD/qmp.sock,server=on,wait=off"
if await rb '^mem: '; then
    qmp qmp.sock '{"execute": "query-balloon"}' \
        '{"execute": "balloon", "arguments": {"value": 268435456}}' | sed 's/^/host: qmp: /'
    i=0
    while [ $i -lt 25 ]; do
        r=$(qmp qmp.sock '{"execute": "query-balloon"}')
        case $r in *'"actual":268435456'*) break ;; esac
        i=$((i + 1))
        sleep 1
    done
    echo "host: query-balloon: $r"
fi
finish rb
"#,
        700,
    ) else {
        return;
    };
    let rng = line_after(&out, "rb: rng: ").unwrap_or_else(|| panic!("{out}"));
    assert!(rng.starts_with("current=virtio_rng."), "{rng}\n{out}");
    assert!(rng.contains(" read=32 "), "/dev/hwrng: {rng}\n{out}");
    assert!(
        out.contains(r#"host: qmp: {"return":{"actual":536870912}}"#),
        "query-balloon before:\n{out}"
    );
    assert!(
        out.contains(r#"host: query-balloon: {"return":{"actual":268435456}}"#),
        "query-balloon after:\n{out}"
    );
    let mem = mem_lines(&out);
    let (first, last) = (mem.first().copied(), mem.last().copied());
    let (Some((total0, free0)), Some((total1, free1))) = (first, last) else {
        panic!("no mem lines:\n{out}");
    };
    // 256 MiB went to the balloon: free memory (and, without deflate-on-oom, MemTotal)
    // dropped by most of it.
    assert!(
        free0 > free1 + 200 * 1024,
        "MemFree {free0} -> {free1} kB:\n{out}"
    );
    assert!(
        total0 > total1 + 200 * 1024,
        "MemTotal {total0} -> {total1} kB:\n{out}"
    );
    assert!(out.contains("rb: QOMVM-NETTEST-DONE"), "{out}");
}

/// Issue 18: a live migration between two VMM processes of a Linux guest that writes to
/// an ext4 file system on its virtio-blk disk (a qcow2 both processes open, as on shared
/// storage), pings the host over virtio-net and receives a 16 MiB TCP stream meanwhile.
/// The host has its address on the source's tap and on the destination's, and moves its
/// route to the guest when the migration completes; the migration starts after the guest's
/// second generation of writes. On the destination every
/// generation reads back right, at most one ping is lost, the stream arrives whole, the
/// host pings the guest there, and afterwards the image passes `qemu-img check` and
/// `e2fsck -fn`.
#[test]
fn a_linux_guest_migrates_with_its_disk_and_network_busy() {
    let Some(out) = net_scenario(
        "migrate",
        r#"
# The host is 192.168.76.1 on both taps; the route to the guest follows it from the
# source's tap to the destination's (what a switch learns from the announcement; the rig's
# kernel has no bridge).
for t in qtsrc qtdst; do
    ip tuntap add dev $t mode tap && ip addr add 192.168.76.1/32 dev $t && ip link set $t up || exit 1
done
for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 >"$f"; done
ip route add 192.168.76.2/32 dev qtsrc || exit 1
truncate -s 64M fs.raw && /sbin/mkfs.ext4 -q -F fs.raw && qemu-img convert -O qcow2 fs.raw disk.qcow2 || exit 1
rm -f fs.raw
head -c 16777216 /dev/urandom >h2g.bin
echo "host: migrate: sending $(sum h2g.bin)"
VM_MEM=256
# Enough generations to outlast the migration in the rig (about one in 6 s there, and a
# minute of migration).
append="qomvm.net=192.168.76.2/24 qomvm.migtest=/dev/vda:36:5001:192.168.76.1"
# The rig's L1 copies memory at TCG speed: a downtime of a few seconds lets the
# migration converge before the guest is done (QEMU users raise it the same way).
max_downtime='{"execute":"migrate-set-parameters","arguments":{"downtime-limit":5000}}'
common="-drive file=disk.qcow2,if=none,id=d0,format=qcow2 -device virtio-blk-pci,drive=d0,addr=0x4 -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,addr=0x3"
# shellcheck disable=SC2086 # $common is a list of arguments
boot src "$append" -netdev tap,id=n0,ifname=qtsrc,script=no,downscript=no,vhost=off $common \
    -qmp "unix:$PWD/src.qmp,server=on,wait=off"
src=$vm src_watchdog=$watchdog
# shellcheck disable=SC2086
boot dst "$append" -netdev tap,id=n0,ifname=qtdst,script=no,downscript=no,vhost=off $common \
    -qmp "unix:$PWD/dst.qmp,server=on,wait=off" -incoming "unix:$PWD/mig.sock"
dst=$vm
vm=$src
if await src 'migtest: listening on tcp port 5001' 300; then
    ( nc_ 192.168.76.2 5001 <h2g.bin >/dev/null || echo "host: migrate: nc to port 5001 failed" ) &
    sender=$!
    if await src 'QOMVM-MIGTEST 2 ' 300; then
        echo "host: migrate: $(qmp src.qmp "$max_downtime" '{"execute":"migrate","arguments":{"uri":"unix:'"$PWD"'/mig.sock"}}')"
        i=0
        while :; do
            st=$(qmp src.qmp '{"execute":"query-migrate"}')
            case $st in *'"completed"'* | *'"failed"'*) break ;; esac
            i=$((i + 1))
            [ $i -gt 600 ] && break
            sleep 0.5
        done
        ip route replace 192.168.76.2/32 dev qtdst
        echo "host: migrate: query-migrate $st"
        echo "host: migrate: source $(qmp src.qmp '{"execute":"query-status"}')"
        qmp src.qmp '{"execute":"quit"}' >/dev/null
        vm=$dst
        if await dst 'QOMVM-MIGTEST [0-9]+ ' 300; then
            if $B ping -c 3 -W 5 192.168.76.2 >ping.log 2>&1; then
                echo "host: migrate: ping 192.168.76.2 ok"
            else
                echo "host: migrate: ping 192.168.76.2 failed: $(tail -n1 ping.log)"
            fi
        fi
    fi
    wait $sender
fi
wait $src
echo "host: src: vmm exit status $?"
pkill -P $src_watchdog 2>/dev/null
kill $src_watchdog 2>/dev/null
tr -d '\r' <src.log | sed 's/^/src: /'
vm=$dst
finish dst
qemu-img check -q disk.qcow2 && echo "host: migrate: qemu-img check ok"
qemu-img convert -O raw disk.qcow2 fs.raw && /sbin/e2fsck -fn fs.raw >fsck.log 2>&1
echo "host: migrate: e2fsck exit status $?"
sed 's/^/host: fsck: /' fsck.log
"#,
        1500,
    ) else {
        return;
    };
    let has = |line: &str| assert!(out.contains(line), "no '{line}':\n{out}");
    has("\"status\":\"completed\"");
    has("\"status\":\"postmigrate\"");
    // The source stopped some generations after the second; the destination printed the
    // rest, in order, every one read back right.
    let gens: Vec<(String, u32)> = out
        .lines()
        .filter_map(|l| {
            let (who, rest) = l.split_once(": QOMVM-MIGTEST ")?;
            let g = rest.split_whitespace().next()?.parse().ok()?;
            assert!(rest.contains(" ok "), "generation failed: {l}\n{out}");
            Some((who.trim().to_string(), g))
        })
        .collect();
    let numbers: Vec<u32> = gens.iter().map(|(_, g)| *g).collect();
    assert_eq!(numbers, (1..=36).collect::<Vec<_>>(), "{out}");
    assert!(
        gens.iter().any(|(who, _)| who == "src") && gens.iter().any(|(who, _)| who == "dst"),
        "the generations did not span both sides: {gens:?}\n{out}"
    );
    let sent = line_after(&out, "host: migrate: sending ").unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        line_after(&out, "dst: QOMVM-MIGTEST-RECV "),
        Some(sent),
        "the stream across the migration:\n{out}"
    );
    has("dst: QOMVM-MIGTEST-OK");
    has("host: migrate: ping 192.168.76.2 ok");
    has("host: dst: vmm exit status 0");
    has("host: src: vmm exit status 0");
    has("host: migrate: qemu-img check ok");
    has("host: migrate: e2fsck exit status 0");
}

/// A CD changed through QMP while the guest runs (the `ide-cd` media commands): the guest's
/// `sr` driver reads the first medium, finds the drive empty after `eject`, and reads the
/// medium `blockdev-change-medium` put in, each checked against the host's MD5.
#[test]
fn a_guest_reads_the_cd_that_qmp_puts_in() {
    cd_medium_change("cdchange", "-cdrom a.iso", r#""device": "ide1-cd0""#);
}

/// The same with a `scsi-cd` on virtio-scsi (libvirt's `<disk device='cdrom' bus='scsi'>`),
/// addressed by its device id: Linux's `sr` over `virtio_scsi` sees "no medium", then the
/// new one ("medium may have changed").
#[test]
fn a_guest_reads_the_scsi_cd_that_qmp_puts_in() {
    cd_medium_change(
        "scsicd",
        "-device virtio-scsi-pci,id=scsi0 -drive if=none,id=cd0,media=cdrom,format=raw,file=a.iso \
         -device scsi-cd,bus=scsi0.0,drive=cd0,id=cd0dev",
        r#""id": "cd0dev""#,
    );
}

/// `block_resize` under a running Linux guest (OpenStack's volume extend): a virtio-blk disk
/// and a `scsi-hd` on virtio-scsi grow, and the guest's `/sys/block/*/size` follow without
/// anything opening the disks (virtio-blk's configuration interrupt; virtio-scsi's
/// `PARAM_CHANGE` event, on which Linux rescans the unit).
#[test]
fn a_guest_sees_its_disks_grow_under_block_resize() {
    let script = r#"
truncate -s 64M vd.img && truncate -s 32M sd.img || exit 1
boot resize "qomvm.ata=1 qomvm.resize=vda,sda"     -drive if=none,id=vd0,file=vd.img,format=raw -device virtio-blk-pci,drive=vd0     -device virtio-scsi-pci,id=scsi0     -drive if=none,id=sd0,file=sd.img,format=raw -device scsi-hd,bus=scsi0.0,drive=sd0     -qmp "unix:$PWD/qmp.sock,server=on,wait=off"
if await resize '^resize: ready' 300; then
    qmp qmp.sock '{"execute": "block_resize", "arguments": {"device": "vd0", "size": 100663296}}'         '{"execute": "block_resize", "arguments": {"device": "sd0", "size": 50331648}}'         | sed 's/^/host: resize: /'
fi
finish resize
echo "host: sizes $(stat -c %s vd.img) $(stat -c %s sd.img)"
"#;
    let Some(out) = net_scenario("resize", script, 700) else {
        return;
    };
    assert!(
        out.contains("resize: resize: ready vda 131072 sda 65536"),
        "the disks before:
{out}"
    );
    assert_eq!(
        out.matches(r#"host: resize: {"return":{}}"#).count(),
        2,
        "both resizes:
{out}"
    );
    for (dev, sectors) in [("vda", 196608), ("sda", 98304)] {
        assert!(
            out.contains(&format!("resize: resize: {dev} {sectors}")),
            "{dev} seen at {sectors} sectors:
{out}"
        );
    }
    assert!(!out.contains("resize: unchanged"), "{out}");
    assert!(out.contains("host: sizes 100663296 50331648"), "{out}");
    assert!(out.contains("host: resize: vmm exit status 0"), "{out}");
}

/// Boots the guest with `drive` (QEMU options holding a.iso as a CD), ejects the medium
/// through QMP naming the drive as `target` (`"device": ...` or `"id": ...`), then puts
/// b.iso in; the guest must read a.iso, no medium, then b.iso.
fn cd_medium_change(name: &str, drive: &str, target: &str) {
    let script = format!(
        r#"
awk 'BEGIN {{ for (i = 0; i < 65536; i++) printf "%031d\n", i }}' >a.iso
awk 'BEGIN {{ for (i = 0; i < 3 * 65536; i++) printf "%031x\n", i }}' >b.iso
for f in a b; do echo "host: $f.iso $(md5sum <$f.iso | cut -d' ' -f1) $(wc -c <$f.iso)"; done
boot cd "qomvm.ata=1 qomvm.cdsum=/dev/sr0 qomvm.cdchange=2" {drive} \
    -qmp "unix:$PWD/qmp.sock,server=on,wait=off"
if await cd '^cdsum: ' 300; then
    # The guest's sr locks the tray while it has the device open (its poll opens it every
    # half second): QEMU's eject then says "is locked ... try again", as a management
    # tool would, the script tries again.
    i=0
    while :; do
        r=$(qmp qmp.sock '{{"execute": "eject", "arguments": {{{target}}}}}')
        echo "host: eject: $r"
        case $r in *"is locked"*) i=$((i + 1)); [ $i -lt 30 ] && {{ sleep 0.3; continue; }} ;; esac
        break
    done
    if await cd '^cdsum: none' 120; then
        qmp qmp.sock "{{\"execute\": \"blockdev-change-medium\", \"arguments\": {{{target_escaped}, \"filename\": \"$PWD/b.iso\", \"format\": \"raw\"}}}}" \
            | sed 's/^/host: change: /'
    fi
fi
finish cd
"#,
        target_escaped = target.replace('"', "\\\""),
    );
    let Some(out) = net_scenario(name, &script, 700) else {
        return;
    };
    let host = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("host: {name} ")))
            .unwrap_or_else(|| panic!("no {name}:\n{out}"))
            .to_string()
    };
    let seen: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once("cd: cdsum: ").map(|(_, s)| s.trim()))
        .collect();
    assert_eq!(
        seen,
        [host("a.iso").as_str(), "none", host("b.iso").as_str()],
        "the media as the guest read them:\n{out}"
    );
    assert!(out.contains(r#"host: eject: {"return":{}}"#), "{out}");
    assert!(out.contains(r#"host: change: {"return":{}}"#), "{out}");
    assert!(out.contains("host: cd: vmm exit status 0"), "{out}");
}

/// Checks the guest's input events in `out` (lines `PREFIX: tablet ...` and `PREFIX:
/// keyboard ...`, as /init's input modes print them) against what the input scenarios
/// send through QMP: an absolute position (0x1234, 0x2000) with the left button down, in a
/// report that ends in EV_SYN, then KEY_A down.
fn check_input_events(out: &str, prefix: &str) {
    let events = |dev: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| {
                l.split_once(&format!("{prefix}: {dev} "))
                    .map(|(_, e)| e.trim().to_string())
            })
            .collect()
    };
    let tablet = events("tablet");
    // EV_ABS ABS_X 0x1234, EV_ABS ABS_Y 0x2000, EV_KEY BTN_LEFT down, then EV_SYN.
    for want in [
        "0003 0000 00001234",
        "0003 0001 00002000",
        "0001 0110 00000001",
    ] {
        assert!(
            tablet.iter().any(|e| e == want),
            "tablet event {want}:\n{out}"
        );
    }
    assert!(
        tablet.last().is_some_and(|e| e.starts_with("0000 ")),
        "the report ends in EV_SYN:\n{out}"
    );
    let keyboard = events("keyboard");
    assert_eq!(
        keyboard.last().map(String::as_str),
        Some("0001 001e 00000001"),
        "KEY_A down:\n{out}"
    );
    assert!(out.contains(r#"host: tablet: {"return":{}}"#), "{out}");
}

/// USB input as a console client gives it: Linux's uhci-hcd (the generic kernel's; the
/// cloud kernel has no USB) enumerates `usb-kbd` on `-usb`'s PIIX3 UHCI and, through
/// Linux's hub driver, `usb-tablet` behind a `usb-hub`; usbhid and hid-generic bind them,
/// and what QMP sends (`input-send-event`: a position and a button; `send-key`) arrives
/// at the guest's evdev devices as the same events.
#[test]
fn usb_tablet_and_keyboard_input_reaches_the_guest() {
    usb_input_reaches_the_guest(
        "usbinput",
        "-usb -device usb-hub,port=1 -device usb-tablet,id=tab,port=1.2 -device usb-kbd,id=kbd,port=2",
        &["QEMU USB Hub", "QEMU USB Tablet", "QEMU USB Keyboard"],
    );
}

/// The same on `qemu-xhci`, as virt-install sets a domain up: Linux's xhci_hcd reaches
/// the keyboard on a root port and the tablet behind the hub by its route string, and
/// polls their interrupt endpoints through transfer rings.
#[test]
fn usb_input_behind_xhci_reaches_the_guest() {
    usb_input_reaches_the_guest(
        "xhciinput",
        "-device qemu-xhci,id=xhci -device usb-hub,bus=xhci.0,port=1 -device usb-tablet,id=tab,bus=xhci.0,port=1.2 -device usb-kbd,id=kbd,bus=xhci.0,port=2",
        &["QEMU USB Hub", "QEMU USB Tablet", "QEMU USB Keyboard"],
    );
}

/// Boots with the USB `devices`, checks the guest lists `products`, sends QMP input and
/// checks the guest's events.
fn usb_input_reaches_the_guest(name: &str, devices: &str, products: &[&str]) {
    let script = r#"
VM_KERNEL=vmlinuz-generic
boot usb "qomvm.usbinput=1" @DEVICES@ \
    -qmp "unix:$PWD/qmp.sock,server=on,wait=off"
if await usb '^usb: ready' 300; then
    qmp qmp.sock '{"execute": "input-send-event", "arguments": {"events": [{"type": "abs", "data": {"axis": "x", "value": 4660}}, {"type": "abs", "data": {"axis": "y", "value": 8192}}, {"type": "btn", "data": {"down": true, "button": "left"}}]}}' \
        | sed 's/^/host: tablet: /'
    if await usb '^usb: keyboard open' 120; then
        qmp qmp.sock '{"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": "a"}]}}' \
            | sed 's/^/host: key: /'
    fi
fi
finish usb
"#
    .replace("@DEVICES@", devices);
    let Some(out) = net_scenario(name, &script, 400) else {
        return;
    };
    for product in products {
        assert!(
            out.contains(&format!("usb: usb: product {product}")),
            "{product}:\n{out}"
        );
    }
    check_input_events(&out, "usb: usb");
    assert!(out.contains("host: usb: vmm exit status 0"), "{out}");
}

/// Virtio input as libvirt's `<input type='tablet'|'keyboard' bus='virtio'/>` gives it:
/// Linux's virtio_input binds `virtio-tablet-pci` and `virtio-keyboard-pci` under QEMU's
/// names, and what QMP sends (`input-send-event`: a position and a button; `send-key`)
/// arrives at the guest's evdev devices as the same events, the tablet first among the
/// pointers (the PS/2 mouse is there too) once its driver runs.
#[test]
fn virtio_tablet_and_keyboard_input_reaches_the_guest() {
    let Some(out) = net_scenario(
        "virtioinput",
        r#"
boot vin "qomvm.virtioinput=1" -device virtio-tablet-pci,id=tab -device virtio-keyboard-pci,id=kbd \
    -qmp "unix:$PWD/qmp.sock,server=on,wait=off"
if await vin '^vinput: ready' 300; then
    qmp qmp.sock '{"execute": "input-send-event", "arguments": {"events": [{"type": "abs", "data": {"axis": "x", "value": 4660}}, {"type": "abs", "data": {"axis": "y", "value": 8192}}, {"type": "btn", "data": {"down": true, "button": "left"}}]}}' \
        | sed 's/^/host: tablet: /'
    if await vin '^vinput: keyboard open' 120; then
        qmp qmp.sock '{"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": "a"}]}}' \
            | sed 's/^/host: key: /'
    fi
fi
finish vin
"#,
        400,
    ) else {
        return;
    };
    for name in ["QEMU Virtio Tablet", "QEMU Virtio Keyboard"] {
        assert!(
            out.contains(&format!("vin: vinput: name {name}")),
            "{name}:\n{out}"
        );
    }
    check_input_events(&out, "vin: vinput");
    assert!(out.contains("host: vin: vmm exit status 0"), "{out}");
}

/// `virtio-gpu-pci` alone (`-vga none`), as a headless guest with a modern kernel has it:
/// Linux's virtio-gpu DRM driver reads the output's EDID (1280x800 preferred), its
/// framebuffer console draws text at the top left and a write of the whole framebuffer
/// comes through (transfers and flushes of its shadow buffer), each seen in QMP's
/// `screendump` pixel by pixel; the console's PS/2 keyboard takes QMP's `send-key`.
#[test]
fn a_guest_draws_on_virtio_gpu_and_the_screendump_shows_it() {
    guest_draws_on_a_virtio_gpu("gpu", "-vga none -device virtio-gpu-pci,id=video0");
}

/// The same on `virtio-vga` (`-vga virtio`, libvirt's primary `virtio` video): the kernel
/// starts on its VGA's text console, then the virtio-gpu driver takes the display over
/// (the VGA console removed as a conflicting framebuffer) and the screendumps show the
/// GPU's scanout.
#[test]
fn a_guest_draws_on_virtio_vga_and_the_screendump_shows_it() {
    guest_draws_on_a_virtio_gpu("vgpu", "-vga virtio");
}

/// [`a_guest_draws_on_virtio_gpu_and_the_screendump_shows_it`] with the GPU `display`
/// gives.
fn guest_draws_on_a_virtio_gpu(name: &str, display: &str) {
    let script = r#"
VM_KERNEL=vmlinuz-generic
boot gpu "qomvm.gpu=1" @DISPLAY@ -qmp "unix:$PWD/qmp.sock,server=on,wait=off"
key() {
    qmp qmp.sock '{"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": "ret"}]}}' >/dev/null
}
# shot NAME: a screendump, summed up: its size, the non-black pixels in the first 32 rows
# and below them, and the pixels of 0x808080.
shot() {
    qmp qmp.sock "{\"execute\": \"screendump\", \"arguments\": {\"filename\": \"$PWD/$1.ppm\"}}" >/dev/null
    "$PY" - "$1.ppm" <<'PYEOF'
import sys
data = open(sys.argv[1], "rb").read()
magic, size, depth, px = data.split(b"\n", 3)
w, h = map(int, size.split())
def lit(b):
    # Pixels with any channel set: the three channels ORed as big integers.
    n = len(b) // 3
    v = int.from_bytes(b[0::3], "big") | int.from_bytes(b[1::3], "big") | int.from_bytes(b[2::3], "big")
    return n - v.to_bytes(n, "big").count(0)
not_grey = bytes(0 if c == 0x80 else 1 for c in range(256))
top = w * 3 * 32
n = len(px) // 3
print(f"{w}x{h} top={lit(px[:top])} below={lit(px[top:])} black={n - lit(px)} grey={n - lit(px.translate(not_grey))} of {w * h}")
PYEOF
}
if await gpu '^gpu: text shown' 300; then
    echo "host: gpu: text $(shot text)"
    key
    if await gpu '^gpu: filled' 120; then
        # The console's shadow buffer reaches the device a moment later (deferred I/O):
        # shots until two in a row agree.
        i=0 last=
        while :; do
            s=$(shot fill)
            [ "$s" = "$last" ] && break
            last=$s i=$((i + 1))
            [ $i -ge 30 ] && break
            sleep 1
        done
        echo "host: gpu: fill $s"
    fi
    key
fi
finish gpu
"#
    .replace("@DISPLAY@", display);
    let Some(out) = net_scenario(name, &script, 400) else {
        return;
    };
    assert!(
        out.contains("gpu: gpu: connector card0-Virtual-1 connected 1280x800 "),
        "the output and its EDID's preferred mode:\n{out}"
    );
    assert!(
        out.contains("gpu: gpu: fb virtio_gpudrmfb 1280,800 32"),
        "{out}"
    );
    let shot = |name: &str| {
        line_after(&out, &format!("host: gpu: {name} "))
            .unwrap_or_else(|| panic!("no {name} screendump:\n{out}"))
    };
    let (text, fill) = (shot("text"), shot("fill"));
    assert!(text.starts_with("1280x800 "), "{text}");
    // Fourteen characters of an 8x16 font light a few hundred pixels, all in the first
    // text row (the cursor, not blinking, sits in the second).
    assert!(
        shot_count(text, "top=") > 200,
        "the text on the screen: {text}"
    );
    assert_eq!(
        shot_count(text, "below="),
        0,
        "nothing below the text: {text}"
    );
    // The grey write, pixel for pixel, but for rows that can stay as they were: Linux
    // 6.1's framebuffer emulation now and then loses the damage of a band of rows in a
    // write this size (a different band each time, with QEMU as the VMM too). Such rows
    // are black or show a few of the text's pixels, nothing else.
    let (grey, black) = (shot_count(fill, "grey="), shot_count(fill, "black="));
    let stale_text = 1_024_000 - grey - black;
    assert!(
        stale_text <= shot_count(text, "top="),
        "only grey, stale black and stale text: {fill} after {text}"
    );
    assert!(
        grey >= 1_024_000 * 9 / 10,
        "the grey framebuffer on the screen: {fill}"
    );
    assert!(out.contains("host: gpu: vmm exit status 0"), "{out}");
}

/// The number after `key` in a screendump's summary line (`top=N below=N ...`).
fn shot_count(summary: &str, key: &str) -> u64 {
    summary
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in {summary}"))
}

/// SCSI hotplug as libvirt's `attach-disk --targetbus scsi` does it (`blockdev-add`,
/// `device_add scsi-hd` on the running adapter's bus, later `device_del`), twice: Linux's
/// virtio_scsi hears of the unit on the event queue, `sd` binds it and the guest reads
/// what the host wrote; on `device_del` the unit goes at once, the guest's disk with it.
#[test]
fn a_hotplugged_scsi_disk_reaches_the_guest_and_leaves_when_asked() {
    let Some(out) = net_scenario(
        "scsihotplug",
        r#"
head -c 3145728 /dev/urandom >hot.img
echo "host: hot.img $(md5sum <hot.img | cut -d' ' -f1) $(wc -c <hot.img)"
boot hp "qomvm.ata=1 qomvm.hotplug=/dev/sda:2" -device virtio-scsi-pci,id=scsi0 \
    -qmp "unix:$PWD/qmp.sock,server=on,wait=off"
if await hp '^hotplug: waiting' 300; then
    qmp qmp.sock \
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"raw\", \"node-name\": \"hot0\", \"file\": {\"driver\": \"file\", \"filename\": \"$PWD/hot.img\"}}}" \
        | sed 's/^/host: add: /'
    for n in 1 2; do
        qmp qmp.sock '{"execute": "device_add", "arguments": {"driver": "scsi-hd", "bus": "scsi0.0", "scsi-id": 0, "lun": 0, "drive": "hot0", "id": "sd1"}}' \
            | sed "s/^/host: add $n: /"
        await_n hp '^hotplug: /dev/sda [0-9a-f]' $n 200 || break
        qmp qmp.sock '{"execute": "device_del", "arguments": {"id": "sd1"}}' | sed "s/^/host: del $n: /"
        await_n hp '^hotplug: /dev/sda (gone|still)' $n 400 || break
    done
    qmp qmp.sock '{"execute": "blockdev-del", "arguments": {"node-name": "hot0"}}' \
        | sed 's/^/host: after: /'
    qmp qmp.sock '{"execute": "quit"}' >/dev/null
fi
finish hp
"#,
        1500,
    ) else {
        return;
    };
    let host_img = out
        .lines()
        .find_map(|l| l.strip_prefix("host: hot.img "))
        .unwrap_or_else(|| panic!("no image line:\n{out}"));
    assert_eq!(
        out.matches(&format!("hp: hotplug: /dev/sda {host_img}"))
            .count(),
        2,
        "the guest did not read the hotplugged disk twice ({host_img}):\n{out}"
    );
    for n in 1..=2 {
        for (what, line) in [("device_add", "add"), ("device_del", "del")] {
            let want = format!(r#"host: {line} {n}: {{"return":{{}}}}"#);
            assert!(out.contains(&want), "{what} {n}:\n{out}");
        }
        assert!(
            out.contains(&format!("hp: hotplug: /dev/sda gone ({n})")),
            "{out}"
        );
    }
    assert!(
        out.contains(r#"host: after: {"return":{}}"#),
        "the node is free:\n{out}"
    );
}

/// PCI hotplug as libvirt does it (`blockdev-add`, `device_add virtio-blk-pci`, later
/// `device_del`), twice with the same node, id and slot (libvirt's detach and re-attach):
/// Linux's ACPI hotplug driver found the DSDT's slots, binds virtio-blk to the new disk
/// when `_E01` tells it of the slot, reads what the host wrote, and, asked to let it go,
/// removes it and ejects the slot, after which the device is gone from the machine and its
/// node free for `blockdev-del`.
#[test]
fn a_hotplugged_disk_reaches_the_guest_and_leaves_when_asked() {
    let Some(out) = net_scenario(
        "hotplug",
        r#"
head -c 3145728 /dev/urandom >hot.img
echo "host: hot.img $(md5sum <hot.img | cut -d' ' -f1) $(wc -c <hot.img)"
boot hp "qomvm.hotplug=/dev/vda:2" -qmp "unix:$PWD/qmp.sock,server=on,wait=off"
if await hp '^hotplug: waiting' 300; then
    qmp qmp.sock \
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"raw\", \"node-name\": \"hot0\", \"file\": {\"driver\": \"file\", \"filename\": \"$PWD/hot.img\"}}}" \
        | sed 's/^/host: add: /'
    for n in 1 2; do
        qmp qmp.sock '{"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", "drive": "hot0", "id": "vd1", "addr": "0x5"}}' \
            | sed "s/^/host: add $n: /"
        await_n hp '^hotplug: /dev/vda [0-9a-f]' $n 200 || break
        qmp qmp.sock '{"execute": "device_del", "arguments": {"id": "vd1"}}' | sed "s/^/host: del $n: /"
        await_n hp '^hotplug: /dev/vda (gone|still)' $n 400 || break
        # The kernel ejects the slot right after it let the disk go.
        i=0
        until qmp qmp.sock '{"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}' \
                | grep -qv '"vd1"' || [ $i -gt 100 ]; do
            sleep 0.1
            i=$((i + 1))
        done
    done
    qmp qmp.sock '{"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}' \
        '{"execute": "blockdev-del", "arguments": {"node-name": "hot0"}}' \
        | sed 's/^/host: after: /'
    qmp qmp.sock '{"execute": "quit"}' >/dev/null
fi
finish hp
"#,
        1500,
    ) else {
        return;
    };
    let host_img = out
        .lines()
        .find_map(|l| l.strip_prefix("host: hot.img "))
        .unwrap_or_else(|| panic!("no image line:\n{out}"));
    let slots = out
        .lines()
        .find_map(|l| {
            l.split_once("hp: hotplug: slots ")
                .map(|(_, s)| s.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no slots line:\n{out}"));
    assert!(
        slots.split_whitespace().any(|s| s == "5"),
        "the kernel's ACPI hotplug driver registered no slot 5 (slots: {slots}):\n{out}"
    );
    assert_eq!(
        out.matches(&format!("hp: hotplug: /dev/vda {host_img}"))
            .count(),
        2,
        "the guest did not read the hotplugged disk twice ({host_img}):\n{out}"
    );
    assert!(
        out.contains(r#"host: add: {"return":{}}"#),
        "blockdev-add:\n{out}"
    );
    for n in 1..=2 {
        assert!(
            out.contains(&format!(r#"host: add {n}: {{"return":{{}}}}"#)),
            "device_add {n}:\n{out}"
        );
        assert!(
            out.contains(&format!(r#"host: del {n}: {{"return":{{}}}}"#)),
            "device_del {n}:\n{out}"
        );
        assert!(
            out.contains(&format!("hp: hotplug: /dev/vda gone ({n})")),
            "{out}"
        );
    }
    let after: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("host: after: "))
        .collect();
    assert_eq!(after.len(), 2, "{out}");
    assert!(
        !after[0].contains("\"vd1\""),
        "vd1 is still in the machine:\n{out}"
    );
    assert_eq!(
        after[1], r#"{"return":{}}"#,
        "blockdev-del of the freed node:\n{out}"
    );
    assert!(out.contains("host: hp: vmm exit status 0"), "{out}");
}

/// A NIC plugged in as libvirt's `attach-interface` does it (`netdev_add user`, then
/// `device_add virtio-net-pci`): the guest's virtio_net binds it and gets 10.0.2.15 from
/// the user network's DHCP server; `device_del` takes it away, and the netdev is free for
/// `netdev_del`.
#[test]
fn a_hotplugged_nic_gets_an_address_and_leaves_when_asked() {
    let Some(out) = net_scenario(
        "hotnic",
        r#"
boot hn "qomvm.hotnic=1" -nic none -qmp "unix:$PWD/qmp.sock,server=on,wait=off"
if await hn '^hotnic: waiting' 300; then
    qmp qmp.sock '{"execute": "netdev_add", "arguments": {"type": "user", "id": "hostnet1"}}' \
        '{"execute": "device_add", "arguments": {"driver": "virtio-net-pci", "netdev": "hostnet1", "id": "net1", "mac": "52:54:00:aa:bb:01"}}' \
        | sed 's/^/host: add: /'
    if await hn '^(net: gw|QOMVM-NET-FAILED|hotnic: no)' 300; then
        qmp qmp.sock '{"execute": "device_del", "arguments": {"id": "net1"}}' | sed 's/^/host: del: /'
        if await hn '^hotnic: .* (gone|still there)' 400; then
            i=0
            until qmp qmp.sock '{"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}' \
                    | grep -qv '"net1"' || [ $i -gt 100 ]; do
                sleep 0.1
                i=$((i + 1))
            done
            qmp qmp.sock '{"execute": "netdev_del", "arguments": {"id": "hostnet1"}}' | sed 's/^/host: after: /'
        fi
    fi
    qmp qmp.sock '{"execute": "quit"}' >/dev/null
fi
finish hn
"#,
        1500,
    ) else {
        return;
    };
    assert_eq!(
        out.matches(r#"host: add: {"return":{}}"#).count(),
        2,
        "netdev_add and device_add:\n{out}"
    );
    assert!(
        out.contains("hn: net: eth0 10.0.2.15/24 52:54:00:aa:bb:01"),
        "no DHCP lease:\n{out}"
    );
    assert!(out.contains(r#"host: del: {"return":{}}"#), "{out}");
    assert!(out.contains("hn: hotnic: eth0 gone"), "{out}");
    assert!(
        out.contains(r#"host: after: {"return":{}}"#),
        "netdev_del after the NIC went:\n{out}"
    );
    assert!(out.contains("host: hn: vmm exit status 0"), "{out}");
}

/// A guest agent's channel as libvirt makes it (`virtio-serial-pci`, a `virtserialport`
/// named `org.qemu.guest_agent.0` over a socket chardev): the guest finds the port by its
/// name and writes to it, the host reads that from the socket and answers, the guest reads
/// the answer; QMP's `VSERPORT_CHANGE` reports the guest opening the port.
#[test]
fn a_guest_talks_to_the_host_over_a_virtio_serial_port() {
    let Some(out) = net_scenario(
        "vport",
        r#"
boot vp "qomvm.vport=org.qemu.guest_agent.0" \
    -device virtio-serial-pci,id=virtio-serial0 \
    -chardev "socket,id=charchannel0,path=$PWD/agent.sock,server=on,wait=off" \
    -device virtserialport,bus=virtio-serial0.0,nr=1,chardev=charchannel0,id=channel0,name=org.qemu.guest_agent.0 \
    -qmp "unix:$PWD/qmp.sock,server=on,wait=off"
"$PY" - "$PWD/agent.sock" "$PWD/qmp.sock" <<'PYEOF' | sed 's/^/host: /'
import json, socket, sys, time
# On the monitor before the guest is up: events are not kept for later clients.
deadline = time.time() + 60
while True:
    try:
        qmp = socket.socket(socket.AF_UNIX)
        qmp.connect(sys.argv[2])
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.05)
qmp.settimeout(300)
q = qmp.makefile("rw")
q.readline()
q.write('{"execute": "qmp_capabilities"}\n')
q.flush()
q.readline()
def port_event():
    while True:
        m = json.loads(q.readline())
        if m.get("event") == "VSERPORT_CHANGE":
            return json.dumps(m["data"], sort_keys=True)
# The guest opens the port, then writes to it (which waits for this side).
print("event: " + port_event())
agent = socket.socket(socket.AF_UNIX)
agent.connect(sys.argv[1])
agent.settimeout(120)
f = agent.makefile("rwb")
print("agent read: " + f.readline().decode().strip())
f.write(b"HOST-ANSWER\n")
f.flush()
print("event: " + port_event())
PYEOF
finish vp
"#,
        700,
    ) else {
        return;
    };
    assert!(
        out.contains("host: agent read: QOMVM-VPORT-HELLO"),
        "the guest's line on the socket:\n{out}"
    );
    assert!(
        out.contains("vp: vport: got HOST-ANSWER"),
        "the host's line in the guest:\n{out}"
    );
    let events: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("host: event: "))
        .collect();
    assert_eq!(
        events,
        [
            r#"{"id": "channel0", "open": true}"#,
            r#"{"id": "channel0", "open": false}"#
        ],
        "VSERPORT_CHANGE as the guest opens and closes the port:\n{out}"
    );
    assert!(out.contains("host: vp: vmm exit status 0"), "{out}");
}
