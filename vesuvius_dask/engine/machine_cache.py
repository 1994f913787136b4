"""Decoded chunks shared by the processes of one machine (DataLoader workers), decoded once.

:class:`MachineChunkCache` keeps decoded chunks as files in a folder in ``/dev/shm``
(memory, not disk) that every DataLoader worker of a stream reaches by name. A
worker that needs a chunk maps the file (no copy: the pages are shared); on a miss
it takes an exclusive ``flock`` on the chunk's claim file, so that of several
workers wanting the same chunk at once one decodes it while the others wait and
then map it. Files appear by atomic rename, so a worker killed mid-write leaves
nothing torn, and a dead worker's locks are released by the kernel. One byte budget
holds for the machine: past it, the least recently written files are removed (a
process that still maps one keeps its pages until it lets go).

Files
    Each chunk is a fixed 128-byte header — magic, dtype string, number of
    dimensions, shape (little-endian integers, read with :mod:`struct`) — then the
    values in C order. A read checks the header and that the file's size is what it
    declares, then maps it: nothing is parsed that could race between threads
    (``np.load`` parses ``.npy`` headers with ``ast.literal_eval``, which CPython
    3.11 does not make safe to call from several threads at once).

Ownership and the stale-folder sweep
    The folder belongs to the process that made it (the owner) and is removed when
    that process's stream is collected or the process exits. The owner holds an
    exclusive ``flock`` on ``owner.lock`` in the folder for its whole life; the
    kernel drops it when the owner dies, however it dies. A sweep at start removes
    a folder only if it can take that lock without waiting — so a live owner in
    another PID namespace (containers sharing ``/dev/shm``), whose PID means nothing
    here, keeps its folder. The folder gets its name only once the lock is held (it
    is made under another name, then renamed), so no sweep sees it unlocked.
    Forked children (DataLoader workers) close their inherited copy of the lock's
    descriptor at fork: closing a copy leaves the owner's lock held, and a worker
    that outlives a killed owner does not keep the folder alive. Workers never
    remove the folder; if a sweep removed it after the owner died, their writes
    fail and they read without the shared cache. Folders made before this scheme
    (no ``owner.lock``) are removed only if their PID does not exist here and they
    are more than a day old (config ``vesuvius-dask.machine-cache.stale-age``).

When ``/dev/shm`` is full or not writable
    A failed write (no space — Docker's ``/dev/shm`` is 64 MB by default —, a
    read-only or missing folder, no permission) warns once per process
    (``RuntimeWarning`` naming the folder and the reason) and returns the chunk
    uncached; from then on :attr:`MachineChunkCache.usable` is False and the engine
    reads without the shared cache (its per-process cache still applies).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import shutil
import struct
import time
import uuid
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

from .. import config
from ..remote.cache_files import claim, evict, release, write_atomic

__all__ = ["MachineChunkCache", "shared_memory_dir", "write_chunk", "map_chunk"]

_PREFIX = "vesuvius-dask-chunks-"
#: A folder being set up (not yet locked): no sweep looks at this name.
_NEW = ".vesuvius-dask-new-"
_OWNER_LOCK = "owner.lock"
_SUFFIX = ".chunk"

#: Chunk file header: magic, dtype string (NUL-padded), ndim, shape (unused dims 0).
_MAGIC = b"VDCHUNK1"
_MAX_NDIM = 8
_HEADER = struct.Struct(f"<8s16sQ{_MAX_NDIM}q")
_DATA_OFFSET = 128  # header padded: the values start aligned for any dtype
_DTYPE_STR = re.compile(rb"[<>|=][biuf][1-8]")
_DTYPES: dict[bytes, np.dtype] = {}

#: Owner-lock descriptors this process holds, by descriptor; closed in forked children.
_HELD: dict[int, str] = {}
#: The process that last warned about a failed write (one warning per process).
_warned_pid: int | None = None


def _close_inherited_locks() -> None:
    # a child closes its copies only: the owner's lock stays held by the owner's descriptor
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def shared_memory_dir() -> Path | None:
    """``/dev/shm`` when it exists and is writable (Linux), else None."""
    p = Path("/dev/shm")
    return p if p.is_dir() and os.access(p, os.W_OK) else None


# -- chunk files ---------------------------------------------------------------------------
def write_chunk(f: IO[bytes], arr: np.ndarray) -> None:
    """Write ``arr`` (C-contiguous, at most 8-D, bool/int/float) as a chunk file."""
    header = _HEADER.pack(_MAGIC, arr.dtype.str.encode(), arr.ndim,
                          *arr.shape, *(0,) * (_MAX_NDIM - arr.ndim))
    f.write(header.ljust(_DATA_OFFSET, b"\0"))
    f.write(arr.reshape(-1).view(np.uint8).data)


def _dtype(text: bytes) -> np.dtype | None:
    dtype = _DTYPES.get(text)
    if dtype is None and _DTYPE_STR.fullmatch(text):
        try:
            dtype = _DTYPES[text] = np.dtype(text.decode())
        except TypeError:
            return None
    return dtype


def map_chunk(path: str | os.PathLike) -> np.ndarray | None:
    """A chunk file mapped read-only, or None if it is not a whole, valid chunk file.

    Raises
    ------
    OSError
        The file cannot be opened (e.g. ``FileNotFoundError``).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _HEADER.size, 0)
        if len(head) != _HEADER.size:
            return None
        magic, text, ndim, *dims = _HEADER.unpack(head)
        dtype = _dtype(text.rstrip(b"\0"))
        if magic != _MAGIC or dtype is None or ndim > _MAX_NDIM:
            return None
        shape = tuple(dims[:ndim])
        count = 1
        for d in shape:
            count *= d
        if min(shape, default=0) < 0 or size != _DATA_OFFSET + count * dtype.itemsize:
            return None
        if count == 0:
            return np.empty(shape, dtype)
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    return np.frombuffer(mapped, dtype, count, _DATA_OFFSET).reshape(shape)


