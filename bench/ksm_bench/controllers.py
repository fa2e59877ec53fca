"""The controllers compared: ksmctl with a policy, ksmtuned, the kernel's advisor,
the kernel's defaults, and KSM off. Each starts from a clean KSM state (see kernel_reset)
and must leave nothing running when stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

REPO = Path(__file__).resolve().parents[2]
KSM = Path("/sys/kernel/mm/ksm")
KSMTUNED = "/usr/sbin/ksmtuned"
# The kernel's defaults (mm/ksm.c), written before every controller.
KERNEL_DEFAULTS = (("advisor_mode", "none"), ("pages_to_scan", "100"), ("sleep_millisecs", "20"),
                   ("advisor_target_scan_time", "200"), ("advisor_max_cpu", "70"),
                   ("advisor_min_pages_to_scan", "500"), ("advisor_max_pages_to_scan", "30000"),
                   ("smart_scan", "1"))


def ksm_write(name: str, value: str) -> bool:
    p = KSM / name
    if not p.exists():
        return False
    try:
        p.write_text(value)
        return True
    except OSError:
        return False


def ksm_read(name: str) -> str:
    return (KSM / name).read_text().strip()


def kernel_reset() -> None:
    """Unmerge everything (run=2, wait for pages_sharing 0), then kernel defaults, run=0."""
    ksm_write("advisor_mode", "none")
    ksm_write("run", "2")
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if int(ksm_read("pages_sharing")) == 0 and int(ksm_read("pages_shared")) == 0:
            break
        time.sleep(0.1)
    else:
        raise RuntimeError("pages_sharing did not drain after run=2")
    ksm_write("run", "0")
    for k, v in KERNEL_DEFAULTS:
        ksm_write(k, v)


def _proc_cpu(pid: int) -> Optional[float]:
    """utime+stime+cutime+cstime of a process: its own CPU and its waited-for children's."""
    try:
        text = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return None
    f = text[text.rindex(")") + 2:].split()
    return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")


