"""Per-VM readings from libvirt, tied to each guest's QEMU process and its ksm_stat.

One getAllDomainStats call lists every active domain with its state: every tick without
libvirt's lifecycle events; with them (the daemon's default) only after an event, and at
most relist_max_age apart, since a domain starts, stops, pauses or resumes only with an
event. Between listings a tick reuses the last listing's domain handles and states, which
at 2,000 domains saves about a third of the tick. Balloon statistics
cost libvirtd a QEMU monitor round trip per domain (about 2.5 ms each on the lab's guests,
against 0.06 ms for the state), so with libvirt's events they are fetched per domain only
when they can have changed: when the domain is first seen, on its balloon-change and
device events, when the guest's next statistics update is due (balloon.last-update plus the
stats period of its XML), and at most balloon_max_age apart. Without those events they are
fetched every tick, with the state.

The QEMU pid comes from libvirt's pid file and is trusted only when /proc/<pid>/cmdline is
a QEMU binary running that very guest, so a stale or reused pid is never credited with
another process's merging. When libvirt cannot be reached (no libvirtd, libvirtd
restarting, libvirt-python missing), QEMU processes are found by scanning /proc meanwhile,
and libvirt is retried with exponential backoff.
"""
from __future__ import annotations

import logging
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ksmctl.errors import ErrorSource
from ksmctl.readings import VmReading, VmSource, VmState
from ksmctl.collectors.pidfiles import Ident
from ksmctl.collectors.procfs import ProcFs, split_cmdline
from ksmctl.collectors.vms.binding import (LibvirtUnavailable, error_code, libvirt_message, quiet_errors,
                                           start_event_loop)
from ksmctl.collectors.vms.qemu import Derived, QemuArgs, QemuProcScanner, parse_qemu_cmdline

log = logging.getLogger("ksmctl.vms")

# virDomainState's numbers
STATES = {0: VmState.NOSTATE, 1: VmState.RUNNING, 2: VmState.BLOCKED, 3: VmState.PAUSED,
          4: VmState.SHUTDOWN, 5: VmState.SHUTOFF, 6: VmState.CRASHED, 7: VmState.PMSUSPENDED}
_STATS_STATE = 1       # VIR_DOMAIN_STATS_STATE
_STATS_BALLOON = 4     # VIR_DOMAIN_STATS_BALLOON
_STATS_ACTIVE = 1      # VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
_ERR_NO_DOMAIN = 42    # VIR_ERR_NO_DOMAIN
_STATS_NOWAIT = 1 << 29  # VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT: skip a domain whose job is busy
_EVENT_ID_LIFECYCLE = 0
# Events after which a domain's balloon figures are fetched again: current (balloon
# change), maximum (memory devices added or removed).
_BALLOON_CHANGE = ("VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE", 13)
_BALLOON_EVENTS = (_BALLOON_CHANGE, ("VIR_DOMAIN_EVENT_ID_DEVICE_ADDED", 19),
                   ("VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED", 15))
BALLOON_MAX_AGE = 60.0  # seconds: the longest a domain's balloon figures go unfetched
RELIST_MAX_AGE = 30.0   # seconds: the longest a listing is reused while lifecycle events arrive


_Listed = Tuple[Any, Dict[str, Any], str, str]  # a listed domain: handle, state record, UUID, name


class _Vanished(Exception):
    """The domain went away between the listing and reading it: skip it this tick."""


