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
import glob as _glob
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .errors import ConversionError
from .volumes import LAYER_DIRS, TIFF_SUFFIXES

__all__ = ["convert_tiffs", "find_layers", "COMPRESSORS", "DEFAULT_COMPRESSOR", "DEFAULT_CHUNKS"]

DEFAULT_CHUNKS = (4, 512, 512)
#: See the README ("Choosing the default codec") for the measurements behind it.
DEFAULT_COMPRESSOR = "blosc-lz4"
COMPRESSORS = ("blosc-lz4", "blosc-zstd", "zstd", "none")


@dataclass(frozen=True)
class Layer:
    """One 2-D layer of the source: a file and a page in it."""

    path: str
    page: int
    number: int


@dataclass(frozen=True)
class StackInfo:
    layers: tuple[Layer, ...]
    shape: tuple[int, int, int]
    dtype: np.dtype
    memmappable: bool


def _natural_key(path: str) -> tuple:
    parts = re.split(r"(\d+)", os.path.basename(path))
    return tuple(int(p) if p.isdigit() else p.lower() for p in parts)


def _layer_number(path: str) -> int:
    digits = re.findall(r"\d+", Path(path).stem)
    if not digits:
        raise ConversionError(f"{path}: the file name has no layer number (expected e.g. 00.tif)")
    return int(digits[-1])


def find_layers(src: str | os.PathLike) -> list[Layer]:
    """List the layers of a source in z order, checking their numbering.

    Parameters
    ----------
    src : str or os.PathLike
        A folder of 2-D TIFFs, a segment folder (its ``surface_volume/`` or
        ``layers/``), a glob pattern, or one multi-page TIFF.

    Returns
    -------
    list of Layer

    Raises
    ------
    ConversionError
        No TIFF found, a file name without a number, duplicate or missing numbers.
    """
    import tifffile

    text = os.fspath(src)
    if any(ch in text for ch in "*?["):
        files = [f for f in _glob.glob(text) if f.lower().endswith(TIFF_SUFFIXES)]
        where = f"glob {text!r}"
    elif os.path.isdir(text):
        files = [os.path.join(text, f) for f in os.listdir(text)
                 if f.lower().endswith(TIFF_SUFFIXES) and not f.startswith(".")]
        where = text
        subdirs = [os.path.join(text, d) for d in LAYER_DIRS
                   if os.path.isdir(os.path.join(text, d))]
        if not files and subdirs:  # a segment folder: its layers
            return find_layers(subdirs[0])
    elif os.path.isfile(text):
        try:
            with tifffile.TiffFile(text) as tif:
                n_pages = len(tif.pages)
        except Exception as err:
            raise ConversionError(f"{text}: not a readable TIFF ({err})") from err
        return [Layer(text, i, i) for i in range(n_pages)]
    else:
        raise ConversionError(f"{text}: no such file, folder or matching glob")
    if not files:
        raise ConversionError(f"{where}: contains no .tif/.tiff layers")
    numbered = sorted(((_layer_number(f), f) for f in files), key=lambda t: (t[0], _natural_key(t[1])))
    numbers = [n for n, _ in numbered]
    dupes = sorted(n for n, k in Counter(numbers).items() if k > 1)
    if dupes:
        names = [os.path.basename(f) for n, f in numbered if n == dupes[0]]
        raise ConversionError(f"{where}: layer number {dupes[0]} appears more than once ({', '.join(names)})")
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ConversionError(
            f"{where}: layers {numbers[0]}..{numbers[-1]} have gaps; missing layer number(s) {shown}"
        )
    return [Layer(f, 0, n) for n, f in numbered]


def inspect_stack(layers: Sequence[Layer]) -> StackInfo:
    """Read every layer's header; check shape, dtype and that the data is all there."""
    import tifffile

    shape = dtype = None
    memmappable = True
    first = None
    handles: dict[str, Any] = {}
    try:
        for layer in layers:
            try:
                tif = handles.get(layer.path)
                if tif is None:
                    if handles:  # multi-page files keep one handle; folders close as they go
                        for h in handles.values():
                            h.close()
                        handles.clear()
                    tif = handles[layer.path] = tifffile.TiffFile(layer.path)
                page = tif.pages[layer.page]
                size = os.path.getsize(layer.path)
                ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts)]
                if not ends or max(ends) > size:
                    raise ConversionError(
                        f"{layer.path}: truncated TIFF (image data ends at byte "
                        f"{max(ends) if ends else '?'}, file has {size} bytes)")
                pshape, pdtype = tuple(page.shape), np.dtype(page.dtype)
                memmappable = memmappable and bool(page.is_memmappable)
            except ConversionError:
                raise
            except Exception as err:
                raise ConversionError(f"{layer.path}: unreadable TIFF ({err})") from err
            if len(pshape) != 2:
                raise ConversionError(f"{layer.path}: expected a 2-D grayscale layer, got shape {pshape}")
            if shape is None:
                shape, dtype, first = pshape, pdtype, layer.path
            elif pshape != shape or pdtype != dtype:
                raise ConversionError(
                    f"{layer.path}: layer is {pshape[0]}x{pshape[1]} {pdtype}, but {first} is "
                    f"{shape[0]}x{shape[1]} {dtype}; all layers must match")
    finally:
        for h in handles.values():
            h.close()
    assert shape is not None and dtype is not None
    return StackInfo(tuple(layers), (len(layers),) + shape, dtype, memmappable)  # type: ignore[arg-type]


