"""Stored objects read by byte range: the one way partial reads reach the bytes.

Partial reads (an uncompressed chunk cut in place, a shard's index and its inner
chunks) ask for ``(key, byte ranges)`` through :meth:`LocalFiles.read_ranges`, the
one function a remote source can serve with range requests later. Locally, a
``start`` below zero is a suffix (the last ``-start`` bytes, as HTTP's
``bytes=-n``), each range is one ``pread``, and a missing file is ``None``.

A local source also memory-maps files (:meth:`LocalFiles.mapped`): a block then
reads only the pages it touches, with no per-range Python call. Maps are kept in a
bounded least-recently-used map per process (:data:`MAPPED_FILES`); a map holds no
file descriptor.

:func:`merge_ranges` coalesces ranges whose gap is small (a ``pread`` costs about
as much as copying a few kilobytes), adding at most a quarter to the bytes read.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

from ..lru import LRU

__all__ = ["LocalFiles", "MAPPED_FILES", "MERGE_GAP", "merge_ranges"]

#: Files kept memory-mapped per process (address space only: pages stay the kernel's page cache).
MAPPED_FILES = LRU(512)
os.register_at_fork(after_in_child=MAPPED_FILES.after_fork)

#: Ranges closer than this many bytes are read as one.
MERGE_GAP = 4096


def merge_ranges(ranges: list[tuple[int, int]], gap: int = MERGE_GAP) -> list[tuple[int, int, int]]:
    """Sorted ``(start, stop)`` ranges merged across gaps up to ``gap`` and a quarter of a range.

    A merge adds at most a quarter to the bytes read. Returns ``(start, stop, count)``:
    each merged range and how many inputs it covers.
    """
    out: list[list[int]] = []
    for a, b in ranges:
        if out and a - out[-1][1] <= min(gap, (b - a) // 4):
            out[-1][1] = max(out[-1][1], b)
            out[-1][2] += 1
        else:
            out.append([a, b, 1])
    return [(a, b, n) for a, b, n in out]


class LocalFiles:
    """The stored objects of a local Zarr array, as files under ``root``.

    Parameters
    ----------
    root : path
        The array's folder; keys are relative to it (``c/0/1/2``, ``0.1.2``).
    mapped : bool
        Whether :meth:`mapped` memory-maps files (else partial reads use
        :meth:`read_ranges`, as a remote source would).
    """

    def __init__(self, root: Path, mapped: bool = True) -> None:
        self.root = Path(root)
        self.mapping = mapped

    def path(self, key: str) -> Path:
        return self.root / key

    def size(self, key: str) -> int | None:
        """Bytes of the object, or None when it is absent."""
        try:
            return os.stat(self.root / key).st_size
        except FileNotFoundError:
            return None

    def stamp(self, key: str) -> tuple[int, int, int] | None:
        """``(inode, size, modification time)`` of the object, or None when it is absent.

        What is kept about an object (a shard's index) is kept under its stamp, so a
        rewritten object is read again.
        """
        try:
            st = os.stat(self.root / key)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read_ranges(self, key: str, ranges: list[tuple[int, int | None]]) -> list[bytes] | None:
        """The bytes of each ``(start, stop)`` of object ``key``, or None when it is absent.

        ``start < 0`` (with ``stop`` None) is the last ``-start`` bytes. A range past
        the end of the object gives fewer bytes (the caller says what that means).
        """
        try:
            fd = os.open(self.root / key, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            out = []
            for start, stop in ranges:
                if start < 0:
                    size = os.fstat(fd).st_size
                    start, stop = max(0, size + start), size
                out.append(os.pread(fd, max(0, int(stop) - start), start))  # type: ignore[arg-type]
            return out
        finally:
            os.close(fd)

    def mapped(self, key: str) -> tuple[Any, int, tuple[int, int, int]] | None:
        """``(memory map, size, stamp)`` of object ``key`` (kept per process), or None when absent.

        A kept map is used while the file's inode, size and modification time are
        unchanged (one ``stat``): a rewritten file is mapped again. An empty file is
        ``(b"", 0)`` (it cannot be mapped).
        """
        path = str(self.root / key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = MAPPED_FILES.get(path)
        if hit is not None and hit[2] == stamp:
            return hit
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            buf = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else b""
        finally:
            os.close(fd)
        MAPPED_FILES.pop(path)
        hit = (buf, size, stamp)
        MAPPED_FILES.put(path, hit)
        return hit

    def forget(self, key: str) -> None:
        """Drop the map of ``key`` (after it was found to be bad: the file may be rewritten)."""
        MAPPED_FILES.pop(str(self.root / key))
