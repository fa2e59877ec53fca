"""The per-VM collector the daemon calls each tick, and the per-VM signals policies use.

`VmCollector` reads libvirt when it can and scans /proc for QEMU processes when it cannot,
so the daemon never stops on a libvirt problem. `vm_signals` turns the readings into the
numbers ksmtuned guesses with `ps` (memory committed to guests against the host's), and
`vm_savings` attributes the host's KSM saving to each guest.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ksmctl.errors import ErrorSource
from ksmctl.readings import KsmState, VmReading, VmSource
from ksmctl.collectors.vms.libvirt import LibvirtCollector
from ksmctl.collectors.procfs import ProcFs

NO_LIBVIRT_URIS = ("", "none", "off")


class VmCollector:
    """Per-VM readings for one tick; libvirt first, /proc discovery as the fallback.

    uri None/"" /"none" means: never try libvirt (a plain QEMU host)."""

    def __init__(self, uri: Optional[str] = "qemu:///system", proc: Optional[ProcFs] = None,
                 run_root: str = "/run", libvirt_module: Any = None,
                 clock: Callable[[], float] = time.monotonic, events: bool = True,
                 backoff_initial: float = 1.0, backoff_max: float = 60.0) -> None:
        if uri is not None and uri.strip().lower() in NO_LIBVIRT_URIS:
            uri = None
        self._impl = LibvirtCollector(
            uri=uri, proc=proc if proc is not None else ProcFs(), run_root=run_root,
            libvirt_module=libvirt_module, clock=clock, events=events,
            backoff_initial=backoff_initial, backoff_max=backoff_max)

    def collect(self) -> Tuple[VmReading, ...]:
        return self._impl.collect()

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from libvirt's event thread) when a domain starts, stops or
        the connection closes, so the daemon can tick at once instead of at its interval."""
        self._impl.on_change = callback

    @property
    def source(self) -> Optional[VmSource]:
        """Where the last collect()'s data came from (None before the first)."""
        return self._impl.source

    @property
    def errors(self) -> List[Tuple[ErrorSource, str]]:
        """(source, message) of this tick's problems (per domain; libvirt unavailable
        while configured), for Readings.errors."""
        return list(self._impl.errors)

    @property
    def last_error(self) -> Optional[str]:
        """Why libvirt is not the source (when it is not)."""
        return self._impl.last_error

    @property
    def changed(self) -> threading.Event:
        """Set when libvirt reports a domain started/stopped or the connection closed."""
        return self._impl.changed

    def close(self) -> None:
        self._impl.close()


def vm_savings(vms: Sequence[VmReading], ksm: Optional[KsmState],
               page_size: int = 4096) -> Dict[str, Dict[str, Optional[float]]]:
    """Per-VM saving attributed from the host's: {uuid: {saved_bytes, share}}.

    A KSM page mapped by k processes saves k-1 pages, but each of the k counts it in its
    ksm_merging_pages; so the sum over processes of merging pages is pages_sharing +
    pages_shared. Each merging page is credited pages_sharing/(pages_sharing+pages_shared)
    of a page, and each KSM zero page one page: summed over all processes this is the
    host's saving exactly, and over guests it is that minus what merged outside guests.
    share is saved_bytes over the host's saving."""
    if ksm is not None:
        page_size = ksm.page_size or page_size
        sharing = ksm.get("pages_sharing", 0) or 0
        shared = ksm.get("pages_shared", 0) or 0
        fraction = sharing / (sharing + shared) if sharing + shared else 0.0
        host_saved = ksm.saved_bytes
    else:
        fraction, host_saved = None, None
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for vm in vms:
        saved: Optional[float] = None
        if vm.ksm is not None and vm.ksm.merging_pages is not None and fraction is not None:
            saved = (vm.ksm.merging_pages * fraction + (vm.ksm.zero_pages or 0)) * page_size
        elif vm.ksm is not None and vm.ksm.merging_pages == 0:
            saved = 0.0
        share = saved / host_saved if saved is not None and host_saved else None
        out[vm.uuid] = {"saved_bytes": saved, "share": share}
    return out