def _cacheable(arr: np.ndarray) -> bool:
    return arr.ndim <= _MAX_NDIM and _dtype(arr.dtype.str.encode()) is not None


# -- the folder: made locked, removed by its owner, swept once its owner is gone ------------
def _make_folder(root: Path, name: str) -> int:
    """Make ``root/name`` with its owner lock held; the lock's descriptor."""
    import fcntl

    tmp = root / (_NEW + name)
    os.mkdir(tmp, 0o700)
    fd = -1
    try:
        fd = os.open(tmp / _OWNER_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, root / name)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _HELD[fd] = str(root / name)
    return fd


def _pid_gone(folder: Path) -> bool:
    try:
        os.kill(int(folder.name[len(_PREFIX):].split("-")[0]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, OverflowError, PermissionError):
        return False
    return False


def _sweep_one(folder: Path, now: float, stale_age: float) -> None:
    import fcntl

    lock = folder / _OWNER_LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)  # never created here: no lock file, no lock
    except FileNotFoundError:
        if _pid_gone(folder) and now - folder.stat().st_mtime > stale_age:  # an older version's
            shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its owner is alive (in whatever PID namespace)
        held, now_there = os.fstat(fd), os.stat(lock)  # still this folder's lock (not swept meanwhile)
        if (held.st_dev, held.st_ino) == (now_there.st_dev, now_there.st_ino):
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)


def _sweep_stale(root: Path) -> None:
    """Remove chunk folders whose owner is gone (a killed main process); never raises."""
    now = time.time()
    # a folder without owner.lock (older versions), or never finished, goes only past this age
    stale_age = float(config.get("machine-cache.stale-age"))
    try:
        folders = list(root.glob(_PREFIX + "*"))
        unfinished = [d for d in root.glob(_NEW + "*") if now - d.stat().st_mtime > stale_age]
    except OSError:
        return
    for d in folders:
        with contextlib.suppress(OSError):
            _sweep_one(d, now, stale_age)
    for d in unfinished:  # a process killed between mkdir and rename
        shutil.rmtree(d, ignore_errors=True)


def _remove(path: str, owner: int, fd: int | None) -> None:
    if os.getpid() != owner:  # a forked or spawned copy never removes the owner's folder
        return
    shutil.rmtree(path, ignore_errors=True)
    if fd is not None and _HELD.pop(fd, None) is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


