"""Open scroll and fragment volumes as lazy, chunk-aligned dask arrays.

:func:`open_volume` is the single entry point. It accepts a path to a Zarr v2/v3
array, a path to an OME-Zarr multiscale group, a folder of TIFF layers or a
multi-page TIFF, a segment folder, a URL, a ``zarr.Array``, a numpy array or
``np.memmap`` (wrapped, never copied) or an existing ``dask.array.Array``. What a
path holds is decided once, by :func:`vesuvius_dask.io.paths.path_kind`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from ..errors import InvalidTypeError, VolumeError
from .catalog import resolve_source
from .paths import PathKind, path_kind
from .segments import open_segment
from .tiff import tiff_volume
from .volume import (
    DEFAULT_RAM_CHUNKS,
    ORIGIN_ATTR,
    Volume,
    VolumeSource,
    check_array,
    check_zarr,
    chunk_key,
    disk_cache_for,
    is_pathlike,
    read_stored,
    remote_chunks,
    wrap_numpy,
    wrap_zarr,
    zarr_volume,
)

__all__ = ["open_volume", "resolve_volume", "Volume", "read_stored", "chunk_key", "DEFAULT_RAM_CHUNKS"]


def resolve_volume(
    source: VolumeSource,
    *,
    level: int | None = None,
    chunks: Any = None,
    name: str | None = None,
    storage_options: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    catalog: Any = None,
    energy: float | str | None = None,
    resolution: float | str | None = None,
) -> Volume:
    """Open ``source`` and return the :class:`Volume` record behind :func:`open_volume`.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array, numpy.ndarray or dask.array.Array
        What to open; see :func:`open_volume`.
    level : int, optional
        Multiscale level for OME-Zarr groups (default 0).
    chunks : tuple of int, optional
        Dask chunking for numpy input (default ``(4, 512, 512)`` clipped to the shape);
        for Zarr input, a multiple of the stored chunks (default: the stored chunks).
    name : str, optional
        Name used in error messages when ``source`` is not a path.
    storage_options : dict, optional
        fsspec options for URLs (credentials, ``anon``, caching).
    cache_dir : str or os.PathLike, optional
        Keep the chunks fetched from a URL in this folder, for other processes and
        later runs (see :func:`open_volume`).
    catalog, energy, resolution : optional
        For a scroll name or segment id (see :func:`open_volume`).

    Returns
    -------
    Volume
    """
    import zarr

    if isinstance(source, Volume):
        return source
    hook = getattr(source, "__vesuvius_volume__", None)
    if hook is not None:  # e.g. a Segment
        return hook()
    if is_pathlike(source):  # a scroll name or segment id becomes its URL; an existing path wins
        source = resolve_source(source, catalog=catalog, energy=energy, resolution=resolution)
        return _from_path(source, level, chunks, storage_options, cache_dir)
    if isinstance(source, zarr.Array):
        lbl = name or f"zarr array {source.store_path}"
        check_zarr(source, lbl)
        remote = remote_chunks(source, lbl, storage_options, cache_dir)
        return Volume(wrap_zarr(source, lbl, chunks, remote), lbl, zarr=source, remote=remote)
    if isinstance(source, np.ndarray):
        lbl = name or "numpy array"
        check_array(source.shape, source.dtype, lbl)
        return Volume(wrap_numpy(source, chunks), lbl, data=source)
    if isinstance(source, da.Array):
        return _from_dask(source, name, chunks, cache_dir)
    raise InvalidTypeError(
        f"{name or 'volume'}: cannot open an object of type {type(source).__name__}; expected a "
        "path (Zarr array, OME-Zarr group, TIFF layers, segment folder), a zarr.Array, a numpy "
        "array or a dask array"
    )


def _from_path(source: str | os.PathLike, level: int | None, chunks: Any,
               storage_options: dict | None, cache_dir: Any) -> Volume:
    """A path's volume: a segment, a TIFF stack, or a Zarr (local or a URL)."""
    kind = path_kind(source)
    if kind == PathKind.SEGMENT:
        return open_segment(source, level=level).__vesuvius_volume__()
    if kind in (PathKind.TIFF_FILE, PathKind.TIFF_FOLDER):
        if level not in (None, 0):
            raise VolumeError(f"{os.fspath(source)}: level={level} applies to OME-Zarr "
                              "multiscale groups; this is a TIFF stack")
        return tiff_volume(Path(os.fspath(source)), chunks=chunks)
    return zarr_volume(source, level=level, chunks=chunks, storage_options=storage_options,
                       cache_dir=cache_dir)


