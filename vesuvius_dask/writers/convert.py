"""Convert stacks of 2-D TIFF layers to Zarr (or OME-Zarr), lazily and safely.

The conversion is a dask graph: one ``dask.delayed`` tifffile read per layer (per
band of rows when the TIFF can be memory-mapped, so only the region of interest is
read), ``da.from_delayed``, stack, crop, ``rechunk`` to the output chunks, and a store
into the Zarr array. Peak memory is a few chunk-slabs, not the stack.

Nothing is written before the whole input is validated (numbering, shapes, dtypes,
readable and complete files, region of interest, chunk sizes), and the output is
built in a temporary sibling folder that is renamed into place only on success.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import config
from .._version import __version__
from ..arguments import positive_triple, renamed
from ..errors import ConversionError, InvalidTypeError, SamplingError
from ..io.tiff import Layer, find_layers, inspect_stack, lazy_stack

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da

__all__ = ["convert_tiffs", "convert_zarr", "find_layers", "COMPRESSORS", "DEFAULT_COMPRESSOR",
           "DEFAULT_CHUNKS"]

#: Chunks written by default: config ``vesuvius-dask.chunks`` (the in-RAM volumes' dask chunks
#: too), read when this module is imported.
DEFAULT_CHUNKS = tuple(int(c) for c in config.get("chunks"))
#: See the README ("Choosing the default codec") for the measurements behind it.
DEFAULT_COMPRESSOR = "blosc-lz4"
COMPRESSORS = ("blosc-lz4", "blosc-zstd", "zstd", "none")


def _codec(name: str, zarr_format: int) -> Any:
    if name not in COMPRESSORS:
        raise ConversionError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}")
    if name == "none":
        return None
    if zarr_format == 2:
        from numcodecs import Blosc, Zstd

        if name == "zstd":
            return Zstd(level=3)
        return Blosc(cname=name.split("-")[1], clevel=5, shuffle=Blosc.BITSHUFFLE)
    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    if name == "zstd":
        return ZstdCodec(level=3)
    return BloscCodec(cname=name.split("-")[1], clevel=5, shuffle=BloscShuffle.bitshuffle)


def _roi(shape: tuple[int, int, int], bounds: Sequence[tuple[int | None, int | None]],
         src: str, noun: str = "stack") -> tuple[slice, slice, slice]:
    out = []
    for axis, size, (lo, hi) in zip("zyx", shape, bounds):
        lo = 0 if lo is None else int(lo)
        hi = size if hi is None else int(hi)
        if not 0 <= lo < hi <= size:
            raise ConversionError(
                f"{src}: region of interest {axis} {lo}..{hi} is outside the {noun}'s {axis} "
                f"range 0..{size} (end-exclusive), {noun} shape {shape}")
        out.append(slice(lo, hi))
    return tuple(out)  # type: ignore[return-value]


def _downsample(arr: Any) -> Any:
    """Halve every axis longer than 1 (mean of 2 along each; odd edges replicated)."""
    import dask.array as da

    factors = {a: 2 if arr.shape[a] > 1 else 1 for a in range(3)}
    pad = [(0, arr.shape[a] % 2 if factors[a] == 2 else 0) for a in range(3)]
    if any(p[1] for p in pad):
        arr = da.pad(arr, pad, mode="edge")
    if arr.dtype.kind in "ui":  # average in float, round back to the integer dtype
        return da.coarsen(np.mean, arr.astype(np.float32), factors).round().astype(arr.dtype)
    return da.coarsen(np.mean, arr, factors)


def _run_units(units: list[Any], scheduler: Any, quiet: bool, what: str,
               threads: int | None = None) -> None:
    """Compute delayed write units with a progress bar, locally or on a cluster.

    Locally the threads belong to a pool made here: on an interrupt it is shut down
    (queued units cancelled, running ones finished) before the caller cleans up, so
    no writer thread outlives the output folder.
    """
    if not units:
        return
    if scheduler is None:
        from concurrent.futures import ThreadPoolExecutor

        import dask

        pool = ThreadPoolExecutor(threads or os.cpu_count() or 1,
                                  thread_name_prefix="vesuvius-dask-convert")
        try:
            if quiet:
                dask.compute(*units, scheduler="threads", pool=pool)
            else:
                from dask.diagnostics import ProgressBar

                print(what, flush=True)
                with ProgressBar(dt=0.5, out=sys.stderr):
                    dask.compute(*units, scheduler="threads", pool=pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return
    from ..engine.cluster import get_client

    client = get_client(scheduler)
    futures = client.compute(units)
    try:
        if not quiet:
            from distributed import progress

            print(what, flush=True)
            with client.as_current():  # the bar finds its scheduler through the current client
                progress(futures, notebook=False)
            print()
        client.gather(futures)
    except BaseException:
        client.cancel(futures)
        raise


def _store_block(block: np.ndarray, arr: Any, journal: Any, level: int,
                 block_info: Any = None) -> np.ndarray:
    """Write one output unit (a whole write chunk or shard), then record it as done."""
    loc = block_info[0]["array-location"]
    arr[tuple(slice(a, b) for a, b in loc)] = block
    journal.record(f"{level}:" + ",".join(str(a) for a, _ in loc))
    return np.ones((1, 1, 1), dtype=bool)


def _store(stack: Any, arr: Any, job: Any, level: int, opts: _Options, what: str) -> None:
    """Store ``stack`` (chunked as the write units) into ``arr``, skipping recorded units."""
    done = job.done()
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int) for c in stack.chunks]
    written = stack.map_blocks(_store_block, arr, job.journal, level, dtype=bool, chunks=(1, 1, 1),
                               meta=np.empty((0, 0, 0), dtype=bool))
    units = [d for idx, d in zip(np.ndindex(*stack.numblocks), written.to_delayed().ravel())
             if f"{level}:" + ",".join(str(starts[a][i]) for a, i in enumerate(idx)) not in done]
    _run_units(units, opts.client, opts.quiet, what, opts.threads)


def _create(store: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype,
            zarr_format: int, compressor: str, shards: tuple[int, ...] | None,
            reopen: bool = False) -> Any:
    import zarr

    if reopen and any((store / m).exists() for m in ("zarr.json", ".zarray")):
        return zarr.open_array(store, mode="r+")  # a resumed run: keep what is written
    kwargs: dict[str, Any] = dict(shape=shape, chunks=chunks, dtype=dtype, zarr_format=zarr_format,
                                  fill_value=0)
    codec = _codec(compressor, zarr_format)
    if zarr_format == 2:
        kwargs["compressors"] = codec
    else:
        kwargs["compressors"] = codec
        kwargs["dimension_names"] = ("z", "y", "x")  # NGFF 0.5 requires them
        if shards is not None:
            kwargs["shards"] = _fit_shards(shards, chunks, shape)
    return zarr.create_array(store, **kwargs)


def _fit_shards(shards: Sequence[int], chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """Shards no larger than needed: at most the shape rounded up to whole chunks."""
    return tuple(min(s, -(-n // c) * c) for s, c, n in zip(shards, chunks, shape))


def _check_options(zarr_format: int, chunks: Any, shards: Any, compressor: str
                   ) -> tuple[tuple[int, int, int], tuple[int, int, int] | None]:
    """Validated chunks and shards (before anything is read or written)."""
    if zarr_format not in (2, 3):
        raise ConversionError(f"zarr_format must be 2 or 3, got {zarr_format}")
    try:
        chunks = positive_triple("chunks", chunks, broadcast=False)
        shards = None if shards is None else positive_triple("shards", shards, broadcast=False)
    except (SamplingError, InvalidTypeError) as err:
        raise ConversionError(str(err)) from err
    if shards is not None:
        if zarr_format != 3:
            raise ConversionError("shards need zarr_format=3", cli={"zarr_format=3": "--zarr-format 3"})
        bad = [a for a, s, c in zip("zyx", shards, chunks) if s % c]
        if bad:
            raise ConversionError(f"shards {shards} must be multiples of chunks {chunks} (axis {bad[0]})")
    _codec(compressor, zarr_format)
    return chunks, shards


def _fingerprint(layers: Sequence[Layer]) -> str:
    """A digest of the layers' names, sizes and modification times."""
    import hashlib

    from .outputs import file_stamp

    h = hashlib.sha256()
    for layer in layers:
        h.update(f"{file_stamp(layer.path)}|{layer.page}\n".encode())
    return h.hexdigest()


