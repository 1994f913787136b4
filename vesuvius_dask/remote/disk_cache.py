"""A persistent on-disk cache of fetched chunk bytes, shared by processes and by later runs.

:class:`DiskChunkCache` keeps the stored (still compressed) bytes of remote chunks
under ``cache_dir``, one file per chunk, in a folder per array::

    cache_dir/.vesuvius-dask-cache       marks the folder as a cache (format version)
    cache_dir/<array id>/array.json      the URL and metadata, for people
    cache_dir/<array id>/c/0/3/1         one chunk: a 16-byte header, then its bytes

The array id is a digest of the array's URL *and* its metadata, so an array that
changes on the server gets a new folder instead of stale chunks.

Guarantees (see :mod:`~vesuvius_dask.remote.cache_files` for the mechanics):

* **A cache_dir owns only what it wrote.** A new or empty folder becomes a cache
  (the marker file ``.vesuvius-dask-cache`` is written); a folder that holds
  anything else and no marker is refused (:class:`~vesuvius_dask.errors.CacheDirError`),
  so ``cache_dir=~/data`` never costs a file. Eviction walks only the array
  folders the cache made (those with an ``array.json``), never follows a symlink,
  and removes only files that start with the cache's header (and its own stale
  temporary files): anything else dropped inside stays.
* **Nothing torn is ever served.** Files appear by atomic rename, and each carries
  its length and CRC-32; a file that fails the check (a disk error, a power loss
  after a rename whose data never reached the disk) is fetched again.
* **Each chunk is fetched once.** A process that misses takes the chunk's claim; a
  process that misses a chunk another one is fetching waits for it and reads the
  file (:meth:`DiskChunkCache.get_or_fetch`), for at most the claim timeout
  (``vesuvius-dask.remote.claim-timeout``, 60 s), then fetches it itself.
* **A byte budget holds.** Every ``max_bytes / 16`` written by a process, the
  least recently used files of the whole ``cache_dir`` are removed down to 90% of
  the budget (one process at a time; a hit marks its file used). The folder can
  exceed the budget by what the processes writing to it wrote since their last
  eviction: at most ``max_bytes / 16`` each.

**Private by default, shareable by a group.** Folders the cache makes are
``0o700`` and its files ``0o600``: other users cannot read them or plant chunk
bytes in them. To share one ``cache_dir`` between the users of a group, make the
folder yourself, group-writable with the setgid bit, before the first run::

    mkdir -m 2770 /data/vd-cache && chgrp scrolls /data/vd-cache

Everything the cache then makes inside follows the folder's group bits (folders
``2770``, files ``0660``, whatever each user's umask), so every member of the
group reads, claims and writes the same chunks. A ``cache_dir`` that belongs to
another user and is not shared with a group of yours, or that every user may
write to (``0o777`` without the sticky bit), is refused: someone else could plant
chunk bytes there.

Why not fsspec's ``simplecache``/``filecache`` or zarr's ``CacheStore``: the fsspec
caches write a download straight into its final name (a killed process leaves a
torn file that the next run serves as the chunk), keep no byte budget and let two
workers fetch the same chunk at once; zarr's experimental ``CacheStore`` writes
atomically but tracks its budget in the memory of one process (a new run does not
know what is on disk, so the folder grows without bound across runs) and does not
coordinate processes either. The properties above are what the stream's
DataLoader workers and resumed jobs need.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CacheDirError
from .cache_files import (
    CLAIM_SUFFIX,
    TMP_SUFFIX,
    claim,
    claim_key,
    evict,
    is_own_tmp,
    make_dirs,
    release,
    walk_files,
    write_atomic,
)

__all__ = ["DiskChunkCache", "default_budget", "array_id", "open_cache_dir", "MISSING", "MARKER"]

_MAGIC = b"VDC1"
_HEADER = struct.Struct("<4sIQ")  # magic, crc32, length
#: Stored marker for a chunk the server does not have (read as the fill value).
MISSING = b""
_MISSING_FLAG = 1 << 63

#: The file that makes a folder a cache_dir, and the format it declares.
MARKER = ".vesuvius-dask-cache"
_FORMAT = "vesuvius-dask cache_dir"
_VERSION = 1

#: Names an array folder gets (:func:`array_id`): a folder of a cache made before the marker existed.
_ARRAY_DIR = re.compile(r"[0-9a-f]{24}\Z")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_READ_FLAGS = _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _read_entry(path: Path) -> bytes | None:
    """A chunk file's bytes, or None: missing, not a regular file, or a symlink (never followed).

    Four system calls (open, fstat, read, close): fewer than Python's
    ``open().read()`` makes, and a FIFO planted at a chunk's name never blocks.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _READ_FLAGS)
    except OSError:
        return None
    try:
        size = os.fstat(fd)
        if not stat.S_ISREG(size.st_mode):
            return None
        raw = os.read(fd, size.st_size)
        while len(raw) < size.st_size:  # a short read (rare for regular files)
            more = os.read(fd, size.st_size - len(raw))
            if not more:
                break
            raw += more
        return raw
    except OSError:
        return None
    finally:
        os.close(fd)


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


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _our_groups() -> set[int]:
    return {os.getegid(), *os.getgroups()}


