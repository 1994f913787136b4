"""Fetch only what a run touches: the stored chunks a stream will read, into ``cache_dir``.

A stream's epoch plan is a pure function of ``(seed, epoch)``, so the stored chunks
its epochs will read are known before any is read. :func:`prefetch` lists them for a
:class:`~vesuvius_dask.loaders.stream.DaskVesuviusStream` (its volumes, block,
samples per epoch, seed, sampler, masks, labels, rank) and a number of epochs — or
for the grid ``predict`` reads (:func:`predict_stream`) — says how many there are
and how many bytes they take, then fetches those not yet in ``cache_dir``. A stream
with the same configuration and ``cache_dir`` then asks the server for no chunk
during those epochs, with any number of DataLoader workers.

The chunks are listed the way the batch engine reads them: the same
:class:`~vesuvius_dask.sampling.plan.BlockPlan` batches (every DataLoader worker's
share, this rank's share under torch.distributed), split into stored chunks by the
engine's own :func:`~vesuvius_dask.engine.batches.plan_pieces`.

Bytes: the count is exact; before fetching, the stored (compressed) size of a chunk
is not known without a request per chunk, so the report gives the decoded size of
the chunks to fetch, which stored chunks rarely exceed (compressed, they are
usually much smaller), and the exact size of those already in ``cache_dir``. After
fetching, the bytes in ``cache_dir`` are exact.

Fetching goes through :class:`~vesuvius_dask.remote.fetch.RemoteChunks`: many
requests in flight, claims shared with other processes, retries; each chunk is
decoded before it is kept (a bad response is never kept), as when a stream reads it.
Chunks already in ``cache_dir`` are skipped without a request, so a killed prefetch
run again fetches only what is missing, and a second run fetches nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.batches import plan_pieces
from ..errors import ArgumentError, CacheDirError
from ..io.volume import Volume, disk_cache_for, is_remote, read_stored, stored_keys
from ..sampling.plan import ANY_VOXEL

__all__ = ["prefetch", "PrefetchPlan", "VolumeChunks", "predict_stream"]

#: Block starts turned into chunk indices per vectorised call.
_GROUP = 1 << 15
#: Chunk indices kept before they are deduplicated.
_DEDUPE = 1 << 22


def _size(n: int) -> str:
    from dask.utils import format_bytes

    return format_bytes(int(n))


@dataclass
class VolumeChunks:
    """The stored chunks of one volume that a run reads.

    Attributes
    ----------
    name : str
        The volume as errors name it (``files[0] (URL)``, ``labels[1] (...)``).
    kind : {"remote", "local", "zarr"}
        ``remote``: fetched chunk by chunk, so prefetched into ``cache_dir``;
        ``local``: on this machine, nothing to fetch; ``zarr``: a URL whose layout
        (sharding, other codecs) is read through zarr, which keeps no ``cache_dir``.
    chunk_ids : numpy.ndarray
        ``(n, 3)`` int64 stored chunk indices, deduplicated, in raster order
        (empty unless ``kind`` is ``remote``).
    keys : list of str
        Their store keys (``c/0/1/2``), relative to :attr:`url`.
    url : str or None
        The array's URL.
    chunk_nbytes : int
        Decoded bytes of one stored chunk.
    cached, cached_bytes : int
        Of the chunks, those in ``cache_dir`` (and their stored bytes) when last counted.
    """

    name: str
    kind: str
    chunk_ids: np.ndarray
    keys: list[str] = field(default_factory=list)
    url: str | None = None
    chunk_nbytes: int = 0
    cached: int = 0
    cached_bytes: int = 0
    volume: Any = field(default=None, repr=False)
    remote: Any = field(default=None, repr=False)
    missing: list[int] = field(default_factory=list, repr=False)

    @property
    def count(self) -> int:
        """Stored chunks the run reads from this volume."""
        return int(self.chunk_ids.shape[0])

    def line(self, epochs: str) -> str:
        """One line for people."""
        if self.kind == "local":
            return f"{self.name}: local, nothing to fetch"
        if self.kind == "zarr":
            return (f"{self.name}: read through zarr (sharded or codecs the chunk path does not decode), "
                    "which keeps no cache_dir: cannot be prefetched")
        todo = self.count - self.cached
        most = "" if not todo else (f" (at most about {_size(todo * self.chunk_nbytes)}: their decoded "
                                    "size; compressed, they take less)")
        return (f"{self.name}: {self.count} chunks over {epochs}, {self.cached} already in cache_dir "
                f"({_size(self.cached_bytes)}), {todo} to fetch{most}")


@dataclass
class PrefetchPlan:
    """What a run reads, what ``cache_dir`` holds of it, and what was fetched (see :func:`prefetch`).

    Attributes
    ----------
    volumes : list of VolumeChunks
        One entry per volume (and label volume) of the stream; a URL given twice is one entry.
    epochs : list of int
        The epochs listed.
    fetched, fetched_bytes : int
        Chunks fetched by :meth:`fetch` and their stored bytes.
    seconds : float
        How long :meth:`fetch` took.
    """

    volumes: list[VolumeChunks]
    epochs: list[int]
    fetched: int = 0
    fetched_bytes: int = 0
    seconds: float = 0.0
    done: bool = False

    @property
    def remote(self) -> list[VolumeChunks]:
        return [v for v in self.volumes if v.kind == "remote"]

    @property
    def chunks(self) -> int:
        """Stored chunks of URL volumes the run reads (the listed set)."""
        return sum(v.count for v in self.remote)

    @property
    def cached(self) -> int:
        """Of them, those in ``cache_dir`` when last counted."""
        return sum(v.cached for v in self.remote)

    @property
    def to_fetch(self) -> int:
        return self.chunks - self.cached

    @property
    def decoded_bytes(self) -> int:
        """Decoded bytes of the chunks to fetch: about what their stored bytes are at most."""
        return sum((v.count - v.cached) * v.chunk_nbytes for v in self.remote)

    def paths(self) -> set[str]:
        """The URLs of the listed chunks."""
        return {f"{v.url}/{k}" for v in self.remote for k in v.keys}

    def _epochs_text(self) -> str:
        e = self.epochs
        if len(e) == 1:
            return f"epoch {e[0]}"
        if e == list(range(e[0], e[0] + len(e))):
            return f"{len(e)} epochs ({e[0]}-{e[-1]})"
        return f"{len(e)} epochs"

    def summary(self) -> str:
        """The report before fetching: a line per volume and one for ``cache_dir`` (or one line)."""
        if not self.remote and all(v.kind == "local" for v in self.volumes):
            return "nothing to fetch: every volume is local"
        text = self._epochs_text()
        lines = [v.line(text) for v in self.volumes]
        if len(self.remote) > 1:
            lines.append(f"total: {self.chunks} chunks, {self.cached} already in cache_dir, "
                         f"{self.to_fetch} to fetch (at most about {_size(self.decoded_bytes)})")
        cache = self.remote[0].remote.cache if self.remote else None
        if self.remote and cache is None:
            lines.append("no cache_dir: listed only (a fetch needs one)")
        elif self.remote:
            held = sum(v.cached_bytes for v in self.remote)
            fits = "" if held + self.decoded_bytes <= cache.max_bytes else (
                "; the run's chunks may not fit: raise vesuvius-dask.remote.cache-dir-bytes")
            lines.append(f"cache_dir {cache.root} (budget {_size(cache.max_bytes)}){fits}")
        return "\n".join(lines)

    def check_cache(self) -> None:
        """Raise :class:`~vesuvius_dask.errors.ArgumentError` if a remote volume has no ``cache_dir``."""
        for entry in self.remote:
            if entry.remote.cache is None:
                raise _no_cache(entry.name)

    def result(self) -> str:
        """One line after :meth:`fetch`."""
        return (f"fetched {self.fetched} chunks ({_size(self.fetched_bytes)} in cache_dir) in "
                f"{self.seconds:.1f} s; cache_dir holds all {self.chunks} chunks of the run")

    def __str__(self) -> str:
        return self.summary() + ("\n" + self.result() if self.done else "")

    def fetch(self, progress: bool = False) -> PrefetchPlan:
        """Fetch the listed chunks not in ``cache_dir`` yet (each decoded before it is kept).

        Parameters
        ----------
        progress : bool
            A tqdm progress bar on stderr.

        Returns
        -------
        PrefetchPlan
            This plan, with :attr:`fetched` and the cached counts brought up to date.

        Raises
        ------
        ChunkFetchError, CorruptChunkError
            A chunk could not be fetched or decoded (what was fetched before stays).
        CacheDirError
            Fetched chunks are no longer in ``cache_dir``: its byte budget is smaller
            than the run's chunks (config ``vesuvius-dask.remote.cache-dir-bytes``).
        """
        from tqdm import tqdm

        self.check_cache()
        t0 = time.perf_counter()
        for entry in self.remote:  # counted again: another process may have fetched some since
            _count_cached(entry)
        before = {id(v): v.cached_bytes for v in self.remote}
        tty = sys.stderr.isatty()
        bar = tqdm(total=self.to_fetch, unit="chunk", desc="prefetch", disable=not progress,
                   file=sys.stderr, mininterval=0.5 if tty else 30.0, dynamic_ncols=tty)
        fetched = 0
        try:
            for entry in self.remote:
                fetched += _fetch_missing(entry, bar)
        finally:
            bar.close()
        missing = 0
        for entry in self.remote:
            _count_cached(entry)
            missing += len(entry.missing)
        self.fetched += fetched
        self.fetched_bytes += sum(v.cached_bytes - before[id(v)] for v in self.remote)
        self.seconds = time.perf_counter() - t0
        if missing:
            cache = self.remote[0].remote.cache
            raise CacheDirError(
                f"{missing} of the run's {self.chunks} chunks are not in cache_dir {cache.root} after "
                f"fetching: its byte budget ({_size(cache.max_bytes)}) is smaller than the run's "
                "chunks; raise vesuvius-dask.remote.cache-dir-bytes")
        self.done = True
        return self


# ----------------------------------------------------------------------------- listing
def _epoch_list(epochs: Any) -> list[int]:
    """``epochs`` as epoch numbers: N means ``0 .. N-1``; a sequence is taken as given."""
    if isinstance(epochs, (int, np.integer)) and not isinstance(epochs, bool):
        if epochs < 1:
            raise ArgumentError(f"epochs must be at least 1 (epochs 0 .. epochs-1), got {epochs}")
        return list(range(int(epochs)))
    if isinstance(epochs, Iterable) and not isinstance(epochs, (str, bytes)):
        values = list(epochs)
        if values and all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) and e >= 0
                          for e in values):
            return sorted({int(e) for e in values})
    raise ArgumentError(f"epochs must be a number of epochs or a list of epoch numbers (>= 0), "
                        f"got {epochs!r}")


def _sources(stream: Any) -> list[tuple[str, Any, bool]]:
    """``(what, engine, labels are 2-D)`` of everything the stream reads: its volumes, its labels."""
    out = [("files", stream.engine, False)]
    if getattr(stream, "label_engine", None) is not None:
        out.append(("labels", stream.label_engine, bool(stream.label_2d)))
    return out


def _kind(vol: Volume) -> str:
    if vol.remote is not None:
        return "remote"
    if vol.zarr is not None and is_remote(vol.zarr):
        return "zarr"
    return "local"


def _grid(vol: Volume) -> tuple[int, ...]:
    return tuple(len(b) - 1 for b in vol.bounds)


class _Touched:
    """Stored chunks touched by blocks, per (source, volume): linear indices, deduplicated."""

    def __init__(self, sources: list[tuple[str, Any, bool]]) -> None:
        self.sources = sources
        self.wanted = {(s, v) for s, (_, eng, _) in enumerate(sources)
                       for v, vol in enumerate(eng.volumes) if vol.remote is not None}
        self.volumes = {v for _, v in self.wanted}
        self.found: dict[tuple[int, int], list[np.ndarray]] = {k: [] for k in self.wanted}
        self.sizes = dict.fromkeys(self.wanted, 0)
        self.pending: dict[int, list[np.ndarray]] = {v: [] for v in self.volumes}
        self.held = 0

    def add(self, vols: np.ndarray, starts: np.ndarray) -> None:
        for v in np.unique(vols).tolist():
            if v in self.volumes:
                part = starts[vols == v]
                self.pending[v].append(part)
                self.held += part.shape[0]
        if self.held >= _GROUP:
            self.flush()

    def flush(self) -> None:
        for v, parts in self.pending.items():
            if not parts:
                continue
            starts = np.concatenate(parts)
            for s, (_, eng, flat) in enumerate(self.sources):
                if (s, v) not in self.wanted:
                    continue
                vol = eng.volumes[v]
                st = starts.copy() if flat else starts
                if flat:
                    st[:, 0] = 0  # 2-D labels are read at z = 0, as the reader does
                ids, _ = plan_pieces(vol.bounds, st, eng.block, np.zeros(st.shape[0], dtype=np.int64))
                self._keep((s, v), np.unique(np.ravel_multi_index(tuple(ids.T), _grid(vol))))
            parts.clear()
        self.held = 0

    def _keep(self, key: tuple[int, int], lin: np.ndarray) -> None:
        self.found[key].append(lin)
        self.sizes[key] += lin.size
        if self.sizes[key] > _DEDUPE:
            merged = np.unique(np.concatenate(self.found[key]))
            self.found[key], self.sizes[key] = [merged], merged.size

    def result(self, key: tuple[int, int]) -> np.ndarray:
        parts = self.found.get(key) or [np.zeros(0, dtype=np.int64)]
        return np.unique(np.concatenate(parts))


def _touched(stream: Any, epochs: list[int]) -> _Touched:
    """The chunks of the stream's remote volumes that ``epochs`` read (every worker's share)."""
    touched = _Touched(_sources(stream))
    if not touched.wanted:
        return touched
    plan = stream.plan
    for epoch in epochs:
        for vols, starts in plan.batches(epoch, 0, 1, getattr(stream, "start_batch", 0),
                                         getattr(stream, "rank", 0), getattr(stream, "world_size", 1)):
            touched.add(np.asarray(vols), np.asarray(starts, dtype=np.int64))
    touched.flush()
    return touched


def _no_cache(name: str) -> ArgumentError:
    return ArgumentError(f"{name} is a URL and the stream has no cache_dir: give cache_dir= "
                         "the folder the run will read from (prefetching keeps chunks there)")


def _with_cache(vol: Volume, name: str, cache_dir: Any, dry_run: bool = False) -> Any:
    """The volume's fetcher, fetching through ``cache_dir`` (default: the stream's).

    A dry run may go without one (every chunk then counts as to fetch).
    """
    remote = vol.remote
    if cache_dir is None:
        if remote.cache is None and not dry_run:
            raise _no_cache(name)
        return remote
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(cache_dir))))
    if remote.cache is not None and Path(remote.cache.root) == root:
        return remote
    return remote.with_cache(disk_cache_for(remote, vol.zarr, root))


def _entries(stream: Any, epochs: list[int], cache_dir: Any, dry_run: bool = False) -> list[VolumeChunks]:
    touched = _touched(stream, epochs)
    entries: list[VolumeChunks] = []
    by_url: dict[str, tuple[VolumeChunks, np.ndarray]] = {}
    for s, (what, eng, _) in enumerate(touched.sources):
        for v, vol in enumerate(eng.volumes):
            label = f"{what}[{v}]"
            name = label if vol.name == label else f"{label} ({vol.name})"
            kind = _kind(vol)
            if kind != "remote":
                entries.append(VolumeChunks(name, kind, np.zeros((0, 3), dtype=np.int64), volume=vol))
                continue
            url = vol.remote.url("").rstrip("/")
            lin = touched.result((s, v))
            if url in by_url:  # the same array twice: one entry
                entry, before = by_url[url]
                entry.name += f", {label}"
                lin = np.union1d(before, lin)
            else:
                entry = VolumeChunks(name, kind, lin, url=url, volume=vol,
                                     chunk_nbytes=int(np.prod(vol.zarr.chunks)) * vol.dtype.itemsize,
                                     remote=_with_cache(vol, name, cache_dir, dry_run))
                entries.append(entry)
            by_url[url] = (entry, lin)
            entry.chunk_ids = np.stack(np.unravel_index(lin, _grid(vol)), axis=1).astype(np.int64) \
                if lin.size else np.zeros((0, 3), dtype=np.int64)
            entry.keys = [k for k, _ in stored_keys(vol.zarr, entry.chunk_ids)]
    return entries


def _count_cached(entry: VolumeChunks) -> None:
    """Count the entry's chunks in ``cache_dir`` (a stat each; nothing is read or requested)."""
    import stat

    cache = entry.remote.cache
    entry.cached = entry.cached_bytes = 0
    entry.missing = []
    if cache is None:  # a dry run without cache_dir: everything is to fetch
        entry.missing = list(range(len(entry.keys)))
        return
    for i, key in enumerate(entry.keys):
        try:
            st = os.stat(cache.file(key))
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            entry.missing.append(i)
            continue
        entry.cached += 1
        entry.cached_bytes += st.st_size


