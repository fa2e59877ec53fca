"""Put the unit, config, policies, man page and completions in place, and take them away.

Operators edit /etc/ksmctl/config.yaml and the policies; an upgrade must never
lose that. Like a package manager's conffile handling: a file that is neither
what this tool installed last time nor identical to the new content is kept,
and the new content goes beside it as <file>.new. A manifest with hashes
records exactly what was installed, so uninstall removes only files that are
still as installed and says which edited ones it kept.

Layout under root (documented in docs/service.md):
  etc/systemd/system/ksmctl.service      admin-installed unit (/usr/lib is the package manager's)
  etc/ksmctl/config.yaml                 from config.example.yaml
  etc/ksmctl/policies/*.yaml             the shipped policies
  <prefix>/share/man/man8/ksmctl.8
  <prefix>/share/bash-completion/completions/ksmctl
  <prefix>/share/zsh/site-functions/_ksmctl
  <prefix>/share/ksmctl/grafana/...       the dashboard and its provisioning files
  <prefix>/share/ksmctl/prometheus/...    alert and recording rules (and their tests)
  var/lib/ksmctl/install-manifest.json
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ksmctl.errors import KsmctlError, PermissionDenied, UsageError

log = logging.getLogger(__name__)

MANIFEST = "var/lib/ksmctl/install-manifest.json"
UNIT_DIR = "etc/systemd/system"
CONFIG_DIR = "etc/ksmctl"
DEFAULT_PREFIX = "/usr/local"
# Where a hardened service cannot see (ProtectHome=yes, tmpfs /tmp).
HIDDEN_FROM_SERVICE = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")


# -- shipped data ------------------------------------------------------------

def data_roots() -> List[Path]:
    """An installed wheel carries its data in ksmctl/data/; a checkout has it at the top."""
    pkg = Path(__file__).resolve().parent.parent
    return [pkg / "data", pkg.parent]


def shipped_file(relpath: str) -> Path:
    """The shipped copy of relpath (e.g. 'systemd/ksmctl.service')."""
    tried = []
    for root in data_roots():
        candidate = root / relpath
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    raise UsageError("shipped file %s not found (looked in %s): is the package installed "
                     "with its data files?" % (relpath, ", ".join(tried)))


def shipped_policies() -> List[Path]:
    """The shipped policy files, from the first place that has any."""
    pkg = Path(__file__).resolve().parent.parent
    for d in (pkg / "data" / "policies", pkg / "policies", pkg.parent / "policies"):
        found = sorted(p for p in d.glob("*.yaml") if p.is_file())
        if found:
            return found
    return []


# Shipped as they are under <prefix>/share/ksmctl/, by `ksmctl install` and by the Debian
# package alike (debian/rules copies the same directories).
SHARED_TREES = ("grafana", "prometheus")


def shipped_tree(reldir: str) -> List[str]:
    """Every file under a shipped directory (e.g. 'grafana'), as paths relative to the
    data root, from the first root that has it."""
    for root in data_roots():
        d = root / reldir
        if d.is_dir():
            found = sorted(str(p.relative_to(root)) for p in d.rglob("*") if p.is_file())
            if found:
                return found
    raise UsageError("shipped directory %s not found (looked in %s): is the package installed "
                     "with its data files?" % (reldir, ", ".join(str(r) for r in data_roots())))


def find_executable(exec_path: Optional[str] = None) -> str:
    """The ksmctl the unit should run: the console script of this installation.

    Never a bare PATH lookup result without checking it: Debian's ksmtuned
    package ships an unrelated /usr/sbin/ksmctl (its `ksmctl start|stop` helper).
    """
    if exec_path:
        path = Path(exec_path)
        if not path.is_absolute():
            raise UsageError("--exec-path %s: must be an absolute path" % exec_path)
        return _unit_safe(str(path), "--exec-path %r" % exec_path)
    candidates = [Path(sysconfig.get_path("scripts")) / "ksmctl",
                  Path(sys.executable).parent / "ksmctl"]
    which = shutil.which("ksmctl")
    if which:
        candidates.append(Path(which))
    for c in candidates:
        if c.is_file() and os.access(str(c), os.X_OK) and _is_our_script(c):
            return _unit_safe(str(c), "the ksmctl found at %r" % str(c) + " (pass --exec-path)")
    raise UsageError("cannot find the ksmctl console script (looked at %s); pass --exec-path"
                     % ", ".join(str(c) for c in candidates))


def _unit_safe(path: str, what: str) -> str:
    """A path written into ExecStart=/ExecReload=: a newline would add unit directives, a
    space split the command, a % be expanded by systemd as a specifier."""
    if re.search(r"[\s\x00-\x1f\x7f%\\\"';$`]", path):
        raise UsageError("%s: must not contain whitespace, control characters or any of "
                         "%% \\ \" ' ; $ ` (it becomes the unit's ExecStart= command)" % what)
    return path


def _is_our_script(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"#!") and b"ksmctl" in head[2:]


def render_unit(text: str, exec_path: str) -> str:
    """Point ExecStart= and ExecReload= at the ksmctl that is actually installed."""
    new = text
    for key in ("ExecStart", "ExecReload"):
        new, n = re.subn(r"^(%s=)\S+" % key, lambda m: m.group(1) + exec_path, new, count=1, flags=re.M)
        if n != 1:
            raise UsageError("shipped unit has no %s= line to rewrite" % key)
    return new


# -- planning ----------------------------------------------------------------

@dataclass
class Item:
    dest: str      # relative to root
    content: bytes
    mode: int


@dataclass
class Report:
    root: str
    installed: List[str] = field(default_factory=list)   # new files
    updated: List[str] = field(default_factory=list)     # unedited, replaced by new content
    unchanged: List[str] = field(default_factory=list)
    kept: List[Tuple[str, str]] = field(default_factory=list)  # (edited file, .new beside it)
    removed: List[str] = field(default_factory=list)
    kept_on_uninstall: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        out: List[str] = []
        for label, paths in (("installed", self.installed), ("updated", self.updated),
                             ("unchanged", self.unchanged), ("removed", self.removed)):
            out.extend("%-10s %s" % (label, self._abs(p)) for p in paths)
        out.extend("kept       %s (edited; new version written to %s)"
                   % (self._abs(a), self._abs(b)) for a, b in self.kept)
        out.extend("kept       %s (edited since install)" % self._abs(p)
                   for p in self.kept_on_uninstall)
        out.extend("warning: " + w for w in self.warnings)
        return out

    def _abs(self, rel: str) -> str:
        return str(Path(self.root) / rel)


def plan(prefix: str = DEFAULT_PREFIX, exec_path: Optional[str] = None) -> Tuple[List[Item], str]:
    exe = find_executable(exec_path)
    share = prefix.strip("/") + "/share"
    unit = render_unit(shipped_file("systemd/ksmctl.service").read_text(), exe)
    items = [
        Item(UNIT_DIR + "/ksmctl.service", unit.encode(), 0o644),
        Item(CONFIG_DIR + "/config.yaml", shipped_file("config.example.yaml").read_bytes(), 0o640),
    ]
    for p in shipped_policies():
        items.append(Item(CONFIG_DIR + "/policies/" + p.name, p.read_bytes(), 0o644))
    items += [
        Item(share + "/man/man8/ksmctl.8", shipped_file("docs/ksmctl.8").read_bytes(), 0o644),
        Item(share + "/bash-completion/completions/ksmctl",
             shipped_file("completions/ksmctl.bash").read_bytes(), 0o644),
        Item(share + "/zsh/site-functions/_ksmctl",
             shipped_file("completions/ksmctl.zsh").read_bytes(), 0o644),
    ]
    for tree in SHARED_TREES:
        for rel in shipped_tree(tree):
            items.append(Item(share + "/ksmctl/" + rel, shipped_file(rel).read_bytes(), 0o644))
    return items, exe


# -- file helpers ------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_hash(path: Path) -> Optional[str]:
    try:
        return _sha256(path.read_bytes())
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, str(path))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _makedirs(root: Path, rel_dir: str, created: List[str]) -> None:
    """mkdir -p, remembering each directory this install created (to rmdir later)."""
    parts = Path(rel_dir).parts
    for i in range(1, len(parts) + 1):
        rel = str(Path(*parts[:i]))
        d = root / rel
        if not d.is_dir():
            d.mkdir(mode=0o755)
            created.append(rel)


def _load_manifest(root: Path) -> Dict:
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": 1, "files": {}, "dirs": []}
    except (OSError, ValueError) as exc:
        raise UsageError("install manifest %s is unreadable (%s): remove it to start over, "
                         "and check what is under %s/etc/ksmctl by hand" % (path, exc, root))
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise UsageError("install manifest %s: unexpected content" % path)
    data.setdefault("dirs", [])
    return data


def _check_root(root: str) -> Path:
    r = Path(root)
    if not r.is_absolute():
        raise UsageError("--root %s: must be an absolute path" % root)
    if not r.is_dir():
        raise UsageError("--root %s: no such directory" % root)
    return r


# -- install / uninstall -----------------------------------------------------

def install(root: str = "/", prefix: str = DEFAULT_PREFIX, exec_path: Optional[str] = None,
            items: Optional[Sequence[Item]] = None) -> Report:
    """Install (or upgrade) without overwriting an operator's edits."""
    r = _check_root(root)
    if items is None:
        items, exe = plan(prefix, exec_path)
    else:
        exe = exec_path or ""
    report = Report(root=str(r))
    if exe.startswith(HIDDEN_FROM_SERVICE):
        report.warnings.append(
            "the unit runs %s, which the service cannot see (ProtectHome=yes, PrivateTmp=yes): "
            "install ksmctl system-wide (pip install as root, or a venv under /opt) and run "
            "install again" % exe)
    manifest = _load_manifest(r)
    files: Dict[str, Dict] = manifest["files"]
    created: List[str] = []
    try:
        for item in items:
            _install_one(r, item, files, created, report)
    finally:
        # Record progress even when a write failed halfway, so uninstall still works.
        manifest["dirs"] = list(dict.fromkeys(manifest["dirs"] + created))
        manifest["exec_path"] = exe
        _makedirs(r, str(Path(MANIFEST).parent), manifest["dirs"])
        _write_atomic(r / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(),
                      0o644)
    return report


