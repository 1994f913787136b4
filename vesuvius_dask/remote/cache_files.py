"""Files of a cache folder shared by processes: atomic writes, claims, and eviction by a byte budget.

Both chunk caches that several processes share — decoded chunks in ``/dev/shm``
(:mod:`~vesuvius_dask.engine.machine_cache`) and fetched chunk bytes on disk
(:mod:`~vesuvius_dask.remote.disk_cache`) — are folders of files that follow these rules:

* a file appears whole or not at all: it is written under a temporary name and
  renamed into place (:func:`write_atomic`), so a process killed mid-write leaves
  only a ``.tmp`` file, which no reader ever opens and :func:`evict` sweeps. The
  temporary file is created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``) under an
  unpredictable name, so nothing planted in the folder (a symlink, a file) is ever
  written through or overwritten;
* one process fills an entry while the others wait: a *claim* is an exclusive
  ``flock`` on a ``.claim`` file beside the entry (:func:`claim`), or, on Linux, a
  byte-range lock on one claims file for the whole folder (:func:`claim_key`: no
  file to create per entry, which costs as much as writing the entry); the kernel
  drops either when its holder dies, so a killed process never blocks the others.
  Claim files are opened ``O_NOFOLLOW | O_CLOEXEC``; a forked child closes the
  claims its parent held (they would otherwise stay locked for as long as the
  child lives, through the shared open file description), and a wait for a claim
  gives up after ``timeout`` seconds (config ``vesuvius-dask.remote.claim-timeout``
  by default, one warning) so that a stuck holder only costs the waiter the work
  it would have waited for;
* past the budget, the least recently used files go first (:func:`evict`; a hit
  touches its file, so modification time is last use). Eviction never follows a
  symlink, removes only temporary files of its own naming, and — given the
  ``magic`` its entries start with — checks that a file starts with it before
  removing it: what is not its own is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import stat
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .. import config

__all__ = ["write_atomic", "claim", "claim_key", "release", "evict", "make_dirs", "is_own_tmp",
           "walk_files", "TMP_SUFFIX", "CLAIM_SUFFIX", "CLAIM_TIMEOUT"]

TMP_SUFFIX = ".tmp"
CLAIM_SUFFIX = ".claim"

#: Seconds a claim is waited for before going on without it (one warning): the default of
#: config ``vesuvius-dask.remote.claim-timeout``, which a claim without ``timeout`` reads.
CLAIM_TIMEOUT = config.default("remote.claim-timeout")

#: The name of :func:`write_atomic`'s temporary files: ``<name>.<pid>-<random hex>.tmp``.
_TMP_NAME = re.compile(r".+\.\d+-[0-9a-f]+" + re.escape(TMP_SUFFIX) + r"\Z")

#: Longest pause between two tries of a claim that another holder has.
_POLL_MAX = 0.02

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

#: Claim descriptors this process holds: fd -> byte offset of its OFD lock, or -1 for ``flock``.
#: Plain dict operations are atomic under the GIL, and a forked child has one thread, so no lock.
_HELD: dict[int, int] = {}

#: Folders whose claim wait timed out in this process (one warning each).
_WARNED: set[str] = set()


def _close_inherited_claims() -> None:
    """In a forked child: close the claim descriptors inherited from the parent.

    Only closed, never unlocked: the lock belongs to the parent's open file
    description, and the parent gives it back.
    """
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()
    _WARNED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_claims)


def is_own_tmp(name: str) -> bool:
    """Whether a file name is one of :func:`write_atomic`'s temporary names."""
    return _TMP_NAME.match(name) is not None


def _create_tmp(target: Path, mode: int) -> tuple[int, str]:
    """A new temporary file beside ``target``, created exclusively: ``(fd, path)``."""
    for _ in range(100):
        tmp = str(target.with_name(f"{target.name}.{os.getpid()}-{_token()}{TMP_SUFFIX}"))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
        except FileExistsError:  # a name taken (or something planted there): another name
            continue
        if mode & 0o077:  # group bits asked for (a shared cache): the umask would drop them
            try:
                os.fchmod(fd, mode)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
        return fd, tmp
    raise FileExistsError(f"{target.parent}: no free temporary name for {target.name}")


