"""QMP through libvirt: list a guest's QOM objects, read and set a backend's `merge`.

A read-write connection and libvirt_qemu's qemuMonitorCommand are needed; libvirt marks
every domain it passes a monitor command to as tainted ("custom-monitor"), so ksmctl
sends them only to guests it manages. Errors become GuestError naming the guest.
"""
from __future__ import annotations

import json
import logging
import uuid as uuidlib
from typing import Any, Dict, List, Optional, Tuple

from ksmctl.collectors.vms.binding import error_code, libvirt_message, quiet_errors
from ksmctl.errors import KsmctlError, UsageError

log = logging.getLogger("ksmctl.guests")

_ERR_NO_DOMAIN = 42
_ACTIVE = 1  # VIR_CONNECT_LIST_DOMAINS_ACTIVE


class GuestError(KsmctlError):
    """A guest's QEMU or libvirt refused or failed a call (exit 1)."""


class Qmp:
    """One read-write libvirt connection, opened on first use."""

    def __init__(self, uri: str = "qemu:///system", libvirt_module: Any = None, qemu_module: Any = None) -> None:
        self.uri = uri
        self._lv = libvirt_module
        self._lq = qemu_module
        self._conn: Any = None

    def _modules(self) -> Tuple[Any, Any]:
        if self._lv is None or self._lq is None:
            try:
                import libvirt
                import libvirt_qemu
            except ImportError:
                raise GuestError("per-VM merge control needs libvirt-python (libvirt and libvirt_qemu modules)") \
                    from None
            self._lv, self._lq = self._lv or libvirt, self._lq or libvirt_qemu
            quiet_errors(self._lv)
        return self._lv, self._lq

    def conn(self) -> Any:
        if self._conn is None:
            lv, _ = self._modules()
            try:
                self._conn = lv.open(self.uri)
            except Exception as e:  # noqa: BLE001 - libvirtError
                raise GuestError(libvirt_message(e, "cannot open a read-write libvirt connection to %s" % self.uri)) \
                    from None
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def lookup(self, ident: str) -> Any:
        """A running domain by UUID or name; UsageError when there is none."""
        conn = self.conn()
        try:
            uuidlib.UUID(ident)
            fn = conn.lookupByUUIDString
        except ValueError:
            fn = conn.lookupByName
        try:
            dom = fn(ident)
        except Exception as e:  # noqa: BLE001
            if error_code(e) == _ERR_NO_DOMAIN:
                raise UsageError("no guest with the name or UUID %r on %s" % (ident, self.uri)) from None
            raise GuestError(libvirt_message(e, "looking up guest %r" % ident)) from None
        try:
            active = dom.isActive()
        except Exception as e:  # noqa: BLE001
            raise GuestError(libvirt_message(e, "guest %r" % ident)) from None
        if not active:
            raise UsageError("guest %r is not running (merge control acts on running guests)" % ident)
        return dom

    def running(self) -> List[Any]:
        try:
            return list(self.conn().listAllDomains(_ACTIVE))
        except Exception as e:  # noqa: BLE001
            self.close()
            raise GuestError(libvirt_message(e, "listing guests on %s" % self.uri)) from None

    def xml(self, dom: Any) -> str:
        try:
            return str(dom.XMLDesc(0))
        except Exception as e:  # noqa: BLE001
            raise GuestError(libvirt_message(e, "reading the XML of %s" % _name(dom))) from None

    def command(self, dom: Any, execute: str, arguments: Optional[Dict[str, Any]] = None) -> Any:
        """One QMP command's "return" value; GuestError with QEMU's own words otherwise."""
        _, lq = self._modules()
        cmd: Dict[str, Any] = {"execute": execute}
        if arguments:
            cmd["arguments"] = arguments
        try:
            reply = lq.qemuMonitorCommand(dom, json.dumps(cmd), 0)
        except Exception as e:  # noqa: BLE001
            raise GuestError(libvirt_message(e, "%s: QMP %s" % (_name(dom), execute))) from None
        try:
            data = json.loads(reply)
        except (TypeError, ValueError):
            raise GuestError("%s: QMP %s: not a JSON reply: %.200r" % (_name(dom), execute, reply)) from None
        if isinstance(data, dict) and "error" in data:
            err = data["error"] if isinstance(data["error"], dict) else {}
            raise GuestError("%s: QMP %s refused: %s" % (_name(dom), execute, err.get("desc", data["error"])))
        return data.get("return") if isinstance(data, dict) else None

    def objects(self, dom: Any) -> Dict[str, str]:
        """qom-list /objects: {id: type} (types are "child<memory-backend-ram>" and such)."""
        got = self.command(dom, "qom-list", {"path": "/objects"})
        return {str(o.get("name")): str(o.get("type", "")) for o in got or () if isinstance(o, dict)}

    def get_merge(self, dom: Any, backend: str) -> Optional[bool]:
        got = self.command(dom, "qom-get", {"path": "/objects/" + backend, "property": "merge"})
        return got if isinstance(got, bool) else None

    def set_merge(self, dom: Any, backend: str, value: bool) -> None:
        """QEMU re-advises the backend's RAM: MADV_UNMERGEABLE breaks its merged pages apart."""
        self.command(dom, "qom-set", {"path": "/objects/" + backend, "property": "merge", "value": value})


def _name(dom: Any) -> str:
    try:
        return str(dom.name())
    except Exception:  # noqa: BLE001
        return "a guest"
