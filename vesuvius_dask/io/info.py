"""Describe a stored volume: shape, dtype, chunks, shards, codecs, levels, sizes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .paths import PathKind, is_url, path_kind, remote_storage_options, segment_volume_dirs
from .volume import multiscale_paths, open_zarr_path, remote_chunks

__all__ = ["describe", "stored_bytes", "check"]


def _zarr_node(path: str | os.PathLike) -> Any:
    """The Zarr array or group at a path or URL (``s3://`` with its defaults: anonymous, region)."""
    import zarr

    opts = remote_storage_options(path) if is_url(path) else None
    return zarr.open(os.fspath(path), mode="r", **({"storage_options": opts} if opts else {}))


def stored_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk under ``path`` (a local Zarr array or group)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _codecs(arr: Any) -> str:
    meta = arr.metadata
    if getattr(meta, "zarr_format", 3) == 2:
        comp = meta.compressor
        filters = meta.filters or ()
        return ", ".join([repr(f) for f in filters] + [repr(comp) if comp else "no compressor"])
    return ", ".join(type(c).__name__ + (f"({c.cname.value}, clevel={c.clevel}, {c.shuffle.value})"
                                         if hasattr(c, "cname") else "")
                     for c in meta.codecs)


def _array_lines(arr: Any, indent: str = "  ") -> list[str]:
    import numpy as np

    logical = int(np.prod(arr.shape)) * arr.dtype.itemsize
    shards = getattr(arr, "shards", None)
    return [
        f"{indent}shape   {tuple(arr.shape)}",
        f"{indent}dtype   {arr.dtype}",
        f"{indent}chunks  {tuple(arr.chunks)}",
        f"{indent}shards  {tuple(shards) if shards else 'none'}",
        f"{indent}format  Zarr v{arr.metadata.zarr_format}",
        f"{indent}codecs  {_codecs(arr)}",
        f"{indent}read    {_read_path(arr)}",
        f"{indent}logical {logical:,} bytes",
    ]


def _read_path(arr: Any) -> str:
    """The read path the batch engine takes for ``arr``, and what it means."""
    from .partial import READ_PATHS
    from .volume import read_path

    path = read_path(arr)
    return f"{path} ({READ_PATHS[path]})"


def _tiff_lines(path: Path, indent: str = "  ") -> list[str]:
    import numpy as np

    from .tiff import inspect_layers

    info = inspect_layers(path)
    files = sorted({layer.path for layer in info.layers})
    first, last = info.layers[0], info.layers[-1]
    if any(layer.page for layer in info.layers):  # as tiff_volume decides
        how = "whole pages decoded per read (multi-page TIFF: convert it for random blocks)"
    elif info.memmappable:
        how = "memory-mapped in place (uncompressed)"
    else:
        how = ("strips or tiles a block touches decoded per read (compressed: decode-bound, "
               "convert it for random blocks)")
    return [
        f"{indent}TIFF stack, {len(info.layers)} layers "
        f"({os.path.basename(first.path)} .. {os.path.basename(last.path)})",
        f"{indent}shape   {info.shape}",
        f"{indent}dtype   {info.dtype}",
        f"{indent}read    {how}",
        f"{indent}logical {int(np.prod(info.shape)) * info.dtype.itemsize:,} bytes",
        f"{indent}stored  {sum(os.path.getsize(f) for f in files):,} bytes on disk",
    ]


def _segment_lines(path: Path) -> list[str]:
    from .segments import open_segment

    seg = open_segment(path)
    found = segment_volume_dirs(seg.path)  # the first is the volume open_segment chose
    if not found:
        lines = [f"  segment, no rendered volume; tifxyz surface {seg.tifxyz} (render it from the "
                 "scroll: --volume SCROLL, or open_segment(..., volume=SCROLL))"]
    elif seg.record is not None and seg.record.zarr is not None:
        lines = [f"  segment, volume from {found[0]}"] + describe(found[0]).splitlines()[1:]
    else:
        lines = [f"  segment, volume from {found[0]}"] + _tiff_lines(Path(found[0]))
    if found and seg.tifxyz is not None:
        lines.append(f"  surface {seg.tifxyz}")
    lines += [f"  {kind}.zarr {where}" for kind, where in seg.label_zarrs.items()]
    for name in ("mask", "labels", "ir"):
        img = getattr(seg, name)
        lines.append(f"  {name:<7} " + (f"{img.shape[0]}x{img.shape[1]} {img.dtype}"
                                         if img is not None else "none"))
    return lines


def describe(path: str | os.PathLike, *, level: int | None = None) -> str:
    """Return a human-readable description of a stored volume.

    Parameters
    ----------
    path : str or os.PathLike
        A Zarr array, an OME-Zarr multiscale group, a folder of TIFF layers (or a
        multi-page TIFF) or a segment folder.
    level : int, optional
        Only this level of a multiscale group (default: every level).

    Returns
    -------
    str
    """
    import zarr

    name = os.fspath(path)
    kind = path_kind(path)
    if kind in (PathKind.TIFF_FILE, PathKind.TIFF_FOLDER):
        return "\n".join([name] + _tiff_lines(Path(name)))
    if kind == PathKind.SEGMENT:
        return "\n".join([name] + _segment_lines(Path(name)))
    arr, _ = open_zarr_path(path, level)  # validates the path and the level
    node = _zarr_node(name)
    lines = [name]
    if isinstance(node, zarr.Array):
        lines += _array_lines(node)
    else:
        paths = multiscale_paths(node.attrs.asdict()) or []
        lines.append(f"  OME-Zarr multiscale image, {len(paths)} levels")
        for i, p in enumerate(paths):
            if level is not None and i != level:
                continue
            lines.append(f"  level {i} ('{p}'):")
            lines += _array_lines(node[p], indent="    ")
    if "://" not in name:
        lines.append(f"  stored  {stored_bytes(name):,} bytes on disk")
    attrs = dict(node.attrs)
    prov = attrs.get("vesuvius_dask")
    if prov:
        lines.append(f"  provenance {prov}")
    return "\n".join(lines)


def _check_chunks(arr: Any, name: str, starts: list[tuple[int, int, int]], remote: Any = None
                  ) -> list[str]:
    from .volume import read_stored, stored_keys

    bad = []
    if remote is not None:  # all of this task's chunks on their way at once
        remote.prefetch(stored_keys(arr, [tuple(s // c for s, c in zip(start, arr.chunks))
                                          for start in starts]))
    for start in starts:
        region = tuple(slice(s, min(s + c, n)) for s, c, n in zip(start, arr.chunks, arr.shape))
        try:
            read_stored(arr, region, name, remote)
        except Exception as err:  # every failure is reported, not only decode errors
            bad.append(str(err))
    if remote is not None:
        remote.flush()  # what this task fetched is in cache_dir when it is done
    return bad


def _check_layer(path: str, page: int) -> list[str]:
    import tifffile

    try:
        tifffile.imread(path, key=page)
    except Exception as err:
        return [f"{path}: layer (page {page}) cannot be decoded: {type(err).__name__}: {err}"]
    return []


class _Lazy:
    """Holds a dask array so that dask.delayed passes it on instead of computing it first."""

    def __init__(self, array: Any) -> None:
        self.array = array


def _check_image(img: _Lazy, name: str) -> list[str]:
    try:
        img.array.compute(scheduler="sync")
    except Exception as err:
        return [f"{name}: {err}"]
    return []


def _segment_check_tasks(path: str, level: int | None) -> tuple[list[Any], int, int]:
    """A segment's checks: its volume (or, never rendered, its surface's grids) and its images."""
    import dask

    from .segments import open_segment

    seg = open_segment(path)
    found = segment_volume_dirs(seg.path)
    if found:
        tasks, n, threads = _check_tasks(os.fspath(found[0]), level)
    else:  # a surface never rendered: its grids are what is stored
        grids = [os.path.join(seg.tifxyz, f"{axis}.tif") for axis in "xyz"]
        tasks, n, threads = [dask.delayed(_check_layer)(g, 0) for g in grids], 3, os.cpu_count() or 1
    for image in ("mask", "labels", "ir"):
        img = getattr(seg, image)
        if img is not None:
            tasks.append(dask.delayed(_check_image)(_Lazy(img), f"{path} {image}"))
            n += 1
    return tasks, n, threads


def _check_tasks(path: str, level: int | None, cache_dir: Any = None) -> tuple[list[Any], int, int]:
    """Delayed checks (each returns a list of problems), the units they cover, threads to use."""
    import dask
    import numpy as np
    import zarr

    from .tiff import inspect_layers

    kind = path_kind(path)
    if kind in (PathKind.TIFF_FILE, PathKind.TIFF_FOLDER):
        layers = inspect_layers(path).layers
        return ([dask.delayed(_check_layer)(lay.path, lay.page) for lay in layers], len(layers),
                os.cpu_count() or 1)
    if kind == PathKind.SEGMENT:
        return _segment_check_tasks(path, level)
    open_zarr_path(path, level)  # validates the path and the level
    node = _zarr_node(path)
    arrays = [(path, node)] if isinstance(node, zarr.Array) else [
        (f"{path} (level {i})", node[p]) for i, p in enumerate(multiscale_paths(node.attrs.asdict()) or [])
        if level is None or i == level]
    tasks, n, threads = [], 0, os.cpu_count() or 1
    for name, arr in arrays:
        remote = remote_chunks(arr, name, None, cache_dir)
        starts = [tuple(int(i) * c for i, c in zip(idx, arr.chunks))
                  for idx in np.ndindex(*[-(-s // c) for s, c in zip(arr.shape, arr.chunks)])]
        n += len(starts)
        for i in range(0, len(starts), 64):
            tasks.append(dask.delayed(_check_chunks)(arr, name, starts[i:i + 64], remote))
        if remote is not None:  # two tasks' chunks in flight: the next group while one decodes
            threads = max(threads, 2 * -(-remote.settings.concurrency // 64))
    return tasks, n, threads


def check(path: str | os.PathLike, *, level: int | None = None, quiet: bool = True,
          cache_dir: str | os.PathLike | None = None) -> tuple[int, list[str]]:
    """Read and decode every stored chunk (or TIFF layer, or segment image) of a volume.

    Parameters
    ----------
    path : str or os.PathLike
        A Zarr array, an OME-Zarr group (every level, or ``level``), a TIFF stack or
        a segment folder.
    level : int, optional
        Only this level of a multiscale group.
    quiet : bool
        No progress bar (dask's).
    cache_dir : str or os.PathLike, optional
        For a URL: keep the fetched chunks in this folder (they are fetched
        concurrently either way; see :func:`~vesuvius_dask.open_volume`).

    Returns
    -------
    (int, list of str)
        How many chunks (layers, images) were checked, and one line per bad one,
        naming the store, the chunk index and its key.
    """
    from concurrent.futures import ThreadPoolExecutor

    import dask

    tasks, n, threads = _check_tasks(os.fspath(path), level, cache_dir)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="vesuvius-dask-check")
    try:
        if quiet:
            results = dask.compute(*tasks, scheduler="threads", pool=pool)
        else:
            from dask.diagnostics import ProgressBar

            with ProgressBar(dt=0.5, out=sys.stderr):
                results = dask.compute(*tasks, scheduler="threads", pool=pool)
    except BaseException:  # Ctrl-C, or a failure: a read-only check need not wait for its readers
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return n, [line for r in results for line in r]
