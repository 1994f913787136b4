"""Pieces of the prediction writer: output-chunk geometry, the plan's counts, the write pool.

:class:`ChunkGeometry` cuts a block into the pieces that fall into each output chunk
(numpy slices, per axis cached), :func:`plan_counts` counts how many blocks of a plan
touch each chunk (so a chunk is known complete when its last block is added), and
:class:`WritePool` normalises and writes completed chunks on threads (numpy and
zarr's codecs release the GIL), with a bounded number in flight.
"""

from __future__ import annotations

import base64
import functools
import itertools
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArgumentError
from .direct import DirectFiles, use_direct

__all__ = ["ChunkGeometry", "plan_counts", "WritePool", "ChunkFiles", "normalized", "output_codec",
           "COMPRESSORS", "pack_bits", "unpack_bits", "pack_counts", "unpack_counts", "add_pieces",
           "piece_torch"]

#: Codecs of ``PredictionWriter`` outputs. ``blosc-lz4`` (byte shuffle) encodes float32
#: predictions about 30x faster than zstd level 3 at about the same size.
COMPRESSORS = ("blosc-lz4", "zstd", "none")

Piece = tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...]]


def output_codec(name: str, zarr_format: int) -> Any:
    """The compressor (``compressors=`` of ``zarr.create_array``) for ``name``; None: uncompressed."""
    if name not in COMPRESSORS:
        raise ArgumentError(f"unknown compressor {name!r}; expected one of {COMPRESSORS}")
    if name == "none":
        return None
    if zarr_format == 2:
        from numcodecs import Blosc, Zstd

        return Zstd(level=3) if name == "zstd" else Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)
    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    return ZstdCodec(level=3) if name == "zstd" else BloscCodec(cname="lz4", clevel=5,
                                                                shuffle=BloscShuffle.shuffle)


