"""Stored objects read by byte range: the one way partial reads reach the bytes.

Partial reads (an uncompressed chunk cut in place, a shard's index and its inner
chunks) ask for ``(key, byte ranges)`` through :meth:`LocalFiles.read_ranges`, the
one function a remote source can serve with range requests later. Locally, a
``start`` below zero is a suffix (the last ``-start`` bytes, as HTTP's
``bytes=-n``), each range is one ``pread``, and a missing file is ``None``.

A local source also memory-maps files (:meth:`LocalFiles.mapped`): a block then
reads only the pages it touches, with no per-range Python call. Maps are kept in a
bounded least-recently-used map per process (:data:`MAPPED_FILES`); a map holds no
file descriptor. A mapped file truncated or rewritten *in place* (``cp`` over it,
``truncate``) makes the next touch of a vanished page a SIGBUS, which kills the
process (Python cannot catch it); a file replaced by rename (as zarr writes chunks)
is safe, the old inode stays mapped. The setting ``map-files: false`` (see
:func:`~vesuvius_dask.io.partial.map_files`) makes every local partial read a
``pread`` instead.

:func:`merge_ranges` coalesces ranges whose gap is small (a ``pread`` costs about
as much as copying a few kilobytes), adding at most a quarter to the bytes read.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import stat
from pathlib import Path
from typing import Any

from ..lru import LRU

__all__ = ["LocalFiles", "RemoteRanges", "MAPPED_FILES", "MERGE_GAP", "REMOTE_GAP", "merge_ranges",
           "open_regular"]

#: Files kept memory-mapped per process (address space only: pages stay the kernel's page cache).
MAPPED_FILES = LRU(512)
os.register_at_fork(after_in_child=MAPPED_FILES.after_fork)

#: Ranges closer than this many bytes are read as one.
MERGE_GAP = 4096


def merge_ranges(ranges: list[tuple[int, int]], gap: int = MERGE_GAP, slack: float = 0.25
                 ) -> list[tuple[int, int, int]]:
    """Sorted ``(start, stop)`` ranges merged across gaps up to ``gap`` and ``slack`` of a range.

    A merge adds at most ``slack`` (a quarter) to the bytes read. Returns
    ``(start, stop, count)``: each merged range and how many inputs it covers.
    """
    out: list[list[int]] = []
    for a, b in ranges:
        if out and a - out[-1][1] <= min(gap, int((b - a) * slack)):
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

    #: Files on this machine: sizes are cheap to ask (a ``stat``), absent files are known.
    local = True

    def __init__(self, root: Path, mapped: bool = True) -> None:
        self.root = Path(root)
        self.mapping = mapped
        self._prefix = os.path.join(str(self.root), "")  # keys joined as strings: pathlib costs ~5 us a call

    def path(self, key: str) -> Path:
        return self.root / key

    def url(self, key: str) -> str:
        """How errors name object ``key`` (its file)."""
        return str(self.root / key)

    @staticmethod
    def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """:func:`merge_ranges` as a ``pread`` costs: gaps up to :data:`MERGE_GAP`, a quarter more bytes."""
        return merge_ranges(ranges)

    def size(self, key: str) -> int | None:
        """Bytes of the object, or None when it is absent (``OSError`` when it is not a file)."""
        try:
            st = os.stat(self.root / key)
        except FileNotFoundError:
            return None
        _check_regular(self.root / key, st.st_mode)
        return st.st_size

    def stamp(self, key: str) -> tuple[int, int, int] | None:
        """``(inode, size, modification time)`` of the object, or None when it is absent.

        What is kept about an object (a shard's index) is kept under its stamp, so a
        rewritten object is read again.
        """
        try:
            st = os.stat(self.root / key)
        except FileNotFoundError:
            return None
        _check_regular(self.root / key, st.st_mode)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read_ranges(self, key: str, ranges: list[tuple[int, int | None]]) -> list[bytes] | None:
        """The bytes of each ``(start, stop)`` of object ``key``, or None when it is absent.

        ``start < 0`` (with ``stop`` None) is the last ``-start`` bytes. A range past
        the end of the object gives fewer bytes (the caller says what that means).
        """
        try:
            fd, _ = open_regular(self.root / key)
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
        path = self._prefix + key
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = MAPPED_FILES.get(path)
        if hit is not None and hit[2] == stamp:
            return hit
        try:
            fd, opened = open_regular(path)
        except FileNotFoundError:
            return None
        try:
            size = opened.st_size
            buf = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else b""
        finally:
            os.close(fd)
        MAPPED_FILES.pop(path)
        hit = (buf, size, stamp)
        MAPPED_FILES.put(path, hit)
        return hit

    def forget(self, key: str) -> None:
        """Drop the map of ``key`` (after it was found to be bad: the file may be rewritten)."""
        MAPPED_FILES.pop(self._prefix + key)


#: What a bounded request raises when it ran out of time (asyncio's is its own class before 3.11).
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """A read-only descriptor of ``path`` and its ``fstat``, refused (``OSError``) unless a regular file.

    Opened without blocking, so a FIFO left where a chunk should be is refused
    rather than waited on for a writer; a folder is named as one.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        _check_regular(path, st.st_mode)
    except OSError:
        os.close(fd)
        raise
    return fd, st


def _check_regular(path: str | os.PathLike, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise OSError(f"{path} is {kind}, not a stored chunk or shard file")


#: Over the network a request costs a round trip (one per plane made 140 requests per 64^3
#: block, 14x slower than whole chunks): ranges closer than this are asked as one (:class:`RemoteRanges`).
REMOTE_GAP = 1 << 20


class RemoteRanges:
    """The stored objects of a remote Zarr array, read by byte range through its fetcher.

    Every range goes through :meth:`RemoteChunks.get_ranges
    <vesuvius_dask.remote.fetch.RemoteChunks.get_ranges>` (its request window,
    refusals, retries, bounds and named faults): ranges of one call are requested
    together. An object's size (for a shard: where its index ends, and what its
    entries may point at) is asked once with a ``HEAD`` (``info`` of the
    filesystem, retried as a fetch is) and kept by the caller.

    Parameters
    ----------
    remote : RemoteChunks
        The array's fetcher; its ``cache`` (a ``cache_dir``), when set, keeps what
        :meth:`cached` fetches.
    """

    local = False
    mapping = False

    def __init__(self, remote: Any) -> None:
        self.remote = remote

    @property
    def cache(self) -> Any:
        return self.remote.cache

    def url(self, key: str) -> str:
        return self.remote.url(key)

    @staticmethod
    def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """:func:`merge_ranges` as a request costs: every gap up to :data:`REMOTE_GAP`.

        A piece's planes are one request: at most its chunk's bytes, about twice the rows it needs.
        """
        return merge_ranges(ranges, REMOTE_GAP, float(REMOTE_GAP))

    def stamp(self, key: str) -> tuple:
        """No stamp without a request: a remote object is taken as unchanged while the process runs."""
        return ()

    def size(self, key: str) -> int | None:
        """Bytes of object ``key`` (a ``HEAD``), or None when it is absent and read as the fill value.

        Absent is the fill value when the fetcher says so (``missing='fill'``).

        Raises
        ------
        ChunkFetchError
            Every attempt failed (a 404 with ``missing='error'`` included), naming the URL.
        """
        import random
        import time

        from ..errors import ChunkFetchError

        url = self.url(key)
        s = self.remote.settings
        last: BaseException | None = None
        for attempt in range(int(s.retries) + 1):
            try:
                return _object_size(_filesystem(self.remote), url, float(s.timeout))
            except FileNotFoundError as err:
                if s.missing == "fill":
                    return None
                last = err
                break
            except Exception as err:  # timeouts, HTTP errors, connection errors
                last = err
                time.sleep(s.backoff * 2 ** attempt * (1 + 0.25 * random.random()))
        reason = ("not found (HTTP 404)" if isinstance(last, FileNotFoundError)
                  else f"no answer within {s.timeout:g} s" if isinstance(last, _TIMEOUTS)
                  else f"{type(last).__name__}: {last}")
        raise ChunkFetchError(f"{self.remote.name}: the size of {url} could not be asked: {reason}") from last

    def read_ranges(self, key: str, ranges: list[tuple[int, int | None]]) -> list[bytes] | None:
        """The bytes of each ``(start, stop)`` of object ``key`` (fetched together), or None when absent.

        ``start < 0`` (``stop`` None) is the last ``-start`` bytes (the size asked first).
        """
        asks = []
        for start, stop in ranges:
            if start < 0:
                size = self.size(key)
                if size is None:
                    return None
                start, stop = max(0, size + start), size
            asks.append((key, int(start), int(stop)))  # type: ignore[arg-type]
        got = self.remote.get_ranges(asks)
        return None if any(g is None for g in got) else got


def _object_size(fs: Any, url: str, timeout: float) -> int:
    """The size of ``url`` (a ``HEAD``), given up after ``timeout`` seconds (``TimeoutError``).

    fsspec's own timeouts are those of its client (aiohttp: 5 minutes), not the
    fetcher's ``remote.timeout``: the request is bounded here, on fsspec's loop.
    """
    if not getattr(fs, "async_impl", False):
        return int(fs.info(url)["size"])
    from fsspec.asyn import sync

    async def bounded() -> dict:
        return await asyncio.wait_for(fs._info(url), timeout)

    return int(sync(fs.loop, bounded)["size"])


#: fsspec filesystems asking object sizes, per process and fetcher options.
_SIZE_FS: dict = {}


def _filesystem(remote: Any) -> Any:
    import json

    import fsspec

    key = (os.getpid(), remote.protocol, json.dumps(remote.storage_options, sort_keys=True, default=repr))
    fs = _SIZE_FS.get(key)
    if fs is None:
        if len(_SIZE_FS) > 16:
            _SIZE_FS.clear()
        fs = _SIZE_FS[key] = fsspec.filesystem(remote.protocol, skip_instance_cache=True,
                                               **remote.storage_options)
    return fs
