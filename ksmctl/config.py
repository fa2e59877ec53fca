"""The daemon's config: /etc/ksmctl/config.yaml (or --config), then KSMCTL_* variables.

Typed and validated like policies: a bad file or variable gets a message naming it, the
key and what is allowed. No file at the default path means the documented defaults.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ksmctl.errors import ConfigError
from ksmctl.fsutil import check_path, read_input
from ksmctl.units import parse_duration
from ksmctl.yamlload import NoBoolNumbers, YamlProblem, load_yaml, validate

DEFAULT_CONFIG_PATH = "/etc/ksmctl/config.yaml"
DEFAULT_STATE_FILE = "/run/ksmctl/state.json"
DEFAULT_LISTEN = "127.0.0.1:19839"


MAX_CONFIG_BYTES = 1024 * 1024
MAX_BYTES = 2 ** 40  # a size setting beyond 1 TiB is a typo, not a size


class _Model(NoBoolNumbers):
    # allow_inf_nan: "nan" and "inf" (from a variable, or quoted) are not numbers of anything.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ExporterConfig(_Model):
    enabled: bool = True
    listen: str = DEFAULT_LISTEN           # host:port; ":PORT" listens on all addresses
    web_config: Optional[str] = None       # exporter-toolkit web config (TLS, basic auth)
    textfile: Optional[str] = None         # also write metrics to this .prom file each tick
    per_vm: bool = True                    # per-VM series (off for privacy or cardinality)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 < int(port) < 65536:
            raise ValueError("expected host:port (e.g. %s or :%s)" % (DEFAULT_LISTEN, DEFAULT_LISTEN.rsplit(":", 1)[1]))
        return v

    @field_validator("web_config", "textfile")
    @classmethod
    def _paths(cls, v: Optional[str]) -> Optional[str]:
        return check_path(v, file=True)


class TraceConfig(_Model):
    path: Optional[str] = None             # JSON lines of readings and decisions, for replay
    max_bytes: int = Field(default=16 * 1024 * 1024, ge=4096, le=MAX_BYTES)
    backups: int = Field(default=3, ge=0, le=100)

    @field_validator("path")
    @classmethod
    def _path(cls, v: Optional[str]) -> Optional[str]:
        return check_path(v, file=True)


class EstimateConfig(_Model):
    enabled: bool = False                  # periodic dedup-potential scan of guest memory
    interval: float = Field(default=3600.0, ge=60, le=366 * 86400)
    rate_mib_s: float = Field(default=64.0, ge=1 / 1024, le=1024 * 1024)  # 1 KiB/s .. 1 TiB/s

    @field_validator("interval", mode="before")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        return parse_duration(v)


class Config(_Model):
    policy: str = "default"                # a shipped policy's name or a file path
    interval: Optional[float] = None       # overrides the policy's interval
    libvirt_uri: str = "qemu:///system"
    libvirt: bool = True                   # false: per-VM data from /proc only
    state_file: str = DEFAULT_STATE_FILE
    state_dir: str = "/var/lib/ksmctl"    # survives restarts (unlike /run/ksmctl)
    restore_on_exit: bool = True           # put back the knobs found at start
    log_level: str = Field(default="info", pattern=r"^(debug|info|warning|error)$")
    exporter: ExporterConfig = ExporterConfig()
    trace: TraceConfig = TraceConfig()
    estimate: EstimateConfig = EstimateConfig()
    sys_root: str = "/sys"                 # for tests and containers
    proc_root: str = "/proc"
    run_root: str = "/run"

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("expected a shipped policy's name or a policy file's path, found an empty string")
        return check_path(v)  # type: ignore[return-value]

    @field_validator("state_file")
    @classmethod
    def _file(cls, v: str) -> str:
        return check_path(v, required=True, file=True)  # type: ignore[return-value]

    @field_validator("state_dir", "sys_root", "proc_root", "run_root")
    @classmethod
    def _dir(cls, v: str) -> str:
        return check_path(v, required=True)  # type: ignore[return-value]

    @field_validator("interval", mode="before")
    @classmethod
    def _interval(cls, v: Any) -> Any:
        if v is None:
            return None
        d = parse_duration(v)
        if not 0.1 <= d <= 3600:
            raise ValueError("interval must be between 0.1s and 3600s")
        return d


# What a reload (SIGHUP) does with each key: applied at once, or kept at its running value
# and named in a warning until the next restart. tests/test_reload.py holds these two sets
# to the model's fields, so a new key must be put in one of them.
ON_RELOAD = frozenset({"policy", "interval", "restore_on_exit", "log_level", "trace"})
AT_RESTART = frozenset({"libvirt_uri", "libvirt", "state_file", "state_dir", "exporter", "estimate",
                        "sys_root", "proc_root", "run_root"})


def restart_keys_changed(running: "Config", new: "Config") -> List[str]:
    """The AT_RESTART keys whose value differs, as dotted paths (exporter.listen)."""
    out: List[str] = []
    for key in sorted(AT_RESTART):
        a, b = getattr(running, key), getattr(new, key)
        if a == b:
            continue
        if isinstance(a, BaseModel):
            out += ["%s.%s" % (key, f) for f in type(a).model_fields if getattr(a, f) != getattr(b, f)]
        else:
            out.append(key)
    return out


def keep_restart_keys(running: "Config", new: "Config") -> "Config":
    """new, with every AT_RESTART key at its running value."""
    return new.model_copy(update={k: getattr(running, k) for k in AT_RESTART})


# KSMCTL_* variable -> key path in the config.
ENV_KEYS = {
    "KSMCTL_POLICY": ("policy",),
    "KSMCTL_INTERVAL": ("interval",),
    "KSMCTL_LIBVIRT_URI": ("libvirt_uri",),
    "KSMCTL_LIBVIRT": ("libvirt",),
    "KSMCTL_STATE_FILE": ("state_file",),
    "KSMCTL_STATE_DIR": ("state_dir",),
    "KSMCTL_RESTORE_ON_EXIT": ("restore_on_exit",),
    "KSMCTL_LOG_LEVEL": ("log_level",),
    "KSMCTL_LISTEN": ("exporter", "listen"),
    "KSMCTL_EXPORTER": ("exporter", "enabled"),
    "KSMCTL_WEB_CONFIG": ("exporter", "web_config"),
    "KSMCTL_TEXTFILE": ("exporter", "textfile"),
    "KSMCTL_TRACE": ("trace", "path"),
}


def load_config(path: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                overrides: Optional[Dict[str, Any]] = None) -> Config:
    """path None: the default file if it exists, else defaults. An explicit path must exist."""
    env = os.environ if env is None else env
    explicit = path is not None or "KSMCTL_CONFIG" in env
    path = path or env.get("KSMCTL_CONFIG") or DEFAULT_CONFIG_PATH
    data: Dict[str, Any] = {}
    lines: Dict[Any, int] = {}
    if explicit or os.path.lexists(path):
        text = read_input(path, "config", MAX_CONFIG_BYTES, ConfigError).text
        try:
            loaded, lines = load_yaml(text, str(path))
        except YamlProblem as e:
            raise ConfigError(str(e)) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("%s: the top level must be a mapping of keys to values" % path)
        data = loaded or {}
    for var, keys in ENV_KEYS.items():
        if var in env:
            cur = data
            for k in keys[:-1]:
                cur = cur.setdefault(k, {})
                if not isinstance(cur, dict):
                    raise ConfigError("%s: %s must be a mapping" % (path, k))
            cur[keys[-1]] = env[var]
    for k, v in (overrides or {}).items():
        if v is not None:
            data[k] = v
    try:
        return validate(Config, data, str(path), lines)
    except YamlProblem as e:
        msg = str(e)
        # The key of each problem ("file:line: key: ..."), to name a variable that set it.
        bad_keys = {line.split(": ", 2)[1] for line in msg.splitlines() if line.count(": ") >= 2}
        for var, keys in ENV_KEYS.items():
            if var in env and ".".join(keys) in bad_keys:
                msg += "\n(%s is set in the environment: %r)" % (var, env[var])
        raise ConfigError(msg) from None
