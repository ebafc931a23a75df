#!/usr/bin/env python3
"""A Linux guest's text console seen and typed into over VNC (issue 17).

Usage: tests/vnc_guest.py OUTDIR VNC-DISPLAY QOMVM-ARGS...

Boots the test guest (`$QOMVM_BIN`, kernel and initramfs from `$QOMVM_ASSETS`) with
QOMVM-ARGS (the display device) and `-vnc 127.0.0.1:VNC-DISPLAY` unless QOMVM-ARGS has
its own `-vnc`, and no `console=` argument: the kernel's console is the VGA text screen
and /init runs its interactive shell there (`qomvm.shell=1`). Then:

1. waits (reading the VGA text buffer with QMP `pmemsave`) for the shell's prompt;
2. takes `OUTDIR/boot.jpg` with Debian's `vncsnapshot` (a real VNC client) and
   `OUTDIR/boot.ppm` with QMP `screendump`;
3. types `echo VNC-$((6*7))-KEYS` and Return as a VNC client does (RFB KeyEvents, Shift
   pressed around shifted characters), waits for the shell's answer `VNC-42-KEYS` in the
   text buffer, and takes `OUTDIR/keys.jpg` and `OUTDIR/keys.ppm`;
4. types `exit`: the guest powers off and qomvm must exit with status 0.

Prints `vnc-guest: ...` progress lines and `VNC-GUEST-OK` at the end; the caller reads
the pictures outside the rig. Exit status 0 means every step worked.
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

# X11 keysyms: ASCII maps to itself; these need Shift on a US keyboard.
SHIFTED = set('~!@#$%^&*()_+{}|:"<>?') | set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
XK_SHIFT_L = 0xFFE1
XK_RETURN = 0xFF0D

# The guest boots at TCG speed inside the rig: generous limits.
BOOT_LIMIT_S = 240
STEP_LIMIT_S = 60


def say(msg):
    print(f"vnc-guest: {msg}", flush=True)


class Qmp:
    def __init__(self, path, proc):
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"vnc-guest: no QMP socket at {path}")
                time.sleep(0.1)
        self.file = self.sock.makefile("rw")
        self.reply()
        self.cmd("qmp_capabilities")

    def reply(self):
        while True:
            line = self.file.readline()
            if not line:
                raise SystemExit("vnc-guest: QMP closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name, **args):
        self.file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.file.flush()
        msg = self.reply()
        if "error" in msg:
            raise SystemExit(f"vnc-guest: {name}: {msg['error']}")
        return msg["return"]


def text_buffer(qmp, scratch):
    """The characters of the VGA text memory (0xb8000, 32 KiB: vgacon scrolls through it
    by moving the start address, so the screen can be anywhere in it), one row of 80 per
    line."""
    path = os.path.join(scratch, "textbuf.bin")
    qmp.cmd("pmemsave", val=0xB8000, size=0x8000, filename=path)
    with open(path, "rb") as f:
        cells = f.read()[0::2]
    chars = "".join(chr(c) if 0x20 <= c < 0x7F else " " for c in cells)
    return "\n".join(chars[i : i + 80].rstrip() for i in range(0, len(chars), 80))


def wait_for_text(qmp, scratch, proc, needle, limit_s):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vnc-guest: qomvm ended ({proc.returncode}) before '{needle}'")
        text = text_buffer(qmp, scratch)
        if needle in text:
            return text
        time.sleep(0.5)
    screen = "\n".join(l for l in text_buffer(qmp, scratch).splitlines() if l.strip())
    raise SystemExit(f"vnc-guest: no '{needle}' on the text screen after {limit_s} s:\n{screen}")


class RfbClient:
    """Just enough of RFB 3.8 to type: no security, shared, KeyEvents."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_LIMIT_S)
        version = self.recv(12)
        if not version.startswith(b"RFB 003."):
            raise SystemExit(f"vnc-guest: not an RFB server: {version!r}")
        self.sock.sendall(b"RFB 003.008\n")
        (count,) = self.recv(1)
        types = self.recv(count) if count else b""
        if 1 not in types:
            raise SystemExit(f"vnc-guest: security types {list(types)} lack None")
        self.sock.sendall(b"\x01")
        (result,) = struct.unpack(">I", self.recv(4))
        if result != 0:
            raise SystemExit(f"vnc-guest: security result {result}")
        self.sock.sendall(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", self.recv(4))
        self.recv(16)  # pixel format
        (name_len,) = struct.unpack(">I", self.recv(4))
        name = self.recv(name_len).decode(errors="replace")
        say(f"RFB client: {width}x{height} '{name}'")

    def recv(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise SystemExit("vnc-guest: the VNC server closed the connection")
            data += chunk
        return data

    def key(self, keysym, down):
        self.sock.sendall(struct.pack(">BBxxI", 4, 1 if down else 0, keysym))

    def tap(self, keysym):
        self.key(keysym, True)
        self.key(keysym, False)
        # The guest reads keys at TCG speed in the rig: do not outrun its i8042 buffer.
        time.sleep(0.05)

    def type_line(self, line):
        for ch in line:
            shifted = ch in SHIFTED
            if shifted:
                self.key(XK_SHIFT_L, True)
            self.tap(ord(ch))
            if shifted:
                self.key(XK_SHIFT_L, False)
        self.tap(XK_RETURN)


def snapshot(qmp, outdir, name, display):
    jpg = os.path.join(outdir, name + ".jpg")
    ppm = os.path.join(outdir, name + ".ppm")
    run = subprocess.run(
        ["vncsnapshot", "-quiet", f"127.0.0.1:{display}", jpg],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=STEP_LIMIT_S,
    )
    if run.returncode != 0:
        raise SystemExit(f"vnc-guest: vncsnapshot failed: {run.stdout.decode(errors='replace')}")
    qmp.cmd("screendump", filename=ppm)
    say(f"{name}: {jpg} ({os.path.getsize(jpg)} bytes), {ppm}")


def main():
    outdir, display, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    os.makedirs(outdir, exist_ok=True)
    # The rig's L1 starts with its loopback down; the VNC clients connect over it.
    subprocess.run(["ip", "link", "set", "lo", "up"], stderr=subprocess.DEVNULL, check=False)
    binary = os.environ["QOMVM_BIN"]
    assets = os.environ["QOMVM_ASSETS"]
    # Unix sockets cannot live on the rig's 9p share of OUTDIR: the socket and the text
    # memory dumps go to a local directory.
    scratch = tempfile.mkdtemp(prefix="qomvm-vnc-guest.")
    sock = os.path.join(scratch, "qmp.sock")
    vnc = [] if "-vnc" in extra else ["-vnc", f"127.0.0.1:{display}"]
    args = [binary, "-M", "pc", "-m", "256", "-smp", "1", "-no-reboot", *extra, *vnc,
            "-kernel", os.path.join(assets, "vmlinuz"),
            "-initrd", os.path.join(assets, "initramfs.cpio.gz"),
            "-append", "panic=-1 qomvm.shell=1",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    say("qomvm " + " ".join(args[1:]))
    log = open(os.path.join(outdir, "qomvm.log"), "wb")
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        qmp = Qmp(sock, proc)
        started = time.monotonic()
        wait_for_text(qmp, scratch, proc, "qomvm#", BOOT_LIMIT_S)
        say(f"shell prompt on the text screen after {time.monotonic() - started:.1f} s")
        snapshot(qmp, outdir, "boot", display)

        client = RfbClient(5900 + display)
        client.type_line("echo VNC-$((6*7))-KEYS")
        wait_for_text(qmp, scratch, proc, "\nVNC-42-KEYS", STEP_LIMIT_S)
        say("the shell answered the keys typed over VNC")
        snapshot(qmp, outdir, "keys", display)

        client.type_line("exit")
        status = proc.wait(timeout=STEP_LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)
        with open(os.path.join(outdir, "qomvm.log"), errors="replace") as f:
            for line in f.read().splitlines()[-20:]:
                print(f"qomvm: {line}")
    if status != 0:
        raise SystemExit(f"vnc-guest: qomvm exit status {status}")
    say("qomvm exit status 0")
    print("VNC-GUEST-OK")


if __name__ == "__main__":
    main()
