"""One writer per index folder: an OS file lock held for the writer's whole life.

The lock is ``flock`` on ``<folder>/.rkit-writer.lock`` (through filelock), so the kernel releases it when the
process dies, kill -9 included: a crashed writer never leaves a stale lock behind. Beside it,
``.rkit-writer.json`` says who holds it (pid, host, command, since when) so the next writer can name the holder.
Readers never take it: they read a committed SQLite snapshot and check the backend against it by content.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import IndexLockedError

LOCK_FILE = ".rkit-writer.lock"
HOLDER_FILE = ".rkit-writer.json"


class WriterLock:
    def __init__(self, folder: Path, label: str):
        self.folder, self.label = Path(folder), label
        self._lock = FileLock(str(self.folder / LOCK_FILE))

    def acquire(self, wait: float | bool = False) -> "WriterLock":
        """Take the lock now, or raise IndexLockedError naming the holder; ``wait``: True (forever) or seconds."""
        timeout = -1 if wait is True else float(wait or 0)
        try:
            self._lock.acquire(timeout=timeout, poll_interval=0.2)
        except Timeout:
            raise IndexLockedError(f"{self.label} is being written by {describe_holder(self.folder)}; "
                                   "wait for it to finish, or pass --wait to queue behind it") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")}
        tmp = self.folder / (HOLDER_FILE + f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(holder), encoding="utf-8")
            os.replace(tmp, self.folder / HOLDER_FILE)
        except OSError:  # only informative: a missing holder note must not stop a writer
            tmp.unlink(missing_ok=True)
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            try:
                (self.folder / HOLDER_FILE).unlink(missing_ok=True)
            except OSError:
                pass
            self._lock.release(force=True)

    @property
    def held(self) -> bool:
        return self._lock.is_locked


def _holder(folder: Path) -> dict | None:
    """The writer's holder note (None when absent or unreadable: it is only informative)."""
    try:
        note = json.loads((Path(folder) / HOLDER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def writer_active(folder: Path) -> bool:
    """A reader's hint, without touching the lock (taking it, even for a moment, could make a writer fail):
    True while the holder note names a live process on this host."""
    h = _holder(folder)
    if h is None:
        return False
    if h.get("host") != socket.gethostname():
        return True  # another host's writer: nothing to check it by, trust the note
    try:
        os.kill(int(h["pid"]), 0)
        return True
    except ProcessLookupError:
        return False  # a writer killed before it could remove its note
    except PermissionError:
        return True  # alive, owned by someone else
    except (OSError, ValueError, KeyError, TypeError):
        return False


def describe_holder(folder: Path) -> str:
    h = _holder(folder)
    try:
        return f"pid {h['pid']} on {h['host']} ({h['command']}, since {h['since']})"
    except (KeyError, TypeError):
        return "another process"


def _command() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    text = " ".join(argv)
    return text if len(text) <= 120 else text[:117] + "..."

