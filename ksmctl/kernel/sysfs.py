"""Reads /sys/kernel/mm/ksm, tolerating attributes an older kernel lacks.

KsmSysfs is the one object that knows where the KSM directory is: the writer, the
coexistence checks and the estimator take one, so tests aim them all at a fixture tree.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

from ksmctl.errors import KsmNotAvailable, ReadError
from ksmctl.kernel import knobs
from ksmctl.readings import KsmState

KSM_SUBDIR = "kernel/mm/ksm"


def parse_advisor_mode(text: str) -> Tuple[str, Tuple[str, ...]]:
    """'[none] scan-time' -> ('none', ('none', 'scan-time'))."""
    modes = []
    selected = None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            word = word[1:-1]
            selected = word
        modes.append(word)
    if selected is None or not modes:
        raise ValueError("no [selected] mode in %r" % text)
    return selected, tuple(modes)


class KsmSysfs:
    """Reader of the KSM sysfs directory. `sys_root` lets tests use a fixture tree."""

    def __init__(self, sys_root: str = "/sys", page_size: Optional[int] = None) -> None:
        self.dir = Path(sys_root) / KSM_SUBDIR
        self.page_size: int = page_size or os.sysconf("SC_PAGE_SIZE")

    def available(self) -> bool:
        return (self.dir / "run").exists()

    def require(self) -> None:
        if not self.available():
            raise KsmNotAvailable(
                "KSM is not available: %s does not exist (kernel built without CONFIG_KSM?)" % self.dir)

    def path(self, name: str) -> Path:
        return self.dir / name

    def has(self, name: str) -> bool:
        return (self.dir / name).exists()

    def read_raw(self, name: str) -> str:
        try:
            return (self.dir / name).read_text().strip()
        except OSError as e:
            raise ReadError("cannot read %s: %s" % (self.dir / name, e.strerror or e)) from None
        except UnicodeDecodeError:
            raise ReadError("%s: not text (undecodable bytes)" % (self.dir / name)) from None

    def read_int(self, name: str) -> int:
        text = self.read_raw(name)
        try:
            return int(text)
        except ValueError:
            raise ReadError("%s: expected an integer, found %r" % (self.dir / name, text[:40])) from None

    def read_choice(self, name: str) -> Tuple[str, Tuple[str, ...]]:
        raw = self.read_raw(name)
        try:
            return parse_advisor_mode(raw)
        except ValueError:
            raise ReadError("%s: expected modes with one [selected], found %r"
                            % (self.dir / name, raw[:60])) from None

    def read(self) -> KsmState:
        """One snapshot. Missing attributes go to `unsupported`, garbled ones to `unreadable`;
        neither is an error, so one bad file never costs the whole reading."""
        self.require()
        values: Dict[str, int] = {}
        unsupported: Set[str] = set()
        unreadable: Dict[str, str] = {}
        advisor_mode: Optional[str] = None
        advisor_modes: Tuple[str, ...] = ()
        for k in knobs.all_knobs():
            name = k.name
            if not (self.dir / name).exists():
                unsupported.add(name)
                continue
            try:
                if k.kind is knobs.Kind.CHOICE:  # advisor_mode, the one word-valued attribute
                    advisor_mode, advisor_modes = self.read_choice(name)
                else:
                    values[name] = self.read_int(name)
            except ReadError as e:
                unreadable[name] = e.message
        return KsmState(values=values, advisor_mode=advisor_mode, advisor_modes=advisor_modes,
                        unsupported=frozenset(unsupported), unreadable=unreadable,
                        page_size=self.page_size)
