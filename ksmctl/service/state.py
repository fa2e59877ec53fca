"""The daemon's state file (/run/ksmctl/state.json): what the CLI shows about a running
daemon. Written atomically (temp file + rename) so a reader never sees half a file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from ksmctl.fsutil import atomic_write


def write_state(path: str, state: Dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(state, separators=(",", ":"), default=str).encode())


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except PermissionError:
        return True
    except (OSError, ValueError, TypeError):
        return False


def read_state(path: str, require_alive: bool = True) -> Optional[Dict[str, Any]]:
    """The daemon's last state, or None when there is no file, it is unreadable, or the
    daemon that wrote it is gone (a stale file after a crash is not a running daemon)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if require_alive and not _alive(data.get("pid")):
        return None
    return data
