"""A child process holding MADV_MERGEABLE memory with a known duplicate structure.

Run as `python -m tests.mergeable PAGES DISTINCT`: it maps PAGES anonymous pages,
fills them cyclically with DISTINCT different contents, marks them mergeable, prints
'ready <pid>' and holds the memory until stdin closes. With a third argument `late` it
prints 'filled' first and marks the memory mergeable only once a line arrives on stdin:
when it joins ksmd's list is then the caller's to choose.
"""
from __future__ import annotations

import mmap
import subprocess
import sys
from typing import Iterable, List

PAGE = mmap.PAGESIZE


def hold(pages: int, distinct: int, late: bool = False) -> None:
    m = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    patterns = [bytes([(i * 37 + 1) % 251 + 1]) * PAGE for i in range(distinct)]
    for i in range(pages):
        m[i * PAGE:(i + 1) * PAGE] = patterns[i % distinct]
    if late:
        sys.stdout.write("filled\n")
        sys.stdout.flush()
        sys.stdin.readline()
    m.madvise(mmap.MADV_MERGEABLE)
    sys.stdout.write("ready %d\n" % __import__("os").getpid())
    sys.stdout.flush()
    sys.stdin.read()


def release(procs: Iterable[subprocess.Popen], timeout: float = 10.0) -> None:
    """Stop children that hold memory until their stdin closes: every stdin is closed
    first, so they exit together; then each is reaped, SIGKILLed if it outlives `timeout`."""
    procs = list(procs)
    for p in procs:
        try:
            p.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Holder:
    """Starts `count` holders and stops them (context manager)."""

    def __init__(self, pages: int, distinct: int, count: int = 1) -> None:
        self.args = (pages, distinct, count)
        self.procs: List[subprocess.Popen] = []

    def __enter__(self) -> "Holder":
        pages, distinct, count = self.args
        for _ in range(count):
            p = subprocess.Popen([sys.executable, "-m", "tests.mergeable", str(pages), str(distinct)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
            self.procs.append(p)
        for p in self.procs:
            line = p.stdout.readline()  # blocks until the child has filled its memory
            assert line.startswith("ready"), line
        return self

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def __exit__(self, *exc) -> None:
        release(self.procs)


if __name__ == "__main__":
    hold(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["late"])