def _token() -> str:
    return os.urandom(8).hex()


def write_atomic(target: Path, write: Callable[[IO[bytes]], Any], *, mode: int = 0o600) -> None:
    """Write ``target`` through ``write(file)`` under a temporary name, then rename it into place.

    Parameters
    ----------
    target : Path
        The file to write (replaced if it exists; a symlink there is replaced, not followed).
    write : callable
        Writes the content to the binary file object it is given.
    mode : int, optional
        Permission bits of the new file (default private, ``0o600``); group bits are
        set even where the umask would clear them.
    """
    fd, tmp = _create_tmp(Path(target), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_dirs(path: Path, top: Path, mode: int = 0o700) -> None:
    """Make ``path`` and its missing parents below ``top`` with ``mode``, through no symlink.

    Unlike ``Path.mkdir(parents=True)``, every folder made gets ``mode`` (group bits
    included, whatever the umask), and a symlink (or a file) in the way below
    ``top`` is an error, not a way out of the folder.

    Raises
    ------
    NotADirectoryError
        Something other than a folder is in the way.
    """
    p = Path(top)
    for part in Path(path).relative_to(top).parts:
        p = p / part
        try:
            os.mkdir(p, mode)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(p).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "in the way of a cache folder (a file or a symlink)",
                                         str(p)) from None
            continue
        if mode & 0o7077:
            os.chmod(p, mode)


