"""Write whole files around the page cache (``O_DIRECT``), for outputs written once and not read back soon.

A prediction's output chunks are written once, by threads, and read back (if at all)
after the run. Through the page cache each byte is copied into kernel memory and
written back later: on the machine this was measured on (ext4 on a virtual disk) that
copy and writeback cost 1.9 s of CPU per GB, and the ``os.sync`` of a checkpoint
waited 0.5 s per GB. Written with ``O_DIRECT`` from a page-aligned buffer, the same
files cost 0.4 s of CPU per GB (the copy into the buffer) and the sync nothing; the
threads wait for the disk instead of using a core (``benchmarks/predict.py``).

``O_DIRECT`` needs the buffer, the length and the file offset aligned to the device's
block: each file is written padded to :data:`ALIGN` bytes from a page-aligned buffer
(one per thread, reused) and truncated to its length. Where the platform or the
filesystem refuses (no ``O_DIRECT``, tmpfs, some network filesystems: ``EINVAL``),
files are written the ordinary way from then on. Durability is the caller's, as with
ordinary writes: a checkpoint still syncs (data written directly may sit in the
device's cache and the file's size in the journal).

The setting ``direct-io`` chooses: ``auto`` uses it for outputs of at least
:data:`AUTO_MIN_BYTES` (a small output is better left in the page cache: written back
after the run, nothing waits for the disk), ``true`` for every output, ``false`` never.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

from .. import config

__all__ = ["DirectFiles", "use_direct", "ALIGN", "AUTO_MIN_BYTES"]

#: Alignment of direct writes: the largest logical block size of common devices.
ALIGN = 4096
#: Outputs at least this large are written with ``O_DIRECT`` under ``direct-io: auto``.
AUTO_MIN_BYTES = 256 * 2**20


def use_direct(output_bytes: int) -> bool:
    """Whether an output of ``output_bytes`` is written with ``O_DIRECT`` (the setting ``direct-io``)."""
    setting = str(config.get("direct-io")).lower()
    if setting in ("false", "off", "0", "no", "never"):
        return False
    if setting in ("true", "on", "1", "yes", "always"):
        return True
    return output_bytes >= AUTO_MIN_BYTES


class DirectFiles:
    """Write whole files with ``O_DIRECT`` where the filesystem takes it, else the ordinary way.

    Parameters
    ----------
    enabled : bool
        Try ``O_DIRECT`` at all (see :func:`use_direct`).
    """

    def __init__(self, enabled: bool) -> None:
        self.direct = bool(enabled) and hasattr(os, "O_DIRECT")
        self._local = threading.local()

    def _buffer(self, size: int) -> mmap.mmap:
        """The calling thread's page-aligned buffer of at least ``size`` bytes (grown as needed)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            if buf is not None:
                buf.close()
            buf = self._local.buf = mmap.mmap(-1, max(size, ALIGN))
        return buf

    def write(self, path: str | os.PathLike, data: bytes | memoryview) -> None:
        """Create or replace ``path`` with ``data`` (written in place, as ``open(path, "wb")``)."""
        view = memoryview(data).cast("B")
        if self.direct and len(view) >= ALIGN:
            try:
                self._write_direct(path, view)
                return
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                self.direct = False  # this filesystem refuses: the ordinary way from now on
        with open(path, "wb") as f:
            f.write(view)

    def _write_direct(self, path: str | os.PathLike, view: memoryview) -> None:
        n = len(view)
        padded = -(-n // ALIGN) * ALIGN
        buf = self._buffer(padded)
        buf[:n] = view
        if padded > n:
            buf[n:padded] = bytes(padded - n)
        out = memoryview(buf)[:padded]
        try:
            fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
            try:
                done = 0
                while done < padded:  # a short write stops at a block boundary
                    wrote = os.write(fd, out[done:])
                    if wrote <= 0:
                        raise OSError(errno.EIO, f"{path}: the file system took no bytes")
                    done += wrote
                os.ftruncate(fd, n)
            finally:
                os.close(fd)
        finally:
            out.release()  # (the buffer can grow later even while this error is kept)
