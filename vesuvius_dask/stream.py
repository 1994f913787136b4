"""``DaskVesuviusStream``: random 3-D blocks from many volumes, as a torch IterableDataset.

This is the only core module that imports torch.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .errors import MissingExtraError

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise MissingExtraError(
        "DaskVesuviusStream needs PyTorch: pip install \"vesuvius-dask[torch]\"") from err

from .engine import DEFAULT_CACHE_BYTES, BatchEngine, read_together
from .errors import InvalidTypeError, SamplingError
from .sampling import (
    SAMPLING_METHODS,
    EpochPlan,
    FeistelPermutation,
    GridStarts,
    LocalityPermutation,
    MaskedStartGrid,
    StartGrid,
)
from .volumes import Volume, resolve_volume

__all__ = ["DaskVesuviusStream"]

#: Blocks read per dask graph when the stream yields single blocks.
DEFAULT_READ_BATCH = 128
#: Block starts computed per vectorised call (rounded to whole batches).
_STARTS_GROUP = 4096
#: Seconds a consumer spends on one batch above which the stream reads ahead.
_BUSY_CONSUMER = 1e-3


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        raise SamplingError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _triple(name: str, value: Any) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,) * 3
    if not isinstance(value, Sequence) or len(value) != 3:
        raise InvalidTypeError(f"{name} must be an int or a (z, y, x) triple, got {value!r}")
    return tuple(_positive_int(f"{name}[{axis}]", v) for axis, v in zip("zyx", value))  # type: ignore[return-value]


def _numpy_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        try:
            return torch.empty(0, dtype=dtype).numpy().dtype
        except (TypeError, RuntimeError) as err:
            raise InvalidTypeError(
                f"dtype={dtype} has no numpy equivalent; pick e.g. torch.float32 and convert "
                "further in `transform`"
            ) from err
    try:
        return np.dtype(dtype)
    except TypeError as err:
        raise InvalidTypeError(f"dtype={dtype!r} is not a numpy or torch dtype") from err


def _needs_scatter(vol: Volume) -> bool:
    """In-RAM numpy data cannot be re-opened by workers by name: it must be sent."""
    from .volume import memmap_ref

    data = vol.data
    if data is None or not isinstance(data, np.ndarray):
        return False
    return not (isinstance(data, np.memmap) and memmap_ref(data, vol.array.chunks) is not None)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _as_tensor(array: Any) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(array)


def _per_volume(name: str, value: Any, files: Sequence[Any], attr: str) -> list[Any]:
    """Expand ``labels``/``masks`` to one entry per volume (``"segment"``: from Segments)."""
    if value is None:
        return [None] * len(files)
    if isinstance(value, str) and value == "segment":
        out = []
        for i, f in enumerate(files):
            if not hasattr(f, attr):
                raise InvalidTypeError(
                    f"{name}='segment' needs Segment objects in files (open_segment); "
                    f"files[{i}] is a {type(f).__name__}")
            out.append(getattr(f, attr))
        return out
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidTypeError(f"{name} must be None, 'segment' or a list with one entry per volume")
    if len(value) != len(files):
        raise SamplingError(f"{name} has {len(value)} entries for {len(files)} volumes")
    return list(value)


def _load_2d(source: Any, what: str, vol: Volume) -> np.ndarray:
    """A 2-D mask as numpy, checked against the volume's (Y, X)."""
    from .segment import read_image

    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        if p.lower().endswith((".png", ".tif", ".tiff", ".jpg")):
            source = read_image(p)
        else:
            import zarr

            source = zarr.open(p, mode="r")
    arr = np.asarray(source.compute() if hasattr(source, "compute") else source)
    if arr.ndim != 2 or arr.shape != vol.shape[1:]:
        raise SamplingError(
            f"{what}: shape {arr.shape} does not match the (Y, X) = {vol.shape[1:]} of the "
            f"volume {vol.label}; masks are 2-D images of the volume's height and width")
    return arr


def _label_volumes(labels: Any, files: Sequence[Any], volumes: list[Volume]
                   ) -> tuple[list[Volume] | None, bool]:
    """Labels as volumes the engine can read (2-D become (1, Y, X)), and whether they are 2-D."""
    if labels is None:
        return None, False
    out = []
    dims = set()
    for i, (src, vol) in enumerate(zip(_per_volume("labels", labels, files, "labels"), volumes)):
        if src is None:
            raise SamplingError(f"labels[{i}]: volume {vol.label} has no labels; every volume needs them")
        if isinstance(src, (str, os.PathLike)) and not os.fspath(src).lower().endswith(
                (".png", ".tif", ".tiff", ".jpg")):
            import zarr

            src = zarr.open(os.fspath(src), mode="r")  # a Zarr label array, 2-D or 3-D
        if isinstance(src, (str, os.PathLike)) or getattr(src, "ndim", 3) == 2:
            arr = _load_2d(src, f"labels[{i}]", vol)
            out.append(resolve_volume(arr[None], label=f"labels[{i}]"))
            dims.add(2)
            continue
        lv = resolve_volume(src, label=f"labels[{i}]")
        if lv.shape != vol.shape:
            raise SamplingError(
                f"labels[{i}]: shape {lv.shape} does not match the volume {vol.label} "
                f"{vol.shape}; 3-D labels must have the volume's shape")
        out.append(lv)
        dims.add(3)
    if len(dims) > 1:
        raise SamplingError("labels mix 2-D and 3-D arrays; use one kind for all volumes")
    return out, dims == {2}


