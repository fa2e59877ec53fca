"""Add rows to the knob table for one test: what a new kernel attribute would be."""
from __future__ import annotations

import contextlib
from typing import Iterator

from ksmctl.kernel import knobs
from ksmctl.kernel.knobs import Knob


@contextlib.contextmanager
def added_knobs(*extra: Knob) -> Iterator[None]:
    """KNOBS (and its index BY_NAME) with `extra` appended, restored afterwards. Every
    consumer reads the table at call time, so this is the only place a test patches."""
    saved = knobs.KNOBS, knobs.BY_NAME
    knobs.KNOBS = saved[0] + tuple(extra)
    knobs.BY_NAME = {k.name: k for k in knobs.KNOBS}
    try:
        yield
    finally:
        knobs.KNOBS, knobs.BY_NAME = saved
