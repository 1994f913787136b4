"""The batch engine: one dask graph per batch, one task per touched stored chunk.

Given a batch of block starts, :class:`BatchEngine` works out, with vectorised
numpy, every piece where a block overlaps a stored chunk, groups the pieces by chunk
and builds a small dask graph:

* one task per touched stored chunk that is not in the decoded-chunk cache: it reads
  (and decompresses) the chunk once and cuts every piece the batch needs out of it;
* one task for all pieces that come from chunks already decoded (cache hits) or from
  in-RAM volumes, which cost no I/O, so need no task of their own;
* an assembly task returning the batch array. Locally the cut tasks write straight
  into one preallocated ``(B, z, y, x)`` array (no per-block concatenation).

The graph runs on dask's threaded scheduler with a thread pool owned by the engine
and created per process, so a DataLoader worker forked after the parent process has
used dask does not inherit a dead pool (dask's default pool is global and is not
re-created after ``fork``). Graphs without I/O run on the synchronous scheduler,
whose per-task overhead is lower.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import config
from ..errors import ChunkFetchError, CorruptChunkError, SamplingError
from ..io.pieces import cut_pieces
from ..io.volume import Volume, read_stored, stored_keys, stored_reader
from ..lru import LRU

__all__ = ["BatchEngine", "ChunkCache", "EngineStats", "plan_pieces", "read_together",
           "cluster_read", "DEFAULT_CACHE_BYTES"]

#: Default decoded-chunk cache budget per process (bytes): config ``vesuvius-dask.cache-bytes``,
#: read when this module is imported (a default argument).
DEFAULT_CACHE_BYTES = config.get_bytes("cache-bytes")

_batch_counter = itertools.count()
#: Released batch arrays kept for reuse per engine.
_OUTPUT_POOL = 4
#: Whether batch arrays are reused once released. Release is seen through CPython's
#: reference counts (``sys.getrefcount``), whose exact values are an implementation
#: detail (3.14 changed them for numpy's own similar check): reuse is on only for the
#: CPython versions this project is tested on.
REUSE_OUTPUTS = sys.implementation.name == "cpython" and (3, 10) <= sys.version_info[:2] <= (3, 13)


def _nbytes(arr: np.ndarray) -> int:
    return int(arr.nbytes)


class ChunkCache(LRU):
    """A thread-safe LRU cache of decoded chunks with a byte budget.

    Parameters
    ----------
    max_bytes : int
        Budget; 0 disables caching. A chunk larger than the budget is never cached.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, size=_nbytes)

    @property
    def max_bytes(self) -> int:
        return self.budget

    @property
    def nbytes(self) -> int:
        return self.total

    # A cache travels empty (to spawned workers, to a cluster): contents are per process.
    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ChunkCache({len(self)} chunks, {self.nbytes}/{self.max_bytes} bytes)"


@dataclass
class EngineStats:
    """Counters of one engine (per process).

    ``bytes_decoded / bytes_delivered`` is the read amplification.
    """

    batches: int = 0
    blocks: int = 0
    chunks_read: int = 0
    cache_hits: int = 0
    shared_hits: int = 0  # chunks another process of this machine had decoded
    bytes_decoded: int = 0
    bytes_delivered: int = 0
    #: Stored bytes the partial read paths read (shard indexes included).
    bytes_read: int = 0

    @property
    def amplification(self) -> float:
        return self.bytes_decoded / self.bytes_delivered if self.bytes_delivered else 0.0


