"""Locks that die with their process: `flock` on a file beside what is guarded.

A pid file is check-then-act (two processes can both find it stale and both take it) and outlives a killed
owner; an flock is taken atomically by the kernel and released when its holder's file is closed, which
includes the holder being killed. The lock file itself stays (removing it would let a third process lock a
new file while the second holds the old one).
"""

from __future__ import annotations

import os
from pathlib import Path


class FileLock:
    """An exclusive advisory lock on `path` (created if needed). `acquire(blocking=False)` says whether it was
    taken; with `blocking=True` it waits. The holder's pid is written into the file for messages only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def holder(self) -> int | None:
        """The pid the current holder wrote (for a message; may be gone by the time it is read)."""
        try:
            return int(self.path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