def _install_one(root: Path, item: Item, files: Dict[str, Dict], created: List[str],
                 report: Report) -> None:
    dest = root / item.dest
    new_hash = _sha256(item.content)
    current = _file_hash(dest)
    recorded = files.get(item.dest, {}).get("sha256")
    _makedirs(root, str(Path(item.dest).parent), created)
    if current == new_hash:
        report.unchanged.append(item.dest)
        files[item.dest] = {"sha256": new_hash}
        _discard_stale_new(root, item.dest, files)
        return
    if current is None or current == recorded:
        _write_atomic(dest, item.content, item.mode)
        (report.installed if current is None else report.updated).append(item.dest)
        files[item.dest] = {"sha256": new_hash}
        _discard_stale_new(root, item.dest, files)
        return
    # Edited by the operator (or there before us and not ours): keep it.
    side = item.dest + ".new"
    _write_atomic(root / side, item.content, item.mode)
    files[side] = {"sha256": new_hash}
    report.kept.append((item.dest, side))


def _discard_stale_new(root: Path, dest: str, files: Dict[str, Dict]) -> None:
    """A .new from an earlier install is moot once the file itself is current."""
    side = dest + ".new"
    entry = files.get(side)
    if entry and _file_hash(root / side) == entry["sha256"]:
        (root / side).unlink()
        del files[side]