class MachineChunkCache:
    """Decoded chunks in shared memory, one decode per chunk per machine.

    Parameters
    ----------
    max_bytes : int
        Budget for the whole machine (at most a quarter of the free ``/dev/shm``).
    root : Path, optional
        Where the folder goes (default ``/dev/shm``).

    Attributes
    ----------
    usable : bool
        False in a process where the cache could not be written (it then warned
        once); callers read without it.

    Raises
    ------
    OSError
        ``root`` is not given and this machine has no ``/dev/shm``.
    """

    def __init__(self, max_bytes: int, root: Path | None = None) -> None:
        root = root or shared_memory_dir()
        if root is None:
            raise OSError("no shared-memory folder (/dev/shm) on this machine")
        root = Path(root)
        _sweep_stale(root)
        try:
            st = os.statvfs(root)
            max_bytes = min(max_bytes, st.f_bavail * st.f_frsize // 4)
        except OSError:
            pass  # the folder is made next, and says what is wrong
        self.max_bytes = int(max_bytes)
        self.claim_timeout = float(config.get("machine-cache.claim-timeout"))
        self.owner = os.getpid()
        self.path = root / f"{_PREFIX}{self.owner}-{uuid.uuid4().hex[:8]}"
        self.usable = True
        self._written = 0
        lock_fd = None
        try:
            lock_fd = _make_folder(root, self.path.name)
        except OSError as err:
            self._give_up(err)
        self._finalizer = weakref.finalize(self, _remove, str(self.path), self.owner, lock_fd)

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes, "owner": self.owner, "path": self.path,
                "usable": self.usable, "claim_timeout": self.claim_timeout}

    def __setstate__(self, state: dict) -> None:
        state.setdefault("usable", True)
        state.setdefault("claim_timeout", float(config.get("machine-cache.claim-timeout")))
        self.__dict__.update(state)
        self._written = 0

    def _file(self, key: tuple) -> Path:
        return self.path / ("_".join(str(k) for k in key) + _SUFFIX)

    def _give_up(self, err: OSError) -> None:
        """Stop using the cache in this process, and say so once."""
        global _warned_pid
        self.usable = False
        if _warned_pid != os.getpid():
            _warned_pid = os.getpid()
            reason = err.strerror or str(err)
            warnings.warn(f"{self.path.parent}: cannot keep decoded chunks in shared memory ({reason}: "
                          f"{err.filename or self.path}); this process reads without the shared "
                          "chunk cache from now on (its own cache still applies)",
                          RuntimeWarning, stacklevel=3)

    def get(self, key: tuple) -> np.ndarray | None:
        """The chunk, mapped read-only from shared memory, or None (marked used: LRU by use)."""
        path = self._file(key)
        try:
            arr = map_chunk(path)
        except (OSError, ValueError):
            return None
        if arr is not None:
            with contextlib.suppress(OSError):
                os.utime(path)  # eviction removes the least recently *used* files first
        return arr

    def has(self, key: tuple) -> bool:
        """Whether some process has put the chunk here."""
        return self._file(key).exists()

    def get_or_load(self, key: tuple, load: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
        """The chunk, decoding it with ``load`` only if no process has; and whether this call did.

        If the cache cannot be written, the chunk ``load`` gives is returned uncached
        (see :attr:`usable`); errors of ``load`` itself propagate.
        """
        if not self.usable:
            return np.ascontiguousarray(load()), True
        hit = self.get(key)
        if hit is not None:
            return hit, False
        target = self._file(key)
        try:
            fd = claim(target, timeout=self.claim_timeout)  # another process decoding it: wait for it
        except OSError as err:
            self._give_up(err)
            return np.ascontiguousarray(load()), True
        try:
            hit = self.get(key)
            if hit is not None:
                return hit, False
            arr = np.ascontiguousarray(load())
            if not self._put(target, arr):
                return arr, True
            mapped = self.get(key)  # the shared pages, not a private copy, stay in use
            return (arr if mapped is None else mapped), True
        finally:
            release(fd)

    def _put(self, target: Path, arr: np.ndarray) -> bool:
        if not _cacheable(arr):
            return False
        try:
            write_atomic(target, lambda f: write_chunk(f, arr))
        except OSError as err:
            self._give_up(err)
            return False
        self._written += arr.nbytes
        if self._written > self.max_bytes // 8:
            self._written = 0
            with contextlib.suppress(OSError):
                evict([self.path], self.max_bytes, lambda name: name.endswith(_SUFFIX))
        return True

    def nbytes(self) -> int:
        """Bytes held in the folder now (the machine-wide footprint of the cache)."""
        try:
            return sum(e.stat().st_size for e in os.scandir(self.path) if e.name.endswith(_SUFFIX))
        except OSError:
            return 0

    def close(self) -> None:
        """Remove the folder now (owner only)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    def __repr__(self) -> str:
        return f"MachineChunkCache({str(self.path)!r}, max_bytes={self.max_bytes})"
