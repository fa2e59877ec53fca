"""Per-process /proc files read cheaply: one-shot reads with the file's identity, and
files kept open from tick to tick (KeptFiles). Apart from procfs.py, which parses what
these read."""
from __future__ import annotations

import errno
import os
import resource
import stat
from typing import Dict, Hashable, List, Optional, Tuple


def read_proc_bytes(path: str) -> Optional[bytes]:
    """A /proc file's bytes, or None when the process is gone. Plain os calls on str
    paths: this runs for every process every tick, where pathlib's overhead shows.
    For files of one record (statm, ksm_stat, comm, cmdline): a short read is taken as the
    whole file. A file of many records (smaps, maps) is handed out a seq_file buffer per
    read, short long before its end: read_proc_to_eof."""
    got = _read(path, False)
    return None if got is None else got[0]


def read_proc_to_eof(path: str) -> Optional[bytes]:
    """A /proc file read until read() returns nothing; None when the process is gone."""
    got = _read(path, False, whole=True)
    return None if got is None else got[0]


def read_proc_identified(path: str) -> Optional[Tuple[bytes, Tuple[int, int]]]:
    """A /proc file's bytes and the identity (inode, ctime) of the file read.

    /proc/<pid>/ files get their inode when first looked up and keep it while the dentry
    is cached; a new process that reuses the pid gets new inodes. So an unchanged identity
    proves the pid still names the process verified earlier, at the price of one fstat
    instead of re-reading its command line. (A changed one only means: verify again.)
    """
    return _read(path, True)


# A FIFO where a /proc file belongs (a fixture tree, a hostile --proc-root) must not block
# the open; a device (/dev/zero) must not be read without end: procfs files are regular.
_OPEN = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)


def _regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _read(path: str, identify: bool, whole: bool = False) -> Optional[Tuple[bytes, Tuple[int, int]]]:
    try:
        fd = os.open(path, _OPEN)
    except OSError:
        return None
    try:
        ident = (0, 0)
        if identify:
            st = os.fstat(fd)
            ident = (st.st_ino, st.st_ctime_ns)
        if whole and not _regular(fd):
            return None
        data = os.read(fd, 16384)
        if not data or (len(data) < 16384 and not whole):
            return data, ident   # one record: procfs hands it out whole when it fits
        if not whole and not _regular(fd):
            return None
        chunks = [data]
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks), ident
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)


def _pread_all(fd: int) -> bytes:
    data = os.pread(fd, 16384, 0)
    if len(data) < 16384:
        return data
    if not _regular(fd):
        raise OSError(errno.EINVAL, "not a regular file")
    chunks = [data]
    while True:
        chunk = os.pread(fd, 65536, sum(len(c) for c in chunks))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def default_kept_files() -> int:
    """How many per-process files the collectors may keep open: the exporter may take half
    of RLIMIT_NOFILE (export/http.py connection_limit), 64 more stay for libvirt, logs and
    one-off reads. 448 under the shipped unit's LimitNOFILE=1024."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(0, soft // 2 - 64)


class FileBudget:
    """The number of files all KeptFiles of one ProcFs may still keep open."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity


Ident = Hashable  # what says "the same process as last time": see KeptFiles.read


class KeptFiles:
    """Per-process /proc files kept open from tick to tick: one pread instead of open,
    fstat, read and close, for every guest every tick.

    An open /proc/<pid>/ file stays bound to the process it was opened for: once that
    process has exited, reading it fails (ESRCH), even when a new process has the pid.
    So while a kept file reads, it is the process it was when opened, and its identity
    (a serial number per open) proves it. Fixture trees hold regular files, which stay
    readable when removed: there a link count of 0 counts as the process gone.
    Beyond the budget, files are opened per read with their (inode, ctime) as identity
    (read_proc_identified). The owner releases a pid it stops tracking: an exited
    process's file is otherwise kept until read."""

    def __init__(self, root: str, budget: FileBudget, check_links: bool) -> None:
        self._root = root
        self._budget = budget
        self._check_links = check_links
        self._fds: Dict[Tuple[int, str], Tuple[int, Ident]] = {}  # (pid, name) -> (fd, identity)
        self._by_pid: Dict[int, List[str]] = {}
        self._serial = 0

    def __len__(self) -> int:
        return len(self._fds)

    def read(self, pid: int, name: str, verify: bool = True) -> Optional[Tuple[bytes, Ident]]:
        """The file's bytes and the identity of the process they are from; None when the
        process is gone or hides the file. A kept file that fails takes the pid's other
        kept files with it (they are that process's too). verify=False skips the fixture
        trees' link check: for a file read after one of the same pid that had it."""
        key = (pid, name)
        kept = self._fds.get(key)
        if kept is not None:  # the hot path: every guest, every tick
            data = self._pread(kept[0], verify)
            if data is not None:
                return data, kept[1]
            self.release(pid)
        path = "%s/%d/%s" % (self._root, pid, name)
        if self._budget.free <= 0:
            return read_proc_identified(path)
        try:
            fd = os.open(path, _OPEN)
        except OSError:
            return None
        first = self._pread(fd, verify)
        if first is None:
            os.close(fd)
            return None
        self._serial += 1
        ident = (-1, self._serial)
        self._fds[key] = (fd, ident)
        self._by_pid.setdefault(pid, []).append(name)
        self._budget.free -= 1
        return first, ident

    def read_bytes(self, pid: int, name: str, verify: bool = True) -> Optional[bytes]:
        got = self.read(pid, name, verify)
        return None if got is None else got[0]

    def _pread(self, fd: int, verify: bool) -> Optional[bytes]:
        try:
            data = os.pread(fd, 16384, 0)
            if len(data) >= 16384:  # procfs hands a small file out whole
                data = _pread_all(fd)
            if verify and self._check_links and os.fstat(fd).st_nlink == 0:
                return None
            # The files kept (ksm_stat, statm) are never empty for a live process; a
            # zombie's ksm_stat is (its mm is gone), and its cmdline too: not a guest.
            return data or None
        except OSError:
            return None

    def _close(self, key: Tuple[int, str]) -> None:
        fd, _ = self._fds.pop(key)
        names = self._by_pid.get(key[0], [])
        if key[1] in names:
            names.remove(key[1])
        if not names:
            self._by_pid.pop(key[0], None)
        self._budget.free += 1
        try:
            os.close(fd)
        except OSError:
            pass

    def release(self, pid: int) -> None:
        for name in list(self._by_pid.get(pid, ())):
            self._close((pid, name))

    def pids(self) -> Tuple[int, ...]:
        return tuple(self._by_pid)

    def close(self) -> None:
        for key in list(self._fds):
            self._close(key)


def is_procfs(root: str) -> bool:
    """A real procfs of our own pid namespace ('self' names us). Anything else (fixture
    trees, a foreign namespace's /proc) gets the link-count check of KeptFiles."""
    try:
        return os.readlink(os.path.join(root, "self")) == str(os.getpid())
    except OSError:
        return False