def _check_trust(path: Path, st: os.stat_result) -> None:
    """Refuse a folder others could plant chunk bytes in (one line naming it)."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002 and not mode & stat.S_ISVTX:
        raise CacheDirError(f"cache_dir {path} is writable by every user (mode {mode:04o}, no sticky bit): "
                            "anyone could plant chunk bytes there; use a folder of your own")
    if st.st_uid != os.geteuid() and not (mode & 0o070 == 0o070 and st.st_gid in _our_groups()):
        raise CacheDirError(f"cache_dir {path} belongs to another user (uid {st.st_uid}) and is not shared "
                            "with a group of yours (group rwx): its owner could plant chunk bytes there; "
                            "use a folder of your own")


def _modes(st: os.stat_result) -> tuple[int, int]:
    """``(folder mode, file mode)`` for what the cache makes in a root of status ``st``.

    Private (``0o700``, ``0o600``) unless the root is group-writable: then its
    group bits (and setgid bit) are followed.
    """
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o020:
        return 0o700, 0o600
    return 0o700 | (mode & 0o070) | (mode & stat.S_ISGID), 0o600 | (mode & 0o060)


def _read_marker(root: Path) -> dict | None:
    """The marker's content, or None if there is none (a marker that is not ours: CacheDirError)."""
    path = root / MARKER
    try:
        fd = os.open(path, os.O_RDONLY | _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as err:  # ELOOP: a symlink
        raise CacheDirError(f"cache_dir {root}: {MARKER} cannot be read ({err.strerror}); "
                            "it must be a file the cache wrote") from err
    try:
        text = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        meta = json.loads(text)
        ok = isinstance(meta, dict) and meta.get("format") == _FORMAT and int(meta.get("version")) >= 1
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise CacheDirError(f"cache_dir {root}: {MARKER} is not a vesuvius-dask cache marker; "
                            "choose an empty or new folder")
    if int(meta["version"]) > _VERSION:
        raise CacheDirError(f"cache_dir {root} was written by a newer vesuvius-dask (cache format "
                            f"{meta['version']}; this one reads {_VERSION}); choose another folder")
    return meta


def _looks_like_old_cache(root: Path, names: list[str]) -> bool:
    """Whether ``root`` holds only what a cache made before the marker existed (array folders, claims)."""
    for name in names:
        path = root / name
        if name == ".evict" + CLAIM_SUFFIX or (name.startswith(MARKER) and is_own_tmp(name)):
            continue
        if not (_ARRAY_DIR.match(name) and stat.S_ISDIR(os.lstat(path).st_mode)
                and _is_regular(str(path / "array.json"))):
            return False
    return True


def open_cache_dir(root: str | os.PathLike) -> tuple[Path, int, int]:
    """Check (or make) ``root`` as a cache folder: ``(root, folder mode, file mode)``.

    A missing folder is made (private); an empty one, or one with the marker, is
    used. Anything else is refused.

    Raises
    ------
    CacheDirError
        ``root`` is a file, holds files that are not a cache, or others could
        write to it (see the module notes).
    """
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    try:
        st = os.stat(root)
    except FileNotFoundError:
        root.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile: check it
            os.mkdir(root, 0o700)
        st = os.stat(root)
    except NotADirectoryError as err:
        raise CacheDirError(f"cache_dir {root} cannot be made: a part of its path is a file") from err
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"cache_dir {root} is a file, not a folder; choose an empty or new folder")
    _check_trust(root, st)
    folder_mode, file_mode = _modes(st)
    if _read_marker(root) is None:
        names = os.listdir(root)
        if names and not _looks_like_old_cache(root, names):
            shown = sorted(names)[0]
            raise CacheDirError(f"cache_dir {root} is not a vesuvius-dask cache: it holds {len(names)} "
                                f"other entries (such as {shown!r}) and no {MARKER}; choose an empty or "
                                "new folder")
        text = json.dumps({"format": _FORMAT, "version": _VERSION}).encode()
        write_atomic(root / MARKER, lambda f: f.write(text), mode=file_mode)
    return root, folder_mode, file_mode