def _shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (no copy, unlike ``share_memory_``)."""
    numel = int(np.prod(shape))
    proto = torch.empty(0, dtype=dtype)
    try:
        storage = proto._typed_storage()._new_shared(numel)
        return proto.new(storage).view(shape)
    except (AttributeError, RuntimeError, TypeError):  # private API moved: copy once
        return torch.empty(shape, dtype=dtype).share_memory_()


#: Batch buffers a DataLoader worker keeps for reuse, and their total byte budget
#: (never more than 1/8 of the free space in /dev/shm at the worker's start).
_SHM_POOL_BUFFERS = 16
_SHM_POOL_BYTES = 512 * 2**20
#: torch's refcounted shared-memory segments keep their cross-process reference count
#: in an int this many bytes before the data (at the start of the mapping).
_SHM_HEADER = 64


def _storage_uses(t: torch.Tensor) -> int:
    """Tensors (and storage objects) in this process holding ``t``'s storage."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _shm_refcount(t: torch.Tensor) -> int:
    """Processes (and messages in transit) holding ``t``'s shared-memory segment."""
    import ctypes

    return ctypes.c_int.from_address(t.untyped_storage().data_ptr() - _SHM_HEADER).value


def _mapping_start(address: int) -> tuple[int, str] | None:
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= address < hi:
                return lo, (fields[5] if len(fields) > 5 else "")
    return None


class _ShmBatchPool:
    """Shared-memory batch buffers of one DataLoader worker, reused once free everywhere.

    A batch handed to the main process travels as a reference to a shared-memory
    segment, so the worker must not reuse it while any process still holds it. A
    fresh segment per batch is always safe but slow: the worker then writes every
    batch into pages the kernel must first zero and map (about 1.5 ms per 4 MB here,
    more than cutting the blocks). This pool reuses a segment only when

    * no tensor in this process refers to it any more (the yielded alias has been
      pickled and dropped by the DataLoader's queue, which happens only after the
      reference below was taken), and
    * torch's cross-process reference count of the segment is back to one (ours):
      the main process, and anything it passed the batch on to, has released it.

    The count exists only for torch's ``file_system`` sharing strategy, which the
    worker therefore switches to (a per-process setting; the main process keeps its
    own). Where the segment layout is not the one checked at start-up (another
    platform or torch version) the pool is off and every batch gets a fresh segment.
    Only persistent workers use a pool (see :func:`_pool_allowed`), and it lets go
    of its buffers when the worker exits.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.buffers: list[tuple[torch.Tensor, int]] = []  # (buffer, own storage uses)
        self.max_bytes = _SHM_POOL_BYTES
        try:  # a small /dev/shm (64 MB in Docker by default) is shared by all workers
            st = os.statvfs("/dev/shm")
            self.max_bytes = min(self.max_bytes, st.f_bavail * st.f_frsize // 8)
        except OSError:
            pass
        self.enabled = self._check_layout()
        if self.enabled:  # the reference count exists only for this strategy
            import torch.multiprocessing

            torch.multiprocessing.set_sharing_strategy("file_system")

    @staticmethod
    def _check_layout() -> bool:
        try:
            import torch.multiprocessing as tmp

            if "file_system" not in tmp.get_all_sharing_strategies():
                return False
            probe = _ShmBatchPool._allocate((4096,), torch.uint8)
            start = _mapping_start(probe.data_ptr())
            if start is None or start[0] != probe.data_ptr() - _SHM_HEADER or "torch" not in start[1]:
                return False
            storage = probe.untyped_storage()
            before = _shm_refcount(probe)
            storage._shared_incref()
            during = _shm_refcount(probe)
            storage._shared_decref()
            return (before, during, _shm_refcount(probe)) == (1, 2, 1)
        except Exception:  # noqa: BLE001 - any surprise: fall back to fresh segments
            return False

    @staticmethod
    def _allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        storage = torch.UntypedStorage._new_using_filename_cpu(max(nbytes, 1))
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def release(self) -> None:
        """Let go of every buffer (a segment is unlinked once its last holder lets go).

        Runs when the worker process exits. DataLoader workers end with
        ``os._exit``, which frees nothing, and a ``file_system`` segment the worker
        still held would stay in ``/dev/shm`` until the main process exits.
        """
        self.buffers.clear()

    def _free(self, buf: torch.Tensor, uses: int) -> bool:
        return _storage_uses(buf) == uses and _shm_refcount(buf) == 1

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A shared-memory tensor of ``shape`` nobody else holds (contents undefined).

        The pool tracks the most recently used buffers; a batch the consumer keeps
        just ages out of it (the pool forgets it, the consumer's copy stays valid).
        """
        if not self.enabled:
            return _shared_tensor(shape, dtype)
        shape = tuple(int(v) for v in shape)
        for i, (buf, uses) in enumerate(self.buffers):
            if tuple(buf.shape) == shape and buf.dtype == dtype and self._free(buf, uses):
                self.buffers.append(self.buffers.pop(i))  # most recently used last
                return buf
        buf = self._allocate(shape, dtype)
        self.buffers.append((buf, _storage_uses(buf)))
        while len(self.buffers) > 1 and (
                len(self.buffers) > _SHM_POOL_BUFFERS
                or sum(b.untyped_storage().nbytes() for b, _ in self.buffers) > self.max_bytes):
            self.buffers.pop(0)
        return buf


