"""Files of a cache folder shared by processes: atomic writes, claims, and eviction by a byte budget.

Both chunk caches that several processes share — decoded chunks in ``/dev/shm``
(:mod:`~vesuvius_dask.shared_cache`) and fetched chunk bytes on disk
(:mod:`~vesuvius_dask.disk_cache`) — are folders of files that follow three rules:

* a file appears whole or not at all: it is written under a temporary name and
  renamed into place (:func:`write_atomic`), so a process killed mid-write leaves
  only a ``.tmp`` file, which no reader ever opens and :func:`evict` sweeps;
* one process fills an entry while the others wait: a *claim* is an exclusive
  ``flock`` on a ``.claim`` file beside the entry (:func:`claim`), or, on Linux, a
  byte-range lock on one claims file for the whole folder (:func:`claim_key`: no
  file to create per entry, which costs as much as writing the entry); the kernel
  drops either when its holder dies, so a killed process never blocks the others;
* past the budget, the least recently used files go first (:func:`evict`; a hit
  touches its file, so modification time is last use).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["write_atomic", "claim", "claim_key", "release", "evict", "TMP_SUFFIX", "CLAIM_SUFFIX"]

TMP_SUFFIX = ".tmp"
CLAIM_SUFFIX = ".claim"

#: Unique within a process (with the pid: across processes); ``next`` is atomic in CPython.
_TMP_IDS = itertools.count()

#: A temporary file older than this (seconds) belongs to a dead writer.
_STALE_TMP = 3600.0


def write_atomic(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``target`` through ``write(file)`` under a temporary name, then rename it into place."""
    tmp = target.with_name(f"{target.name}.{os.getpid()}-{next(_TMP_IDS)}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def claim(entry: Path, *, wait: bool = True) -> int | None:
    """Take the claim on ``entry``: a file descriptor to :func:`release`.

    With ``wait`` False, None if another process holds it.
    """
    import fcntl

    fd = os.open(str(entry) + CLAIM_SUFFIX, os.O_CREAT | os.O_RDWR, 0o600)
    return _locked(fd, lambda: fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB))


def claim_key(table: Path, key: str, entry: Path, *, wait: bool = True) -> int | None:
    """Take the claim on ``key``: a byte-range lock on the file ``table`` (Linux), or :func:`claim`.

    An open-file-description lock (``F_OFD_SETLK``) at offset ``crc32(key)``: like
    ``flock``, it belongs to the descriptor (two threads of one process exclude each
    other) and is dropped when it is closed or its process dies, but many keys share
    one file. Elsewhere, :func:`claim` on ``entry``. With ``wait`` False, None if
    another holder has it. Give it back with :func:`release`.
    """
    import fcntl
    import struct
    import zlib

    if not hasattr(fcntl, "F_OFD_SETLK"):
        return claim(entry, wait=wait)
    fd = os.open(table, os.O_CREAT | os.O_RDWR, 0o600)
    lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, zlib.crc32(key.encode()), 1, 0)
    return _locked(fd, lambda: fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, lock))


def _locked(fd: int, lock: Callable[[], Any]) -> int | None:
    """``fd`` once ``lock()`` succeeded; None (``fd`` closed) if another holder has the lock."""
    try:
        lock()
    except (BlockingIOError, PermissionError):  # held elsewhere (EAGAIN, or EACCES for fcntl)
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int) -> None:
    """Give a claim back (closing the descriptor drops the lock)."""
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def _walk(root: Path) -> Iterator[os.DirEntry]:
    stack = [str(root)]
    while stack:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(stack.pop()):
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    yield entry


def evict(roots: Iterable[Path], max_bytes: int, keep: Callable[[str], bool],
          target: float = 1.0) -> int:
    """Remove least recently used files under ``roots`` down to ``target * max_bytes``.

    Returns the bytes left.

    ``keep(name)`` says which file names are entries (others — claims, metadata —
    are not counted); temporary files of dead writers are removed.
    """
    files = []
    total = 0
    now = time.time()
    for root in roots:
        for entry in _walk(root):
            with contextlib.suppress(FileNotFoundError):
                if entry.name.endswith(TMP_SUFFIX):
                    if now - entry.stat().st_mtime > _STALE_TMP:
                        os.unlink(entry.path)
                    continue
                if not keep(entry.name):
                    continue
                st = entry.stat()
                files.append((st.st_mtime_ns, entry.path, st.st_size))
                total += st.st_size
    limit = int(max_bytes * target)
    for _, path, size in sorted(files):
        if total <= limit:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + CLAIM_SUFFIX)
        total -= size
    return total
