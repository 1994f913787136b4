"""A persistent on-disk cache of fetched chunk bytes, shared by processes and by later runs.

:class:`DiskChunkCache` keeps the stored (still compressed) bytes of remote chunks
under ``cache_dir``, one file per chunk, in a folder per array::

    cache_dir/<array id>/array.json     the URL and metadata, for people
    cache_dir/<array id>/c/0/3/1        one chunk: a 16-byte header, then its bytes

The array id is a digest of the array's URL *and* its metadata, so an array that
changes on the server gets a new folder instead of stale chunks.

Guarantees (see :mod:`~vesuvius_dask.cachefiles` for the mechanics):

* **Nothing torn is ever served.** Files appear by atomic rename, and each carries
  its length and CRC-32; a file that fails the check (a disk error, a power loss
  after a rename whose data never reached the disk) is removed and fetched again.
* **Each chunk is fetched once.** A process that misses takes the chunk's claim; a
  process that misses a chunk another one is fetching waits for it and reads the
  file (:meth:`DiskChunkCache.get_or_fetch`).
* **A byte budget holds.** Every ``max_bytes / 16`` written by a process, the
  least recently used files of the whole ``cache_dir`` are removed down to 90% of
  the budget (one process at a time; a hit marks its file used). The folder can
  exceed the budget by what the processes writing to it wrote since their last
  eviction: at most ``max_bytes / 16`` each.

Why not fsspec's ``simplecache``/``filecache`` or zarr's ``CacheStore``: the fsspec
caches write a download straight into its final name (a killed process leaves a
torn file that the next run serves as the chunk), keep no byte budget and let two
workers fetch the same chunk at once; zarr's experimental ``CacheStore`` writes
atomically but tracks its budget in the memory of one process (a new run does not
know what is on disk, so the folder grows without bound across runs) and does not
coordinate processes either. The three properties above are what the stream's
DataLoader workers and resumed jobs need.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cachefiles import CLAIM_SUFFIX, TMP_SUFFIX, claim, claim_key, evict, release, write_atomic

__all__ = ["DiskChunkCache", "default_budget", "array_id", "MISSING"]

_MAGIC = b"VDC1"
_HEADER = struct.Struct("<4sIQ")  # magic, crc32, length
#: Stored marker for a chunk the server does not have (read as the fill value).
MISSING = b""
_MISSING_FLAG = 1 << 63


def default_budget(root: Path) -> int:
    """The default byte budget: half the free space of ``root``'s disk, at most 64 GiB."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return int(min(64 * 2**30, st.f_bavail * st.f_frsize // 2))


def _is_entry(name: str) -> bool:
    """Chunk files only: not claims, temporary files, ``array.json`` or ``.claims``/``.evict``."""
    return not (name.startswith(".") or name.endswith(CLAIM_SUFFIX) or name.endswith(TMP_SUFFIX)
                or name == "array.json")