_SHM_POOL: _ShmBatchPool | None = None
#: Epochs (iterations) started in this DataLoader worker process, by pid.
_WORKER_ITERATIONS: dict[int, int] = {}


def _pool_allowed() -> bool:
    """Reuse shared memory only in a DataLoader worker that has started a second epoch.

    That is, a persistent worker. A worker that lives for one epoch gets a fresh
    (file-descriptor) segment per batch, as torch does by default: when its
    DataLoader stops early, batches still in the queue are dropped unread, and a
    ``file_system`` segment dropped that way would stay in ``/dev/shm`` until the
    main process exits; one early stop per epoch would pile them up. A persistent
    worker's queue is drained by the DataLoader at the next epoch instead.
    """
    return get_worker_info() is not None and _WORKER_ITERATIONS.get(os.getpid(), 0) >= 2
#: Tensors smaller than this travel as they are (a fresh segment is cheap for them).
_POOL_MIN_BYTES = 4096


def _into_pool(item: Any) -> Any:
    """Tensors of a worker's item that are not in shared memory, copied into pool buffers.

    A ``transform`` that returns new tensors (``(block - m) / s``) would otherwise make
    the DataLoader copy each of them into a fresh shared-memory segment, page faults
    and all; a copy into a reused buffer costs a fraction of that. Tensors already in
    shared memory (the batch itself, views of it, in-place results) pass unchanged.
    """
    if isinstance(item, torch.Tensor):
        pool = _shm_pool()
        if (not pool.enabled or item.is_shared() or item.device.type != "cpu"
                or not item.is_contiguous() or item.nbytes < _POOL_MIN_BYTES
                or type(item) is not torch.Tensor or item.requires_grad):
            return item
        buf = pool.take(tuple(item.shape), item.dtype)
        buf.copy_(item)
        return buf.view(buf.shape)  # an alias, so the pool sees it while it travels
    if isinstance(item, tuple) and not hasattr(item, "_fields"):
        return tuple(_into_pool(v) for v in item)
    if isinstance(item, list):
        return [_into_pool(v) for v in item]
    if isinstance(item, dict):
        return {k: _into_pool(v) for k, v in item.items()}
    return item


def _shm_pool() -> _ShmBatchPool:
    """The pool of the calling process (a forked child starts its own)."""
    global _SHM_POOL
    if _SHM_POOL is None or _SHM_POOL.pid != os.getpid():
        from multiprocessing import util

        _SHM_POOL = _ShmBatchPool()
        # multiprocessing runs these finalizers in a worker before its os._exit
        util.Finalize(_SHM_POOL, _SHM_POOL.release, exitpriority=10)
    return _SHM_POOL


