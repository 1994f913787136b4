"""``DaskVesuviusStream``: a torch ``IterableDataset`` over the block plan and the batch reader.

This is the only module (with :mod:`~vesuvius_dask.loaders.batch_buffers` and
:mod:`~vesuvius_dask.loaders.reader`, which it uses) that imports torch. It checks the
arguments, builds a :class:`~vesuvius_dask.sampling.plan.BlockPlan` and the engines, keeps
the epoch in shared memory so ``set_epoch`` reaches persistent workers, and turns
the reader's arrays into tensors.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np

from ..errors import MissingExtraError
from ..extras import missing

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise MissingExtraError(missing("torch", "DaskVesuviusStream")) from err

from ..arguments import positive_int, positive_triple, renamed
from ..engine.batches import DEFAULT_CACHE_BYTES, BatchEngine
from ..errors import ArgumentError, InvalidTypeError, ResumeError, SamplingError
from ..io.labels import label_volumes, load_mask, per_volume
from ..io.normalize import Normalizer, normalization_spec
from ..io.open import Volume, resolve_volume
from ..sampling.plan import ANY_VOXEL, DEFAULT_READ_BATCH
from ..sampling.planned import plan_for
from ..sampling.resume import STATE_FORMAT, check_state, fingerprint, merge_states, resume_point
from ..sampling.samplers import PLAN_DEFAULTS, RandomSampler, Sampler
from ..sampling.surface_patches import SurfacePlan
from .batch_buffers import count_worker_iteration, into_pool, pool_allowed
from .options import ReadOptions
from .reader import BatchReader
from .targets import item_dict, stream_bundle

__all__ = ["DaskVesuviusStream"]

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


def _output_dtype(volumes: list[Volume], dtype: Any, normalized: bool = False) -> np.dtype:
    """The stream's dtype; a conversion that could lose values is an error."""
    if normalized:  # normalised blocks are floating point: float32 unless asked otherwise
        out = np.dtype(np.float32) if dtype is None else _numpy_dtype(dtype)
        if out.kind != "f":
            raise InvalidTypeError(f"normalization gives floating-point blocks; dtype={dtype} is not "
                                   "one (use torch.float32)")
    else:
        out = np.result_type(*[v.dtype for v in volumes]) if dtype is None else _numpy_dtype(dtype)
    for i, v in enumerate(volumes):
        if not np.can_cast(v.dtype, out, casting="safe"):
            raise SamplingError(
                f"files[{i}] ({v.name}) has dtype {v.dtype}, which dtype={dtype} cannot "
                f"hold without losing values; use a wider dtype (e.g. torch.float32) or "
                "convert in `transform`")
    return out


class _Progress:
    """Where this process's current iteration stands (what :meth:`DaskVesuviusStream.state_dict` saves)."""

    __slots__ = ("epoch", "base", "worker", "workers", "done")

    def __init__(self, epoch: int, base: int, worker: int, workers: int, done: int) -> None:
        self.epoch, self.base, self.worker, self.workers, self.done = epoch, base, worker, workers, done


def _skip_items(batches: Iterator[tuple[np.ndarray, np.ndarray]], skip: int) -> Iterator[Any]:
    """The batches without the first ``skip`` items of the first one (a resume inside a batch)."""
    for i, (vols, starts) in enumerate(batches):
        if i == 0:
            vols, starts = vols[skip:], starts[skip:]
            if vols.size == 0:
                continue
        yield vols, starts


def _subset(batches: Iterator[Any], subset: Sequence[int], worker: int, workers: int) -> Iterator[Any]:
    """Of the plan's batches, those numbered in ``subset`` (sorted), split among the workers."""
    wanted = iter(subset)
    nxt, kept = next(wanted, None), 0
    for b, item in enumerate(batches):
        if nxt is None:
            return
        if b == nxt:
            if kept % workers == worker:
                yield item
            kept += 1
            nxt = next(wanted, None)


def _find_states(obj: Any, found: list[dict]) -> list[dict]:
    """Every stream state inside ``obj`` (a stream state, or a StatefulDataLoader's state dict)."""
    if isinstance(obj, dict):
        if obj.get("format") == STATE_FORMAT:
            found.append(obj)
        else:
            for value in obj.values():
                _find_states(value, found)
    return found


