"""The daemon's log lines on stderr, with their priority for journald.

Under systemd, stderr is a stream to journald (JOURNAL_STREAM names it). journald reads
a `<N>` prefix (sd-daemon(3)) as the line's syslog priority, so `journalctl -p warning`
and alerting on priorities work; without the prefix every line would be `info`. Outside
journald the lines stay plain `LEVEL name: message`.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional, TextIO

# logging level -> syslog priority (sd-daemon(3): SD_DEBUG 7 ... SD_CRIT 2)
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
             (logging.INFO, 6), (logging.NOTSET, 7))
FORMAT = "%(levelname)s %(name)s: %(message)s"


def priority(levelno: int) -> int:
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


class JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback too) carries the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "<%d>" % priority(record.levelno)
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal(stream: TextIO = sys.stderr, env: Optional[dict] = None) -> bool:
    """True when stream is the journald stream systemd named in JOURNAL_STREAM (dev:ino)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError, AttributeError):
        return False


def error_text(text: str, stream: TextIO = sys.stderr) -> str:
    """An error message for stderr: at priority err (3) when stderr is the journal, so a
    refused start is an error in the journal too, not an info line."""
    if not stderr_is_journal(stream):
        return text
    return "\n".join("<3>" + line for line in text.splitlines())


def configure_logging(level: str, stream: TextIO = sys.stderr) -> None:
    """As logging.basicConfig: a no-op when the root logger already has handlers."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter(FORMAT) if stderr_is_journal(stream) else logging.Formatter(FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
