"""Optional features and the extras that bring their dependencies.

numpy and xxhash (the estimator) and bcrypt (the exporter's basic auth) are heavy and
only needed when the feature is on, so they are extras of the wheel
(`pip install 'ksmctl[estimate,auth]'`) and are imported only where the feature runs;
the Debian package carries them all. A feature switched on without its extra fails with
a message that names the extra, at start (exit 2), not later in a thread.
"""
from __future__ import annotations

import importlib
from typing import Dict, Tuple

from .errors import UsageError

EXTRAS: Dict[str, Tuple[str, ...]] = {
    "estimate": ("numpy", "xxhash"),
    "auth": ("bcrypt",),
}


def require(extra: str, what: str) -> None:
    """Import the extra's modules, or raise UsageError saying how to get them."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise UsageError("%s: %s is installed but cannot be imported: %s" % (what, module, e))
            missing.append(module)
        except ImportError as e:   # installed, but it would not load (e.g. a sandbox denies it)
            raise UsageError("%s: %s is installed but cannot be imported: %s" % (what, module, e))
    if missing:
        raise UsageError("%s needs %s, which %s not installed: pip install 'ksmctl[%s]' "
                         "(the Debian package includes it)"
                         % (what, " and ".join(missing), "is" if len(missing) == 1 else "are", extra))