def _file_list(files: Any) -> Sequence[Any]:
    """``files`` as a non-empty sequence (one path or array becomes a list of one)."""
    if isinstance(files, (str, bytes)) or not isinstance(files, Sequence):
        files = [files]
    if len(files) == 0:
        raise SamplingError("files is empty: give at least one volume")
    return files


def _normalizing(volumes: list[Volume], dtype: Any, normalization: Any) -> tuple[np.dtype, Any]:
    """The stream's dtype and its normaliser (None for ``"none"``: nothing on the hot path).

    Global schemes read their volumes' statistics here, once (a bounded sample).
    """
    spec = normalization_spec(normalization)
    out = _output_dtype(volumes, dtype, spec["scheme"] != "none")
    return out, None if spec["scheme"] == "none" else Normalizer(spec, volumes)


def _as_tensor(array: Any) -> Any:
    if isinstance(array, dict):  # native-3D targets: {"inklabels", "supervision"}
        return {k: _as_tensor(v) for k, v in array.items()}
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(array)


def _row(label: Any, i: int) -> Any:
    return {k: v[i] for k, v in label.items()} if isinstance(label, dict) else label[i]


def _block_shape(block: Any, sizes: tuple[Any, Any, Any]) -> tuple[int, int, int]:
    """The block shape from ``block=`` or from ``z_size, y_size, x_size`` (exactly one of the two)."""
    given = [v is not None for v in sizes]
    if block is not None:
        if any(given):
            raise InvalidTypeError("give the block shape once: block=(z, y, x) or z_size, y_size, x_size")
        return positive_triple("block", block)
    if not all(given):
        raise InvalidTypeError("the block shape is missing: give z_size, y_size, x_size or block=(z, y, x)")
    return tuple(positive_int(n, v) for n, v in zip(("z_size", "y_size", "x_size"), sizes))  # type: ignore[return-value]


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: as given, else from an initialised torch.distributed group."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        world_size = world_size if world_size is not None else (dist.get_world_size() if ready else 1)
        rank = rank if rank is not None else (dist.get_rank() if ready else 0)
    world_size = positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise SamplingError(f"rank must be in [0, {world_size}), got {rank!r}")
    return int(rank), world_size


def _machine_cache(cache_bytes: int) -> Any:
    """The machine-wide decoded-chunk cache for DataLoader workers, where /dev/shm exists."""
    from ..engine.machine_cache import MachineChunkCache, shared_memory_dir

    if cache_bytes <= 0 or shared_memory_dir() is None:
        return None
    return MachineChunkCache(cache_bytes)


def _second_engine(label_engine: Any, extras: Any) -> Any:
    """What the reader reads beside the blocks: the labels' engine or the targets' bundle (never both)."""
    return label_engine if extras is None else extras


def _check_options(batch_size: Any, transform: Any) -> None:
    if batch_size is not None:
        positive_int("batch_size", batch_size)
    if transform is not None and not callable(transform):
        raise InvalidTypeError(f"transform must be callable, got {type(transform).__name__}")


def _differs(value: Any, default: Any) -> bool:
    """``value`` is not the keyword's default (so the caller gave it)."""
    if value is None or default is None:
        return value is not default
    try:
        return bool(value != default)
    except (TypeError, ValueError):  # arrays and other values without a plain ==
        return True