def _open_claim_file(path: str, mode: int, lock: int) -> int:
    """Open (creating) a claim file, not through a symlink; the descriptor is tracked for fork."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | _NOFOLLOW | _CLOEXEC, mode)
    _HELD[fd] = lock
    if mode & 0o077:  # a shared cache: a claim file made here gets the group bits the umask dropped
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
    return fd


def _drop(fd: int) -> None:
    _HELD.pop(fd, None)
    with contextlib.suppress(OSError):
        os.close(fd)


def claim(entry: Path, *, wait: bool = True, timeout: float | None = None, mode: int = 0o600) -> int | None:
    """Take the claim on ``entry``: a file descriptor to :func:`release`.

    Parameters
    ----------
    entry : Path
        The entry; its claim file is ``entry`` + ``.claim`` (never followed if a symlink).
    wait : bool
        False: None at once if another holder has it.
    timeout : float, optional
        Seconds to wait (default: config ``vesuvius-dask.remote.claim-timeout``;
        ``math.inf``: for ever);
        then None, with one warning per folder and process.
    mode : int
        Permission bits of a claim file made here.
    """
    import fcntl

    path = str(entry) + CLAIM_SUFFIX
    fd = _open_claim_file(path, mode, -1)
    return _locked(fd, lambda block: fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB)),
                   wait, timeout, path)


def claim_key(table: Path, key: str, entry: Path, *, wait: bool = True, timeout: float | None = None,
              mode: int = 0o600) -> int | None:
    """Take the claim on ``key``: a byte-range lock on the file ``table`` (Linux), or :func:`claim`.

    An open-file-description lock (``F_OFD_SETLK``) at offset ``crc32(key)``: like
    ``flock``, it belongs to the descriptor (two threads of one process exclude each
    other) and is dropped when it is closed or its process dies, but many keys share
    one file. Elsewhere, :func:`claim` on ``entry``. With ``wait`` False, None if
    another holder has it; ``timeout`` and ``mode`` as for :func:`claim`. Give it
    back with :func:`release`.
    """
    import fcntl
    import struct
    import zlib

    if not hasattr(fcntl, "F_OFD_SETLK"):
        return claim(entry, wait=wait, timeout=timeout, mode=mode)
    offset = zlib.crc32(key.encode())
    fd = _open_claim_file(str(table), mode, offset)
    lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    how = (fcntl.F_OFD_SETLK, fcntl.F_OFD_SETLKW)
    return _locked(fd, lambda block: fcntl.fcntl(fd, how[block], lock), wait, timeout, str(table))


def _locked(fd: int, lock: Callable[[bool], Any], wait: bool, timeout: float | None, path: str) -> int | None:
    """``fd`` once ``lock(block)`` succeeded; None (``fd`` closed) if another holder kept it.

    Without ``wait`` one try; with it, tries spaced by a growing pause (up to
    :data:`_POLL_MAX`) until ``timeout``.
    """
    timeout = float(config.get("remote.claim-timeout") if timeout is None else timeout)
    try:
        if wait and math.isinf(timeout):
            lock(True)
            return fd
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while True:
            try:
                lock(False)
                return fd
            except (BlockingIOError, PermissionError):  # held elsewhere (EAGAIN, or EACCES for fcntl)
                pass
            left = deadline - time.monotonic()
            if not wait or left <= 0:
                break
            time.sleep(min(pause, left))
            pause = min(2 * pause, _POLL_MAX)
    except BaseException:
        _drop(fd)
        raise
    _drop(fd)
    if wait:
        _warn_timeout(path, timeout)
    return None


def _warn_timeout(path: str, timeout: float) -> None:
    folder = os.path.dirname(path)
    if folder in _WARNED:
        return
    _WARNED.add(folder)
    warnings.warn(f"{path}: waited {timeout:g} s for another process's claim; going on without it "
                  "(that work may be done twice)", RuntimeWarning, stacklevel=4)


def release(fd: int | None) -> None:
    """Give a claim back: unlock it, then close the descriptor (None: nothing to give back)."""
    if fd is None:
        return
    import fcntl

    offset = _HELD.pop(fd, -1)
    with contextlib.suppress(OSError):
        if offset >= 0:  # an OFD lock: unlocked on the open file description, which a child may share
            import struct

            unlock = struct.pack("hhqqi4x", fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, unlock)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def walk_files(root: Path) -> Iterator[os.DirEntry]:
    """Every regular file under ``root``; symlinks (to folders or files) are neither followed nor given."""
    stack = [str(root)]
    while stack:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
            for entry in os.scandir(stack.pop()):
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry


def _starts_with(path: str, ino: int, magic: bytes | None) -> bool:
    """Whether ``path`` is still the regular file ``ino`` and its first bytes are ``magic``."""
    if magic is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        return (stat.S_ISREG(st.st_mode) and st.st_ino == ino
                and os.pread(fd, len(magic), 0) == magic)
    except OSError:
        return False
    finally:
        os.close(fd)


def evict(roots: Iterable[Path], max_bytes: int, keep: Callable[[str], bool],
          target: float = 1.0, *, magic: bytes | None = None) -> int:
    """Remove least recently used files under ``roots`` down to ``target * max_bytes``.

    Returns the bytes left.

    Parameters
    ----------
    roots : iterable of Path
        Folders whose files are entries (walked without following symlinks).
    max_bytes : int
        The budget.
    keep : callable
        ``keep(name)`` says which file names are entries (others — claims, metadata —
        are not counted).
    target : float
        Fraction of the budget to come down to.
    magic : bytes, optional
        The first bytes of every entry: a file chosen for removal that does not start
        with them is not this cache's and stays (and is not counted).

    Notes
    -----
    Temporary files of dead writers (:func:`write_atomic`'s naming, older than
    config ``vesuvius-dask.cache-files.stale-tmp-age``, an hour) are removed too; no
    other file is.
    """
    files = []
    total = 0
    now = time.time()
    stale = float(config.get("cache-files.stale-tmp-age"))  # a temporary file this old: a dead writer's
    for root in roots:
        for entry in walk_files(root):
            with contextlib.suppress(FileNotFoundError):
                if entry.name.endswith(TMP_SUFFIX):
                    age = now - entry.stat(follow_symlinks=False).st_mtime
                    if is_own_tmp(entry.name) and age > stale:
                        os.unlink(entry.path)
                    continue
                if not keep(entry.name):
                    continue
                st = entry.stat(follow_symlinks=False)
                files.append((st.st_mtime_ns, entry.path, st.st_size, st.st_ino))
                total += st.st_size
    limit = int(max_bytes * target)
    for _, path, size, ino in sorted(files):
        if total <= limit:
            break
        total -= size
        if not _starts_with(path, ino, magic):
            continue  # not ours: left alone, and not ours to count
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _remove_claim_file(path + CLAIM_SUFFIX)
    return total


def _remove_claim_file(path: str) -> None:
    """Remove an entry's claim file: an empty regular file (anything else there is not ours)."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(path)