# ----------------------------------------------------------------------------- fetching
def _region(arr: Any, cid: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(i * int(c), min((i + 1) * int(c), int(n)))
                 for i, c, n in zip(cid, arr.chunks, arr.shape))


def _fetch_missing(entry: VolumeChunks, bar: Any) -> int:
    """Fetch the entry's chunks not in ``cache_dir`` (many in flight), decoding each; how many."""
    remote, arr = entry.remote, entry.volume.zarr
    missing = set(entry.missing)
    for i, key in enumerate(entry.keys):  # the run's chunks are the most recently used
        if i not in missing:
            try:
                os.utime(remote.cache.file(key))
            except OSError:
                pass
    todo = [(entry.keys[i], tuple(int(c) for c in entry.chunk_ids[i])) for i in entry.missing]
    limit = remote.ahead_limit()
    handed = 0
    try:
        for i, (_, cid) in enumerate(todo):
            if handed < len(todo) and handed - i < limit:  # keep ``limit`` fetches under way
                end = min(len(todo), i + limit)
                remote.prefetch(todo[handed:end], limit=limit)
                handed = end
            # decoded before it is kept, as the stream reads it (a bad response is never kept)
            read_stored(arr, _region(arr, cid), entry.name, remote)
            bar.update(1)
    finally:
        remote.flush()  # what was fetched is in cache_dir, even on an error
    return len(todo)


