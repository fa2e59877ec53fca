"""Sizes, percentages and durations as people write them in YAML and on the command line."""
from __future__ import annotations

import re
from typing import Union

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|[KMGT]|B)?\s*$", re.IGNORECASE)
_MULT = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024 ** 2, "mb": 1000 ** 2,
         "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3,
         "t": 1024 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DUR_MULT = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}

SIZE_HELP = "a size in bytes, or with a unit: 512MiB, 2GiB, 2048KiB (K/M/G/T = powers of 1024)"
DURATION_HELP = "seconds, or with a unit: 500ms, 10s, 5m, 1h"


def parse_size(value: Union[str, int, float]) -> int:
    """Bytes from '2GiB', '512M', '4096' or a number. Raises ValueError with what is allowed."""
    if isinstance(value, bool):
        raise ValueError("expected %s, found %r" % (SIZE_HELP, value))
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a size cannot be negative (%r)" % value)
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError("expected %s, found %r" % (SIZE_HELP, value))
    return int(float(m.group(1)) * _MULT[(m.group(2) or "").lower()])


def parse_duration(value: Union[str, int, float]) -> float:
    """Seconds from '10s', '500ms', '5m' or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected %s, found %r" % (DURATION_HELP, value))
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative (%r)" % value)
        return float(value)
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ValueError("expected %s, found %r" % (DURATION_HELP, value))
    return float(m.group(1)) * _DUR_MULT[m.group(2) or ""]


def format_bytes(n: float) -> str:
    """Human size with binary units: 3.2 GiB, 512.0 MiB, -12.0 MiB."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return "%s%s %s" % (sign, ("%d" % n) if unit == "B" else ("%.1f" % n), unit)
        n /= 1024
    raise AssertionError("unreachable")