class DiskChunkCache:
    """Chunk bytes of one remote array, cached in ``root`` (shared with every array there).

    Parameters
    ----------
    root : str or Path
        The cache folder (created if needed); the budget is for all of it.
    array_id : str
        A digest naming the array (URL and metadata).
    max_bytes : int, optional
        Budget for ``root`` (default :func:`default_budget`).
    about : dict, optional
        Written to ``array.json`` (the URL, for people browsing the folder).
    """

    def __init__(self, root: str | os.PathLike, array_id: str, max_bytes: int | None = None,
                 about: dict | None = None) -> None:
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
        self.array_id = array_id
        self.path = self.root / array_id
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes) if max_bytes is not None else default_budget(self.root)
        if about is not None and not (self.path / "array.json").exists():
            text = json.dumps(about, indent=1, sort_keys=True, default=str)
            write_atomic(self.path / "array.json", lambda f: f.write(text.encode()))
        self._init_counters()

    def _init_counters(self) -> None:
        self._pid = os.getpid()
        self._guard = threading.Lock()
        self._folders: set[Path] = set()
        self._warned = False
        self._written = 0
        self.corrupt = 0  # files that failed their check (removed, fetched again)

    @property
    def _lock(self) -> threading.Lock:
        """The lock of the current process (a forked child never inherits one a parent thread held)."""
        if self._pid != os.getpid():
            self._init_counters()
        return self._guard

    def __getstate__(self) -> dict:
        return {"root": self.root, "array_id": self.array_id, "path": self.path,
                "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_counters()

    def file(self, key: str) -> Path:
        """The file of store key ``key`` (``c/0/3/1``, ``0.3.1``)."""
        parts = [p for p in key.split("/") if p not in ("", ".", "..")]
        return self.path.joinpath(*parts)

    def get(self, key: str) -> bytes | None:
        """The cached bytes (``MISSING`` for a chunk the server lacks), or None on a miss."""
        path = self.file(key)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        data = self._check(raw)
        if data is None:
            with self._lock:
                self.corrupt += 1
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # eviction removes the least recently *used* files first
        return data

    @staticmethod
    def _check(raw: bytes) -> bytes | None:
        if len(raw) < _HEADER.size:
            return None
        magic, crc, length = _HEADER.unpack_from(raw)
        if magic != _MAGIC:
            return None
        if length == _MISSING_FLAG and len(raw) == _HEADER.size:
            return MISSING
        data = raw[_HEADER.size:]
        if len(data) != length or zlib.crc32(data) != crc:
            return None
        return data

    def put(self, key: str, data: bytes | None) -> bool:
        """Store a chunk's bytes (None: the server has no such chunk); whether it was stored.

        A write that fails (a full disk, a folder removed meanwhile and not
        re-creatable) warns once per process and leaves the chunk uncached: the
        caller has its bytes either way.
        """
        if data is None:
            header, body = _HEADER.pack(_MAGIC, 0, _MISSING_FLAG), memoryview(b"")
        else:
            body = memoryview(data)
            header = _HEADER.pack(_MAGIC, zlib.crc32(body), body.nbytes)

        def write(f: Any) -> None:
            f.write(header)
            f.write(body)

        path = self.file(key)
        try:
            try:
                self._folder(path)
                write_atomic(path, write)
            except FileNotFoundError:  # its folder was removed since: make it again
                self._folders.discard(path.parent)
                self._folder(path)
                write_atomic(path, write)
        except OSError as err:
            self._warn_once(f"cache_dir {self.root}: cannot write {path.name} ({err}); "
                            "going on without caching what cannot be written")
            return False
        with self._lock:
            self._written += body.nbytes + _HEADER.size
        self._evict_when_due()
        return True

    def _warn_once(self, text: str) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        import warnings

        warnings.warn(text, RuntimeWarning, stacklevel=3)

    def _evict_when_due(self) -> None:
        """Evict once ``max_bytes / 16`` were written here since the last eviction.

        The evicting thread goes on while the writes made during its scan are due
        too; a thread that finds another one evicting (here or in another process)
        leaves it to that one, or to its own next put.
        """
        while True:
            with self._lock:
                due = self._written if self._written > self.max_bytes // 16 else 0
            if not due or self.evict() < 0:
                return
            with self._lock:
                self._written = max(0, self._written - due)

    def get_or_fetch(self, key: str, fetch: Callable[[], bytes | None]) -> tuple[bytes | None, bool]:
        """The chunk's bytes and whether this call fetched them (with ``fetch``).

        Only a process that misses and holds the claim fetches; one that finds
        another process fetching the chunk waits for it and reads the file.
        """
        hit = self.get(key)
        if hit is not None:
            return (None if hit == MISSING else hit), False
        fd = self._claim(key, wait=True)
        try:
            hit = self.get(key)
            if hit is not None:
                return (None if hit == MISSING else hit), False
            data = fetch()
            self.put(key, data)
            return data, True
        finally:
            release(fd)

    def try_claim(self, key: str) -> int | None:
        """The claim on ``key`` if no process holds it (for a fetch started now), else None."""
        return self._claim(key, wait=False)

    def _claim(self, key: str, wait: bool) -> int | None:
        import fcntl

        entry = self.file(key)
        if not hasattr(fcntl, "F_OFD_SETLK"):  # claim_key falls back to a file beside the entry
            self._folder(entry)
        return claim_key(self.path / ".claims", key, entry, wait=wait)

    def _folder(self, entry: Path) -> None:
        """Make the entry's folder (once per process; eviction removes files, not folders)."""
        if entry.parent not in self._folders:
            entry.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(entry.parent)

    def has(self, key: str) -> bool:
        return self.file(key).is_file()

    def evict(self) -> int:
        """Bring the whole cache folder to 90% of the budget (skipped while another process does)."""
        fd = claim(self.root / ".evict", wait=False)
        if fd is None:
            return -1
        try:
            return evict([self.root], self.max_bytes, _is_entry, target=0.9)
        finally:
            release(fd)

    def nbytes(self) -> int:
        """Bytes of chunk files in the whole cache folder."""
        total = 0
        for dirpath, _, names in os.walk(self.root):
            for n in names:
                if _is_entry(n):
                    with contextlib.suppress(FileNotFoundError):
                        total += os.stat(os.path.join(dirpath, n)).st_size
        return total

    def __repr__(self) -> str:
        return f"DiskChunkCache({str(self.path)!r}, max_bytes={self.max_bytes})"


def array_id(url: str, metadata: Any) -> str:
    """The cache folder name of an array: a digest of its URL and metadata."""
    text = json.dumps({"url": url, "metadata": metadata}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]