def _read_layer(path: str, page: int, ys: tuple[int, int], xs: tuple[int, int],
                memmap: bool) -> np.ndarray:
    """Read rows ``ys`` and columns ``xs`` of one layer (only those, when memory-mappable)."""
    import tifffile

    try:
        if memmap:
            mm = tifffile.memmap(path, page=page, mode="r")
            return np.array(mm[ys[0]:ys[1], xs[0]:xs[1]])
        data = tifffile.imread(path, key=page)
        return np.ascontiguousarray(data[ys[0]:ys[1], xs[0]:xs[1]])
    except Exception as err:
        raise ConversionError(f"{path}: reading layer failed ({err})") from err


def lazy_stack(info: StackInfo, roi: tuple[slice, slice, slice], band: int) -> Any:
    """The region of interest of a TIFF stack as a lazy dask array.

    One delayed read per layer, or per band of ``band`` rows when the TIFF can be
    memory-mapped (then only the region of interest is read).
    """
    import dask
    import dask.array as da

    zs, ys, xs = roi
    height, width = ys.stop - ys.start, xs.stop - xs.start
    read = dask.delayed(_read_layer, pure=True)
    layers = []
    for layer in info.layers[zs]:
        if info.memmappable:
            bands = [
                da.from_delayed(
                    read(layer.path, layer.page, (y, min(y + band, ys.stop)), (xs.start, xs.stop), True),
                    shape=(min(y + band, ys.stop) - y, width), dtype=info.dtype)
                for y in range(ys.start, ys.stop, band)
            ]
            layers.append(da.concatenate(bands, axis=0))
        else:
            layers.append(da.from_delayed(
                read(layer.path, layer.page, (ys.start, ys.stop), (xs.start, xs.stop), False),
                shape=(height, width), dtype=info.dtype))
    return da.stack(layers, axis=0)


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
         src: str) -> tuple[slice, slice, slice]:
    out = []
    for axis, size, (lo, hi) in zip("zyx", shape, bounds):
        lo = 0 if lo is None else int(lo)
        hi = size if hi is None else int(hi)
        if not 0 <= lo < hi <= size:
            raise ConversionError(
                f"{src}: region of interest {axis} {lo}..{hi} is outside the stack's {axis} "
                f"range 0..{size} (end-exclusive), stack shape {shape}")
        out.append(slice(lo, hi))
    return tuple(out)  # type: ignore[return-value]