@dataclass
class _Known(Derived):
    """What is cached per domain UUID between ticks (and, from Derived, the parsed
    ksm_stat and the last VmReading)."""

    pid: Optional[int] = None
    xml_pid: Optional[int] = -1  # the pid the XML verdict was taken for (-1: none yet)
    xml_excluded: Optional[bool] = None
    had_pid: bool = False
    argv_raw: Optional[bytes] = None  # the verified command line, so a tick only compares
    args: Optional[QemuArgs] = None
    ident: Optional[Ident] = None  # the identity of its ksm_stat when verified (KeptFiles.read)
    stats_period: Optional[int] = None  # <memballoon><stats period='N'/> of the XML read at start
    params: Optional[Dict[str, Any]] = None  # the last state record, and the fields of it and balloon
    balloon: Optional[Dict[str, Any]] = None  # the last balloon record (None: never fetched)
    balloon_due: float = float("-inf")  # monotonic time at which it is fetched again
    fields: Dict[str, Any] = field(default_factory=dict)

    def set_balloon(self, params: Dict[str, Any], now: float, wall: float, max_age: float, spread: float) -> None:
        """Store a fetched balloon record and when to fetch the next: right after the
        guest's next statistics update when its XML has a stats period, else after
        max_age (times spread, 0.75 to 1, so that domains seen together are not fetched
        together)."""
        self.balloon = {k: v for k, v in params.items() if k.startswith("balloon.")}
        self.params = None  # the fields are built again from both records
        wait = max_age * spread
        last = self.balloon.get("balloon.last-update")
        if self.stats_period:
            # QEMU stamps the statistics with the host's wall clock; a second for them to
            # arrive. Not stamped yet (the guest is booting) or late: look again in a period.
            try:
                until = float(last) + self.stats_period + 1.0 - wall if last else 0.0
            except (TypeError, ValueError):  # not a timestamp: as if not stamped
                until = 0.0
            wait = min(wait, until if until > 0 else float(self.stats_period))
        self.balloon_due = now + wait


def _kib(params: Dict[str, Any], key: str) -> Optional[int]:
    v = params.get(key)
    return int(v) * 1024 if v is not None else None


def _params_fields(params: Dict[str, Any]) -> Dict[str, Any]:
    """The VmReading fields getAllDomainStats gives (rss is the caller's: statm)."""
    return dict(
        state=STATES.get(params.get("state.state", -1), VmState.UNKNOWN),
        balloon_current=_kib(params, "balloon.current"), balloon_maximum=_kib(params, "balloon.maximum"),
        guest_available=_kib(params, "balloon.available"), guest_usable=_kib(params, "balloon.usable"),
        guest_unused=_kib(params, "balloon.unused"), guest_swap_in=_kib(params, "balloon.swap_in"),
        guest_swap_out=_kib(params, "balloon.swap_out"),
        guest_major_faults=int(params["balloon.major_fault"]) if "balloon.major_fault" in params else None)


def nosharepages(xml: str) -> bool:
    return xml_facts(xml)[0]