class ChunkGeometry:
    """Where a block's voxels fall in the output chunks (optionally only a part's chunks).

    Parameters
    ----------
    shape, block, chunks : tuple of int
        Output shape, block shape and output chunks (same length).
    part : (int, int), optional
        Only the chunks part ``k`` of ``n`` owns (contiguous runs in raster order).
    """

    def __init__(self, shape: Sequence[int], block: Sequence[int], chunks: Sequence[int],
                 part: tuple[int, int] | None = None) -> None:
        self.shape, self.block, self.chunks = tuple(shape), tuple(block), tuple(chunks)
        self.grid = tuple(-(-n // c) for n, c in zip(self.shape, self.chunks))
        self.part = part
        self.total = int(np.prod(self.grid))
        self._strides = [int(np.prod(self.grid[i + 1:])) for i in range(len(self.grid))]
        self._axis = functools.lru_cache(maxsize=65536)(self._axis_pieces)

    def owner(self, cid: Sequence[int]) -> int:
        """The part (of ``n``) owning chunk ``cid``."""
        n = 1 if self.part is None else self.part[1]
        return sum(k * s for k, s in zip(cid, self._strides)) * n // self.total

    def owned(self, cid: Sequence[int]) -> bool:
        return self.part is None or self.owner(cid) == self.part[0]

    def _axis_pieces(self, axis: int, start: int) -> tuple[tuple[int, slice, slice], ...]:
        b, c, n = self.block[axis], self.chunks[axis], self.shape[axis]
        out = []
        for k in range(start // c, (start + b - 1) // c + 1):
            lo, hi = max(start, c * k), min(start + b, c * (k + 1), n)
            out.append((k, slice(lo - start, hi - start), slice(lo - c * k, hi - c * k)))
        return tuple(out)

    def pieces(self, start: Sequence[int]) -> list[Piece]:
        """``(chunk index, block slices, chunk slices)`` of each owned chunk a block at ``start`` touches."""
        out = []
        for combo in itertools.product(*(self._axis(a, s) for a, s in enumerate(start))):
            cid = tuple(k for k, _, _ in combo)
            if self.owned(cid):
                out.append((cid, tuple(p[1] for p in combo), tuple(p[2] for p in combo)))
        return out

    def region(self, cid: Sequence[int]) -> tuple[slice, ...]:
        """The chunk's voxels in the output."""
        return tuple(slice(c * k, min(c * (k + 1), n)) for c, k, n in zip(self.chunks, cid, self.shape))

    def chunk_shape(self, cid: Sequence[int]) -> tuple[int, ...]:
        return tuple(r.stop - r.start for r in self.region(cid))


def plan_counts(geometry: ChunkGeometry, starts: np.ndarray) -> np.ndarray:
    """How many blocks at ``starts`` (``(N, ndim)``) touch each owned output chunk (grid-shaped)."""
    counts = np.zeros(geometry.grid, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64).reshape(-1, len(geometry.grid))
    if len(starts) == 0:
        return counts
    chunks, block = np.asarray(geometry.chunks), np.asarray(geometry.block)
    first, last = starts // chunks, (starts + block - 1) // chunks
    for offset in np.ndindex(*((last - first).max(axis=0) + 1)):
        cid = first + np.asarray(offset)
        inside = (cid <= last).all(axis=1)
        np.add.at(counts, tuple(cid[inside].T), 1)
    if geometry.part is not None:
        k, n = geometry.part
        lin = np.arange(geometry.total).reshape(geometry.grid)
        counts[lin * n // geometry.total != k] = 0
    return counts


def piece_torch() -> Any:
    """torch, when it adds pieces on the calling thread alone; else None (then numpy).

    That is when torch's intra-op threads are 1 (``predict`` sets so on small
    machines): with more, its pool would split each piece and spin for it.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch comes with the stream
        return None
    return torch if torch.get_num_threads() == 1 else None


def add_pieces(acc: np.ndarray, values: np.ndarray, pieces: Sequence[tuple[int, tuple, tuple]]) -> None:
    """``acc[dst] += values[i][src]`` for each ``(i, src, dst)``, in order (numpy).

    (torch's strided add gives the same bits in ~2/3 of the time alone, 0.20–0.24 s
    against 0.31–0.39 s for 3,000 blocks of 16×64×64, but no faster inside a 3-D
    ``predict`` on 2 cores, 3.9–4.0 s either way: left out.)
    """
    for i, src, dst in pieces:
        acc[dst] += values[i][src]


def normalized(s: np.ndarray, w: np.ndarray, fill_value: float, *, inplace: bool = False) -> np.ndarray:
    """``s / w`` where some weight landed, ``fill_value`` elsewhere.

    With ``inplace``, into ``s`` (float32: the same divisions, bit for bit, in two passes
    instead of five when every voxel has a weight).
    """
    if not inplace or s.dtype != np.float32:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(w > 0, s / np.where(w > 0, w, 1), fill_value)
    landed = w > 0
    if landed.all():
        return np.divide(s, w, out=s)
    np.divide(s, w, out=s, where=landed)
    np.copyto(s, np.float32(fill_value), where=~landed)
    return s


def pack_bits(flags: np.ndarray) -> str:
    """A boolean array as compact text (for a JSON checkpoint)."""
    return base64.b64encode(zlib.compress(np.packbits(flags.ravel()).tobytes())).decode()


def pack_counts(counts: np.ndarray) -> str:
    """Small non-negative counts (uint16) as compact text (for a JSON checkpoint)."""
    return base64.b64encode(zlib.compress(counts.astype("<u2").tobytes())).decode()


def unpack_counts(text: str, n: int) -> np.ndarray:
    counts = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<u2").astype(np.uint16)
    if len(counts) != n:
        raise ValueError(f"{len(counts)} counts, expected {n}")
    return counts


def unpack_bits(text: str, shape: Sequence[int]) -> np.ndarray:
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.unpackbits(bits)[:int(np.prod(shape))].reshape(tuple(shape)).astype(bool)


class WritePool:
    """Run chunk writes on threads, at most ``in_flight`` at once; the first error is raised back.

    Parameters
    ----------
    workers : int
        Threads.
    in_flight : int, optional
        Writes queued or running before :meth:`submit` waits (default ``2 * workers``);
        bounds the memory of chunks waiting to be written.
    name : str
        The threads' names: ``vesuvius-dask-NAME_K``.
    """

    def __init__(self, workers: int, in_flight: int | None = None, name: str = "write") -> None:
        self.workers = max(1, int(workers))
        self.name = name
        self._slots = threading.BoundedSemaphore(in_flight or 2 * self.workers)
        self._pool: ThreadPoolExecutor | None = None
        self._futures: set[Future] = set()
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the pool (waits while ``in_flight`` writes are pending)."""
        self._raise()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"vesuvius-dask-{self.name}")
        self._slots.acquire()
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future) -> None:
        with self._lock:
            self._futures.discard(fut)
            if not fut.cancelled() and fut.exception() is not None and self._error is None:
                self._error = fut.exception()
        self._slots.release()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def wait(self) -> None:
        """Wait until every submitted write has finished; raise the first error."""
        while True:
            with self._lock:
                pending = list(self._futures)
            if not pending:
                break
            for fut in pending:
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - recorded by _done, raised below
                    pass
        self._raise()

    def close(self, cancel: bool = False) -> None:
        """Stop the threads (after the running writes; queued ones dropped with ``cancel``)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None


def _numcodec(name: str, zarr_format: int) -> Any:
    """The numcodecs codec that encodes a chunk as ``output_codec(name, zarr_format)`` does (None: raw)."""
    if name == "none":
        return None
    if zarr_format == 2:
        return output_codec(name, 2)
    from numcodecs import Blosc, Zstd

    # zarr's v3 BloscCodec/ZstdCodec wrap these (typesize: the dtype's, 4 for float32)
    return Zstd(level=3, checksum=False) if name == "zstd" else Blosc(cname="lz4", clevel=5,
                                                                       shuffle=Blosc.SHUFFLE, typesize=4)


def _all_fill(values: np.ndarray, fill: float) -> bool:
    """Whether zarr would skip the chunk as empty (``write_empty_chunks=False``): its ``all_equal``."""
    bits = values.view(np.uint32)
    if fill == 0.0:  # zarr compares bit patterns here: a chunk of -0.0 is stored
        return not (bits.flat[0] or bits.flat[-1] or bits.any())  # (most chunks: decided at once)
    if np.isnan(fill):
        return bool(np.isnan(values.flat[0]) and np.isnan(values).all())
    return bool(values.flat[0] == np.float32(fill) and (values == np.float32(fill)).all())


class ChunkFiles:
    """Store whole chunks of a float32 Zarr array (one ``PredictionWriter`` created) without zarr's pipeline.

    The files zarr would write for ``array[region] = values`` on a chunk's region:
    edge chunks padded with the fill value, the array's codec (``compressor`` and
    format), the array's chunk keys, and a chunk equal to the fill value everywhere
    not stored (zarr's default ``write_empty_chunks=False``). Encoding (blosc and zstd
    release the GIL) and the write run in the calling thread, with no event loop in
    between. Files are written in place (around the page cache where the filesystem
    takes it: :class:`~vesuvius_dask.writers.direct.DirectFiles`): a run killed while
    writing one rewrites it when it resumes (a chunk is recorded as written only at a
    checkpoint, after a sync).
    """

    def __init__(self, array: Any, root: str | Path, compressor: str) -> None:
        import zarr

        self.root = Path(root)
        self.shape = tuple(int(n) for n in array.shape)
        self.chunks = tuple(int(c) for c in array.chunks)
        self.fill = float(array.fill_value)
        self.zarr_format = int(array.metadata.zarr_format)
        self._key = array.metadata.encode_chunk_key
        self._codec = _numcodec(compressor, self.zarr_format)
        self._write_empty = bool(zarr.config.get("array.write_empty_chunks"))
        self._dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._out = DirectFiles(use_direct(4 * int(np.prod(self.shape))))

    def write(self, cid: Sequence[int], values: np.ndarray) -> None:
        """Store chunk ``cid`` (``values``: its region of the array, clipped at the edges)."""
        path = self.root / self._key(tuple(int(c) for c in cid))
        values = np.ascontiguousarray(values, dtype="<f4")
        if not self._write_empty and _all_fill(values, self.fill):
            path.unlink(missing_ok=True)
            return
        if values.shape != self.chunks:  # an edge chunk: stored at full size, padded
            full = np.full(self.chunks, self.fill, dtype="<f4")
            full[tuple(slice(0, n) for n in values.shape)] = values
            values = full
        data = values if self._codec is None else self._codec.encode(values)
        parent = path.parent
        if parent not in self._dirs:
            parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._dirs.add(parent)
        self._out.write(path, data)