def _positive_triple(name: str, value: Sequence[int] | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    value = tuple(int(v) for v in value)
    if len(value) != 3 or any(v <= 0 for v in value):
        raise ConversionError(f"{name} must be three positive integers Z,Y,X, got {value}")
    return value  # type: ignore[return-value]


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


def _compute(target: Any, scheduler: Any, quiet: bool, what: str) -> None:
    """Run a delayed store with a progress bar (local or distributed)."""
    if scheduler is None:
        from dask.diagnostics import ProgressBar

        if quiet:
            target.compute(scheduler="threads")
        else:
            print(what, flush=True)
            with ProgressBar(dt=0.5):
                target.compute(scheduler="threads")
        return
    from .cluster import get_client

    client = get_client(scheduler)
    future = client.compute(target)
    if not quiet:
        from distributed import progress

        print(what, flush=True)
        progress(future)
        print()
    future.result()


def _create(store: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype,
            zarr_format: int, compressor: str, shards: tuple[int, ...] | None) -> Any:
    import zarr

    kwargs: dict[str, Any] = dict(shape=shape, chunks=chunks, dtype=dtype, zarr_format=zarr_format,
                                  fill_value=0)
    codec = _codec(compressor, zarr_format)
    if zarr_format == 2:
        kwargs["compressors"] = codec
    else:
        kwargs["compressors"] = codec
        if shards is not None:
            kwargs["shards"] = tuple(min(s, n) for s, n in zip(shards, shape))
    return zarr.create_array(store, **kwargs)


def convert_tiffs(
    src: str | os.PathLike,
    dst: str | os.PathLike,
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
    scheduler: Any = None,
    quiet: bool = True,
) -> Any:
    """Convert a TIFF stack to a Zarr array (or an OME-Zarr multiscale group).

    Parameters
    ----------
    src : str or os.PathLike
        A folder of 2-D TIFF layers (ordered by the number in the file name, e.g.
        ``00.tif`` … ``64.tif``), a segment folder (its ``surface_volume/`` or
        ``layers/``), a glob (``"layers/*.tif"``) or one multi-page TIFF.
    dst : str or os.PathLike
        Output path. Built in a temporary sibling and renamed into place on success.
    z, y, x : (start, end)
        Region of interest in source voxels, end-exclusive; ``None`` means the edge.
    chunks : (int, int, int)
        Output chunks (default ``(4, 512, 512)``).
    compressor : {"blosc-lz4", "blosc-zstd", "zstd", "none"}
        Codec (default ``"blosc-lz4"`` with bit-shuffle).
    zarr_format : {2, 3}
        Zarr format (default 3).
    shards : (int, int, int), optional
        Zarr v3 shard shape (a multiple of ``chunks``).
    ome : bool
        Write an OME-Zarr multiscale group: level ``0`` plus 2× downsampled levels
        until a level fits in one chunk in y and x.
    overwrite : bool
        Replace an existing ``dst`` (only once the new output is complete).
    scheduler : str or distributed.Client, optional
        A dask.distributed scheduler address or client; default: local threads.
    quiet : bool
        No progress bar.

    Returns
    -------
    dask.array.Array
        The written volume (level 0), opened lazily from ``dst``.

    Raises
    ------
    ConversionError
        Bad input (numbering, mismatched or unreadable layers, region of interest,
        chunks, codec), or a read that failed during the conversion. ``dst`` is
        then left untouched.
    FileExistsError
        ``dst`` exists and ``overwrite`` is false.
    """
    import dask.array as da

    from .volumes import open_volume

    src_text = os.fspath(src)
    dst_path = Path(dst)
    if zarr_format not in (2, 3):
        raise ConversionError(f"zarr_format must be 2 or 3, got {zarr_format}")
    chunks = _positive_triple("chunks", chunks)
    shards = _positive_triple("shards", shards)
    if shards is not None:
        if zarr_format != 3:
            raise ConversionError("shards need zarr_format=3")
        bad = [a for a, s, c in zip("zyx", shards, chunks) if s % c]
        if bad:
            raise ConversionError(f"shards {shards} must be multiples of chunks {chunks} (axis {bad[0]})")
    _codec(compressor, zarr_format)
    if dst_path.exists() and not overwrite:
        raise FileExistsError(f"{dst_path}: already exists; pass --overwrite to replace it")

    layers = find_layers(src_text)
    info = inspect_stack(layers)
    roi = _roi(info.shape, (z, y, x), src_text)
    write_chunks = shards or chunks
    stack = lazy_stack(info, roi, band=write_chunks[1])
    out_shape = stack.shape
    stack = stack.rechunk(tuple(min(c, s) for c, s in zip(write_chunks, out_shape)))

    provenance = {
        "source": os.path.abspath(src_text),
        "layers": [os.path.basename(layers[roi[0].start].path),
                   os.path.basename(layers[roi[0].stop - 1].path)],
        "roi": {a: [s.start, s.stop] for a, s in zip("zyx", roi)},
        "source_shape": list(info.shape),
        "tool": f"vesuvius-dask {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }

    tmp = dst_path.parent / f".{dst_path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if ome:
            _write_ome(tmp, stack, chunks, info.dtype, zarr_format, compressor, shards, provenance,
                       scheduler, quiet)
        else:
            arr = _create(tmp, out_shape, chunks, info.dtype, zarr_format, compressor, shards)
            arr.attrs["vesuvius_dask"] = provenance
            _compute(da.store(stack, arr, lock=False, compute=False), scheduler, quiet,
                     f"converting {src_text} -> {dst_path} {out_shape}")
        _replace(tmp, dst_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_volume(dst_path)


def _write_ome(tmp: Path, stack: Any, chunks: tuple[int, int, int], dtype: np.dtype,
               zarr_format: int, compressor: str, shards: tuple[int, int, int] | None,
               provenance: dict, scheduler: Any, quiet: bool) -> None:
    import dask.array as da
    import zarr

    group = zarr.open_group(tmp, mode="w", zarr_format=zarr_format)
    datasets = []
    level = stack
    scale = [1.0, 1.0, 1.0]
    i = 0
    while True:
        shape = level.shape
        arr = _create(tmp / str(i), shape, tuple(min(c, s) for c, s in zip(chunks, shape)), dtype,
                      zarr_format, compressor, shards)
        write = tuple(min(c, s) for c, s in zip(shards or chunks, shape))
        _compute(da.store(level.rechunk(write), arr, lock=False, compute=False), scheduler, quiet,
                 f"level {i} {shape}")
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": list(scale)}]})
        if (shape[1] <= chunks[1] and shape[2] <= chunks[2]) or i >= 9:
            break
        # the next level is computed from the level just written, not from the TIFFs
        level = _downsample(da.from_zarr(arr))
        scale = [s * (2.0 if n > 1 else 1.0) for s, n in zip(scale, shape)]
        i += 1
    multiscales = [{
        "version": "0.4" if zarr_format == 2 else "0.5",
        "name": Path(provenance["source"]).name,
        "axes": [{"name": a, "type": "space"} for a in "zyx"],
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


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished output into place; an existing dst is removed only afterwards."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