def xml_facts(xml: str) -> Tuple[bool, Optional[int]]:
    """(<memoryBacking><nosharepages/> present, the balloon's statistics period in
    seconds or None) of a running domain's XML: neither changes while it runs, except the
    period by `virsh dommemstat --period`, which balloon_max_age bounds."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return False, None
    period: Optional[int] = None
    stats = root.find("./devices/memballoon/stats")
    if stats is not None:
        try:
            period = int(stats.get("period", ""))
        except ValueError:
            period = None
        if period is not None and period <= 0:  # 0 is libvirt's "off"; below it is not a period
            period = None
    return root.find("./memoryBacking/nosharepages") is not None, period


def _spread(uuid: str) -> float:
    """0.75 to 1, fixed per domain."""
    try:
        return 0.75 + 0.25 * int(uuid[:8], 16) / 0xFFFFFFFF
    except ValueError:
        return 1.0


class LibvirtCollector:
    """Active libvirt domains as VmReadings; /proc discovery while libvirt is unavailable.

    `.source` is where this tick's data came from after each collect(); `.errors` the
    (source, message) pairs of this tick's problems: per-domain ones, and libvirt being
    unavailable while it is configured (an outage is counted every tick it lasts);
    `.changed` is set by libvirt lifecycle and close events so a caller may tick early."""

    def __init__(self, uri: Optional[str] = "qemu:///system", proc: Optional[ProcFs] = None,
                 run_root: str = "/run", libvirt_module: Any = None,
                 clock: Callable[[], float] = time.monotonic, events: bool = True,
                 backoff_initial: float = 1.0, backoff_max: float = 60.0,
                 wall: Callable[[], float] = time.time, balloon_max_age: float = BALLOON_MAX_AGE,
                 relist_max_age: float = RELIST_MAX_AGE) -> None:
        self.uri = uri
        self.wall = wall
        self.balloon_max_age = balloon_max_age
        self.relist_max_age = relist_max_age
        self.proc = proc if proc is not None else ProcFs()
        self.pid_dir = Path(run_root) / "libvirt" / "qemu"
        self.clock = clock
        self.events = events
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.changed = threading.Event()
        self.on_change: Optional[Callable[[], None]] = None  # e.g. wake the daemon for a tick now
        self.source: Optional[VmSource] = None
        self.last_error: Optional[str] = None
        self.errors: List[Tuple[ErrorSource, str]] = []
        self._lv = libvirt_module
        self._no_module: Optional[str] = None if uri else "no libvirt URI configured"
        self._conn: Any = None
        self._broken = False
        self._callback_ids: List[int] = []
        self._backoff = backoff_initial
        self._next_try = float("-inf")
        self._known: Dict[str, _Known] = {}
        self._stale: Set[str] = set()
        self._balloon_events = False  # balloon-change events registered on this connection
        self._lifecycle_events = False  # lifecycle events registered on this connection
        self._listing: Optional[List[_Listed]] = None  # the last getAllDomainStats, per domain
        self._listed_at = float("-inf")
        self._relist = True  # a lifecycle event since the last listing
        self._balloon_marked: Set[str] = set()  # domains with a balloon or device event since
        self._lock = threading.Lock()
        self._scanner = QemuProcScanner(self.proc)
        self._files = self.proc.kept_files()
        self._reported: Set[Tuple[str, str]] = set()

    # ---- connection ------------------------------------------------------------------
    def _module(self) -> Any:
        if self._lv is None:
            import libvirt  # lazy: ksmctl runs on hosts without libvirt-python
            self._lv = libvirt
        return self._lv

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._broken

    def _connection(self) -> Any:
        if self._conn is not None and self._broken:
            self._disconnect("libvirtd closed the connection")
        if self._conn is not None:
            return self._conn
        if self._no_module is not None:
            self.last_error = self._no_module
            return None
        if self.clock() < self._next_try:
            return None
        try:
            lv = self._module()
        except ImportError:
            self._no_module = "libvirt-python is not installed"
            self.last_error = self._no_module
            return None
        quiet_errors(lv)
        if self.events:
            start_event_loop(lv)
        try:
            conn = lv.openReadOnly(self.uri)
            if conn is None:
                raise LibvirtUnavailable("openReadOnly returned nothing")
        except Exception as e:  # noqa: BLE001 - libvirtError, or anything a binding raises
            self._schedule_retry(libvirt_message(e, "cannot connect to libvirt at %s" % self.uri))
            return None
        self._conn = conn
        self._broken = False
        self._backoff = self.backoff_initial
        if self.events:
            self._register_callbacks(lv, conn)
        return conn

    def _register_callbacks(self, lv: Any, conn: Any) -> None:
        try:
            conn.registerCloseCallback(self._on_close, None)
        except Exception as e:  # noqa: BLE001 - a failed call will tell us instead
            log.debug("libvirt close callback not registered: %s", libvirt_message(e, str(self.uri)))
        try:
            cid = conn.domainEventRegisterAny(
                None, getattr(lv, "VIR_DOMAIN_EVENT_ID_LIFECYCLE", _EVENT_ID_LIFECYCLE),
                self._on_lifecycle, None)
            self._callback_ids.append(cid)
        except Exception as e:  # noqa: BLE001 - then new VMs show up at the next tick
            log.debug("libvirt lifecycle events not registered: %s", libvirt_message(e, str(self.uri)))
            return  # without lifecycle events, every tick lists, with balloon figures
        self._lifecycle_events = True
        for event in _BALLOON_EVENTS:
            const, number = event
            try:
                cid = conn.domainEventRegisterAny(None, getattr(lv, const, number), self._on_balloon, None)
            except Exception as e:  # noqa: BLE001 - an older libvirt: max age (or every tick) instead
                log.debug("libvirt %s not registered: %s", const, libvirt_message(e, str(self.uri)))
                continue
            self._callback_ids.append(cid)
            if event is _BALLOON_CHANGE:
                self._balloon_events = True

    def _on_close(self, _conn: Any, _reason: int, _opaque: Any) -> None:
        self._broken = True
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        if self.on_change is not None:
            self.on_change()

    def _on_lifecycle(self, _conn: Any, dom: Any, _event: int, _detail: int, _opaque: Any) -> None:
        try:
            uuid = dom.UUIDString()
        except Exception:  # noqa: BLE001
            return
        with self._lock:
            self._stale.add(uuid)
            self._relist = True
        self._notify()

    def _on_balloon(self, _conn: Any, dom: Any, *_args: Any) -> None:
        try:
            uuid = dom.UUIDString()
        except Exception:  # noqa: BLE001
            return
        with self._lock:
            self._balloon_marked.add(uuid)

    def _schedule_retry(self, message: str) -> None:
        self.last_error = message
        self._next_try = self.clock() + self._backoff
        log.debug("%s; next try in %.0fs", message, self._backoff)
        self._backoff = min(self._backoff * 2, self.backoff_max)

    def _disconnect(self, why: Optional[str] = None) -> None:
        conn, self._conn = self._conn, None
        ids, self._callback_ids = self._callback_ids, []
        self._broken = False
        self._balloon_events = self._lifecycle_events = False
        self._listing = None  # its handles are the old connection's
        for known in self._known.values():
            known.balloon_due = float("-inf")  # events may be missed meanwhile: fetch all again
        if conn is not None:
            for cid in ids:
                try:
                    conn.domainEventDeregisterAny(cid)
                except Exception:  # noqa: BLE001 - the connection may be dead already
                    pass
            try:
                conn.unregisterCloseCallback()
            except Exception:  # noqa: BLE001
                pass
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
        if why is not None:
            # Retry soon (first backoff step): libvirtd restarting is the common case.
            self._schedule_retry(why)

    def close(self) -> None:
        self._disconnect()
        self._scanner.close()
        for uuid in list(self._known):
            self._forget(uuid)

    def _forget(self, uuid: str) -> None:
        known = self._known.pop(uuid, None)
        if known is not None and known.pid is not None:
            self._files.release(known.pid)

    # ---- collecting ------------------------------------------------------------------
    def collect(self) -> Tuple[VmReading, ...]:
        self.errors = []
        self.changed.clear()
        conn = self._connection()
        if conn is not None:
            try:
                vms = self._collect_libvirt(conn)
            except LibvirtUnavailable as e:
                self._disconnect(e.message)
            else:
                self._set_source(VmSource.LIBVIRT)
                return vms
        if self._no_module is None:  # configured and importable, yet unusable: an outage
            self.errors.append((ErrorSource.LIBVIRT, self.last_error or "libvirt is unavailable"))
        vms = self._scanner.collect()
        self._set_source(VmSource.PROC)
        return vms

    def _set_source(self, source: VmSource) -> None:
        if source == self.source:
            return
        self.source = source
        if source is VmSource.LIBVIRT:
            self._scanner.close()  # its kept files are the fallback's, not needed meanwhile
            log.info("per-VM data from libvirt at %s", self.uri)
        elif self._no_module is not None:
            log.info("per-VM data from /proc (QEMU processes): %s", self._no_module)
        else:
            log.warning("per-VM data from /proc (QEMU processes) while libvirt is unavailable: %s;"
                        " retrying libvirt with backoff", self.last_error)

    def _collect_libvirt(self, conn: Any) -> Tuple[VmReading, ...]:
        lazy = self._balloon_events
        now = self.clock()
        with self._lock:
            relist, self._relist = self._relist, False
        if (relist or not self._lifecycle_events or self._listing is None
                or now - self._listed_at >= self.relist_max_age):
            # The flag was taken first: an event during the call lists again next tick.
            named = self._list(conn, lazy)
            self._listing, self._listed_at = named, now
            reused = False
        else:
            named, reused = self._listing, True
        with self._lock:
            stale, self._stale = self._stale, set()
            marked, self._balloon_marked = self._balloon_marked, set()
        for uuid in stale:
            self._forget(uuid)
        if lazy:
            self._fetch_balloons(conn, named, marked)
        out = []
        seen = set()
        for dom, params, uuid, name in named:
            try:
                reading = self._domain(dom, params, uuid, name, lazy)
            except _Vanished:
                if reused:  # gone before its event arrived: list again next tick
                    with self._lock:
                        self._relist = True
                continue
            if reading is not None:
                out.append(reading)
                seen.add(reading.uuid)
        for uuid in [u for u in self._known if u not in seen]:
            self._forget(uuid)  # keeps the cache (and kept files) bounded by the running domains
        return tuple(out)

    def _list(self, conn: Any, lazy: bool) -> List[_Listed]:
        """Every active domain: (handle, state record, UUID, name)."""
        lv = self._lv
        stats_flags = getattr(lv, "VIR_DOMAIN_STATS_STATE", _STATS_STATE)
        if not lazy:
            stats_flags |= getattr(lv, "VIR_DOMAIN_STATS_BALLOON", _STATS_BALLOON)
        try:
            records = conn.getAllDomainStats(
                stats_flags, getattr(lv, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE", _STATS_ACTIVE))
        except Exception as e:  # noqa: BLE001
            raise LibvirtUnavailable(libvirt_message(e, "libvirt %s: listing domains failed" % self.uri)) from None
        named = []
        for dom, params in records or ():
            try:
                named.append((dom, params, dom.UUIDString(), dom.name()))
            except Exception as e:  # noqa: BLE001 - both are local calls; a broken object
                if error_code(e) != _ERR_NO_DOMAIN:
                    self._note(ErrorSource.LIBVIRT, "?", libvirt_message(e, "libvirt %s: a domain" % self.uri))
        return named

    def _fetch_balloons(self, conn: Any, named: List[_Listed],
                        marked: Set[str]) -> None:
        """One domainListGetStats(BALLOON) for the domains whose figures are due: new ones,
        those with an event since, those whose guest has updated its statistics since or
        whose max age is up. A domain it leaves out (gone, or its job busy) stays due."""
        now = self.clock()
        due = []
        for dom, _params, uuid, _name in named:
            known = self._known.get(uuid)
            if known is None or uuid in marked or now >= known.balloon_due:
                due.append(dom)
        if not due:
            return
        lv = self._lv
        try:
            got = conn.domainListGetStats(due, getattr(lv, "VIR_DOMAIN_STATS_BALLOON", _STATS_BALLOON),
                                          getattr(lv, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", _STATS_NOWAIT))
        except Exception as e:  # noqa: BLE001 - the figures stay as they were; due again next tick
            self._note(ErrorSource.LIBVIRT, "balloon",
                       libvirt_message(e, "libvirt %s: balloon statistics of %d domains" % (self.uri, len(due))))
            return
        wall = self.wall()
        for dom, params in got or ():
            try:
                uuid = dom.UUIDString()
            except Exception:  # noqa: BLE001 - gone meanwhile
                continue
            known = self._known.get(uuid)
            if known is None:
                known = self._known[uuid] = _Known()
            known.set_balloon(params, now, wall, self.balloon_max_age, _spread(uuid))

    def _note(self, source: ErrorSource, key: str, message: str) -> None:
        """A per-domain problem: in this tick's errors under its real source (a libvirt
        call, or the pid file and /proc); logged once per domain and message."""
        self.errors.append((source, message))
        if (key, message) not in self._reported:
            if len(self._reported) > 10000:
                self._reported.clear()
            self._reported.add((key, message))
            log.warning("%s", message)

    def _domain(self, dom: Any, params: Dict[str, Any], uuid: str, name: str, lazy: bool) -> Optional[VmReading]:
        known = self._known.get(uuid)
        read: Optional[Tuple[bytes, Ident]] = None
        statm: Optional[bytes] = None
        if known is None:
            known = self._known[uuid] = _Known()
        elif known.pid is not None and known.ident is not None:
            read = self._files.read(known.pid, "ksm_stat")
            if read is not None and read[1] == known.ident:
                statm = self._files.read_bytes(known.pid, "statm", verify=False)
                # The hot path (a verified guest, the same listing): when its two files
                # read what they did last time, every input of its reading is unchanged.
                if (statm is not None and params is known.params and read[0] == known.ksm_raw
                        and statm == known.statm_raw and known.xml_pid == known.pid
                        and known.reading is not None):
                    return known.reading
        pid, args, raw = self._pid(uuid, name, known, read)
        excluded_xml = self._xml_excluded(dom, uuid, name, pid, known)
        excluded = bool(excluded_xml) or bool(args is not None and args.mem_merge_off)
        ksm = known.ksm_stat(raw) if pid is not None else None
        if params is not known.params:
            if params != known.params:  # a listing's new dict: equal values, same fields
                fields = _params_fields({**params, **known.balloon} if lazy and known.balloon else params)
                if fields != known.fields:  # else keep the object the last reading was built with
                    known.fields = fields
            known.params = params
        fields = known.fields
        mem = None
        if pid is not None:
            if statm is None:  # not read on the hot path's way: read it now, right after
                # ksm_stat proved the pid is this guest's (unless it has none)
                statm = self._files.read_bytes(pid, "statm", verify=known.ident is None)
            mem = known.statm_from(statm, self.proc)
        return known.reading_for((name, pid, ksm, mem, excluded, fields), lambda: VmReading(
            uuid=uuid, name=name, pid=pid, source=VmSource.LIBVIRT, rss=mem.resident if mem else None,
            anon_rss=mem.anon if mem else None, ksm=ksm, excluded=excluded, **fields))

    def _check_pid(self, pid: int, uuid: str, name: str,
                   known: Optional[_Known] = None) -> Tuple[Optional[QemuArgs], str]:
        """(args, "") when pid is this guest's QEMU; (None, why) otherwise."""
        raw = self.proc.cmdline_bytes(pid)
        if not raw:
            return None, "gone"
        if known is not None and known.argv_raw == raw:
            return known.args, ""
        args = parse_qemu_cmdline(split_cmdline(raw))
        if args is None:
            return None, "not a QEMU process"
        if args.name != name or (args.uuid is not None and args.uuid != uuid.lower()):
            return None, "a QEMU process of another guest (%s)" % (args.name or args.uuid)
        if known is not None:
            known.argv_raw, known.args = raw, args
        return args, ""

    def _pid(self, uuid: str, name: str, known: _Known, got: Optional[Tuple[bytes, Ident]] = None,
             ) -> Tuple[Optional[int], Optional[QemuArgs], Optional[bytes]]:
        """The guest's QEMU pid, verified against /proc/<pid>/cmdline, and its ksm_stat
        bytes; (None, None, None) if unknown. Once verified, a tick only checks that the
        ksm_stat it reads (`got`, when the caller read it already) is still that
        process's (KeptFiles.read)."""
        if known.pid is not None:
            if got is None:
                got = self._files.read(known.pid, "ksm_stat")
            if got is not None and known.ident is not None and got[1] == known.ident:
                return known.pid, known.args, got[0]
            args, _ = self._check_pid(known.pid, uuid, name, known)
            if args is not None:
                return known.pid, args, self._identify(known, known.pid)
            self._files.release(known.pid)
            known.pid = known.argv_raw = known.args = known.ident = None
        path = self.pid_dir / (name + ".pid")
        try:
            text = path.read_text().strip()
        except OSError:
            if known.had_pid:
                raise _Vanished() from None  # it had a process; the pid file went with it
            return None, None, None
        try:
            pid = int(text)
        except ValueError:
            self._note(ErrorSource.PROC, uuid, "%s: pid file %s holds %r, not a pid" % (name, path, text[:20]))
            return None, None, None
        args, why = self._check_pid(pid, uuid, name, known)
        if args is None:
            if why == "gone" and known.had_pid:
                raise _Vanished()
            self._note(ErrorSource.PROC, uuid, "%s: ignoring stale pid file %s: pid %d is %s"
                       % (name, path, pid, "gone" if why == "gone" else why))
            return None, None, None
        known.pid = pid
        known.had_pid = True
        return pid, args, self._identify(known, pid)

    def _identify(self, known: _Known, pid: int) -> Optional[bytes]:
        """Read the just-verified process's ksm_stat and remember which file it was."""
        got = self._files.read(pid, "ksm_stat")
        known.ident = got[1] if got is not None else None
        return got[0] if got is not None else None

    def _xml_excluded(self, dom: Any, uuid: str, name: str, pid: Optional[int],
                      known: _Known) -> Optional[bool]:
        """<memoryBacking><nosharepages/>, from the XML fetched once per domain start."""
        if known.xml_pid == pid and known.xml_excluded is not None:
            return known.xml_excluded
        try:
            xml = dom.XMLDesc(0)
        except Exception as e:  # noqa: BLE001
            if error_code(e) == _ERR_NO_DOMAIN:
                raise _Vanished() from None
            self._note(ErrorSource.LIBVIRT, uuid,
                       libvirt_message(e, "libvirt %s: reading the XML of %s" % (self.uri, name)))
            return None  # retried next tick; the QEMU command line still tells mem-merge=off
        known.xml_pid = pid
        known.xml_excluded, period = xml_facts(xml)
        if period != known.stats_period:
            known.stats_period = period
            known.balloon_due = float("-inf")  # fetched again next tick, due by the period from then on
        return known.xml_excluded