def plan_pieces(bounds: Sequence[np.ndarray], starts: np.ndarray, block: Sequence[int],
                rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split blocks into their overlaps with stored chunks (vectorised).

    Parameters
    ----------
    bounds : sequence of 3 int64 arrays
        Chunk boundaries along z, y, x.
    starts : (k, 3) int64 array
        Block starts.
    block : tuple of int
        Block shape.
    rows : (k,) int64 array
        Row of each block in the output batch.

    Returns
    -------
    chunk_ids : (n, 3) int64 array
        Chunk index of each piece.
    pieces : (n, 10) int64 array
        ``[row, dz0, dz1, dy0, dy1, dx0, dx1, sz, sy, sx]``: the piece goes to
        ``out[row, dz0:dz1, dy0:dy1, dx0:dx1]`` from ``chunk[sz:, sy:, sx:]``.
    """
    starts = np.asarray(starts, dtype=np.int64)
    first, count = [], []
    for a in range(3):
        s = starts[:, a]
        c0 = np.searchsorted(bounds[a], s, side="right") - 1
        c1 = np.searchsorted(bounds[a], s + block[a] - 1, side="right") - 1
        first.append(c0)
        count.append(c1 - c0 + 1)
    per_block = count[0] * count[1] * count[2]
    if np.all(per_block == 1):
        owner = np.arange(starts.shape[0])
        offs = [np.zeros_like(first[0])] * 3
    else:
        owner = np.repeat(np.arange(starts.shape[0]), per_block)
        p = np.arange(owner.size) - np.repeat(np.cumsum(per_block) - per_block, per_block)
        nyx = (count[1] * count[2])[owner]
        iz, rem = np.divmod(p, nyx)
        iy, ix = np.divmod(rem, count[2][owner])
        offs = [iz, iy, ix]
    chunk_ids = np.empty((owner.size, 3), dtype=np.int64)
    pieces = np.empty((owner.size, 10), dtype=np.int64)
    pieces[:, 0] = rows[owner]
    for a in range(3):
        c = first[a][owner] + offs[a]
        s = starts[owner, a]
        lo = np.maximum(s, bounds[a][c])
        hi = np.minimum(s + block[a], bounds[a][c + 1])
        chunk_ids[:, a] = c
        pieces[:, 1 + 2 * a] = lo - s
        pieces[:, 2 + 2 * a] = hi - s
        pieces[:, 7 + a] = lo - bounds[a][c]
    return chunk_ids, pieces


_cut = cut_pieces


class _CutCached:
    """Task: cut pieces out of chunks already in memory (cache hits, RAM volumes)."""

    def __init__(self, out: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.out, self.parts = out, parts

    def __call__(self) -> None:
        for chunk, pieces in self.parts:
            _cut(chunk, self.out, pieces)


class _ReadCut:
    """Task: read one stored chunk from zarr, cache it, cut its pieces."""

    def __init__(self, engine: BatchEngine, vol: Volume, chunk_id: tuple[int, int, int],
                 region: tuple[slice, ...], out: np.ndarray, pieces: np.ndarray) -> None:
        self.engine, self.vol, self.chunk_id = engine, vol, chunk_id
        self.region, self.out, self.pieces = region, out, pieces

    def __call__(self) -> None:
        chunk = self.engine._read_chunk(self.vol, self.chunk_id, self.region)
        _cut(chunk, self.out, self.pieces)


class _ReadPieces:
    """Task: write the pieces of one read unit (a chunk, or a shard) straight into the batch.

    For the partial read paths (:mod:`vesuvius_dask.io.partial`): only the bytes the
    pieces need are read; inner chunks decoded whole are kept in the chunk cache.
    """

    def __init__(self, engine: BatchEngine, vol: Volume, reader: Any,
                 items: list[tuple[tuple[int, int, int], np.ndarray]], out: np.ndarray) -> None:
        self.engine, self.vol, self.reader, self.items, self.out = engine, vol, reader, items, out

    def __call__(self) -> None:
        try:
            decoded, nbytes = self.reader.read_pieces(self.items, self.out)
        except CorruptChunkError as err:  # it names the chunk, its key and store already
            raise CorruptChunkError(f"{self.vol.name}: {err}") from None
        except ChunkFetchError:  # names the volume, the chunk and its URL already
            raise
        except OSError as err:
            cid = self.items[0][0]
            raise CorruptChunkError(f"{self.vol.name}: chunk {cid} (key {self.reader.codec.key(cid)!r} in "
                                    f"store {self.reader.codec.where}) cannot be read: "
                                    f"{type(err).__name__}: {err}") from err
        engine = self.engine
        for cid, chunk in decoded:
            engine.cache.put((self.vol.token,) + cid, chunk)
        with engine._lock:
            engine.stats.chunks_read += len(self.items)
            engine.stats.bytes_read += nbytes
            engine.stats.bytes_decoded += nbytes + sum(c.nbytes for _, c in decoded)


class _ReadAll:
    """Task: several local read units in turn (see :meth:`BatchEngine._spread`)."""

    def __init__(self, tasks: list[_ReadPieces]) -> None:
        self.tasks = tasks

    def __call__(self) -> None:
        for task in self.tasks:
            task()


class _CutComputed:
    """Task: cut pieces out of a chunk computed by the volume's own dask graph."""

    def __init__(self, engine: BatchEngine, key: Any, out: np.ndarray, pieces: np.ndarray) -> None:
        self.engine, self.key, self.out, self.pieces = engine, key, out, pieces

    def __call__(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk)
        self.engine._account_read(self.key, chunk)
        _cut(chunk, self.out, self.pieces)


def _assemble(out: np.ndarray, *_deps: Any) -> np.ndarray:
    return out


class BatchEngine:
    """Read batches of blocks from many volumes, one dask graph per batch.

    Parameters
    ----------
    volumes : list of Volume
        The volumes (see :func:`vesuvius_dask.io.open.resolve_volume`).
    block : tuple of int
        Block shape ``(z_size, y_size, x_size)``.
    dtype : numpy dtype, optional
        Output dtype (default: the common dtype of the volumes).
    cache_bytes : int
        Decoded-chunk cache budget per process (0 disables it).
    num_threads : int, optional
        Threads reading chunks in parallel (default: the number of CPUs; with remote
        volumes, their ``concurrency``, so that many requests are in flight).
    """

    def __init__(self, volumes: Sequence[Volume], block: Sequence[int], *,
                 dtype: Any = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 num_threads: int | None = None) -> None:
        self.volumes = list(volumes)
        self.block = tuple(int(b) for b in block)
        self.dtype = np.dtype(dtype) if dtype is not None else np.result_type(
            *[v.dtype for v in self.volumes])
        self.cache = ChunkCache(cache_bytes)
        remote = [v.remote.settings.concurrency for v in self.volumes if v.remote is not None]
        self.num_threads = num_threads or max([os.cpu_count() or 1, *remote])
        self.stats = EngineStats()
        self._bounds = [v.bounds for v in self.volumes]
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None
        self._graphs: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._outputs: list[np.ndarray] = []
        self._proc_pid = os.getpid()
        self.uid = uuid.uuid4().hex  # identifies this engine's copies on cluster workers
        #: Decoded chunks shared by the DataLoader workers of a machine (see
        #: :class:`~vesuvius_dask.engine.machine_cache.MachineChunkCache`); used while
        #: ``machine_active`` is set (by the stream, inside DataLoader workers).
        self.machine: Any = None
        self.machine_active = False

    # -- pickling: caches, pools and counters are per process -------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pool=None, _pool_pid=None, _graphs={}, _lock=None, stats=EngineStats(),
                     _outputs=[])
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._proc_pid = os.getpid()

    def _own_process(self) -> None:
        """Make anew, in a forked child, what does not survive ``fork``.

        Locks (a parent thread may have held one at the fork), and Zarr arrays on
        remote stores (an fsspec filesystem's event loop and HTTP session belong to
        the parent: a pickle round trip opens them again in this process). The
        decoded chunks the parent had cached stay: a forked worker starts warm.
        Spawned and cluster copies come through ``__setstate__`` and need none of it.
        """
        pid = os.getpid()
        if self._proc_pid == pid:
            return
        import pickle

        self._lock = threading.Lock()
        self.cache.after_fork()
        for vol in self.volumes:
            if vol.zarr is not None and type(vol.zarr.store).__name__ == "FsspecStore":
                vol.zarr = pickle.loads(pickle.dumps(vol.zarr))
        self._proc_pid = pid

    def _output(self, shape: tuple[int, ...]) -> np.ndarray:
        """A batch array: a recycled one nobody references any more, or a new one.

        Reusing released outputs keeps their pages mapped and warm; a fresh
        multi-megabyte array costs a page fault per 4 KB on first write, which is a
        large part of the copy time here. An array is reused only when the pool's own
        references are the only ones left (CPython reference counts: a tensor made
        by ``torch.from_numpy`` and any view keep the array referenced).

        That count is a CPython detail: reuse is on only for the CPython versions the
        project tests (:data:`REUSE_OUTPUTS`); elsewhere every batch is a new array,
        which is always correct, just slower.
        """
        with self._lock:
            for arr in self._outputs if REUSE_OUTPUTS else ():
                # references: the pool list, the loop variable, getrefcount's argument
                if arr.shape == shape and sys.getrefcount(arr) <= 3:
                    return arr
            arr = np.empty(shape, dtype=self.dtype)
            self._outputs.append(arr)
            if len(self._outputs) > _OUTPUT_POOL:
                self._outputs.pop(0)
            return arr

    def _thread_pool(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        if self._pool is None or self._pool_pid != pid:
            # A pool inherited through fork has no threads: make a new one.
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="vesuvius-dask")
            self._pool_pid = pid
        return self._pool

    def _volume_graph(self, v: int) -> dict:
        g = self._graphs.get(v)
        if g is None:
            g = self._graphs[v] = dict(self.volumes[v].array.__dask_graph__())
        return g

    # -- chunk reads ---------------------------------------------------------
    def _count_read(self, chunk: np.ndarray) -> None:
        with self._lock:
            self.stats.chunks_read += 1
            self.stats.bytes_decoded += chunk.nbytes

    def _account_read(self, key: Any, chunk: np.ndarray) -> None:
        self._count_read(chunk)
        self.cache.put(key, chunk)

    def _read_chunk(self, vol: Volume, chunk_id: tuple[int, int, int],
                    region: tuple[slice, ...]) -> np.ndarray:
        key = (vol.token,) + tuple(chunk_id)
        if self.machine is not None and self.machine_active and self.machine.usable:
            # the local LRU keeps the mapping (shared pages, no copy), so later batches
            # cut it inline; see DaskVesuviusStream's machine_cache for the memory bound.
            # A cache this process cannot write (/dev/shm full) returns the chunk
            # uncached, warns once and is not used again here (``usable`` False).
            chunk, decoded = self.machine.get_or_load(
                key, lambda: read_stored(vol.zarr, region, vol.name, vol.remote))
            if decoded:
                self._count_read(chunk)
            else:
                with self._lock:
                    self.stats.shared_hits += 1
            self.cache.put(key, chunk)
            return chunk
        chunk = read_stored(vol.zarr, region, vol.name, vol.remote)
        self._account_read(key, chunk)
        return chunk

    @property
    def remote(self) -> bool:
        """Whether some volume is fetched over the network (see :meth:`prefetch`)."""
        return any(v.remote is not None for v in self.volumes)

    def prefetch(self, vol_index: np.ndarray, starts: np.ndarray) -> int:
        """Start fetching the remote chunks this batch will need that no cache holds.

        Returns the fetches under way, over all volumes.
        """
        vol_index = np.asarray(vol_index, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
        pending = 0
        for v, vol in enumerate(self.volumes):
            if vol.remote is None or self._piece_reader(vol) is not None:  # ranges are not read ahead
                continue
            rows = np.nonzero(vol_index == v)[0]
            if rows.size:
                ids, _ = plan_pieces(self._bounds[v], starts[rows], self.block, rows)
                wanted = [cid for cid in map(tuple, np.unique(ids, axis=0).tolist())
                          if (vol.token,) + cid not in self.cache and not (
                              self.machine_active and self.machine.usable
                              and self.machine.has((vol.token,) + cid))]
                vol.remote.prefetch(stored_keys(vol.zarr, wanted))
            pending += vol.remote.pending()
        return pending

    def flush_fetches(self) -> None:
        """Wait until the remote chunks fetched so far are in their ``cache_dir``."""
        for v in self.volumes:
            if v.remote is not None:
                v.remote.flush()

    def pending_fetches(self) -> int:
        """Fetches started by :meth:`prefetch` and still under way."""
        return sum(v.remote.pending() for v in self.volumes if v.remote is not None)

    # -- graphs ----------------------------------------------------------------
    def batch_graph(self, vol_index: np.ndarray, starts: np.ndarray,
                    out: np.ndarray | None = None) -> tuple[dict, Any, np.ndarray, int]:
        """Build the dask graph of one batch.

        Returns
        -------
        graph : dict
            The dask graph.
        key : key
            The output key; its value is the ``(B, z, y, x)`` batch array.
        out : numpy.ndarray
            The preallocated output the tasks write into.
        n_reads : int
            Number of tasks that read stored chunks.
        """
        vol_index = np.asarray(vol_index, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
        shape = (starts.shape[0],) + self.block
        if out is None:
            out = self._output(shape)
        elif out.shape != shape or out.dtype != self.dtype:
            raise SamplingError(f"out has shape {out.shape} and dtype {out.dtype}; "
                             f"expected {shape} and {self.dtype}")
        tag = next(_batch_counter)
        graph: dict = {}
        deps: list[Any] = []
        in_memory: list[tuple[np.ndarray, np.ndarray]] = []
        n_reads = 0
        hits = 0
        readers: dict[int, Any] = {}
        units: dict[tuple[int, ...], list[tuple[tuple[int, int, int], np.ndarray]]] = {}
        for v, cid, region, pieces in self._work(vol_index, starts):
            vol = self.volumes[v]
            if cid is None:  # in RAM or memory-mapped
                in_memory.append((vol.data, pieces))
                continue
            if v not in readers:
                readers[v] = self._piece_reader(vol)
            reader = readers[v]
            if reader is not None and reader.path == "partial-uncompressed":  # nothing decoded or cached
                units.setdefault((v,) + cid, []).append((cid, pieces))
                continue
            cached = self.cache.get((vol.token,) + cid)
            if cached is not None:
                in_memory.append((cached, pieces))
                hits += 1
                continue
            if reader is not None:  # a shard: one task reads its index once, then its inner chunks
                unit = (v,) + tuple(c // u for c, u in zip(cid, reader.unit))
                units.setdefault(unit, []).append((cid, pieces))
                continue
            key = (f"vd-read-{tag}", v) + cid
            if vol.zarr is not None:
                graph[key] = (_ReadCut(self, vol, cid, region, out, pieces),)
            else:
                src_key = (vol.array.name,) + cid
                graph.update(self._culled(v, src_key))
                graph[key] = (_CutComputed(self, (vol.token,) + cid, out, pieces), src_key)
            deps.append(key)
            n_reads += 1
        tasks = [_ReadPieces(self, self.volumes[unit[0]], readers[unit[0]], items, out)
                 for unit, items in units.items()]
        for i, group in enumerate(self._spread(tasks)):
            key = (f"vd-unit-{tag}", i)
            graph[key] = (group[0],) if len(group) == 1 else (_ReadAll(group),)
            deps.append(key)
            n_reads += 1
        if in_memory:
            key = (f"vd-cut-{tag}",)
            graph[key] = (_CutCached(out, in_memory),)
            deps.append(key)
        out_key = (f"vd-batch-{tag}",)
        graph[out_key] = (_assemble, out, *deps)
        with self._lock:
            self.stats.cache_hits += hits
        return graph, out_key, out, n_reads

    def _spread(self, tasks: list[_ReadPieces]) -> list[list[_ReadPieces]]:
        """Partial reads as tasks: local ones in at most ``num_threads`` groups, remote ones alone.

        A local read unit costs tens of microseconds; a task of its own cost about as much in
        the scheduler (half the time of a batch of 64^3 blocks). Remote units wait on the
        network: one task each keeps that many requests in flight.
        """
        local = [t for t in tasks if t.vol.remote is None]
        spread = [[t] for t in tasks if t.vol.remote is not None]
        k = min(len(local), self.num_threads)
        return spread + [local[i::k] for i in range(k)]

    def _piece_reader(self, vol: Volume) -> Any:
        """The volume's partial reader (:mod:`vesuvius_dask.io.partial`), or None (whole chunks).

        A sharded volume reads inner chunks one by one through the machine-wide cache
        while that is active (decoded inner chunks are shared by the workers).
        """
        if vol.zarr is None:
            return None
        reader = stored_reader(vol.zarr, vol.remote).pieces
        if (reader is not None and reader.path == "sharded" and self.machine is not None
                and self.machine_active and self.machine.usable):
            return None
        return reader

    def _work(self, vol_index: np.ndarray, starts: np.ndarray
              ) -> list[tuple[int, tuple[int, int, int] | None, tuple[slice, ...] | None, np.ndarray]]:
        """Pieces of a batch grouped by source: ``(volume, chunk id, region, pieces)``.

        In-RAM and memory-mapped volumes give one group with chunk id ``None``.
        """
        work = []
        single = len(self.volumes) == 1
        for v in ([0] if single else np.unique(vol_index).tolist()):
            rows = np.arange(vol_index.size) if single else np.nonzero(vol_index == v)[0]
            if self.volumes[v].data is not None:
                # every block is one piece of one "chunk": the whole array
                pieces = np.zeros((rows.size, 10), dtype=np.int64)
                pieces[:, 0] = rows
                pieces[:, 2], pieces[:, 4], pieces[:, 6] = self.block
                pieces[:, 7:] = starts[rows]
                work.append((v, None, None, pieces))
                continue
            bounds = self._bounds[v]
            chunk_ids, pieces = plan_pieces(bounds, starts[rows], self.block, rows)
            grid = np.array([len(b) - 1 for b in bounds], dtype=np.int64)
            lin = (chunk_ids[:, 0] * grid[1] + chunk_ids[:, 1]) * grid[2] + chunk_ids[:, 2]
            order = np.argsort(lin, kind="stable")
            cut_at = np.nonzero(np.diff(lin[order]))[0] + 1
            for group in np.split(order, cut_at):
                cid = tuple(int(c) for c in chunk_ids[group[0]])
                region = tuple(slice(int(b[c]), int(b[c + 1])) for b, c in zip(bounds, cid))
                work.append((v, cid, region, pieces[group]))  # type: ignore[arg-type]
        return work

    def _culled(self, v: int, key: Any) -> dict:
        from dask.optimization import cull

        culled, _ = cull(self._volume_graph(v), [key])
        return culled

    def read(self, vol_index: np.ndarray, starts: np.ndarray,
             out: np.ndarray | None = None) -> np.ndarray:
        """Read one batch: ``out[i] = volumes[vol_index[i]][block at starts[i]]``.

        Parameters
        ----------
        vol_index : (B,) int array
            Volume of each block.
        starts : (B, 3) int array
            Start ``(z, y, x)`` of each block.
        out : numpy.ndarray, optional
            Where to write the batch (e.g. shared memory); default: a new array.

        Returns
        -------
        numpy.ndarray
            ``(B, z_size, y_size, x_size)`` array of the engine's dtype.
        """
        return read_together([(self, vol_index, starts, out)])[0]


def read_together(requests: Sequence[tuple[BatchEngine, np.ndarray, np.ndarray, np.ndarray | None]]
                  ) -> list[np.ndarray]:
    """Read several batches (e.g. blocks and their labels) as one dask graph.

    Parameters
    ----------
    requests : sequence of (engine, vol_index, starts, out)
        What each engine reads; ``out`` may be None.

    Returns
    -------
    list of numpy.ndarray
        One batch per request.
    """
    from dask.local import get_sync
    from dask.threaded import get as get_threaded

    graph: dict = {}
    keys, outs = [], []
    n_reads = 0
    for engine, vol_index, starts, out in requests:
        engine._own_process()
        g, key, out, n = engine.batch_graph(vol_index, starts, out)
        graph.update(g)
        keys.append(key)
        outs.append(out)
        n_reads += n
    first = requests[0][0]
    if n_reads == 0:
        # No chunk to read (in-RAM volumes, cache hits): the graph is only cut tasks
        # and assemblies; dask's scheduler would only add overhead, run them inline.
        for task in graph.values():
            if isinstance(task[0], _CutCached):
                task[0]()
    elif n_reads >= 2 and first.num_threads > 1:
        get_threaded(graph, keys, pool=first._thread_pool())
    else:
        get_sync(graph, keys)
    for (engine, *_), out in zip(requests, outs):
        with engine._lock:
            engine.stats.batches += 1
            engine.stats.blocks += out.shape[0]
            engine.stats.bytes_delivered += out.nbytes
    return outs


# -- dask.distributed ----------------------------------------------------------------
# Engines deserialised in this (worker) process, by uid: a batch task carries its
# engine (a few KB: volumes travel as zarr store paths, memory-map and TIFF file
# names), and the first copy to arrive is kept, with its decoded-chunk cache.
# At most _WORKER_ENGINES_MAX engines (and their caches) are kept, least recent out.
_WORKER_ENGINES_MAX = 4
_WORKER_ENGINES = LRU(_WORKER_ENGINES_MAX)


def cluster_read(engines: Sequence[BatchEngine], vol_index: np.ndarray,
                starts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Task run on a dask.distributed worker: read one batch (and its labels).

    Parameters
    ----------
    engines : sequence of BatchEngine
        The volume engine, then optionally the label engine.
    vol_index : numpy.ndarray
        Volume of each block.
    starts : sequence of numpy.ndarray
        Block starts for each engine.

    Returns
    -------
    list of numpy.ndarray
        One batch per engine, read as one chunk-aware dask graph on this worker.
    """
    local = []
    for e in engines:
        _WORKER_ENGINES.put(e.uid, e)  # the first copy to arrive stays, with its cache
        local.append(_WORKER_ENGINES.get(e.uid, e))
    return read_together([(e, vol_index, st, None) for e, st in zip(local, starts)])
