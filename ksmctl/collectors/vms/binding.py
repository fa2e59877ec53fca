"""libvirt-python as ksmctl uses it: errors as one-line messages, and the one event loop.

Apart from the collector so that it reads as what it does per tick; nothing here knows
about domains.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional, Set

from ksmctl.errors import KsmctlError

log = logging.getLogger("ksmctl.vms")


class LibvirtUnavailable(KsmctlError):
    """libvirt could not be used this tick (connect or a connection-wide call failed)."""


def libvirt_message(e: BaseException, what: str) -> str:
    """A libvirtError as one line, without libvirt's 'libvirt: XML-RPC error :' noise."""
    get = getattr(e, "get_error_message", None)
    msg = get() if get else None
    return "%s: %s" % (what, (msg or str(e) or type(e).__name__).strip())


def error_code(e: BaseException) -> Optional[int]:
    get = getattr(e, "get_error_code", None)
    return get() if get else None


# libvirt allows exactly one event loop implementation per process, registered before the
# connections that use it; it is process state by nature, hence this module-level guard.
_event_lock = threading.Lock()
_event_loop_modules: Set[int] = set()


def start_event_loop(lv: Any) -> bool:
    """Register libvirt's default event loop and run it in a daemon thread (once).

    With it, libvirt notices a closed connection at once (close callback, keepalive)
    and delivers domain lifecycle events; without it, a failed call is the signal."""
    with _event_lock:
        if id(lv) in _event_loop_modules:
            return True
        register = getattr(lv, "virEventRegisterDefaultImpl", None)
        run = getattr(lv, "virEventRunDefaultImpl", None)
        if register is None or run is None:
            return False
        try:
            register()
        except Exception as e:  # noqa: BLE001 - a binding without event support
            log.debug("libvirt event loop unavailable: %s", e)
            return False

        def loop() -> None:
            while True:
                try:
                    run()
                except Exception:  # noqa: BLE001 - keep the loop alive; libvirt logs
                    time.sleep(0.5)

        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _event_loop_modules.add(id(lv))
        return True


def quiet_errors(lv: Any) -> None:
    """libvirt-python prints every error to stderr by default; ours become messages."""
    try:
        lv.registerErrorHandler(lambda _ctx, _err: None, None)
    except Exception:  # noqa: BLE001
        pass
