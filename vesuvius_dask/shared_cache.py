"""Decoded chunks shared by the processes of one machine (DataLoader workers), decoded once.

:class:`SharedChunkCache` keeps decoded chunks as ``.npy`` files in a folder in
``/dev/shm`` (memory, not disk) that every DataLoader worker of a stream reaches by
name. A worker that needs a chunk maps the file (no copy: the pages are shared); on
a miss it takes an exclusive ``flock`` on the chunk's claim file, so that of several
workers wanting the same chunk at once one decodes it while the others wait and then
map it. Files appear by atomic rename, so a worker killed mid-write leaves nothing
torn, and a dead worker's locks are released by the kernel. One byte budget holds
for the machine: past it, the least recently written files are removed (a process
that still maps one keeps its pages until it lets go). The folder belongs to the
process that made it and is removed when that process's stream is collected or
the process exits; folders of processes that no longer exist are swept at start.
"""

from __future__ import annotations

import os
import shutil
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .cachefiles import claim, evict, release, write_atomic

__all__ = ["SharedChunkCache", "shared_memory_dir"]

_PREFIX = "vesuvius-dask-chunks-"


def shared_memory_dir() -> Path | None:
    """``/dev/shm`` when it exists and is writable (Linux), else None."""
    p = Path("/dev/shm")
    return p if p.is_dir() and os.access(p, os.W_OK) else None


def _sweep_stale(root: Path) -> None:
    """Remove chunk folders whose owner process is gone (a killed main process)."""
    for d in root.glob(_PREFIX + "*"):
        try:
            pid = int(d.name[len(_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _remove(path: str, owner: int) -> None:
    if os.getpid() == owner:  # a forked or spawned copy never removes the owner's folder
        shutil.rmtree(path, ignore_errors=True)


class SharedChunkCache:
    """Decoded chunks in shared memory, one decode per chunk per machine.

    Parameters
    ----------
    max_bytes : int
        Budget for the whole machine (at most a quarter of the free ``/dev/shm``).
    root : Path, optional
        Where the folder goes (default ``/dev/shm``).
    """

    def __init__(self, max_bytes: int, root: Path | None = None) -> None:
        root = root or shared_memory_dir()
        if root is None:
            raise OSError("no shared-memory folder (/dev/shm) on this machine")
        _sweep_stale(root)
        st = os.statvfs(root)
        self.max_bytes = int(min(max_bytes, st.f_bavail * st.f_frsize // 4))
        self.owner = os.getpid()
        # made on first write, by whichever process writes first; removed by the owner
        self.path = root / f"{_PREFIX}{self.owner}-{uuid.uuid4().hex[:8]}"
        self._written = 0
        self._finalizer = weakref.finalize(self, _remove, str(self.path), self.owner)

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes, "owner": self.owner, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._written = 0

    def _file(self, key: tuple) -> Path:
        return self.path / ("_".join(str(k) for k in key) + ".npy")

    def get(self, key: tuple) -> np.ndarray | None:
        """The chunk, mapped read-only from shared memory, or None (marked used: LRU by use)."""
        path = self._file(key)
        try:
            arr = np.load(path, mmap_mode="r")
            os.utime(path)  # eviction removes the least recently *used* files first
            return arr
        except (FileNotFoundError, ValueError, OSError):
            return None

    def has(self, key: tuple) -> bool:
        """Whether some process has put the chunk here."""
        return self._file(key).exists()

    def get_or_load(self, key: tuple, load: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
        """The chunk, decoding it with ``load`` only if no process has; and whether this call did."""
        hit = self.get(key)
        if hit is not None:
            return hit, False
        target = self._file(key)
        self.path.mkdir(exist_ok=True)
        fd = claim(target)  # another process decoding it: wait for it
        try:
            hit = self.get(key)
            if hit is not None:
                return hit, False
            arr = np.ascontiguousarray(load())
            write_atomic(target, lambda f: np.save(f, arr))
            self._written += arr.nbytes
            if self._written > self.max_bytes // 8:
                self._written = 0
                evict([self.path], self.max_bytes, lambda name: name.endswith(".npy"))
            mapped = self.get(key)  # the shared pages, not a private copy, stay in use
            return (arr if mapped is None else mapped), True
        finally:
            release(fd)

    def nbytes(self) -> int:
        """Bytes held in the folder now (the machine-wide footprint of the cache)."""
        if not self.path.exists():
            return 0
        return sum(e.stat().st_size for e in os.scandir(self.path) if e.name.endswith(".npy"))

    def close(self) -> None:
        """Remove the folder now (owner only)."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"SharedChunkCache({str(self.path)!r}, max_bytes={self.max_bytes})"



