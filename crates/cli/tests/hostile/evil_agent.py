# A hostile agent inside a sandbox (crates/cli/tests/daemon_hostile.rs): root in the guest
# takes the real agent's own port to the host (pidfd_getfd on PID 1's descriptor; no test code
# in the agent) and writes what a hostile agent would, in the protocol's framing
# (docs/PROTOCOL.md). It never reads, so the real agent keeps answering the host.
#   python3 evil_agent.py CASE
import ctypes
import os
import struct
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
SYS_pidfd_open, SYS_pidfd_getfd = 434, 438
MAX_FRAME_LEN = 5 + 128 * 1024
DATA, MSG, EOF, WINDOW, RESET, OPEN = 5, 4, 6, 7, 8, 3


def port():
    pidfd = libc.syscall(SYS_pidfd_open, 1, 0)
    if pidfd < 0:
        sys.exit("pidfd_open: errno %d" % ctypes.get_errno())
    for name in os.listdir("/proc/1/fd"):
        try:
            target = os.readlink("/proc/1/fd/" + name)
        except OSError:
            continue
        if "vport" in target:
            fd = libc.syscall(SYS_pidfd_getfd, pidfd, int(name), 0)
            if fd < 0:
                sys.exit("pidfd_getfd: errno %d" % ctypes.get_errno())
            return fd
    sys.exit("the agent has no virtio port open")


def frame(stream, kind, payload=b""):
    return struct.pack("<IIB", 5 + len(payload), stream, kind) + payload


def write(fd, data):
    while data:
        data = data[os.write(fd, data):]


def main():
    case = sys.argv[1]
    fd = port()
    if case == "oversized":
        # A length past the limit: the host must refuse it before buffering.
        write(fd, struct.pack("<IIB", 0xFFFFFFFF, 1, DATA))
    elif case == "short":
        # A length shorter than the header it is in.
        write(fd, struct.pack("<IIB", 2, 1, DATA))
    elif case == "unknown-kind":
        write(fd, struct.pack("<IIB", 5, 0, 0xEE))
    elif case == "drip":
        # A frame that claims 128 KiB and arrives a byte at a time: the real agent's frames
        # land inside it, so the framing breaks.
        write(fd, struct.pack("<IIB", MAX_FRAME_LEN, 1, DATA))
        for _ in range(50):
            write(fd, b"x")
            time.sleep(0.05)
    elif case == "noise":
        # Frames that keep the framing but break the rules: data, messages, EOFs and resets on
        # streams the host never opened, garbage and unknown messages, a WINDOW of the wrong
        # size and a huge one, streams the guest opens (even ids) and never closes, 8 MiB of
        # data flooded onto a stream nobody reads.
        out = []
        for sid in range(1001, 1201, 2):
            out.append(frame(sid, DATA, b"\x01" + b"x" * 100))
            out.append(frame(sid, MSG, b'{"type":"launch_missiles"}'))
            out.append(frame(sid, MSG, b"{not json"))
            out.append(frame(sid, EOF, b"\x01"))
            out.append(frame(sid, RESET, b"\xff" * 2000))
        out.append(frame(1, WINDOW, b"\x01"))
        out.append(frame(1, WINDOW, struct.pack("<I", 0xFFFFFFFF)))
        for sid in range(2, 2 + 2 * 5000, 2):
            out.append(frame(100000 + sid, OPEN, b'{"op":"stat","path":"/"}'))
        write(fd, b"".join(out))
        chunk = frame(4242, DATA, b"\x01" + b"z" * 65536)
        for _ in range(128):
            write(fd, chunk)
    else:
        sys.exit("unknown case " + case)


main()