def _not_both(what: str, obj: Any, given: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse an object (``sampler=``, ``reading=``) together with a keyword it replaces."""
    for name, value in given.items():
        if _differs(value, defaults[name]):
            raise InvalidTypeError(
                f"pass either {what}= or the keyword {name}=, not both: got {what}={obj!r} and "
                f"{name}={value!r}")


def _sampler_in_use(sampler: Any, samples_per_epoch: Any, keywords: dict[str, Any]) -> Sampler:
    """The sampler given, or the one the sampling keywords describe; never both."""
    if sampler is None:
        return Sampler.from_options(samples_per_epoch, **keywords)
    if not isinstance(sampler, Sampler):
        raise InvalidTypeError(f"sampler must be a Sampler (UniformSampler, GridSampler, ...), got "
                               f"{type(sampler).__name__}")
    _not_both("sampler", sampler, keywords, PLAN_DEFAULTS)
    if samples_per_epoch is not None and sampler.samples_per_epoch != samples_per_epoch:
        if sampler.samples_per_epoch is not None:
            raise InvalidTypeError(
                f"samples_per_epoch={samples_per_epoch!r} differs from the sampler's: "
                f"{sampler!r}; give it once")
        sampler = replace(sampler, samples_per_epoch=samples_per_epoch)
    return sampler


def _reading_in_use(reading: Any, keywords: dict[str, Any]) -> ReadOptions:
    """The read options given, or the reading keywords' (never both), with defaults filled in."""
    def filled(options: ReadOptions) -> ReadOptions:
        return replace(
            options, read_batch=DEFAULT_READ_BATCH if options.read_batch is None else options.read_batch,
            cache_bytes=DEFAULT_CACHE_BYTES if options.cache_bytes is None else options.cache_bytes)

    given = filled(ReadOptions(**keywords))
    if reading is None:
        return given
    if not isinstance(reading, ReadOptions):
        raise InvalidTypeError(f"reading must be a ReadOptions, got {type(reading).__name__}")
    defaults = filled(ReadOptions())
    _not_both("reading", reading, {f.name: getattr(given, f.name) for f in fields(given)},
              {f.name: getattr(defaults, f.name) for f in fields(defaults)})
    return filled(reading)


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
        Block shape, as the original ``VesuviusStream`` takes it; or give ``block``.
    block : int or (int, int, int), optional
        Block shape ``(z, y, x)`` by the name the rest of the API uses (``predict``,
        ``PredictionWriter``); give either it or the three sizes.
    samples_per_epoch : int, optional
        Blocks per epoch, across all DataLoader workers together. At most the number
        of available block starts. Required for random sampling (here or on the
        sampler); with ``sampling_method="grid"`` the default (None) is every grid
        position. Every option after it is keyword-only.
    sampler : Sampler, optional
        How the epoch picks its blocks, as one object:
        :class:`~vesuvius_dask.sampling.samplers.UniformSampler`,
        :class:`~vesuvius_dask.sampling.samplers.ProportionalSampler`,
        :class:`~vesuvius_dask.sampling.samplers.LocalitySampler`,
        :class:`~vesuvius_dask.sampling.samplers.BalancedSampler` or
        :class:`~vesuvius_dask.sampling.samplers.GridSampler`. The sampling keywords
        below (``sampling_method``, ``shuffle``, ``seed``, ``stride``, ``locality``,
        ``locality_mix``, ``overlap``, ``mask_coverage``, ``positive_fraction``,
        ``positive_coverage``) are a convenience that builds the same object
        (:meth:`~vesuvius_dask.sampling.samplers.Sampler.from_options`); giving one of
        them with a value other than its default together with ``sampler`` is an
        error. ``stream.sampler`` is the sampler in use (with the drawn seed when it
        had none).
    reading : ReadOptions, optional
        How blocks are read and cached, as one object
        (:class:`~vesuvius_dask.loaders.options.ReadOptions`); the keywords
        ``cache_bytes``, ``prefetch``, ``read_batch``, ``num_threads``, ``client``,
        ``retries`` and ``machine_cache`` are its convenience form, refused together
        with it. ``stream.reading`` holds the options in use.
    sampling_method : {"uniform", "proportional", "grid"}
        ``"uniform"``: each block picks a volume uniformly at random (among volumes
        with undrawn starts left), then an undrawn start in it. ``"proportional"``:
        volumes are picked with probability proportional to their undrawn starts.
        ``"grid"`` (for inference): every position of a regular grid that tiles each
        volume (see ``overlap`` and :class:`~vesuvius_dask.sampling.starts.Tiling`),
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
        Applied to each yielded block (or batch) tensor, ``transform(block)``; with
        ``labels`` (or ``targets``, ``context``), called as ``transform(block, label)``
        and must return the pair (so augmentations can flip both alike; see
        :class:`~vesuvius_dask.loaders.augment.BatchAugment`, best applied on the device
        in the training loop instead).
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
        interleaved at a time (see :class:`~vesuvius_dask.sampling.starts.LocalityPermutation`).
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
        (default 1.0: the whole footprint, so training blocks are all papyrus; any
        value > 0 needs at least one voxel). ``predict`` defaults to "any voxel"
        instead, because inference must cover every papyrus voxel.
    storage_options : dict, optional
        fsspec options for remote (URL) volumes, e.g. ``{"anon": True}`` for S3.
    cache_dir : str or os.PathLike, optional
        Keep the chunks fetched for URL volumes in this folder: DataLoader workers
        share it (each chunk is fetched by one process while the others wait for it)
        and later runs start from it. See :func:`~vesuvius_dask.io.open.open_volume`
        for its guarantees and budget. Remote chunks are fetched with many requests
        in flight: those of the next batches while this one is read (dask config
        ``vesuvius-dask.remote.concurrency``, default 32; see
        :class:`~vesuvius_dask.remote.fetch.RemoteSettings`).
    targets : dict, optional
        Several aligned label volumes by name, ``{"ink": ..., "supervision": ...,
        "distance": ...}``: each value is what ``labels`` takes (one entry per volume;
        with one volume the entry may be given bare), 2-D maps or 3-D volumes, each
        with its own dtype. Items become ``(block, {name: label})`` (``(block,
        targets, coords)`` with ``return_coords``), read in the same graph as the
        blocks. ``labels=x`` is the single-target case, yielded bare; give one or the
        other (``positive_fraction`` needs ``labels``). See
        :mod:`vesuvius_dask.io.targets`.
    context : dict or Context, optional
        ``{"level": Lc, "size": (z, y, x)}``: with each block, a ``size`` block from
        the coarser level ``Lc`` of the same OME-Zarr multiscale image, centred on it
        and shifted inwards at the border (never padded), in the stream's dtype and
        normalisation, read in the same graph. The item dict gets it as
        ``"context"``: ``(block, {"context": ..., **targets})``. The files must be
        OME-Zarr groups holding ``Lc``, or ``"files"`` gives one coarse volume per
        volume. See :mod:`vesuvius_dask.io.context` for the exact mapping.
    positive_fraction : float, optional
        Label-balanced sampling (needs 2-D ``labels``): exactly
        ``round(positive_fraction * samples_per_epoch)`` blocks of every epoch are
        *positive* (at least ``positive_coverage`` of their label footprint is
        non-zero), the rest negative; each class without replacement, both inside
        the masks. The counts are known at construction (memory O(mask)); too few
        starts of either class is an error that gives the counts. Composes with
        ``masks``, ``stride``, ``locality``, workers and ``set_epoch``.
    positive_coverage : float
        Fraction of the label footprint that makes a start positive (default: any
        positive voxel).
    machine_cache : bool
        (Formerly ``shared_cache``.) Inside DataLoader workers, share decoded chunks
        through ``/dev/shm``: a
        chunk is decoded once per machine, not once per worker (see
        :class:`~vesuvius_dask.engine.machine_cache.MachineChunkCache`). ``cache_bytes`` then
        bounds the shared folder; each of ``k`` workers also keeps mappings of up to
        ``cache_bytes / k`` of chunks (pages of the same files, not copies; pages of
        files evicted meanwhile stay until the worker lets go), so the machine holds
        at most ``2 x cache_bytes``, and ``cache_bytes`` when the volume fits.
        Default True; off with ``cache_bytes=0``, with ``client``, and where there
        is no ``/dev/shm``.
    rank, world_size : int, optional
        This process's torch.distributed rank and the number of ranks (default: from
        an initialised ``torch.distributed`` process group, else 0 and 1). Sample
        ``i`` of each epoch goes to rank ``i % world_size``, after padding the epoch
        with its own first samples to a multiple of ``world_size`` (as
        ``DistributedSampler`` does): every rank yields ``ceil(samples_per_epoch /
        world_size)`` blocks, so the same number of batches, and fewer than
        ``world_size`` blocks are repeated overall. Grids are not padded: inference
        on several GPUs visits every position exactly once overall. Each rank's share
        is then split among its DataLoader workers by batch; ``set_epoch`` as with
        ``DistributedSampler``.

    Notes
    -----
    Epochs: the plan depends on ``(seed, epoch)`` only. Call :meth:`set_epoch` before
    each epoch (as with ``DistributedSampler``); otherwise each new iteration of the
    same object advances the epoch by one (true in a single process and with
    ``persistent_workers=True``; with non-persistent DataLoader workers each epoch
    gets a fresh copy, so only :meth:`set_epoch` changes the order). ``set_epoch``
    reaches persistent workers too: the epoch is kept in shared memory.

    The stream is a thin adapter: :class:`~vesuvius_dask.sampling.plan.BlockPlan` decides the
    blocks, :class:`~vesuvius_dask.loaders.reader.BatchReader` reads them with the
    :class:`~vesuvius_dask.engine.batches.BatchEngine`, and this class turns them into tensors.

    Workers: under ``DataLoader(num_workers=k)`` worker ``w`` reads batches
    ``w, w+k, ...`` of the same plan, so the epoch yields ``samples_per_epoch``
    blocks in total, none twice, and the same set of blocks whatever ``k`` is.
    Fork and spawn are both safe: thread pools and caches are made per process.
    """

    @renamed(shared_cache="machine_cache")
    def __init__(
        self,
        files: Sequence[Any],
        z_size: int | None = None,
        y_size: int | None = None,
        x_size: int | None = None,
        samples_per_epoch: int | None = None,
        *,
        block: int | Sequence[int] | None = None,
        sampler: Sampler | None = None,
        reading: ReadOptions | None = None,
        sampling_method: str = "uniform",
        shuffle: bool = True,
        seed: int | None = None,
        batch_size: int | None = None,
        return_coords: bool = False,
        dtype: Any = None,
        transform: Callable[..., Any] | None = None,
        stride: int | Sequence[int] | None = None,
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
        storage_options: dict | None = None,
        positive_fraction: float | None = None,
        positive_coverage: float = ANY_VOXEL,
        rank: int | None = None,
        world_size: int | None = None,
        machine_cache: bool = True,
        cache_dir: Any = None,
        normalization: Any = "none",
        targets: Any = None,
        context: Any = None,
    ) -> None:
        super().__init__()
        files = _file_list(files)
        block = _block_shape(block, (z_size, y_size, x_size))
        _check_options(batch_size, transform)
        sampler = _sampler_in_use(sampler, samples_per_epoch, dict(
            sampling_method=sampling_method, shuffle=shuffle, seed=seed, stride=stride, overlap=overlap,
            mask_coverage=mask_coverage, locality=locality, locality_mix=locality_mix,
            positive_fraction=positive_fraction, positive_coverage=positive_coverage))
        #: The read options in use (defaults filled in).
        self.reading = reading = _reading_in_use(reading, dict(
            cache_bytes=cache_bytes, prefetch=prefetch, read_batch=read_batch, num_threads=num_threads,
            client=client, retries=retries, machine_cache=machine_cache))
        self.batch_size = None if batch_size is None else int(batch_size)
        self.return_coords = bool(return_coords)
        self.transform = transform
        #: Native-3D (a SurfaceSampler): the crops and their projected labels (docs/native3d.md).
        self.surface = SurfacePlan.for_stream(
            sampler, files, block, level=level, labels=labels, masks=masks, storage_options=storage_options,
            read_batch=self.batch_size or reading.read_batch, cache_dir=cache_dir)
        self.volumes: list[Volume] = self.surface.volumes if self.surface is not None else [
            resolve_volume(f, level=level, name=f"files[{i}]", storage_options=storage_options,
                           cache_dir=cache_dir)
            for i, f in enumerate(files)]
        masks_2d = [None if m is None else load_mask(m, f"masks[{i}]", self.volumes[i])
                    for i, m in enumerate(per_volume("masks", masks, files, "mask"))]
        self.label_volumes, self.label_2d = label_volumes(labels, files, self.volumes)
        sampler = sampler if self.surface is None else self.surface.sampler
        self.plan = self.surface if self.surface is not None else plan_for(  # BlockPlan, quotas, weights
            sampler, self.volumes, block, masks=masks_2d, read_batch=self.batch_size or reading.read_batch,
            label_volumes=self.label_volumes, label_2d=self.label_2d)
        #: The sampler in use: the one given (or built from the keywords), with the plan's seed.
        self.sampler = replace(sampler, seed=self.plan.seed) \
            if isinstance(sampler, RandomSampler) and sampler.seed is None else sampler
        self.dtype, self._normalizer = _normalizing(self.volumes, dtype, normalization)
        self.engine = BatchEngine(self.volumes, block, dtype=self.dtype, cache_bytes=reading.cache_bytes,
                                  num_threads=reading.num_threads)
        self.label_engine = None if self.label_volumes is None else BatchEngine(
            self.label_volumes, (1,) + block[1:] if self.label_2d else block,
            cache_bytes=reading.cache_bytes // 4, num_threads=reading.num_threads)
        if reading.machine_cache and reading.client is None:
            self.engine.machine = _machine_cache(reading.cache_bytes)
        #: ``targets=`` and ``context=``: read in each batch's graph (None without them).
        self.extras = stream_bundle(targets, context, files, self.volumes, block, self.dtype, labels=labels,
                                    surface=self.surface, level=level, storage_options=storage_options,
                                    cache_dir=cache_dir, cache_bytes=reading.cache_bytes,
                                    num_threads=reading.num_threads)
        self.reader = BatchReader(self.engine, _second_engine(self.label_engine, self.extras), self.label_2d,
                                  prefetch=reading.prefetch, client=reading.client,
                                  retries=reading.retries, shared=self.batch_size is not None)
        #: Batches of each epoch before this one are skipped (``predict`` resumes with it).
        self.start_batch = 0
        #: Only these batches of the plan (sorted numbers), split among workers (``predict --part``).
        self.batch_subset: list[int] | None = None
        self._resume: dict | None = None
        self._progress: _Progress | None = None
        self._fingerprint: str | None = None
        self.rank, self.world_size = _distributed(rank, world_size)
        self._epoch, self._epoch_set, self._iterations, self._epoch_generation = 0, False, 0, 0
        # [epoch, generation, warned] in shared memory: set_epoch in the main process
        # reaches DataLoader workers that already hold a copy (persistent_workers=True).
        self._epoch_cell = torch.zeros(3, dtype=torch.int64).share_memory_()

    # ------------------------------------------------------------------ the plan
    block = property(lambda self: self.plan.block, doc="Block shape ``(z, y, x)``.")
    grids = property(lambda self: self.plan.grids, doc="One start grid per volume.")
    samples_per_epoch = property(lambda self: self.plan.samples_per_epoch, doc="Blocks per epoch.")
    starts_per_volume = property(lambda self: self.plan.starts_per_volume,
                                 doc="Number of valid block starts in each volume.")
    sampling_method = property(lambda self: self.plan.sampling_method, doc="How volumes are picked.")
    seed = property(lambda self: self.plan.seed, doc="Seed of the whole epoch plan.")
    stride = property(lambda self: self.plan.stride, doc="Stride of the start grid.")
    read_batch = property(lambda self: self.plan.read_batch, doc="Blocks per read.")

    @property
    def arrays(self) -> list[Any]:
        """The volumes as lazy dask arrays."""
        return [v.array for v in self.volumes]

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
        return self.plan.epoch_coords(self.epoch if epoch is None else int(epoch))

    def __len__(self) -> int:
        """Blocks (or batches) this rank yields per epoch."""
        n = self.samples_per_epoch
        if self.world_size > 1:
            n = -(-n // self.world_size) if self.sampling_method != "grid" else \
                len(range(self.rank, n, self.world_size))
        return n if self.batch_size is None else math.ceil(n / self.batch_size)

    def __repr__(self) -> str:
        return (
            f"DaskVesuviusStream({len(self.volumes)} volumes, block={self.block}, "
            f"samples_per_epoch={self.samples_per_epoch}, sampling_method="
            f"{self.sampling_method!r}, batch_size={self.batch_size}, dtype={self.dtype}, "
            f"stride={self.stride}, seed={self.seed}, epoch={self.epoch})"
        )

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Use the plan of ``epoch`` for the next iteration (and advance from there).

        A state loaded with :meth:`load_state_dict` is kept when ``epoch`` is its epoch.
        """
        if self._resume is not None and int(self._resume["epoch"]) != int(epoch):
            self._resume = None
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

    def _warn_once(self, info: Any) -> None:
        """Fresh DataLoader workers without ``set_epoch``: warn once per stream (worker 0)."""
        if info.id == 0 and not self._epoch_set and self._iterations == 0 \
                and int(self._epoch_cell[2]) == 0:
            self._epoch_cell[2] = 1
            warnings.warn(
                "DaskVesuviusStream in DataLoader workers: call stream.set_epoch(epoch) before "
                "each epoch, or use persistent_workers=True; with fresh workers and no "
                "set_epoch every epoch repeats epoch 0's order.",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._sync_epoch()
        if info is not None:
            self._warn_once(info)
        count_worker_iteration()
        if info is not None and self.engine.machine is not None and not self.engine.machine_active:
            # workers share decoded chunks; each keeps mappings of at most its share of
            # the budget, so the machine holds at most 2 x cache_bytes (see machine_cache)
            self.engine.machine_active = True
            self.engine.cache.budget = max(1, self.engine.machine.max_bytes // info.num_workers)
        epoch = self.epoch
        self._iterations += 1
        split, skip, base, done = self.start_batch, 0, self.start_batch, 0
        if self._resume is not None:
            state, self._resume = self._resume, None
            worker, split, skip, base, done = resume_point(state, worker, num_workers,
                                                           self.plan.read_batch)
        if self.batch_subset is not None:
            batches = _subset(self.plan.batches(epoch, 0, 1, split, self.rank, self.world_size),
                              [b - split for b in self.batch_subset if b >= split], worker, num_workers)
        else:
            batches = self.plan.batches(epoch, worker, num_workers, split, self.rank, self.world_size)
        if skip:
            batches = _skip_items(batches, skip)
        progress = self._progress = _Progress(epoch, base, worker, num_workers, done)
        return self._emit(self.reader.run(batches), progress)

    # ------------------------------------------------------------------ resuming
    def _expected(self) -> dict[str, Any]:
        if self._fingerprint is None:
            masks = [hashlib.sha256(np.packbits(g.valid)).hexdigest()[:16]
                     if hasattr(g, "valid") else None for g in getattr(self.plan, "grids", [])]
            self._fingerprint = fingerprint({
                "volumes": [(str(v.name).rstrip("/").rsplit("/", 1)[-1], v.shape, str(v.dtype))
                            for v in self.volumes],
                "block": self.block, "samples": self.samples_per_epoch, "read_batch": self.plan.read_batch,
                "masks": masks, "labels": None if self.label_volumes is None else
                [lv.shape for lv in self.label_volumes],
                "positives": getattr(self.plan, "positive_fraction", None),
                "subset": self.batch_subset})
        return {"seed": self.seed, "fingerprint": self._fingerprint, "rank": self.rank,
                "world_size": self.world_size, "unit": "blocks" if self.batch_size is None else "batches",
                "sampler": self.sampler.state_dict()}

    def _state(self, epoch: int, base: int, workers: int, positions: dict[int, int]) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **self._expected(), "epoch": int(epoch), "base": int(base),
                "workers": int(workers), "positions": {str(w): int(c) for w, c in positions.items()}}

    def state_dict(self) -> dict[str, Any]:
        """Where this process's iteration stands: a few integers, to resume it exactly.

        The state holds the epoch, the batch the iteration started from, the worker
        split and how many items (batches, or blocks without ``batch_size``) were
        yielded, plus the seed, the sampler and a fingerprint of the configuration
        (volumes, block, masks, labels, batch size), so it is never applied to
        another stream. torchdata's ``StatefulDataLoader`` calls it in each worker
        and saves the lot; under a plain ``DataLoader`` use :meth:`loader_state`.

        Returns
        -------
        dict
            JSON-serialisable; give it to :meth:`load_state_dict`.
        """
        if self._resume is not None:
            return dict(self._resume)
        p = self._progress
        if p is None:
            return self._state(self.epoch, self.start_batch, 1, {0: 0})
        return self._state(p.epoch, p.base, p.workers, {p.worker: p.done})

    def loader_state(self, batches: int, *, num_workers: int = 0, loader_batch_size: int | None = None,
                     epoch: int | None = None) -> dict[str, Any]:
        """The state after a plain ``DataLoader`` yielded ``batches`` batches of this epoch.

        Parameters
        ----------
        batches : int
            Batches the loader yielded in this epoch, counted from its start.
        num_workers : int
            The loader's workers (matters only for single blocks, ``batch_size=None``).
        loader_batch_size : int, optional
            The loader's ``batch_size`` when the stream yields single blocks.
        epoch : int, optional
            Default: the epoch being iterated in this process, else the one
            :meth:`set_epoch` set.

        Returns
        -------
        dict
            For :meth:`load_state_dict`.
        """
        n, k = int(batches), max(1, int(num_workers))
        if n < 0:
            raise ArgumentError(f"batches must be non-negative, got {batches}")
        if self.batch_size is not None:
            positions = {0: n}
            k = 1
        else:
            if loader_batch_size is None:
                raise ArgumentError("the stream yields single blocks: give loader_batch_size= (the "
                                    "DataLoader's batch_size)")
            b = int(loader_batch_size)
            positions = {w: b * (n // k + (w < n % k)) for w in range(k)}
        if epoch is None:  # the epoch under way (in this process), else the one set
            epoch = self._progress.epoch if self._progress is not None else self.epoch
        return self._state(epoch, self.start_batch, k, positions)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a :meth:`state_dict` (or a ``StatefulDataLoader``'s whole state).

        The next iteration yields exactly the items the interrupted one would have
        yielded after the saved point; later iterations go on from the next epoch.
        Call it before making the DataLoader (its workers get a copy of the stream),
        and use the same ``seed`` (or sampler), volumes, block and batch size. A
        state saved with ``k`` workers resumes with any number when the stream
        yields batches (``batch_size=``); with single blocks, only with ``k``.

        Raises
        ------
        ResumeError
            The state is of another stream, seed, rank or configuration, or
            cannot continue the same order: one line says which.
        """
        states = _find_states(state, [])
        if not states:
            raise ResumeError(f"not a DaskVesuviusStream state (expected a dict with format="
                              f"{STATE_FORMAT!r}, got {type(state).__name__})")
        state = check_state(merge_states(states), self._expected())
        self.sampler.load_state_dict(state["sampler"])
        if get_worker_info() is None:
            self.set_epoch(state["epoch"])  # reaches persistent workers' epoch too
        else:  # in a worker (StatefulDataLoader): this copy only; the shared cell is the main's
            self._epoch, self._epoch_set, self._iterations = int(state["epoch"]), True, 0
            self._epoch_generation = int(self._epoch_cell[1])
        self._resume, self._progress = state, None

    @property
    def normalization(self) -> dict[str, Any]:
        """The normalisation in use, to save with a model: ``{"scheme", "statistics", "volumes"}``.

        ``statistics`` are the volume's when the stream has one volume (else None:
        each volume used its own, listed in ``volumes``); ``predict(...,
        normalization=stream.normalization)`` applies the same scheme.
        """
        if self._normalizer is None:
            return {"scheme": "none", "statistics": None, "volumes": None}
        return self._normalizer.describe()

    def _emit(self, results: Iterator[tuple[Any, Any, np.ndarray, np.ndarray]],
              progress: _Progress) -> Iterator[Any]:
        norm = self._normalizer
        for batch, label, vols, starts in results:
            if self.surface is not None:
                label = self.surface.targets(vols, starts)
            if self.extras is not None:  # targets and context: {name: view of the buffer}
                label = item_dict(self.extras, label, vols, norm)
            if norm is not None:
                batch = norm(batch, vols)
            tensor = _as_tensor(batch)
            if label is not None:
                label = _as_tensor(label)
                if self.label_2d:
                    label = label[:, 0]
            coords = torch.from_numpy(np.column_stack([vols, starts]).astype(np.int64)) \
                if self.return_coords else None
            if self.batch_size is not None:
                item = self._item(tensor, label, coords)
                progress.done += 1
                yield into_pool(item) if pool_allowed() else item
            else:
                for i in range(tensor.shape[0]):
                    progress.done += 1
                    yield self._item(tensor[i], None if label is None else _row(label, i),
                                     None if coords is None else coords[i])

    def _item(self, block: torch.Tensor, label: Any, coords: torch.Tensor | None) -> Any:
        if label is None:
            if self.transform is not None:
                block = self.transform(block)
            return (block, coords) if self.return_coords else block
        if self.transform is not None:
            block, label = self.transform(block, label)
        return (block, label, coords) if self.return_coords else (block, label)
