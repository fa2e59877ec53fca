"""pytest fixtures of the libvirt + QEMU lab (enable with pytest_plugins = ["tests.lab.fixtures"]).

The guests boot once per session: software-emulated boots cost tens of seconds."""
from __future__ import annotations

from typing import Iterator, List

import pytest

from tests.support import need, need_root, need_tool

from .lab import Guest, Lab


def _need_lab() -> None:
    need_root()
    for tool in ("libvirtd", "virtlogd", "qemu-system-x86_64", "busybox", "cpio"):
        need_tool(tool)
    try:
        import libvirt  # noqa: F401
    except ImportError:
        need(False, "libvirt-python is not installed (pip install libvirt-python)")


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """virtlogd + libvirtd running (reused when already up); torn down by pid if ours."""
    _need_lab()
    lab = Lab()
    try:
        lab.start_daemons()
        lab.prepare_guest_files()
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="session")
def lab_guests(lab: Lab) -> List[Guest]:
    """Three guests sharing most of their written content, plus one with nosharepages;
    all have finished writing their memory (READY marker on the serial console)."""
    guests = [lab.start_guest() for _ in range(3)] + [lab.start_guest(nosharepages=True)]
    lab.wait_ready(guests)
    return guests
