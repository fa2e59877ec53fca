"""Error types that reach people: each carries a message fit to print and an exit code.

Anything a person or the system supplies that is bad (a policy, a config, a CLI
argument, a sysfs file, a libvirt error) becomes one of these, never a traceback.
"""
from __future__ import annotations

import enum
from typing import Any, Optional

# Exit codes, documented in `ksmctl --help` and the README.
EXIT_OK = 0
EXIT_FAILURE = 1      # the operation was tried and failed (kernel refused a write, I/O error)
EXIT_USAGE = 2        # bad input: arguments, policy, config; or no KSM in this kernel
EXIT_PERMISSION = 3   # needs root
EXIT_REFUSED = 4      # refused by a safety guard (unmerge the host cannot absorb, another KSM writer)


class StrEnum(str, enum.Enum):
    """An enum whose members are their value wherever text is made: str(), format(), %s,
    json. Python 3.12 made format() of a str mixin show `Class.MEMBER`; labels, the state
    file and CLI output must not change with the interpreter."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def parse_or(cls, value: object, default: "Any") -> "Any":
        """The member named by a recorded value (a trace or state file holds plain
        strings), or default for one this version does not know."""
        try:
            return cls(value)
        except ValueError:
            return default


class ErrorSource(StrEnum):
    """Where an error came from: the `source` label of ksmctl_errors_total, so bounded."""

    SYSFS = "sysfs"
    PROC = "proc"
    LIBVIRT = "libvirt"
    POLICY = "policy"
    CONFIG = "config"
    TRACE = "trace"
    ESTIMATE = "estimate"
    EXPORTER = "exporter"
    OTHER = "other"

    @classmethod
    def parse(cls, name: object) -> "ErrorSource":
        """A recorded source; unknown ones are OTHER."""
        return cls.parse_or(name, cls.OTHER)


class KsmctlError(Exception):
    """Base of all errors that are reported to a person as a message."""

    exit_code = EXIT_FAILURE
    knob: Optional[str] = None   # the KSM knob a refused write was for

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(KsmctlError):
    exit_code = EXIT_USAGE


class PolicyError(UsageError):
    """A policy file is invalid; the message names file, key path, value and what is allowed."""


class ConfigError(UsageError):
    """The daemon config (file or KSMCTL_* environment) is invalid."""


class KsmNotAvailable(UsageError):
    """This kernel has no /sys/kernel/mm/ksm (CONFIG_KSM off)."""


class KernelWriteError(KsmctlError):
    """The kernel refused a write to a KSM knob."""


class PermissionDenied(KsmctlError):
    exit_code = EXIT_PERMISSION


class Refused(KsmctlError):
    """A safety guard refused the operation (it can be forced where the CLI says so)."""

    exit_code = EXIT_REFUSED


class ReadError(KsmctlError):
    """A sysfs or /proc file could not be read or parsed; the message names the file."""
