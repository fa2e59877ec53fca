"""File helpers: atomic replacement for what ksmctl writes, and the one safe read for
every file a person or the system hands it (policy, config, web config, state, trace).

A path may name anything: a FIFO (an open would block forever), a device (/dev/zero
never ends; opening some, like /dev/watchdog, has effects), a directory, a huge file,
or text in another encoding. open_input() and read_input() refuse all of those with a
message naming the file, before reading a byte that is not from a regular file.
"""
from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Type, Union

from ksmctl.errors import KsmctlError, UsageError

PathLike = Union[str, "os.PathLike[str]"]

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def atomic_write(path: Union[str, Path], data: bytes, mode: int = 0o644) -> None:
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + p.name + ".", dir=str(p.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def format_size(n: int) -> str:
    """Limits in messages: 1 MiB, 64 KiB, 100 bytes."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return "%d %s" % (n // size, unit)
    return "%d bytes" % n


def check_path(v: Optional[str], required: bool = False, file: bool = False) -> Optional[str]:
    """A path setting: never a NUL byte (a YAML "\\0" escape; every system call refuses it),
    not empty when the key needs a path, and naming a file (not "/" or "dir/") when file."""
    if v is None:
        return v
    if "\0" in v:
        raise ValueError("a path cannot contain a NUL byte")
    if required and not v.strip():
        raise ValueError("expected a path, found an empty string")
    if file and v.strip() and (v.endswith("/") or os.path.basename(os.path.normpath(v)) in ("", ".", "..")):
        raise ValueError("expected the path of a file, found a directory path")
    return v


def open_input(path: PathLike, what: str, error: Type[KsmctlError] = UsageError) -> BinaryIO:
    """An open binary file that is a regular file (symlinks to one are fine), or `error`
    naming the path and what it is instead. Never blocks: FIFOs and devices are refused
    by stat before open, and the open itself is non-blocking and checked again (fstat)
    in case the path was swapped in between."""
    name = os.fspath(path)
    if not name or "\0" in name:  # os.stat would raise ValueError (NUL) or ENOENT ("")
        raise error("%r: not a %s file path (%s)" % (name[:80], what, "empty" if not name else "a NUL byte"))
    try:
        st = os.stat(name)
        if not stat.S_ISREG(st.st_mode):
            raise error("%s: is %s, expected a %s file" % (name, _kind(st.st_mode), what))
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise error("%s: no such %s file" % (name, what)) from None
    except OSError as e:
        raise error("%s: cannot read %s: %s" % (name, what, e.strerror or e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error("%s: is %s, expected a %s file" % (name, _kind(st.st_mode), what))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def decode_utf8(raw: bytes, where: str, what: str, error: Type[KsmctlError] = UsageError) -> str:
    """Text, or `error` naming the byte offset (never a UnicodeDecodeError)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error("%s: not UTF-8 text (byte %d), expected a %s file" % (where, e.start, what)) from None


@dataclass(frozen=True)
class InputFile:
    path: str
    raw: bytes
    text: str


def read_input(path: PathLike, what: str, max_bytes: int, error: Type[KsmctlError] = UsageError) -> InputFile:
    """A whole small input file as bytes and UTF-8 text, or `error` with a message that
    names the file and never quotes its contents. Sizes are counted by reading (st_size
    is 0 for /proc files), at most max_bytes + 1 of them."""
    name = os.fspath(path)
    with open_input(name, what, error) as f:
        try:
            raw = f.read(max_bytes + 1)
        except OSError as e:
            raise error("%s: cannot read %s: %s" % (name, what, e.strerror or e)) from None
    if len(raw) > max_bytes:
        raise error("%s: larger than %s, too large for a %s file" % (name, format_size(max_bytes), what))
    return InputFile(name, raw, decode_utf8(raw, name, what, error))
