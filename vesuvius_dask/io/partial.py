"""How an array's stored chunks are read: its *read path*, chosen once per array.

=======================  ==================================================================
``partial-uncompressed``  uncompressed chunks (Zarr v2 without compressor or filters, C
                          order; Zarr v3 with only ``bytes``, either endianness): a block
                          reads only its own rows, locally in place (memory-mapped, or by
                          byte range), remotely by range requests (not with a ``cache_dir``:
                          then ``whole-chunk``)
``sharded``               Zarr v3 ``sharding_indexed``, local or remote: each shard's index
                          read once (cached), inner chunks by byte range; locally,
                          uncompressed inner chunks are cut in part; remotely inner chunks
                          are fetched whole (kept in ``cache_dir`` as ``<shard key>#z.y.x``)
                          (:mod:`~vesuvius_dask.io.shards`)
``whole-chunk``           compressed chunks the fast path decodes: each touched chunk read
                          and decoded whole (:mod:`~vesuvius_dask.io.chunks`); also remote
                          uncompressed arrays with a ``cache_dir``
``zarr``                  anything else, read through zarr-python
=======================  ==================================================================

:func:`array_reader` makes the decision; :class:`UncompressedChunks` is the first
path's reader. A *piece reader* (the first two) writes the pieces a batch needs
from one *read unit* (a chunk, or a shard) straight into the batch array
(:meth:`UncompressedChunks.read_pieces`); pieces are the rows of
:func:`~vesuvius_dask.engine.batches.plan_pieces`. Every partial read reaches the bytes
through a source's ``read_ranges(key, ranges)`` (or its memory map when local,
:class:`~vesuvius_dask.io.ranges.LocalFiles`), so a remote source serving byte ranges
fits the same readers.

A chunk file of another size than the array's chunk is a
:class:`~vesuvius_dask.errors.CorruptChunkError` naming the file and the chunk; nothing
is read past what the array's metadata allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .chunks import ChunkCodec, fast_reader
from .pieces import cut_pieces, cut_ranges, fill_pieces, span_bytes
from .ranges import LocalFiles, RemoteRanges
from .shards import ShardedChunks

__all__ = ["READ_PATHS", "MAP_FILES", "map_files", "ArrayReader", "UncompressedChunks", "array_reader"]

#: The read paths, with what ``info`` says about each.
READ_PATHS = {
    "partial-uncompressed": "uncompressed chunks read in place: a block reads only its own rows "
                            "(over HTTP/S3 by range requests)",
    "sharded": "sharded: shard index read once, inner chunks by byte range "
               "(uncompressed inner chunks cut in part; over HTTP/S3 by range requests)",
    "whole-chunk": "each touched chunk read and decoded whole",
    "zarr": "read through zarr-python (codecs or layout the fast paths do not handle)",
}


@dataclass
class ArrayReader:
    """How one Zarr array's stored chunks are read (see the module's table).

    Attributes
    ----------
    path : str
        ``partial-uncompressed``, ``sharded``, ``whole-chunk`` or ``zarr``.
    codec : ChunkCodec or None
        Decodes a whole stored chunk (remote reads share it); None when zarr reads.
    chunk : callable or None
        ``region -> numpy``: one stored (inner) chunk read locally, or None.
    pieces : object or None
        The piece reader of the partial paths (``read_pieces``, ``unit``).
    """

    path: str
    codec: Any = None
    chunk: Callable[[tuple[slice, ...]], np.ndarray] | None = None
    pieces: Any = None


class UncompressedChunks:
    """Partial reads of a local array's uncompressed chunks (read path ``partial-uncompressed``).

    Parameters
    ----------
    source : LocalFiles
        The array's files (memory-mapped, or read by range).
    codec : ChunkCodec
        The array's chunk codec (uncompressed, C order).
    shape : tuple of int
        The array's shape (edge chunks are clipped to it).
    """

    path = "partial-uncompressed"

    def __init__(self, source: LocalFiles, codec: ChunkCodec, shape: tuple[int, ...]) -> None:
        self.source, self.codec, self.shape = source, codec, tuple(int(s) for s in shape)
        #: Stored chunks per read unit (one task of the engine) along each axis.
        self.unit = (1,) * len(self.shape)

    def _view(self, coords: tuple[int, ...]) -> np.ndarray | None:
        """The stored chunk as a read-only array over its memory map (nothing read yet), or None."""
        key = self.codec.key(coords)
        got = self.source.mapped(key)
        if got is None:
            return None
        buf, size, _ = got
        if size != self.codec.nbytes:
            self.source.forget(key)
            raise self.codec.corrupt(coords, f"the file holds {size} bytes, not an uncompressed chunk's")
        return np.frombuffer(buf, dtype=self.codec.stored).reshape(self.codec.chunks)

    def _check_size(self, coords: tuple[int, ...]) -> bool:
        """Whether the chunk's file is there (ranges path); one of another size is refused."""
        size = self.source.size(self.codec.key(coords))
        if size is not None and size != self.codec.nbytes:
            raise self.codec.corrupt(coords, f"the file holds {size} bytes, not an uncompressed chunk's")
        return size is not None

    def read_chunk(self, region: tuple[slice, ...]) -> np.ndarray:
        """One stored chunk (``region``, clipped to the array), as a new array of the array's dtype."""
        coords = self.codec.coords(region)
        shape = tuple(s.stop - (s.start or 0) for s in region)
        if self.source.mapping:
            view = self._view(coords)
            if view is None:
                return np.full(shape, self.codec.fill, dtype=self.codec.dtype)
            return np.array(view[tuple(slice(0, k) for k in shape)], dtype=self.codec.dtype)
        out = np.empty((1,) + shape, dtype=self.codec.dtype)
        piece = np.array([[0, 0, shape[0], 0, shape[1], 0, shape[2], 0, 0, 0]], dtype=np.int64)
        self.read_pieces([(coords, piece)], out)
        return out[0]

    def read_pieces(self, items: list[tuple[tuple[int, ...], np.ndarray]], out: np.ndarray
                    ) -> tuple[list[tuple[tuple[int, ...], np.ndarray]], int]:
        """Write the pieces of each ``(chunk index, pieces)`` into ``out``.

        Returns ``(decoded chunks worth caching, bytes read)``: nothing is decoded
        here, so the first is always empty.
        """
        total = 0
        item = self.codec.stored.itemsize
        for coords, pieces in items:
            if self.source.mapping:
                view = self._view(coords)
                if view is None:
                    fill_pieces(out, pieces, self.codec.fill)
                    continue
                cut_pieces(view, out, pieces)
                total += span_bytes(pieces, self.codec.chunks, item)
            elif not self.source.local or self._check_size(coords):
                n = cut_ranges(self.source, self.codec.key(coords), 0, self.codec, pieces, out, coords)
                if n is None and self.source.local:  # removed since its size was asked
                    raise self.codec.corrupt(coords, "the object holding it is absent")
                if n is None:  # remote, absent, and read as the fill value (missing='fill')
                    fill_pieces(out, pieces, self.codec.fill)
                total += n or 0
            else:
                fill_pieces(out, pieces, self.codec.fill)
        return [], total


