"""Per-shard locks, so that two runs writing one local shard set never write, or clean up, the same shard.

A run holds `.shard-NNNNNN.lock` (an exclusive `fcntl.flock`) while it writes shard NNNNNN. The kernel
drops the lock when its process dies, however it dies, so a lock that can be taken belongs to nobody:
the temporary files of that shard are then a dead run's, and only then are they removed. The lock file
holds the owner's host and PID, for the message of a run that waits.

Object stores have no such locks: runs into one URL must be told apart by rank (RANK / WORLD_SIZE).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_GLOB = ".shard-*.lock"


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a file it names as its writer is then still
    being written)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def lock_name(index: int) -> str:
    return f".shard-{index:06d}.lock"


class ShardLock:
    """The lock of shard `index` in the directory `directory`; `acquire` then `release` (or `with`)."""

    def __init__(self, directory: Path, index: int):
        self.path, self.index = Path(directory) / lock_name(index), index
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; without `blocking`, return False at once when another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        self._fd = fd
        return True

    def owner(self) -> str:
        """Who holds (or last held) the lock, as "host PID"; empty when unknown."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ShardLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