# ----------------------------------------------------------------------------- the calls
def prefetch(stream: Any, epochs: int | Iterable[int] = 1, *, cache_dir: str | os.PathLike | None = None,
             dry_run: bool = False, progress: bool = False) -> PrefetchPlan:
    """Fetch into ``cache_dir`` exactly the stored chunks a stream's epochs will read.

    The chunks are listed from the stream's epoch plan (its volumes, block,
    samples per epoch, seed, sampler, masks, labels; every DataLoader worker's
    share, and this rank's share under torch.distributed), counted against
    ``cache_dir``, and those not there yet are fetched, many requests in flight,
    each decoded before it is kept. A stream with the same configuration and
    ``cache_dir`` then asks the server for no chunk during those epochs.

    Parameters
    ----------
    stream : DaskVesuviusStream
        The run's stream (for ``predict``'s grid: :func:`predict_stream`).
    epochs : int or iterable of int
        N: epochs ``0 .. N-1`` (``for epoch in range(N): stream.set_epoch(epoch)``);
        or the epoch numbers (``range(5, 10)`` to resume at epoch 5).
    cache_dir : str or os.PathLike, optional
        Where the run will read chunks from. Default: the stream's ``cache_dir``.
    dry_run : bool
        List and count only: no chunk is requested. ``plan.fetch()`` fetches later.
    progress : bool
        A progress bar on stderr while fetching.

    Returns
    -------
    PrefetchPlan
        The chunks per volume, what ``cache_dir`` held of them, and what was fetched;
        ``str(plan)`` is the report.

    Raises
    ------
    ArgumentError
        ``epochs`` is not a positive count or a list of epoch numbers, or a volume
        is a URL and there is no ``cache_dir``.
    ChunkFetchError, CorruptChunkError
        A chunk could not be fetched or decoded (what was fetched before stays).
    CacheDirError
        ``cache_dir`` cannot be used, or its byte budget cannot hold the run's chunks.

    Examples
    --------
    >>> stream = DaskVesuviusStream([url], 4, 64, 64, samples_per_epoch=100_000,
    ...                             batch_size=128, seed=0, cache_dir="/data/vd-cache")
    >>> plan = prefetch(stream, epochs=10, dry_run=True)   # doctest: +SKIP
    >>> print(plan)                                         # doctest: +SKIP
    >>> plan.fetch(progress=True)                           # doctest: +SKIP
    """
    numbers = _epoch_list(epochs)
    plan = PrefetchPlan(_entries(stream, numbers, cache_dir, dry_run), numbers)
    for entry in plan.remote:
        _count_cached(entry)
    if not dry_run:
        plan.fetch(progress=progress)
    return plan