def uninstall(root: str = "/") -> Report:
    """Remove what install added and nobody changed since; keep and name the rest."""
    r = _check_root(root)
    path = r / MANIFEST
    if not path.exists():
        raise UsageError("nothing to uninstall: %s does not exist (ksmctl was not installed "
                         "with `ksmctl install` under this root)" % path)
    manifest = _load_manifest(r)
    report = Report(root=str(r))
    for rel, entry in sorted(manifest["files"].items()):
        f = r / rel
        current = _file_hash(f)
        if current is None:
            continue
        if current == entry.get("sha256"):
            f.unlink()
            report.removed.append(rel)
        else:
            report.kept_on_uninstall.append(rel)
    path.unlink()
    report.removed.append(MANIFEST)
    for rel in sorted(manifest["dirs"], key=lambda d: -len(Path(d).parts)):
        try:
            (r / rel).rmdir()
        except OSError:
            pass  # not empty: holds kept files or the daemon's state
    return report


def describe_error(exc: OSError, root: str) -> KsmctlError:
    """An OSError during install as a message naming the path."""
    where = exc.filename or root
    if isinstance(exc, PermissionError):
        return PermissionDenied("cannot write %s: permission denied (run as root, or use --root)"
                                % where)
    return KsmctlError("cannot install into %s: %s" % (where, exc.strerror or exc))