@renamed(src="source", dst="output", scheduler="client")
def convert_tiffs(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    z: tuple[int | None, int | None] = (None, None),
    y: tuple[int | None, int | None] = (None, None),
    x: tuple[int | None, int | None] = (None, None),
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    compressor: str = DEFAULT_COMPRESSOR,
    zarr_format: int = 3,
    shards: Sequence[int] | None = None,
    ome: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    client: Any = None,
    quiet: bool = True,
) -> da.Array:
    """Convert a TIFF stack to a Zarr array (or an OME-Zarr multiscale group).

    Parameters
    ----------
    source : str or os.PathLike
        A folder of 2-D TIFF layers (ordered by the number in the file name, e.g.
        ``00.tif`` … ``64.tif``), a segment folder (its ``surface_volume/`` or
        ``layers/``), a glob (``"layers/*.tif"``) or one multi-page TIFF.
    output : str or os.PathLike
        Output path. Built in ``.NAME.partial/`` beside it and renamed into place on
        success. It may not be, contain, or lie inside the input (or the input's
        segment folder).
    z, y, x : (start, end)
        Region of interest in source voxels, end-exclusive; ``None`` means the edge.
    chunks : (int, int, int)
        Output chunks (default ``(4, 512, 512)``).
    compressor : {"blosc-lz4", "blosc-zstd", "zstd", "none"}
        Codec (default ``"blosc-lz4"`` with bit-shuffle).
    zarr_format : {2, 3}
        Zarr format (default 3).
    shards : (int, int, int), optional
        Zarr v3 shard shape (a multiple of ``chunks``); shards larger than the
        volume are trimmed to it (rounded up to whole chunks).
    ome : bool
        Write an OME-Zarr multiscale group: level ``0`` plus 2× downsampled levels
        until a level fits in one chunk in y and x.
    overwrite : bool
        Replace an existing ``output`` (only once the new output is complete), and
        discard an interrupted run's leftovers.
    resume : bool
        Continue a run that was killed (its ``.NAME.partial/`` folder): written units
        are kept, the rest is written. Refused, with the reason, if the input files
        or options differ. With nothing to resume, a fresh run starts (logged).
    client : str or distributed.Client, optional
        A dask.distributed client or scheduler address; default: local threads.
    quiet : bool
        No progress bar.

    Returns
    -------
    dask.array.Array
        The written volume (level 0), opened lazily from ``output``.

    Raises
    ------
    ConversionError
        Bad input (numbering, mismatched or unreadable layers, region of interest,
        chunks, codec), or a read that failed during the conversion. ``output`` is
        then left untouched.
    OutputError
        ``output`` is, contains or lies inside the input.
    OutputExistsError
        ``output`` exists and ``overwrite`` is false, or an interrupted run's leftovers
        are there and neither ``resume`` nor ``overwrite`` is given.
    ResumeError
        ``resume=True`` but the interrupted run had other inputs or options.
    Interrupted
        SIGINT or SIGTERM: writer threads are stopped; the partial output is removed,
        or kept (and the message says how to resume it) once a chunk was recorded.
    """
    src, dst = source, output
    src_text = os.fspath(src)
    chunks, shards = _check_options(zarr_format, chunks, shards, compressor)

    layers = find_layers(src_text)
    info = inspect_stack(layers)
    roi = _roi(info.shape, (z, y, x), src_text)
    out_shape = tuple(s.stop - s.start for s in roi)
    options = _Options(*_fitted(chunks, shards, out_shape), compressor, zarr_format, bool(ome), client,
                       quiet)
    identity = {"source": os.path.realpath(src_text), "layers": _fingerprint(info.layers),
                **options.identity(roi, info.dtype)}
    inputs = [src_text] + sorted({layer.path for layer in info.layers})
    provenance = {
        "source": os.path.abspath(src_text),
        "layers": [os.path.basename(layers[roi[0].start].path),
                   os.path.basename(layers[roi[0].stop - 1].path)],
        "roi": {a: [s.start, s.stop] for a, s in zip("zyx", roi)},
        "source_shape": list(info.shape),
    }
    return _write_volume(lambda write: lazy_stack(info, roi, band=write[1]), out_shape, info.dtype,
                         dst, inputs, identity, provenance, options, overwrite, resume,
                         f"converting {src_text} -> {os.fspath(dst)} {out_shape}")



