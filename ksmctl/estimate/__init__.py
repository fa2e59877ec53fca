"""The dedup-potential estimator (`ksmctl estimate`, the daemon's periodic estimate).

This package's __init__ runs before any of its submodules, so it is where
OPENBLAS_NUM_THREADS has to be set: OpenBLAS reads it once, when numpy is first
imported, and numpy is imported only from here (count.py, scan.py). No BLAS routine is
used; without the variable OpenBLAS starts a spinning thread per core. setdefault: an
operator's own value wins.

The public names are loaded on first use (PEP 562), so `import ksmctl.estimate` (which
`ksmctl.estimate.schedule` and the CLI trigger) does not pull in numpy.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Dict

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_LAZY: Dict[str, str] = {
    "Estimator": "scan",
    "EstimateResult": "result", "TargetEstimate": "result", "Skipped": "result",
    "Progress": "result", "zero_saving": "result",
    "Target": "discover", "TargetKind": "discover", "resolve_targets": "discover",
    "discover_mergeable": "discover", "find_qemu_guests": "discover",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    return getattr(importlib.import_module("%s.%s" % (__name__, module)), name)
