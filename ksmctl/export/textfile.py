"""node_exporter's textfile collector output: the tick's metrics, written atomically.

Only ksmctl's own families go there, never process_*: node_exporter exports its own
process metrics, and a second set in a textfile would clash with them."""
from __future__ import annotations

from typing import Optional

from ksmctl.fsutil import atomic_write


def write_textfile(path: str, body: bytes) -> Optional[str]:
    """Replace `path` with body (a rename: node_exporter never reads half a file). Returns
    what went wrong, for the caller to log and count, or None."""
    try:
        atomic_write(path, body)
    except OSError as e:
        return "cannot write textfile %s: %s" % (path, e.strerror or e)
    return None