class DaskVesuviusStream(IterableDataset):
    """Stream random 3-D blocks from many volumes into PyTorch.

    Each epoch draws ``samples_per_epoch`` distinct block starts (without replacement)
    across all volumes. Blocks are read in batches, each batch as one dask graph with
    one task per touched stored chunk, so a chunk shared by several blocks of a batch
    is read and decompressed once; decoded chunks are kept in an LRU cache
    (``cache_bytes``) and the next batches are read in the background (``prefetch``).

    Parameters
    ----------
    files : list
        Volumes: anything :func:`vesuvius_dask.open_volume` accepts (paths to Zarr
        arrays or OME-Zarr groups, ``zarr.Array``, numpy arrays or memmaps, dask
        arrays), mixed freely.
    z_size, y_size, x_size : int
        Block shape.
    samples_per_epoch : int
        Blocks per epoch, across all DataLoader workers together. At most the number
        of available block starts.
    sampling_method : {"uniform", "proportional", "grid"}
        ``"uniform"``: each block picks a volume uniformly at random (among volumes
        with undrawn starts left), then an undrawn start in it. ``"proportional"``:
        volumes are picked with probability proportional to their undrawn starts.
        ``"grid"`` (for inference): every position of a regular grid that tiles each
        volume (see ``overlap`` and :class:`~vesuvius_dask.sampling.GridStarts`),
        volume after volume, in raster order (z, then y, then x: consecutive blocks
        share stored chunks), each exactly once per epoch; ``samples_per_epoch=None``
        means all of them. Masks skip positions outside the mask.
    shuffle : bool
        ``True``: starts inside a volume come in a seeded random order. ``False``:
        in raster order (z, then y, then x), as the original ``VesuviusStream``; the
        volume choice stays random.
    seed : int, optional
        Seed of the whole epoch plan. ``None`` draws one at construction, so the
        object (and its pickled copies in workers) stays self-consistent.
    batch_size : int, optional
        ``None`` yields single blocks ``(z, y, x)`` (use ``DataLoader(batch_size=B)``);
        an int yields batches ``(B, z, y, x)`` (use ``DataLoader(batch_size=None)``).
    return_coords : bool
        Yield ``(block, coords)``; ``coords`` is an int64 tensor ``[volume, z, y, x]``
        (``(B, 4)`` for batches).
    dtype : torch.dtype or numpy dtype, optional
        Output dtype. ``None`` keeps the volumes' dtype (uint16 stays uint16). A
        conversion that could lose values (e.g. float to int, uint16 to int16 or
        float16) raises instead of truncating.
    transform : callable, optional
        Applied to each yielded block (or batch) tensor; with ``labels``, called as
        ``transform(block, label)`` and must return the pair (so augmentations can
        flip both alike).
    stride : int or (int, int, int), optional
        Only starts on this grid are drawn (``stride == block`` gives
        non-overlapping blocks). Default 1.

    Other Parameters
    ----------------
    cache_bytes : int
        Decoded-chunk cache budget per process (default 512 MiB; 0 disables).
    prefetch : int, optional
        Batches read ahead in a background thread; 0 reads inline. Default (None):
        2 in the main process, 0 inside DataLoader workers, where the DataLoader
        already keeps ``prefetch_factor`` batches per worker in flight and a second
        thread would only contend for the GIL. The stream reads ahead only while the
        consumer spends more than 1 ms per batch (a training step); a consumer that
        asks again at once gets inline reads, which are faster then.
    read_batch : int
        Blocks per dask graph when ``batch_size`` is None (default 128).
    level : int, optional
        Multiscale level used for OME-Zarr paths in ``files``.
    num_threads : int, optional
        Threads reading chunks in parallel per process (default: CPU count).
    locality : int, optional
        Opt-in read locality for volumes far larger than the cache: draw blocks in
        runs of ``locality`` starts from the same stored chunk, ``locality_mix`` runs
        interleaved at a time (see :class:`~vesuvius_dask.sampling.LocalityPermutation`).
        Still without replacement and reproducible; less random: consecutive blocks
        come from a few chunks. Keep ``cache_bytes`` above ``locality_mix`` × 8
        chunks so that a run's chunks stay cached while it is drawn.
    locality_mix : int
        Runs interleaved at a time with ``locality`` (default 8).
    overlap : int or (int, int, int), optional
        With ``sampling_method="grid"``: overlap between neighbouring blocks (default
        0). The last block along an axis is shifted inwards to end at the volume's
        edge, so it may overlap more.
    client : distributed.Client or str, optional
        Run each batch's graph on a dask.distributed cluster (a client, or a scheduler
        address). ``prefetch`` batches (default 2) stay in flight as futures and are
        yielded in order. Workers must reach the volumes by path (Zarr, memory maps,
        TIFF stacks); with in-RAM numpy arrays (volumes, 2-D labels from PNG) the
        engines are scattered to every worker once per client instead. Each batch is
        one task that runs the chunk-aware engine on a worker. Failed tasks are retried
        ``retries`` times (default 2) and a lost worker's tasks are recomputed by the
        scheduler, so an epoch still yields each planned block once. Under
        ``DataLoader(num_workers=k)`` each worker process connects its own client
        (by address); usually ``num_workers=0`` suffices, the cluster reads in parallel.
    retries : int
        dask retries per task with ``client`` (default 2).
    labels : list or "segment", optional
        One label array per volume: 2-D ``(Y, X)`` (e.g. ``inklabels.png``) or 3-D
        ``(Z, Y, X)``; numpy, dask, a path to a PNG/TIFF/Zarr, or ``"segment"`` to take
        each :class:`~vesuvius_dask.Segment`'s ink labels. Items become
        ``(block, label)`` (``(block, label, coords)`` with ``return_coords``), where
        ``label`` is the ``(y_size, x_size)`` window (2-D) or the block (3-D) at the
        same start, read in the same dask graph as the blocks.
    masks : list or "segment", optional
        One 2-D ``(Y, X)`` mask per volume (entries may be None), or ``"segment"``.
        Only starts whose footprint the mask covers (see ``mask_coverage``) are drawn;
        the count of valid starts is exact and known before the epoch.
    mask_coverage : float
        Fraction of a block's ``(y, x)`` footprint that must be non-zero in the mask
        (default 1.0: the whole footprint; any value > 0 needs at least one voxel).

    Notes
    -----
    Epochs: the plan depends on ``(seed, epoch)`` only. Call :meth:`set_epoch` before
    each epoch (as with ``DistributedSampler``); otherwise each new iteration of the
    same object advances the epoch by one (true in a single process and with
    ``persistent_workers=True``; with non-persistent DataLoader workers each epoch
    gets a fresh copy, so only :meth:`set_epoch` changes the order). ``set_epoch``
    reaches persistent workers too: the epoch is kept in shared memory.

    Workers: under ``DataLoader(num_workers=k)`` worker ``w`` reads batches
    ``w, w+k, ...`` of the same plan, so the epoch yields ``samples_per_epoch``
    blocks in total, none twice, and the same set of blocks whatever ``k`` is.
    Fork and spawn are both safe: thread pools and caches are made per process.
    """

    def __init__(
        self,
        files: Sequence[Any],
        z_size: int,
        y_size: int,
        x_size: int,
        samples_per_epoch: int,
        sampling_method: str = "uniform",
        shuffle: bool = True,
        seed: int | None = None,
        batch_size: int | None = None,
        return_coords: bool = False,
        dtype: Any = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
        stride: int | Sequence[int] | None = None,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        prefetch: int | None = None,
        read_batch: int = DEFAULT_READ_BATCH,
        level: int | None = None,
        num_threads: int | None = None,
        locality: int | None = None,
        locality_mix: int = 8,
        labels: Any = None,
        masks: Any = None,
        mask_coverage: float = 1.0,
        overlap: int | Sequence[int] | None = None,
        client: Any = None,
        retries: int = 2,
    ) -> None:
        super().__init__()
        if isinstance(files, (str, bytes)) or not isinstance(files, Sequence):
            files = [files]
        if len(files) == 0:
            raise SamplingError("files is empty: give at least one volume")
        self.block = (
            _positive_int("z_size", z_size),
            _positive_int("y_size", y_size),
            _positive_int("x_size", x_size),
        )
        if sampling_method not in SAMPLING_METHODS:
            raise SamplingError(
                f"unknown sampling_method {sampling_method!r}; expected one of {SAMPLING_METHODS}"
            )
        self.sampling_method = sampling_method
        grid_mode = sampling_method == "grid"
        if samples_per_epoch is None and grid_mode:
            self.samples_per_epoch = -1  # every grid position; set once the grids are known
        else:
            self.samples_per_epoch = _positive_int("samples_per_epoch", samples_per_epoch)
        if grid_mode and stride is not None:
            raise SamplingError("stride does not apply to sampling_method='grid'; use overlap")
        self.overlap = (0, 0, 0) if overlap is None else tuple(
            int(o) for o in ((overlap,) * 3 if isinstance(overlap, (int, np.integer)) else overlap))
        if overlap is not None and not grid_mode:
            raise SamplingError("overlap applies to sampling_method='grid' only")
        self.shuffle = bool(shuffle) and not grid_mode  # the grid is visited in order
        self.stride = (1, 1, 1) if stride is None else _triple("stride", stride)
        self.batch_size = None if batch_size is None else _positive_int("batch_size", batch_size)
        self.read_batch = self.batch_size or _positive_int("read_batch", read_batch)
        self.return_coords = bool(return_coords)
        if transform is not None and not callable(transform):
            raise InvalidTypeError(f"transform must be callable, got {type(transform).__name__}")
        self.transform = transform
        if prefetch is not None and (isinstance(prefetch, bool) or not isinstance(
                prefetch, (int, np.integer)) or prefetch < 0):
            raise SamplingError(f"prefetch must be None or a non-negative integer, got {prefetch!r}")
        self.prefetch = None if prefetch is None else int(prefetch)
        self.locality = None if locality is None else _positive_int("locality", locality)
        self.locality_mix = _positive_int("locality_mix", locality_mix)
        if self.locality is not None and not self.shuffle:
            raise SamplingError("locality needs shuffle=True (it reorders starts randomly by chunk)")
        self._perms: dict[tuple[int, int], Any] = {}

        self.volumes: list[Volume] = []
        for i, f in enumerate(files):
            self.volumes.append(resolve_volume(f, level=level, label=f"files[{i}]"))
        self.grids: list[Any] = [
            GridStarts(v.shape, self.block, self.overlap, label=f"files[{i}] ({v.label})")
            if grid_mode else
            StartGrid(v.shape, self.block, self.stride, label=f"files[{i}] ({v.label})")
            for i, v in enumerate(self.volumes)
        ]
        if not (isinstance(mask_coverage, (int, float)) and 0 < mask_coverage <= 1):
            raise SamplingError(f"mask_coverage must be in (0, 1], got {mask_coverage!r}")
        self.mask_coverage = float(mask_coverage)
        for i, mask in enumerate(_per_volume("masks", masks, files, "mask")):
            if mask is not None:
                mask = _load_2d(mask, f"masks[{i}]", self.volumes[i])
                self.grids[i] = MaskedStartGrid(self.grids[i], mask, self.mask_coverage)
        self.masked = any(isinstance(g, MaskedStartGrid) for g in self.grids)
        self.label_volumes, self.label_2d = _label_volumes(labels, files, self.volumes)
        total = sum(g.n for g in self.grids)
        if self.samples_per_epoch == -1:
            self.samples_per_epoch = total
        if self.samples_per_epoch > total:
            raise SamplingError(
                f"samples_per_epoch={self.samples_per_epoch} is more than the {total} block "
                f"starts available for block {self.block} and stride {self.stride} "
                f"(per volume: {', '.join(str(g.n) for g in self.grids)})"
            )

        src = np.result_type(*[v.dtype for v in self.volumes])
        out = src if dtype is None else _numpy_dtype(dtype)
        for i, v in enumerate(self.volumes):
            if not np.can_cast(v.dtype, out, casting="safe"):
                raise SamplingError(
                    f"files[{i}] ({v.label}) has dtype {v.dtype}, which dtype={dtype} cannot "
                    f"hold without losing values; use a wider dtype (e.g. torch.float32) or "
                    "convert in `transform`"
                )
        self.dtype = out
        self._torch_dtype = torch.from_numpy(np.empty(0, dtype=out)).dtype
        self.seed = int(np.random.SeedSequence().entropy) if seed is None else int(seed)
        if self.seed < 0:
            raise SamplingError(f"seed must be non-negative, got {seed}")
        self.engine = BatchEngine(self.volumes, self.block, dtype=out,
                                  cache_bytes=cache_bytes, num_threads=num_threads)
        self.label_engine = None
        if self.label_volumes is not None:
            lblock = (1,) + self.block[1:] if self.label_2d else self.block
            self.label_engine = BatchEngine(self.label_volumes, lblock, cache_bytes=cache_bytes // 4,
                                            num_threads=num_threads)
        self._epoch = 0
        self._epoch_set = False
        self._iterations = 0
        # [epoch, generation] in shared memory: set_epoch in the main process reaches
        # DataLoader workers that already hold a copy (persistent_workers=True).
        self._epoch_cell = torch.zeros(3, dtype=torch.int64).share_memory_()  # + warned
        self._epoch_generation = 0
        self._client_obj: Any = None
        self._client_pid = os.getpid()
        self.scheduler_address: str | None = None
        self.retries = int(retries)
        #: Batches of each epoch before this one are skipped (``predict`` resumes with it).
        self.start_batch = 0
        self._scattered: dict[Any, Any] = {}
        if client is not None:
            if isinstance(client, str):
                from .cluster import get_client

                self.scheduler_address = client
                get_client(client)  # fail now, within the timeout, if it is unreachable
            else:
                self._client_obj = client
                self.scheduler_address = client.scheduler.address

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_client_obj"] = None  # a Client does not travel; copies connect by address
        state["_scattered"] = {}
        return state

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Use the plan of ``epoch`` for the next iteration (and advance from there)."""
        self._epoch = int(epoch)
        self._epoch_set = True
        self._iterations = 0
        self._epoch_generation = int(self._epoch_cell[1]) + 1
        self._epoch_cell[0] = self._epoch
        self._epoch_cell[1] = self._epoch_generation

    def _sync_epoch(self) -> None:
        """Adopt an epoch set in another process (the DataLoader's main process)."""
        generation = int(self._epoch_cell[1])
        if generation != self._epoch_generation:
            self._epoch, self._epoch_generation = int(self._epoch_cell[0]), generation
            self._epoch_set, self._iterations = True, 0

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use."""
        return self._epoch + self._iterations

    def __len__(self) -> int:
        if self.batch_size is None:
            return self.samples_per_epoch
        return math.ceil(self.samples_per_epoch / self.batch_size)

    @property
    def starts_per_volume(self) -> list[int]:
        """Number of valid block starts in each volume."""
        return [g.n for g in self.grids]

    @property
    def arrays(self) -> list[Any]:
        """The volumes as lazy dask arrays."""
        return [v.array for v in self.volumes]

    def __repr__(self) -> str:
        return (
            f"DaskVesuviusStream({len(self.volumes)} volumes, block={self.block}, "
            f"samples_per_epoch={self.samples_per_epoch}, sampling_method="
            f"{self.sampling_method!r}, batch_size={self.batch_size}, dtype={self.dtype}, "
            f"stride={self.stride}, seed={self.seed}, epoch={self.epoch})"
        )

    # ------------------------------------------------------------------ plan
    def _plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(self.starts_per_volume, self.samples_per_epoch,
                         self.sampling_method, self.seed, epoch)

    def _starts(self, labels: np.ndarray, ranks: np.ndarray, epoch: int) -> np.ndarray:
        starts = np.empty((labels.size, 3), dtype=np.int64)
        for v in np.unique(labels).tolist():
            sel = labels == v
            grid = self.grids[v]
            local = ranks[sel]
            if self.shuffle:
                local = self._permutation(epoch, v)(local)
            starts[sel] = grid.unravel(local)
        return starts

    def _permutation(self, epoch: int, v: int) -> Any:
        perm = self._perms.get((epoch, v))
        if perm is None:
            grid, key = self.grids[v], [self.seed, epoch, 3, v]
            if self.locality is None:
                perm = FeistelPermutation(grid.n, key)
            else:
                perm = LocalityPermutation(grid, self.volumes[v].bounds, self.locality,
                                           self.locality_mix, key)
            if len(self._perms) > 4 * len(self.grids):
                self._perms.clear()
            self._perms[(epoch, v)] = perm
        return perm

    def _batches(self, epoch: int, worker: int, num_workers: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        plan = self._plan(epoch)
        skip = self.start_batch
        selected = plan.batches(
            self.read_batch, select=lambda b: b >= skip and (b - skip) % num_workers == worker)
        # Starts are computed for several batches at once: the permutations are
        # vectorised, so fewer, larger calls cost less per block.
        group = max(1, _STARTS_GROUP // self.read_batch)
        while True:
            pending = list(itertools.islice(selected, group))
            if not pending:
                return
            labels = np.concatenate([lab for _, lab, _ in pending])
            starts = self._starts(labels, np.concatenate([r for _, _, r in pending]), epoch)
            first = 0
            for _, lab, _ in pending:
                yield lab, starts[first:first + lab.size]
                first += lab.size

    def epoch_coords(self, epoch: int | None = None) -> np.ndarray:
        """All ``(volume, z, y, x)`` starts of one epoch, in plan order, without reading.

        Parameters
        ----------
        epoch : int, optional
            Default: the epoch the next iteration will use.

        Returns
        -------
        numpy.ndarray
            ``(samples_per_epoch, 4)`` int64 array.
        """
        ep = self.epoch if epoch is None else int(epoch)
        parts = [np.column_stack([labels, starts]) for labels, starts in self._batches(ep, 0, 1)]
        return np.concatenate(parts).astype(np.int64)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._sync_epoch()
        if info is not None and info.id == 0 and not self._epoch_set and self._iterations == 0 \
                and int(self._epoch_cell[2]) == 0:
            self._epoch_cell[2] = 1  # shared: one warning per stream, not one per worker
            warnings.warn(
                "DaskVesuviusStream in DataLoader workers: call stream.set_epoch(epoch) before "
                "each epoch, or use persistent_workers=True; with fresh workers and no "
                "set_epoch every epoch repeats epoch 0's order.",
                stacklevel=2,
            )
        if info is not None:
            _WORKER_ITERATIONS[os.getpid()] = _WORKER_ITERATIONS.get(os.getpid(), 0) + 1
        epoch = self.epoch
        self._iterations += 1
        return self._generate(epoch, worker, num_workers)

    def _read(self, vols: np.ndarray, starts: np.ndarray) -> tuple[Any, Any, np.ndarray, np.ndarray]:
        requests: list[tuple[Any, np.ndarray, np.ndarray, Any]] = [(self.engine, vols, starts, None)]
        if self.label_engine is not None:
            lstarts = starts.copy()
            if self.label_2d:
                lstarts[:, 0] = 0
            requests.append((self.label_engine, vols, lstarts, None))
        tensors = None
        if self.batch_size is not None and get_worker_info() is not None:
            # In a DataLoader worker, write the batch straight into shared memory, so
            # handing it to the main process costs no copy (as default_collate does).
            # Persistent workers reuse buffers the main process has released (see
            # _ShmBatchPool); the batch is yielded as an alias, so the pool can tell.
            take = _shm_pool().take if _pool_allowed() else _shared_tensor
            tensors = [take((vols.size,) + eng.block, _torch_dtype(eng.dtype))
                       for eng, *_ in requests]
            requests = [(eng, v, st, t.numpy()) for (eng, v, st, _), t in zip(requests, tensors)]
        arrays = read_together(requests)
        del requests
        items = [t.view(t.shape) for t in tensors] if tensors is not None else arrays
        label = items[1] if len(items) > 1 else None
        return items[0], label, vols, starts

    def _client(self) -> Any:
        from .cluster import get_client

        if self._client_obj is not None and self._client_pid == os.getpid():
            return self._client_obj
        return get_client(self.scheduler_address)

    def _remote(self, batches: Iterator[tuple[np.ndarray, np.ndarray]], prefetch: int
                ) -> Iterator[tuple[Any, Any, np.ndarray, np.ndarray]]:
        """Read each batch on the cluster, ``prefetch`` batches in flight, in plan order.

        One task per batch runs the chunk-aware engine on a worker (its decoded-chunk
        cache stays there between batches); only block starts and the engine's few KB
        of references travel, and the batch comes back.
        """
        from .engine import remote_read

        client = self._client()
        engines = self._remote_engines(client)
        pending: deque = deque()
        # A future's data is transferred only when asked for: fetch each one in a
        # background thread as soon as it is submitted, so the transfer overlaps too.
        fetcher = ThreadPoolExecutor(2, thread_name_prefix="vesuvius-dask-fetch")
        try:
            for vols, starts in batches:
                all_starts = [starts]
                if self.label_engine is not None:
                    lstarts = starts.copy()
                    if self.label_2d:
                        lstarts[:, 0] = 0
                    all_starts.append(lstarts)
                future = client.submit(remote_read, engines, vols, all_starts, pure=False,
                                       retries=self.retries)
                pending.append((future, fetcher.submit(future.result), vols, starts))
                if len(pending) > prefetch:
                    yield self._collect(pending.popleft())
            while pending:
                yield self._collect(pending.popleft())
        finally:
            for future, *_ in pending:
                future.cancel()
            fetcher.shutdown(wait=False, cancel_futures=True)

    def _remote_engines(self, client: Any) -> Any:
        """The engines as task arguments; scattered once if they hold in-RAM arrays."""
        engines = [self.engine] + ([self.label_engine] if self.label_engine else [])
        if not any(_needs_scatter(v) for e in engines for v in e.volumes):
            return engines  # small: travel with each task, rebuilt nowhere twice
        key = (os.getpid(), id(client))
        future = self._scattered.get(key)
        if future is None:
            future = self._scattered[key] = client.scatter(engines, broadcast=True, hash=False)
        return future

    def _collect(self, item: tuple[Any, Any, np.ndarray, np.ndarray]
                 ) -> tuple[Any, Any, np.ndarray, np.ndarray]:
        _, fetched, vols, starts = item
        arrays = fetched.result()
        for stats, arr in zip([self.engine.stats] + ([self.label_engine.stats] if self.label_engine else []),
                              arrays):
            stats.batches += 1
            stats.blocks += arr.shape[0]
            stats.bytes_delivered += arr.nbytes
        return arrays[0], (arrays[1] if len(arrays) > 1 else None), vols, starts

    def _generate(self, epoch: int, worker: int, num_workers: int) -> Iterator[Any]:
        batches = self._batches(epoch, worker, num_workers)
        if self.scheduler_address is not None:
            yield from self._emit(self._remote(batches, 2 if self.prefetch is None else self.prefetch))
            return
        prefetch = self.prefetch
        if prefetch is None:
            prefetch = 0 if get_worker_info() is not None else 2
        if prefetch == 0:
            yield from self._emit(self._read(lab, st) for lab, st in batches)
            return
        # Read ahead in a background thread only while the consumer spends time
        # between batches (a training step, which releases the GIL). A consumer that
        # asks again at once gets the next batch read inline: a thread would only add
        # GIL hand-offs there. Futures are collected in submission order.
        pool: ThreadPoolExecutor | None = None  # made on first read-ahead
        pending: deque = deque()
        lock = threading.Lock()

        def read_next() -> Any:
            with lock:
                nxt = next(batches, None)
            return None if nxt is None else self._read(*nxt)

        ahead = False
        try:
            while True:
                result = pending.popleft().result() if pending else read_next()
                if result is None:
                    return
                if ahead:
                    if pool is None:
                        pool = ThreadPoolExecutor(1, thread_name_prefix="vesuvius-dask-prefetch")
                    while len(pending) < prefetch:
                        pending.append(pool.submit(read_next))
                t_yield = time.perf_counter()
                yield from self._emit([result])
                ahead = time.perf_counter() - t_yield > _BUSY_CONSUMER
        finally:
            for fut in pending:
                fut.cancel()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _emit(self, results: Iterator[tuple[Any, Any, np.ndarray, np.ndarray]]) -> Iterator[Any]:
        for batch, label, vols, starts in results:
            tensor = _as_tensor(batch)
            if label is not None:
                label = _as_tensor(label)
                if self.label_2d:
                    label = label[:, 0]
            coords = torch.from_numpy(np.column_stack([vols, starts]).astype(np.int64)) \
                if self.return_coords else None
            if self.batch_size is not None:
                item = self._item(tensor, label, coords)
                yield _into_pool(item) if _pool_allowed() else item
            else:
                for i in range(tensor.shape[0]):
                    yield self._item(tensor[i], None if label is None else label[i],
                                     None if coords is None else coords[i])

    def _item(self, block: torch.Tensor, label: Any, coords: torch.Tensor | None) -> Any:
        if label is None:
            if self.transform is not None:
                block = self.transform(block)
            return (block, coords) if self.return_coords else block
        if self.transform is not None:
            block, label = self.transform(block, label)
        return (block, label, coords) if self.return_coords else (block, label)
