"""The guest harness connects to QEMU's agent socket only once QEMU listens on it.

A child process stands in for QEMU here (it binds, waits, then listens), because the gap
between bind and listen is too short to hit on purpose with QEMU itself.
"""
import subprocess
import sys
import time

import pytest

from tests.guest.vm import connect_when_listening

SERVER = r"""
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
time.sleep(float(sys.argv[2]))
s.listen(1)
c, _ = s.accept()
c.sendall(b"hello")
time.sleep(5)
"""


def test_connect_waits_for_listen_after_bind(tmp_path):
    path = tmp_path / "agent.sock"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(path), "1.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 10
        while not path.exists():               # bound, not yet listening: the gap CI hit
            assert time.monotonic() < end, "server never bound"
            time.sleep(0.01)
        sock = connect_when_listening(path, proc, timeout=10)
        sock.settimeout(5)
        assert sock.recv(5) == b"hello"
        sock.close()
    finally:
        proc.kill()
        proc.wait()


def test_connect_gives_up_with_the_childs_output_when_it_exits(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "print('no socket for you')"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with pytest.raises(RuntimeError, match="no socket for you"):
        connect_when_listening(tmp_path / "never.sock", proc, timeout=10)