class DiskChunkCache:
    """Chunk bytes of one remote array, cached in ``root`` (shared with every array there).

    Parameters
    ----------
    root : str or Path
        The cache folder (made if needed; see :func:`open_cache_dir` for what is
        refused); the budget is for all of it.
    array_id : str
        A digest naming the array (URL and metadata).
    max_bytes : int, optional
        Budget for ``root`` (default :func:`default_budget`).
    about : dict, optional
        Written to ``array.json`` (the URL, for people browsing the folder).

    Raises
    ------
    CacheDirError
        ``root`` cannot be a cache (it holds other files, is a file, or others
        could write to it).
    """

    def __init__(self, root: str | os.PathLike, array_id: str, max_bytes: int | None = None,
                 about: dict | None = None) -> None:
        self.root, self.folder_mode, self.file_mode = open_cache_dir(root)
        self.array_id = array_id
        self.path = self.root / array_id
        try:
            make_dirs(self.path, self.root, self.folder_mode)
        except NotADirectoryError as err:
            raise CacheDirError(f"cache_dir {self.root}: {array_id} is not a folder the cache made "
                                "(a symlink or a file); remove it or choose another folder") from err
        _check_trust(self.path, os.lstat(self.path))
        self.max_bytes = int(max_bytes) if max_bytes is not None else default_budget(self.root)
        if not os.path.lexists(self.path / "array.json"):  # marks the folder as the cache's own
            text = json.dumps(about if about is not None else {"array_id": array_id}, indent=1,
                              sort_keys=True, default=str)
            write_atomic(self.path / "array.json", lambda f: f.write(text.encode()), mode=self.file_mode)
        self._init_counters()

    def _init_counters(self) -> None:
        self._pid = os.getpid()
        self._guard = threading.Lock()
        self._folders: set[Path] = set()
        self._warned = False
        self._written = 0
        self.corrupt = 0  # files that failed their check (fetched again)

    @property
    def _lock(self) -> threading.Lock:
        """The lock of the current process (a forked child never inherits one a parent thread held)."""
        if self._pid != os.getpid():
            self._init_counters()
        return self._guard

    def __getstate__(self) -> dict:
        return {"root": self.root, "array_id": self.array_id, "path": self.path,
                "max_bytes": self.max_bytes, "folder_mode": self.folder_mode, "file_mode": self.file_mode}

    def __setstate__(self, state: dict) -> None:
        state.setdefault("folder_mode", 0o700)
        state.setdefault("file_mode", 0o600)
        self.__dict__.update(state)
        self._init_counters()

    def file(self, key: str) -> Path:
        """The file of store key ``key`` (``c/0/3/1``, ``0.3.1``)."""
        parts = [p for p in key.split("/") if p not in ("", ".", "..")]
        return self.path.joinpath(*parts)

    def get(self, key: str) -> bytes | None:
        """The cached bytes (``MISSING`` for a chunk the server lacks), or None on a miss.

        A file that fails its check counts as a miss (the next :meth:`put` replaces
        it); one that starts with the cache's header is removed at once.
        """
        path = self.file(key)
        raw = _read_entry(path)
        if raw is None:  # missing, a folder, a symlink, unreadable
            return None
        data = self._check(raw)
        if data is None:
            with self._lock:
                self.corrupt += 1
            if raw[:len(_MAGIC)] == _MAGIC:  # ours, torn: out of the way (anything else is left alone)
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
                write_atomic(path, write, mode=self.file_mode)
            except FileNotFoundError:  # its folder was removed since: make it again
                self._folders.discard(path.parent)
                self._folder(path)
                write_atomic(path, write, mode=self.file_mode)
        except OSError as err:
            self._warn_once(f"cache_dir {self.root}: cannot write {path.name} ({err}); "
                            "going on without caching what cannot be written")
            return False
        with self._lock:
            self._written += body.nbytes + _HEADER.size
        self._evict_when_due()
        return True

    def remove(self, key: str, data: bytes | None = None) -> bool:
        """Remove the file of ``key`` if it holds ``data`` (None: the absent-chunk marker); whether it did.

        For bytes that turned out not to decode: a copy another process has put
        since (other bytes) stays.
        """
        path = self.file(key)
        raw = _read_entry(path)
        held = None if raw is None else self._check(raw)
        if held is None or held != (MISSING if data is None else bytes(data)):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
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

    def get_or_fetch(self, key: str, fetch: Callable[[], bytes | None], *,
                     timeout: float | None = None) -> tuple[bytes | None, bool]:
        """The chunk's bytes and whether this call fetched them (with ``fetch``).

        Only a process that misses and holds the claim fetches; one that finds
        another process fetching the chunk waits for it (at most ``timeout``
        seconds, default config ``vesuvius-dask.remote.claim-timeout``, then
        fetches it too) and reads the file.
        """
        hit = self.get(key)
        if hit is not None:
            return (None if hit == MISSING else hit), False
        fd = self.claim(key, timeout=timeout)
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
        return self.claim(key, wait=False)

    def claim(self, key: str, *, wait: bool = True, timeout: float | None = None) -> int | None:
        """The claim on ``key`` (a descriptor for :func:`~vesuvius_dask.remote.cache_files.release`), or None.

        None: another process holds it (``wait`` False), the wait timed out, or
        the claims file cannot be opened (one warning: the chunk is then fetched
        without a claim).
        """
        import fcntl

        entry = self.file(key)
        for attempt in range(2):
            try:
                if not hasattr(fcntl, "F_OFD_SETLK"):  # claim_key falls back to a file beside the entry
                    self._folder(entry)
                return claim_key(self.path / ".claims", key, entry, wait=wait, timeout=timeout,
                                 mode=self.file_mode)
            except FileNotFoundError:  # the array's folder was removed since: make it again
                if attempt:
                    raise
                self._folders.clear()
                make_dirs(self.path, self.root, self.folder_mode)
            except OSError as err:  # a symlink where the claims file goes (ELOOP), no permission
                self._warn_once(f"cache_dir {self.root}: cannot open the claims file of {self.array_id} "
                                f"({err.strerror or err}); going on without claims")
                return None
        return None  # pragma: no cover - the loop returns or raises

    def _folder(self, entry: Path) -> None:
        """Make the entry's folder (once per process; eviction removes files, not folders)."""
        if entry.parent not in self._folders:
            make_dirs(entry.parent, self.root, self.folder_mode)
            self._folders.add(entry.parent)

    def has(self, key: str) -> bool:
        return self.file(key).is_file()

    def _array_dirs(self) -> list[Path]:
        """The array folders of the whole cache: real folders (not symlinks) with an ``array.json``."""
        out = []
        with contextlib.suppress(OSError):
            for e in os.scandir(self.root):
                if e.is_dir(follow_symlinks=False) and _is_regular(os.path.join(e.path, "array.json")):
                    out.append(Path(e.path))
        return out

    def evict(self) -> int:
        """Bring the whole cache folder to 90% of the budget (skipped while another process does).

        Only files of the cache's array folders that start with its header are
        removed (see :func:`~vesuvius_dask.remote.cache_files.evict`).
        """
        try:
            fd = claim(self.root / ".evict", wait=False, mode=self.file_mode)
        except OSError as err:
            self._warn_once(f"cache_dir {self.root}: cannot open {self.root / '.evict'}{CLAIM_SUFFIX} "
                            f"({err.strerror or err}); not evicting")
            return -1
        if fd is None:
            return -1
        try:
            return evict(self._array_dirs(), self.max_bytes, _is_entry, target=0.9, magic=_MAGIC)
        finally:
            release(fd)

    def nbytes(self) -> int:
        """Bytes of chunk files in the whole cache folder."""
        total = 0
        for folder in self._array_dirs():
            for entry in walk_files(folder):
                if _is_entry(entry.name):
                    with contextlib.suppress(OSError):
                        total += entry.stat(follow_symlinks=False).st_size
        return total

    def __repr__(self) -> str:
        return f"DiskChunkCache({str(self.path)!r}, max_bytes={self.max_bytes})"


def array_id(url: str, metadata: Any) -> str:
    """The cache folder name of an array: a digest of its URL and metadata."""
    text = json.dumps({"url": url, "metadata": metadata}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]
