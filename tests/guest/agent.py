#!/usr/bin/python3
"""ksmlab-agent: runs the test host's commands inside the systemd guest.

The host (tests/guest/vm.py) talks to it over a virtio-serial port named ksmlab.agent:
one JSON object per line each way. A request {"id": N, "argv": [...], "timeout": S,
"input": TEXT} gets {"id": N, "rc": RC, "out": STDOUT, "err": STDERR}; {"id": N} alone
is a ping. The guest has no network: this port is its only link to the host, apart from
a read-only 9p share of the host's files. Installed and enabled by build-image.sh.
"""
import json
import os
import subprocess
import sys
import time

PORT_NAME = "ksmlab.agent"


def find_port():
    base = "/sys/class/virtio-ports"
    while True:
        try:
            for d in os.listdir(base):
                with open(os.path.join(base, d, "name")) as f:
                    if f.read().strip() == PORT_NAME:
                        return "/dev/" + d
        except OSError:
            pass
        time.sleep(0.2)


def handle(req):
    rid = req.get("id")
    argv = req.get("argv")
    if not argv:
        return {"id": rid, "rc": 0, "out": "pong", "err": ""}
    try:
        p = subprocess.run(argv, input=req.get("input", "").encode(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=req.get("timeout", 120),
                           start_new_session=True, env=dict(os.environ, **req.get("env", {})))
        return {"id": rid, "rc": p.returncode, "out": p.stdout.decode("utf-8", "replace"),
                "err": p.stderr.decode("utf-8", "replace")}
    except subprocess.TimeoutExpired as e:
        return {"id": rid, "rc": -1, "out": (e.stdout or b"").decode("utf-8", "replace"),
                "err": "ksmlab-agent: timed out after %ss\n" % req.get("timeout")}
    except OSError as e:
        return {"id": rid, "rc": 127, "out": "", "err": "ksmlab-agent: %s\n" % e}


def main():
    path = find_port()
    fd = os.open(path, os.O_RDWR)
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:          # the host side is not connected (yet, or any more)
            time.sleep(0.1)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                req = json.loads(line)
            except ValueError:
                continue
            out = (json.dumps(handle(req)) + "\n").encode()
            while out:
                n = os.write(fd, out)
                out = out[n:]


if __name__ == "__main__":
    sys.exit(main())