def _group_pids(pgid: int) -> List[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path("/proc/%s/stat" % name).read_text()
        except OSError:
            continue
        f = text[text.rindex(")") + 2:].split()
        if int(f[2]) == pgid:
            out.append(int(name))
    return out


class Controller:
    name = "controller"
    interval: float = 1.0      # how often it can react (phases are scaled by it)
    description = ""

    def start(self, workdir: Path) -> None: ...

    def stop(self) -> None: ...

    def own_cpu(self) -> Optional[float]:
        """CPU seconds the controller process itself used (not ksmd), when known."""
        return None

    def on_phase(self, phase: str) -> None:
        """Told when a phase begins (pressure, growth, release): only the floor listens."""

    def info(self) -> Dict[str, object]:
        return {"name": self.name, "interval": self.interval, "description": self.description}


class KsmctlController(Controller):
    """The ksmctl daemon with a shipped policy; `overrides` ({key: value}) change it for
    the run (a generated policy file in the work directory). A key is a dotted path into
    the policy (scan.adaptive.min_pass_yield) or a key name that occurs once in it
    (min_pass_yield)."""

    def __init__(self, policy: str, overrides: Optional[Dict[str, object]] = None) -> None:
        self.policy = policy
        self.shipped = REPO / "policies" / ("%s.yaml" % policy)
        data = yaml.safe_load(self.shipped.read_text())
        changed = []
        for key, value in (overrides or {}).items():
            path = _policy_key(data, key)
            parent = data
            for k in path[:-1]:
                parent = parent[k]
            parent[path[-1]] = value
            changed.append("%s=%s" % (".".join(path), _yaml_value(value)))
        self.data = data
        self.overrides = dict(overrides or {})
        self.text = self.shipped.read_text() if not changed else yaml.safe_dump(data, sort_keys=False)
        from ksmctl.policy.loader import parse_policy
        parse_policy(self.text, "%s with %s" % (self.shipped, ", ".join(changed)) if changed else str(self.shipped))
        from ksmctl.units import parse_duration
        self.interval = parse_duration(data.get("interval", "10s"))
        self.name = "ksmctl " + " ".join([policy] + ["%s=%s" % (k, _yaml_value(v)) for k, v in self.overrides.items()])
        self.description = "ksmctl daemon, policy %s%s (interval %gs)" % (
            policy, " with " + ", ".join(changed) if changed else "", self.interval)
        self.path = self.shipped
        self.proc: Optional[subprocess.Popen] = None
        self._cpu: Optional[float] = None

    def start(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        if self.overrides:
            self.path = workdir / ("%s.yaml" % self.policy)
            self.path.write_text(self.text)
        self.trace = workdir / "trace.jsonl"
        cfg = {"policy": str(self.path), "state_file": str(workdir / "state.json"),
               "state_dir": str(workdir), "exporter": {"enabled": False}, "libvirt": False,
               "log_level": "info", "trace": {"path": str(self.trace)}}
        (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
        self.log = open(workdir / "daemon.log", "w")
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "ksmctl", "--config", str(workdir / "config.yaml"),
                                      "daemon", "--policy", str(self.path)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)

    def own_cpu(self) -> Optional[float]:
        if self.proc is not None and self.proc.poll() is None:
            self._cpu = _proc_cpu(self.proc.pid)
        return self._cpu

    def decisions(self) -> List[Dict[str, object]]:
        """Every tick's decision from the daemon's trace (the work directory's trace.jsonl,
        read before the run's work directories go): mono (the tick's time.monotonic()),
        scan_rule, run_rule and the reasons, e.g. "another full pass is not worth it"."""
        out: List[Dict[str, object]] = []
        trace = getattr(self, "trace", None)
        if trace is None or not trace.exists():
            return out
        for line in trace.read_text().splitlines():
            try:
                d = json.loads(line)
                dec = d["decision"]
                out.append({"mono": float(d["readings"]["monotonic"]), "scan_rule": dec["scan_rule"],
                            "run_rule": dec["run_rule"], "reasons": list(dec["reasons"])})
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def stop(self) -> None:
        if self.proc is None:
            return
        self.own_cpu()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if self.proc.returncode not in (0, -signal.SIGTERM):
            raise RuntimeError("%s exited with %s; see its log" % (self.name, self.proc.returncode))
        self.proc = None


class KsmtunedController(Controller):
    """The real /usr/sbin/ksmtuned with Debian's /etc/ksmtuned.conf (all defaults).

    It daemonizes (`loop &`); started in its own session, its whole process group is
    killed on stop. It counts committed memory with `pgrep -f '^qemu-system.*-enable-kvm'`,
    so with plain processes (and with software-emulated guests) it sees none and reacts
    only to free memory (MemFree+Buffers+Cached) below 20% of MemTotal."""

    script = KSMTUNED   # the script run (a subclass may run a modified copy)

    def __init__(self, interval: Optional[int] = None) -> None:
        self.monitor_interval = interval
        self.interval = float(interval or 60)
        self.name = "ksmtuned" + (" %ds" % interval if interval else " default")
        self.description = "/usr/sbin/ksmtuned, KSM_MONITOR_INTERVAL=%d" % self.interval
        self.pgid: Optional[int] = None
        self._cpu: Optional[float] = None
        self.loop_pid: Optional[int] = None

    def start(self, workdir: Path) -> None:
        if not os.path.exists(KSMTUNED):
            raise RuntimeError("%s is not installed (apt-get install ksmtuned)" % KSMTUNED)
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PIDFILE=str(workdir / "ksmtuned.pid"))
        if self.monitor_interval:
            env["KSM_MONITOR_INTERVAL"] = str(self.monitor_interval)
        p = subprocess.Popen([self.script], env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        p.wait(timeout=10)  # the script forks its loop and exits
        self.pgid = p.pid
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                self.loop_pid = int((workdir / "ksmtuned.pid").read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.05)

    def own_cpu(self) -> Optional[float]:
        if self.loop_pid is not None:
            c = _proc_cpu(self.loop_pid)
            if c is not None:
                self._cpu = c
        return self._cpu

    def stop(self) -> None:
        if self.pgid is None:
            return
        self.own_cpu()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                pass
            end = time.monotonic() + 5
            while time.monotonic() < end and _group_pids(self.pgid):
                time.sleep(0.05)
            if not _group_pids(self.pgid):
                break
        left = _group_pids(self.pgid)
        if left:
            raise RuntimeError("ksmtuned processes left running: %s" % left)
        self.pgid = None


class AdvisorController(Controller):
    name = "kernel advisor"
    interval = 1.0
    description = "advisor_mode=scan-time with the kernel's advisor defaults, run=1"

    def start(self, workdir: Path) -> None:
        ksm_write("advisor_mode", "none")
        if not ksm_write("advisor_mode", "scan-time"):
            raise RuntimeError("this kernel has no advisor_mode")
        ksm_write("run", "1")

    def stop(self) -> None:
        ksm_write("advisor_mode", "none")


class KernelDefaultsController(Controller):
    name = "kernel defaults"
    interval = 1.0
    description = "run=1, pages_to_scan=100, sleep_millisecs=20 (the kernel's defaults), left on"

    def start(self, workdir: Path) -> None:
        ksm_write("pages_to_scan", "100")
        ksm_write("sleep_millisecs", "20")
        ksm_write("run", "1")


class OffController(Controller):
    name = "KSM off"
    interval = 1.0
    description = "run=0"

    def start(self, workdir: Path) -> None:
        ksm_write("run", "0")


class FloorController(Controller):
    """The cost of the merges themselves: ksmd at the default policy's full pace for exactly
    two full passes (full_scans + 2) from pressure onset, then run=0; and two more when
    guests start during pressure (they join ksmd's list ahead of its cursor, so those two
    passes see every new page twice). It knows the phases, which no real controller does:
    its ksmd CPU-seconds per GiB of peak saving is the floor a controller can approach."""

    name = "floor"
    interval = 1.0

    def __init__(self, policy: str = "default") -> None:
        data = yaml.safe_load((REPO / "policies" / ("%s.yaml" % policy)).read_text())
        scan = data["scan"]
        self.pages = int(scan["pages_to_scan"]["max"])
        self.sleep = int(scan["sleep_millisecs"].get("floor", scan["sleep_millisecs"].get("base", 10)))
        self.description = ("ksmd at %d pages per %d ms (%s policy's full pace) for two full passes from "
                            "pressure onset and from the start of new guests, run=0 in between"
                            % (self.pages, self.sleep, policy))
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def start(self, workdir: Path) -> None:
        ksm_write("run", "0")

    def on_phase(self, phase: str) -> None:
        if phase not in ("pressure", "growth"):
            return
        self._join()
        ksm_write("pages_to_scan", str(self.pages))
        ksm_write("sleep_millisecs", str(self.sleep))
        target = int(ksm_read("full_scans")) + 2
        ksm_write("run", "1")
        self._stop.clear()
        self._thread = threading.Thread(target=self._until, args=(target,), daemon=True)
        self._thread.start()

    def _until(self, target: int) -> None:
        while not self._stop.is_set():
            if int(ksm_read("full_scans")) >= target:
                break
            time.sleep(0.01)
        ksm_write("run", "0")

    def _join(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def stop(self) -> None:
        self._join()
        ksm_write("run", "0")


def _policy_key(data: dict, key: str) -> List[str]:
    """The path of `key` in a policy: a dotted path whose parent exists or is a top-level
    section the file leaves out (kernel.smart_scan; a setting the file leaves at its
    default may be added: the policy loader then judges it), or the one place a bare key
    occurs."""
    if "." in key:
        from ksmctl.policy.model import Policy
        path, node = key.split("."), data
        if path[0] not in data and path[0] in Policy.model_fields and len(path) == 2:
            data[path[0]] = {}
        for k in path[:-1]:
            if not isinstance(node, dict) or k not in node:
                raise ValueError("the policy has no %s" % ".".join(path[:path.index(k) + 1]))
            node = node[k]
        if not isinstance(node, dict):
            raise ValueError("%s is not a section of the policy" % ".".join(path[:-1]))
        return path
    found: List[List[str]] = []

    def walk(node: object, at: List[str]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == key:
                    found.append(at + [k])
                walk(v, at + [k])
    walk(data, [])
    if len(found) != 1:
        raise ValueError("%r occurs %d times in the policy; give its dotted path" % (key, len(found)))
    return found[0]


def _yaml_value(v: object) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().replace("\n...", "")


SHIPPED = ("default", "aggressive", "conservative", "kernel-advisor", "ksmtuned", "off")


def make(name: str) -> Controller:
    """By name: 'ksmctl:<policy>', 'ksmctl:<policy>:<key>=<value>[:...]' (the policy with
    those settings changed, e.g. 'ksmctl:default:min_pass_yield=0'), 'ksmtuned',
    'ksmtuned:10', 'advisor', 'kernel-defaults', 'off', 'floor'."""
    if name.startswith("ksmctl:"):
        policy, *sets = name.split(":")[1:]
        overrides: Dict[str, object] = {}
        for item in sets:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError("%r: a policy setting is written key=value" % name)
            overrides[key] = yaml.safe_load(value)
        return KsmctlController(policy, overrides)
    if name == "ksmtuned":
        return KsmtunedController()
    if name.startswith("ksmtuned:"):
        return KsmtunedController(int(name.split(":", 1)[1]))
    if name == "advisor":
        return AdvisorController()
    if name == "kernel-defaults":
        return KernelDefaultsController()
    if name == "off":
        return OffController()
    if name == "floor":
        return FloorController()
    raise ValueError("unknown controller %r" % name)


ALL = tuple("ksmctl:" + p for p in SHIPPED) + ("ksmtuned", "ksmtuned:10", "advisor", "kernel-defaults", "off", "floor")