def predict_stream(source: Any, *, block: Sequence[int] | None = None, overlap: Sequence[int] | None = None,
                   masks: Any = None, mask_coverage: float = ANY_VOXEL, batch_size: int = 32,
                   cache_dir: str | os.PathLike | None = None, storage_options: dict | None = None) -> Any:
    """The grid stream :func:`~vesuvius_dask.writers.predict.predict` reads, for :func:`prefetch`.

    The same defaults as ``predict``: block 16×64×64 clipped to the volume, overlap a
    quarter of the block in y and x, a mask touched by any voxel.

    Parameters
    ----------
    source : Segment, path, URL or array
        ``predict``'s source.
    block, overlap, masks, mask_coverage, batch_size, cache_dir, storage_options
        As for ``predict`` (``masks``: a mask image or array, or ``"segment"``).

    Returns
    -------
    DaskVesuviusStream
        A :class:`~vesuvius_dask.sampling.samplers.GridSampler` stream over the source.
    """
    from ..io.open import resolve_volume
    from ..io.paths import PathKind, path_kind
    from ..io.segments import open_segment
    from ..sampling.samplers import GridSampler
    from .stream import DaskVesuviusStream

    if isinstance(source, (str, os.PathLike)):
        if "://" in os.fspath(source):
            source = resolve_volume(source, cache_dir=cache_dir, storage_options=storage_options)
        elif path_kind(source) == PathKind.SEGMENT:
            source = open_segment(source)
    shape = resolve_volume(source).shape
    if block is None:
        block = tuple(min(b, n) for b, n in zip((16, 64, 64), shape))
    block = tuple(int(b) for b in block)
    if overlap is None:
        overlap = (0, block[1] // 4, block[2] // 4)
    if isinstance(masks, (list, tuple)) and len(masks) == 1:
        masks = masks[0]
    masks = None if masks is None else ("segment" if isinstance(masks, str) and masks == "segment"
                                        else [masks])
    grid = GridSampler(overlap=overlap, mask_coverage=mask_coverage)  # every position once
    return DaskVesuviusStream([source], *block, sampler=grid, batch_size=batch_size, masks=masks)