@renamed(src="source", dst="output", scheduler="client")
def convert_zarr(
    source: Any,
    output: str | os.PathLike,
    *,
    level: int | None = None,
    z: tuple[int | None, int | None] = (None, None),
    y: tuple[int | None, int | None] = (None, None),
    x: tuple[int | None, int | None] = (None, None),
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    compressor: str = DEFAULT_COMPRESSOR,
    zarr_format: int = 3,
    shards: Sequence[int] | None = None,
    ome: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    client: Any = None,
    quiet: bool = True,
    cache_dir: str | os.PathLike | None = None,
    storage_options: dict | None = None,
) -> da.Array:
    """Copy a region of a Zarr volume — local, or a URL such as the scroll server's — to a new Zarr.

    The way to work on a crop of a scroll that is too large to download: the
    region's stored chunks are fetched with many requests in flight (see
    :func:`~vesuvius_dask.open_volume`), re-chunked and re-encoded as asked, and
    written with the same guarantees as :func:`convert_tiffs` (built in
    ``.NAME.partial/``, Ctrl-C keeps only recorded chunks, ``resume`` continues a killed run).

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array, Segment or dask.array.Array
        A Zarr array, an OME-Zarr group (with ``level``), or a URL of either; or a
        lazy volume, such as a segment whose surface volume is rendered from the scroll
        (:func:`~vesuvius_dask.surfaces.segment.open_segment` with ``volume=``) or a
        :func:`~vesuvius_dask.surfaces.render.render_surface`: its chunks are computed
        and written (a resume needs the same graph: the same surface files, scroll and
        options).
    output : str or os.PathLike
        Output path; it may not be, contain, or lie inside a local ``src``.
    level : int, optional
        Level of an OME-Zarr group (default 0).
    z, y, x : (start, end)
        Region of interest in the source's voxels (of that level), end-exclusive.
    chunks, compressor, zarr_format, shards, ome, overwrite, resume, client, quiet
        As for :func:`convert_tiffs`.
    cache_dir : str or os.PathLike, optional
        For a URL: keep the fetched chunks in this folder (a resumed or repeated run
        fetches none of them again).
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    dask.array.Array
        The written volume (level 0), opened lazily from ``output``.

    Raises
    ------
    VolumeError
        ``src`` cannot be opened (missing, not a Zarr, no such level).
    ConversionError
        Bad region of interest, chunks, shards or codec.
    ChunkFetchError
        A remote chunk could not be fetched, after retries (``output`` is untouched;
        with ``cache_dir`` the chunks fetched so far are kept for the next try).
    OutputError, OutputExistsError, ResumeError, Interrupted
        As for :func:`convert_tiffs`.
    """
    import hashlib
    import json

    from ..io.open import resolve_volume
    from ..io.paths import is_url
    from ..io.volume import zarr_region
    from .outputs import source_stamp

    src, dst = source, output
    chunks, shards = _check_options(zarr_format, chunks, shards, compressor)
    vol = resolve_volume(src, level=level, storage_options=storage_options, cache_dir=cache_dir)
    if vol.zarr is None and isinstance(src, (str, os.PathLike)):
        raise ConversionError(f"{vol.name}: not a Zarr volume; convert TIFF stacks with convert_tiffs")
    if vol.zarr is None:  # a lazy volume (a rendered surface, a dask array): written as computed
        inputs = [os.fspath(p) for p in (getattr(src, "path", None),) if isinstance(p, (str, os.PathLike))]
        return _convert_lazy(vol, dst, (z, y, x), _options_of(chunks, shards, compressor, zarr_format,
                                                              ome, client, quiet), overwrite, resume, inputs)
    arr = vol.zarr
    src_text = os.fspath(src) if isinstance(src, (str, os.PathLike)) else vol.name
    roi = _roi(tuple(arr.shape), (z, y, x), src_text, noun="volume")
    out_shape = tuple(s.stop - s.start for s in roi)
    threads = None
    if vol.remote is not None:  # tasks fetch their chunks concurrently: keep two groups in flight
        group = int(config.get("remote.group"))
        threads = max(os.cpu_count() or 1, 2 * -(-vol.remote.settings.concurrency // group ** 2))
    options = _Options(*_fitted(chunks, shards, out_shape), compressor, zarr_format, bool(ome), client,
                       quiet, threads)
    local = isinstance(src, (str, os.PathLike)) and not is_url(src_text)
    meta = json.dumps(arr.metadata.to_dict(), sort_keys=True, default=str)
    identity = {"source": os.path.realpath(src_text) if local else src_text, "level": level,
                "metadata": hashlib.sha256(meta.encode()).hexdigest(),
                # a local source's chunk files (sizes, times): a resume refuses a changed source
                "source_stamp": source_stamp(src_text) if local else None,
                **options.identity(roi, arr.dtype)}
    inputs = ([src_text] if local else []) + ([os.fspath(cache_dir)] if cache_dir is not None else [])
    provenance = {
        "source": os.path.abspath(src_text) if local else src_text, "level": level,
        "roi": {a: [s.start, s.stop] for a, s in zip("zyx", roi)},
        "source_shape": list(arr.shape),
    }
    stack = zarr_region(arr, roi, vol.name, vol.remote)
    return _write_volume(lambda write: stack, out_shape, np.dtype(arr.dtype), dst,
                         inputs, identity, provenance, options, overwrite, resume,
                         f"copying {src_text} -> {dst} {out_shape}")


def _options_of(chunks: Any, shards: Any, compressor: str, zarr_format: int, ome: bool, client: Any,
               quiet: bool) -> tuple:
    """The writing options not yet fitted to an output shape (see :func:`_convert_lazy`)."""
    return chunks, shards, compressor, zarr_format, bool(ome), client, quiet


def _convert_lazy(vol: Any, dst: Any, bounds: Any, opts: tuple, overwrite: bool, resume: bool,
                  inputs: list) -> Any:
    """Write a region of a lazy volume (no stored chunks to copy: its dask graph computes them).

    A resumed run must have the same graph (``vol.token``: a render's surface files,
    scroll volume and options), the same region and the same writing options.
    """
    chunks, shards, compressor, zarr_format, ome, client, quiet = opts
    roi = _roi(tuple(vol.shape), bounds, vol.name, noun="volume")
    out_shape = tuple(s.stop - s.start for s in roi)
    options = _Options(*_fitted(chunks, shards, out_shape), compressor, zarr_format, ome, client, quiet)
    identity = {"source": vol.name, "token": vol.token, **options.identity(roi, vol.dtype)}
    provenance = {"source": vol.name, "roi": {a: [s.start, s.stop] for a, s in zip("zyx", roi)},
                  "source_shape": list(vol.shape)}
    stack = vol.array[roi]
    return _write_volume(lambda write: stack, out_shape, np.dtype(vol.dtype), dst, inputs, identity,
                         provenance, options, overwrite, resume, f"writing {vol.name} -> {dst} {out_shape}")


@dataclass(frozen=True)
class _Options:
    """How the output is written (validated): chunks, shards, codec, format, pyramid, where."""

    chunks: tuple[int, int, int]
    shards: tuple[int, int, int] | None
    compressor: str
    zarr_format: int
    ome: bool
    client: Any
    quiet: bool
    threads: int | None = None  # local writer threads (default: the CPU count)

    def identity(self, roi: tuple[slice, ...], dtype: Any) -> dict:
        """What a resumed run must share with the run it continues (besides the source)."""
        return {"roi": [[s.start, s.stop] for s in roi], "chunks": list(self.chunks),
                "shards": list(self.shards) if self.shards else None, "compressor": self.compressor,
                "zarr_format": self.zarr_format, "ome": self.ome, "dtype": np.dtype(dtype).str}


def _fitted(chunks: tuple[int, int, int], shards: tuple[int, int, int] | None, shape: tuple[int, ...]
            ) -> tuple[tuple[int, int, int], tuple[int, int, int] | None]:
    """Chunks no larger than the output, and shards fitted to them (see :func:`_fit_shards`)."""
    chunks = tuple(min(c, n) for c, n in zip(chunks, shape))  # type: ignore[assignment]
    return chunks, None if shards is None else _fit_shards(shards, chunks, shape)  # type: ignore[return-value]


def _write_volume(source: Callable[[tuple[int, ...]], Any], out_shape: tuple[int, ...], dtype: np.dtype,
                  dst: str | os.PathLike, inputs: list, identity: dict, provenance: dict, opts: _Options,
                  overwrite: bool, resume: bool, what: str) -> Any:
    """Write ``source(write_chunks)`` (a lazy stack) safely to ``dst``; see :func:`convert_tiffs`."""
    from ..io.open import open_volume
    from .outputs import OutputJob, interruptible

    provenance = {**provenance, "tool": f"vesuvius-dask {__version__}",
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    with interruptible():
        job = OutputJob(dst, inputs, identity, overwrite=overwrite, resume=resume, what="convert")
        try:
            write_chunks = opts.shards or opts.chunks
            stack = source(write_chunks)
            stack = stack.rechunk(tuple(min(c, s) for c, s in zip(write_chunks, out_shape)))
            if opts.ome:
                _write_ome(job, stack, dtype, provenance, opts)
            else:
                arr = _create(job.data, out_shape, opts.chunks, dtype, opts.zarr_format,
                              opts.compressor, opts.shards, reopen=job.resumed)
                if "vesuvius_dask" not in arr.attrs:
                    arr.attrs["vesuvius_dask"] = provenance
                _store(stack, arr, job, 0, opts, what)
            job.publish()
        except BaseException as err:
            job.stopped(err)  # finished work is kept (and the message says how to resume)
            raise
    return open_volume(dst)


def _write_ome(job: Any, stack: Any, dtype: np.dtype, provenance: dict, opts: _Options) -> None:
    import dask.array as da
    import zarr

    root = job.data
    chunks, zarr_format = opts.chunks, opts.zarr_format
    group = zarr.open_group(root, mode="a" if job.resumed else "w", zarr_format=zarr_format)
    datasets = []
    level = stack
    scale = [1.0, 1.0, 1.0]
    i = 0
    while True:
        shape = level.shape
        lchunks = tuple(min(c, s) for c, s in zip(chunks, shape))
        lshards = _fit_shards(opts.shards, lchunks, shape) if opts.shards is not None else None
        arr = _create(root / str(i), shape, lchunks, dtype, opts.zarr_format, opts.compressor, lshards,
                      reopen=job.resumed)
        write = tuple(min(c, s) for c, s in zip(lshards or lchunks, shape))
        _store(level.rechunk(write), arr, job, i, opts, f"level {i} {shape}")
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": list(scale)}]})
        if (shape[1] <= chunks[1] and shape[2] <= chunks[2]) or i >= 9:
            break
        # the next level is computed from the level just written, not from the TIFFs
        level = _downsample(da.from_zarr(arr))
        scale = [s * (2.0 if n > 1 else 1.0) for s, n in zip(scale, shape)]
        i += 1
    axes = [{"name": a, "type": "space"} for a in "zyx"]
    multiscales = [{
        "version": "0.4" if zarr_format == 2 else "0.5",
        "name": Path(provenance["source"]).name,
        "axes": axes,
        "datasets": datasets,
        "type": "mean",
    }]
    if zarr_format == 2:
        group.attrs["multiscales"] = multiscales
    else:
        for m in multiscales:
            m.pop("version")
        group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    group.attrs["vesuvius_dask"] = provenance
