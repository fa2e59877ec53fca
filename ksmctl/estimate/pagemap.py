"""/proc/<pid>/pagemap entries, classified a window at a time, and the zero page's frames.

A window's classes are one bytes object (one byte per page, from the entry's top byte
through a 256-entry table), so runs of readable pages are found by a regex in C rather
than by a Python test per page. Pagemap gives each present page's frame number (root
with CAP_SYS_ADMIN only), which is how "achieved" is counted exactly.
"""
from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE = 1 << 61
PM_EXCLUSIVE = 1 << 56
PFN_MASK = (1 << 55) - 1
HUGE_ZERO_PAGES = 512         # the huge zero page (THP): 2 MiB of consecutive frames

# Classes of a page from the top byte of its pagemap entry (bits 56..63).
C_SKIP, C_EXCL, C_SHARED, C_FILE = b".", b"P", b"S", b"F"


def _class_table() -> bytes:
    table = bytearray(256)
    for top in range(256):
        if not top & 0x80:          # bit 63: not present (untouched, or swapped: bit 62)
            table[top] = C_SKIP[0]
        elif top & 0x20:            # bit 61: file page or shared anon; the huge zero page too
            table[top] = C_FILE[0]
        elif top & 0x01:            # bit 56: mapped exactly once: cannot be sharing a frame
            table[top] = C_EXCL[0]
        else:
            table[top] = C_SHARED[0]
    return bytes(table)


_CLASS = _class_table()
READ_RUN_RE = re.compile(rb"[PS]+")     # pages to read: present anonymous
FILE_RUN_RE = re.compile(rb"F+")


def classify(window: bytes) -> bytes:
    """One class byte per 8-byte little-endian entry of `window`."""
    return window[7::8].translate(_CLASS)


@dataclass(frozen=True)
class ZeroFrames:
    """Frames of the kernel's zero page: pages mapping them already cost nothing."""

    pfns: Tuple[int, ...] = ()
    huge_first: Optional[int] = None    # first frame of the huge zero page, if seen

    def is_huge_zero(self, pfn: int) -> bool:
        return self.huge_first is not None and self.huge_first <= pfn < self.huge_first + HUGE_ZERO_PAGES


def probe_zero_frames(proc_root: str, page_size: int) -> ZeroFrames:
    """Learn the zero page's frame number(s) by reading untouched memory of our own.

    The huge zero page (THP) shows as 512 consecutive frames flagged as file pages, so
    its first frame is kept too. Nothing learnt (no pagemap, no THP) is not an error.
    """
    pfns = []
    try:
        fd = os.open(Path(proc_root) / "self" / "pagemap", os.O_RDONLY)
    except OSError:
        return ZeroFrames()
    try:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        small = mmap.mmap(-1, page_size, flags=flags)
        huge_len = 4 << 20
        big = mmap.mmap(-1, huge_len, flags=flags)
        try:
            if hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    big.madvise(mmap.MADV_HUGEPAGE)
                except OSError:
                    pass
            for m, off in ((small, 0), (big, None)):
                base = buffer_address(m)
                if off is None:   # a 2 MiB aligned address inside `big`
                    off = (-base) % (2 << 20)
                _ = m[off]        # read fault: maps the (huge) zero page
                raw = os.pread(fd, 8, (base + off) // page_size * 8)
                if len(raw) == 8:
                    e = int.from_bytes(raw, "little")
                    if e & PM_PRESENT and e & PFN_MASK:
                        pfns.append((e & PFN_MASK, bool(e & PM_FILE)))
        finally:
            small.close()
            big.close()
    except (OSError, ValueError):
        pass
    finally:
        os.close(fd)
    small_pfns: Tuple[int, ...] = ()
    huge: Optional[int] = None
    for pfn, is_file in pfns:
        if is_file:
            huge = pfn
        else:
            small_pfns = (pfn,)
    return ZeroFrames(small_pfns, huge)


def buffer_address(m: mmap.mmap) -> int:
    import ctypes
    obj = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(obj)
    finally:
        del obj