def _from_dask(source: da.Array, name: str | None, chunks: Any, cache_dir: Any) -> Volume:
    """A dask array's volume; one made by :func:`open_volume` keeps its Zarr or numpy origin."""
    lbl = name or f"dask array {source.name}"
    check_array(source.shape, source.dtype, lbl)
    if any(np.isnan(c) for axis in source.chunks for c in axis):
        raise VolumeError(f"{lbl}: dask array has unknown chunk sizes; call compute_chunk_sizes()")
    kind, obj, *more = getattr(source, ORIGIN_ATTR, (None, None))
    remote = more[0] if more else None
    if chunks is not None:
        source = source.rechunk(chunks)
        kind = None
    if kind == "zarr":
        if remote is not None and cache_dir is not None:
            remote = remote.with_cache(disk_cache_for(remote, obj, cache_dir))
        return Volume(source, lbl, zarr=obj, remote=remote)
    if kind == "numpy":
        return Volume(source, lbl, data=obj)
    return Volume(source, lbl)


def open_volume(
    source: VolumeSource,
    *,
    level: int | None = None,
    chunks: Any = None,
    storage_options: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    catalog: Any = None,
    energy: float | str | None = None,
    resolution: float | str | None = None,
) -> da.Array:
    """Open a volume as a lazy, chunk-aligned 3-D dask array.

    Nothing is read but metadata: the result is lazy.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array, numpy.ndarray or dask.array.Array
        A path to a Zarr v2 or v3 array, a path to an OME-Zarr multiscale group, a
        path to a folder of 2-D TIFF layers (``00.tif``, ``01.tif``, ... in numeric
        order; uncompressed layers are memory-mapped, not converted) or a multi-page
        TIFF, a segment folder (its volume, see :func:`open_segment`), a
        ``zarr.Array``, a numpy array or ``np.memmap`` (wrapped without copying), or
        a dask array (returned as is, after validation). Or a name from the
        catalogue (:mod:`vesuvius_dask.io.catalog`): a scroll (``"scroll1"``,
        ``"Scroll 1"``, ``"1"``, ``"PHercParis4:78keV:2.4um"``) or a segment id
        (``"20230530164535"``), resolved offline to its URL. A local path that exists
        always wins over a name.
    level : int, optional
        Resolution level of an OME-Zarr multiscale group (default 0, the finest).
    chunks : tuple of int, optional
        Dask chunking. For numpy input the default is ``(4, 512, 512)`` clipped to the
        shape. For Zarr input the default is the stored chunking (one dask chunk per
        stored chunk); a chunking that is not a multiple of it warns. For a Zarr
        URL the default is 4 x 4 stored chunks in y and x per dask chunk, whose task
        fetches them concurrently (so a compute keeps many requests in flight). For
        dask input the array is rechunked.
    storage_options : dict, optional
        fsspec options for a URL, e.g. ``{"anon": True}`` for public S3 buckets.
    cache_dir : str or os.PathLike, optional
        For a URL: keep fetched chunks (their stored bytes) in this folder, shared by
        processes and later runs; atomic, checksummed, evicted least recently used
        past a budget (dask config ``vesuvius-dask.remote.cache-dir-bytes``; default
        half the free disk space, at most 64 GiB). Ignored for local volumes.
        Requests in flight, retries and timeouts are set with dask config
        ``vesuvius-dask.remote.*`` (see :class:`~vesuvius_dask.remote.fetch.RemoteSettings`).
    catalog : str, os.PathLike or mapping, optional
        A user's catalogue file (the official ``scrolls.yaml`` structure) over the
        recorded one (default: the file in ``$VESUVIUS_DASK_CATALOG``, if set); see
        :func:`~vesuvius_dask.io.catalog.load_catalog`.
    energy, resolution : float or str, optional
        For a scroll name: the volume at this energy (keV) and resolution (µm).
        Default: the scroll's first volume in the catalogue.

    Returns
    -------
    dask.array.Array
        The 3-D ``(z, y, x)`` volume.

    Raises
    ------
    VolumeNotFoundError
        The path does not exist; a name the catalogue does not know (the message
        names the nearest known ones).
    VolumeError
        The path is not a Zarr array or multiscale group, the level does not exist,
        the array is not 3-D, or its dtype is not an integer or float type; or its
        metadata declares what no volume has (sizes that are not positive integers,
        more than :data:`~vesuvius_dask.io.volume.MAX_STORED_CHUNKS` chunks, a chunk
        above :data:`~vesuvius_dask.io.volume.MAX_CHUNK_BYTES`), checked before
        anything is made from it.
    InvalidTypeError
        ``source`` is of an unsupported type.

    Examples
    --------
    >>> vol = open_volume("example_zarr/example.zarr")  # doctest: +SKIP
    >>> vol[0:4, 0:64, 0:64].compute().shape  # doctest: +SKIP
    (4, 64, 64)
    """
    return resolve_volume(source, level=level, chunks=chunks, storage_options=storage_options,
                          cache_dir=cache_dir, catalog=catalog, energy=energy,
                          resolution=resolution).array