def _is_remote(arr: Any) -> bool:
    return type(getattr(arr, "store", None)).__name__ == "FsspecStore"


def _local_root(arr: Any) -> Path | None:
    store = getattr(arr, "store", None)
    if type(store).__name__ != "LocalStore":
        return None
    root = Path(str(store.root)) / arr.store_path.path
    return root if root.is_dir() else None


#: Whether local partial reads memory-map files (else they read byte ranges with ``pread``,
#: as a remote source would). None: the setting ``map-files`` (read when an array's read
#: path is chosen, at its first read in a process); the tests and benchmarks set True or
#: False to check and count either path.
MAP_FILES: bool | None = None


def map_files() -> bool:
    """Whether local partial reads memory-map files now (:data:`MAP_FILES`, else ``map-files``)."""
    from .. import config

    return bool(config.get("map-files")) if MAP_FILES is None else bool(MAP_FILES)


def array_reader(arr: Any, mapped: bool | None = None, remote: Any = None) -> ArrayReader:
    """The read path of a Zarr array and its readers (see the module's table).

    Parameters
    ----------
    arr : zarr.Array
    mapped : bool, optional
        Local partial reads through memory maps, else by byte range (default:
        :func:`map_files`: the setting ``map-files``). A file truncated or rewritten
        in place while it is mapped kills the process with SIGBUS; byte ranges only
        read fewer bytes (a ``CorruptChunkError``).
    remote : RemoteChunks, optional
        The fetcher of a remote array: its partial paths read byte ranges through it
        (:class:`~vesuvius_dask.io.ranges.RemoteRanges`). Without it a remote array gets
        its path (what ``info`` says) but no readers: zarr reads it.

    A remote array's path: ``sharded`` as locally; ``partial-uncompressed`` unless its
    fetcher keeps chunks in a ``cache_dir`` (then ``whole-chunk``: each chunk fetched
    once, whole, and read from the disk later on).
    """
    if not hasattr(arr, "metadata"):
        return ArrayReader("zarr")
    root = _local_root(arr)
    far = root is None and _is_remote(arr)
    if root is None and not far:  # another store (in memory...): whole chunks through zarr
        codec = ChunkCodec.of(arr)
        return ArrayReader("zarr") if codec is None else ArrayReader("whole-chunk", codec)
    source: Any = (LocalFiles(root, map_files() if mapped is None else mapped) if root is not None
                   else RemoteRanges(remote) if remote is not None else None)
    if getattr(arr, "shards", None):
        return _sharded(arr, source)
    codec = ChunkCodec.of(arr)
    if codec is None:
        return ArrayReader("zarr")
    if source is not None and not source.local:
        codec.where = source.url("").rstrip("/")  # errors name the URL
    # remote with a cache_dir: each chunk fetched once, whole, beats ranges fetched every epoch
    if not codec.uncompressed or len(codec.chunks) != 3 or (
            far and remote is not None and remote.cache is not None):
        return ArrayReader("whole-chunk", codec, fast_reader(arr))
    if source is None:  # a remote array's path, for info: nothing to read with
        return ArrayReader("partial-uncompressed", codec)
    pieces = UncompressedChunks(source, codec, arr.shape)
    return ArrayReader("partial-uncompressed", codec, pieces.read_chunk, pieces)


def _sharded(arr: Any, source: Any) -> ArrayReader:
    sharded = ShardedChunks.of(arr, source)
    if sharded is None:
        return ArrayReader("zarr")
    if source is None:  # a remote array's path, for info: nothing to read with
        return ArrayReader("sharded")
    return ArrayReader("sharded", None, sharded.read_chunk, sharded)
