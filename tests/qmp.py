#!/usr/bin/env python3
"""Drives qomvm's QMP server with QEMU's own client library (PyPI `qemu.qmp`).

Usage: tests/qmp.py QOMVM_BINARY

Starts `QOMVM -M none -accel qtest -qmp unix:SOCK,server=on,wait=off`, then, through
`qemu.qmp.QMPClient`: negotiation (the client enables `oob` as it does with QEMU),
qom-list /machine, qom-get of a `type`, query-status, stop/cont with their events, an
error reply, an HMP command, and quit (the process must exit with status 0).
Exit status 0 means every check passed; tests/qmp.rs runs this script.
"""

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile

from qemu.qmp import ExecuteError, QMPClient


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def run(binary, sock):
    qmp = QMPClient("qomvm-test")
    for _ in range(200):
        if os.path.exists(sock):
            break
        await asyncio.sleep(0.05)
    await qmp.connect(sock)
    version = qmp.greeting.QMP.version
    check(version["package"].startswith("qomvm "), f"greeting package: {version}")
    check(version["qemu"]["major"] >= 4, f"greeting QEMU interface level: {version}")
    check("oob" in qmp.greeting.QMP.capabilities, "greeting offers oob")

    props = await qmp.execute("qom-list", {"path": "/machine"})
    names = {p["name"]: p["type"] for p in props}
    check(names.get("type") == "str", f"qom-list /machine has 'type': {names}")
    check(names.get("unattached") == "child<container>", f"qom-list children: {names}")

    check(
        await qmp.execute("qom-get", {"path": "/machine", "property": "type"}) == "none-machine",
        "qom-get /machine type",
    )
    check(
        await qmp.execute("qom-get", {"path": "/machine/unattached", "property": "type"})
        == "container",
        "qom-get /machine/unattached type",
    )

    status = await qmp.execute("query-status")
    check(status == {"status": "running", "singlestep": False, "running": True}, f"query-status {status}")

    with qmp.listener(("STOP", "RESUME")) as listener:
        check(await qmp.execute("stop") == {}, "stop returns {}")
        event = await asyncio.wait_for(listener.get(), 5)
        check(event["event"] == "STOP", f"STOP event: {event}")
        check("seconds" in event["timestamp"], "events carry a timestamp")
        status = await qmp.execute("query-status")
        check(status["status"] == "paused" and not status["running"], f"paused: {status}")

        check(await qmp.execute("cont") == {}, "cont returns {}")
        event = await asyncio.wait_for(listener.get(), 5)
        check(event["event"] == "RESUME", f"RESUME event: {event}")
        status = await qmp.execute("query-status")
        check(status["status"] == "running" and status["running"], f"running: {status}")

    try:
        await qmp.execute("no-such-command")
        check(False, "an unknown command fails")
    except ExecuteError as err:
        check(err.error_class == "CommandNotFound", f"error class {err.error_class}")

    out = await qmp.execute("human-monitor-command", {"command-line": "info status"})
    check(out == "VM status: running\r\n", f"HMP info status: {out!r}")

    # Descriptors passed with SCM_RIGHTS: add-fd puts one in a set (the lowest free, or
    # the one named), query-fdsets lists it, remove-fd closes it; getfd names one.
    async def fails(cmd, args, desc):
        try:
            await qmp.execute(cmd, args)
            check(False, f"{cmd} {args} fails")
        except ExecuteError as err:
            check(str(err) == desc, f"{cmd} {args}: {str(err)!r}")

    await fails("add-fd", {}, "No file descriptor supplied via SCM_RIGHTS")
    with open(os.devnull, "rb") as f:
        qmp.send_fd_scm(f.fileno())
        added = await qmp.execute("add-fd", {"opaque": "rdonly:/dev/null"})
        check(added["fdset-id"] == 0 and added["fd"] > 2, f"add-fd: {added}")
        qmp.send_fd_scm(f.fileno())
        named = await qmp.execute("add-fd", {"fdset-id": 7})
        check(named["fdset-id"] == 7, f"add-fd fdset-id 7: {named}")
        qmp.send_fd_scm(f.fileno())
        await fails("add-fd", {"fdset-id": -1}, "Parameter 'fdset-id' expects a non-negative value")
        sets = await qmp.execute("query-fdsets")
        check(
            sets == [
                {"fdset-id": 0, "fds": [{"fd": added["fd"], "opaque": "rdonly:/dev/null"}]},
                {"fdset-id": 7, "fds": [{"fd": named["fd"]}]},
            ],
            f"query-fdsets: {sets}",
        )
        check(await qmp.execute("remove-fd", {"fdset-id": 0, "fd": added["fd"]}) == {}, "remove-fd")
        await fails("remove-fd", {"fdset-id": 0}, "File descriptor named 'fdset-id:0' not found")
        await fails(
            "remove-fd", {"fdset-id": 7, "fd": 999}, "File descriptor named 'fdset-id:7, fd:999' not found"
        )
        check(await qmp.execute("remove-fd", {"fdset-id": 7}) == {}, "remove-fd of a whole set")
        check(await qmp.execute("query-fdsets") == [], "no sets left")
        qmp.send_fd_scm(f.fileno())
        check(await qmp.execute("getfd", {"fdname": "null"}) == {}, "getfd")
        check(await qmp.execute("closefd", {"fdname": "null"}) == {}, "closefd")

    check(await qmp.execute("quit") == {}, "quit returns {}")
    try:
        await qmp.disconnect()
    except EOFError:
        # The server closed the stream as it exited; QEMU's own test harness
        # (qemu.machine) expects this after 'quit' too.
        pass


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    binary = sys.argv[1]
    tmp = tempfile.mkdtemp(prefix="qomvm-qmp-")
    sock = os.path.join(tmp, "qmp.sock")
    proc = subprocess.Popen(
        [binary, "-M", "none", "-accel", "qtest", "-qmp", f"unix:{sock},server=on,wait=off"],
        env=dict(os.environ, RUST_LOG="off"),
    )
    try:
        asyncio.run(asyncio.wait_for(run(binary, sock), 60))
        status = proc.wait(timeout=10)
        check(status == 0, f"qomvm exit status after quit: {status}")
        check(not os.path.exists(sock), "the socket is removed at exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print("qmp.py: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
