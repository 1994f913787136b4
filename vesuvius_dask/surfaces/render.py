"""Render a surface volume from the scroll, lazily: the volume sampled along the surface's normals.

Layer ``k`` (``k = 0 .. layers-1``) of full-resolution pixel ``(r, c)`` is the scroll
volume at ``(p + (k - layers // 2) * step * n) * 2**-level``, where ``p`` and ``n`` are
the pixel's point and unit normal (level-0 voxels, see :meth:`Surface.sample`): for the
published 65 layers, layer 32 is the surface, layers 0 and 64 lie 32 steps behind and in
front of it. ``step`` is in level-0 voxels, so every level renders the same layers (a
coarser level reads fewer voxels). Sampling is trilinear; a position outside
``[0, n - 1]`` on any axis of the volume, and every layer of an invalid pixel, is 0 (as
``scipy.ndimage.map_coordinates(order=1, mode="constant", cval=0)``). Integer volumes
are rounded to the nearest value (halves up); the output dtype is the volume's.

The render is a dask array of one task per output chunk (default ``(layers, 128,
128)``). A task computes its pixels' sample positions, reads the box of the volume they
span (through the volume's chunk reader: only the stored chunks the box overlaps, local
or remote, ``cache_dir`` included) and interpolates; a box above
:data:`MAX_BOX_VOXELS` is split in two along its longest axis until it fits.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import ArgumentError
from ..io.open import resolve_volume
from ..io.segments import Segment, check_images, open_segment
from ..io.volume import Volume, is_pathlike, read_stored
from .tifxyz import Surface, open_surface

__all__ = ["render_surface", "render_segment", "sample_volume", "MAX_BOX_VOXELS"]

#: Largest box of the volume one read takes (64 Mi voxels); a task whose samples span
#: more (a sheet folding across the scroll) reads several smaller boxes.
MAX_BOX_VOXELS = 1 << 26


def _read_box(vol: Volume, box: tuple[slice, ...]) -> np.ndarray:
    """``vol[box]`` through the chunk reader of what backs it: only the chunks it overlaps."""
    if vol.zarr is not None:
        out = read_stored(vol.zarr, box, vol.name, vol.remote)
        if vol.remote is not None:
            vol.remote.flush()  # fetched chunks are in cache_dir once the task returns
        return out
    if vol.data is not None:
        return np.asarray(vol.data[box])
    return np.asarray(vol.array[box].compute(scheduler="synchronous"))


def _gather(vol: Volume, i0: np.ndarray, i1: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Trilinear values at samples with lower nodes ``i0``, upper ``i1`` and fractions ``f``."""
    lo, hi = i0.min(axis=0), i1.max(axis=0) + 1
    size = hi - lo
    if int(np.prod(size)) > MAX_BOX_VOXELS and len(i0) > 1:
        axis = int(np.argmax(size))
        left = i0[:, axis] < lo[axis] + size[axis] // 2
        if left.any() and not left.all():
            out = np.empty(len(i0), dtype=np.float64)
            out[left] = _gather(vol, i0[left], i1[left], f[left])
            out[~left] = _gather(vol, i0[~left], i1[~left], f[~left])
            return out
    box = _read_box(vol, tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)))
    return trilinear(box, i0 - lo, i1 - lo, f)


def _scipy_map_coordinates() -> Any:
    try:
        from scipy.ndimage import map_coordinates
    except ImportError:  # scipy is optional: the numpy path gives the same values, slower
        return None
    return map_coordinates


#: scipy's C trilinear interpolation when scipy is installed (about 10x the numpy path).
MAP_COORDINATES = _scipy_map_coordinates()


def trilinear(box: np.ndarray, a: np.ndarray, b: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Trilinear values in ``box`` at lower nodes ``a``, upper ``b`` (``a`` or ``a + 1``), fractions ``f``.

    Every node lies inside ``box``: eight numpy gathers (the path without scipy).
    """
    flat = np.ascontiguousarray(box).reshape(-1)
    sz, sy = box.shape[1] * box.shape[2], box.shape[2]
    base = a[:, 0] * sz + a[:, 1] * sy + a[:, 2]
    dz, dy, dx = (b[:, 0] - a[:, 0]) * sz, (b[:, 1] - a[:, 1]) * sy, b[:, 2] - a[:, 2]
    fz, fy, fx = f[:, 0], f[:, 1], f[:, 2]

    def along_x(i: np.ndarray) -> np.ndarray:
        lo = flat[i].astype(np.float64)
        return lo + fx * (flat[i + dx] - lo)

    def along_y(i: np.ndarray) -> np.ndarray:
        lo = along_x(i)
        return lo + fy * (along_x(i + dy) - lo)

    lo = along_y(base)
    return lo + fz * (along_y(base + dz) - lo)


def sample_volume(vol: Volume, positions: np.ndarray) -> np.ndarray:
    """Trilinear samples of a volume at ``(N, 3)`` positions ``(z, y, x)``; 0 outside ``[0, n-1]``.

    Reads only the box of the volume the positions inside it span (see :func:`_read_box`).

    Returns
    -------
    numpy.ndarray
        ``(N,)`` float64.
    """
    if MAP_COORDINATES is not None and len(positions):
        return _sample_boxes(vol, np.ascontiguousarray(np.asarray(positions, dtype=np.float64).T))
    shape = np.asarray(vol.shape, dtype=np.int64)
    out = np.zeros(len(positions), dtype=np.float64)
    inside = np.all((positions >= 0) & (positions <= shape - 1), axis=1)
    if inside.any():
        q = positions[inside]
        i0 = np.minimum(np.floor(q).astype(np.int64), np.maximum(shape - 2, 0))
        i1 = np.minimum(i0 + 1, shape - 1)
        out[inside] = _gather(vol, i0, i1, q - i0)
    return out


def _sample_boxes(vol: Volume, q: np.ndarray) -> np.ndarray:
    """:func:`sample_volume` by scipy at ``(3, N)`` positions: ``map_coordinates(order=1)`` in the box read.

    Positions outside ``[0, n - 1]`` on any axis (NaN included) are 0 without reading
    anything; the box spans the others (plus the upper neighbour), so it lies inside the
    volume whatever the outliers are, and holds every node they interpolate.
    """
    shape = np.asarray(vol.shape, dtype=np.int64)
    inside = np.all((q >= 0) & (q <= (shape - 1)[:, None]), axis=0)  # NaN compares False
    if not inside.all():
        out = np.zeros(q.shape[1], dtype=np.float64)
        if inside.any():
            out[inside] = _sample_boxes(vol, q[:, inside])
        return out
    lo = np.floor(q.min(axis=1)).astype(np.int64)
    hi = np.minimum(np.floor(q.max(axis=1)).astype(np.int64) + 2, shape)
    size = hi - lo
    if int(np.prod(size)) > MAX_BOX_VOXELS and q.shape[1] > 1:
        axis = int(np.argmax(size))
        left = q[axis] < lo[axis] + size[axis] // 2
        if left.any() and not left.all():
            out = np.empty(q.shape[1], dtype=np.float64)
            out[left] = _sample_boxes(vol, q[:, left])
            out[~left] = _sample_boxes(vol, q[:, ~left])
            return out
    box = _read_box(vol, tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)))
    return MAP_COORDINATES(box, q - lo[:, None], order=1, mode="constant", cval=0.0, output=np.float64)


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.floor(values + 0.5), info.min, info.max).astype(dtype)
    return values.astype(dtype)


class _Renderer:
    """One render's task function: ``(k0, k1, r0, r1, c0, c1)`` -> that block of the render.

    A plain class, so that dask passes the surface and volume records as they are
    (it would look inside a dataclass for collections).
    """

    def __init__(self, surface: Surface, vol: Volume, layers: int, step: float, level: int) -> None:
        self.surface, self.vol = surface, vol
        self.layers, self.step, self.level = layers, step, level

    def __call__(self, k0: int, k1: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        dtype = np.dtype(self.vol.dtype)
        out = np.zeros((k1 - k0, r1 - r0, c1 - c0), dtype=dtype)
        points, normals, ok = self.surface.sample(np.arange(r0, r1)[:, None], np.arange(c0, c1)[None, :])
        if not ok.any():
            return out
        offsets = (np.arange(k0, k1) - self.layers // 2) * self.step
        p, n = points[ok].T[:, None, :], normals[ok].T[:, None, :]  # (3, 1, pixels): z, y, x rows
        pos = ((p + offsets[None, :, None] * n) * 2.0 ** -self.level).reshape(3, -1)  # layer-major
        values = (_sample_boxes(self.vol, pos) if MAP_COORDINATES is not None
                  else sample_volume(self.vol, pos.T))
        out[:, ok] = _cast(values, dtype).reshape(len(offsets), -1)
        return out


def _as_surface(surface: Any, flip_normals: bool | None) -> Surface:
    if isinstance(surface, Surface):
        if flip_normals is not None and bool(flip_normals) != surface.flip_normals:
            return surface.with_flip(flip_normals)
        return surface
    return open_surface(surface, flip_normals=bool(flip_normals))


def _check(layers: Any, step: Any, level: Any, chunks: Any) -> tuple[int, int, int]:
    if not isinstance(layers, (int, np.integer)) or isinstance(layers, bool) or layers < 1:
        raise ArgumentError(f"layers={layers!r}: expected a positive integer (published: 65)")
    if not isinstance(step, (int, float, np.number)) or not math.isfinite(step) or step <= 0:
        raise ArgumentError(f"step={step!r}: expected a positive number of voxels")
    if not isinstance(level, (int, np.integer)) or isinstance(level, bool) or level < 0:
        raise ArgumentError(f"level={level!r}: expected a pyramid level 0, 1, 2, ...")
    chunks = (int(layers), 128, 128) if chunks is None else chunks
    try:
        cz, cy, cx = (int(c) for c in chunks)
    except (TypeError, ValueError):
        raise ArgumentError(f"chunks={chunks!r}: expected (layers, y, x) sizes") from None
    if min(cz, cy, cx) < 1:
        raise ArgumentError(f"chunks={chunks!r}: sizes must be positive")
    return cz, cy, cx


def _edges(n: int, c: int) -> list[tuple[int, int]]:
    return [(a, min(a + c, n)) for a in range(0, n, c)]


def render_surface(surface: Any, volume: Any, *, layers: int = 65, step: float = 1.0, level: int = 0,
                   chunks: tuple[int, int, int] | None = None, flip_normals: bool | None = None,
                   storage_options: dict | None = None,
                   cache_dir: str | os.PathLike | None = None) -> Any:
    """A lazy surface volume: the scroll volume sampled along a surface's normals.

    Parameters
    ----------
    surface : Surface, Segment, str or os.PathLike
        A :class:`~vesuvius_dask.surfaces.tifxyz.Surface`, a segment with one, or a
        tifxyz (or segment) folder.
    volume : str, os.PathLike, Volume, zarr.Array, numpy.ndarray or dask.array.Array
        The scroll volume the surface's points index, at pyramid level ``level``
        (opened with :func:`~vesuvius_dask.io.open.resolve_volume`; a path to an
        OME-Zarr opens that level).
    layers : int
        Layers along the normal (published: 65; layer ``layers // 2`` is the surface).
    step : float
        Distance between layers, in level-0 voxels.
    level : int
        Pyramid level of ``volume``: the points are scaled by ``2**-level``.
    chunks : tuple of int, optional
        Output chunks ``(layers, y, x)``; default ``(layers, 128, 128)``.
    flip_normals : bool, optional
        Override the surface's normal sign (see :mod:`vesuvius_dask.surfaces.normals`).
    storage_options, cache_dir
        For a volume given as a URL (see :func:`~vesuvius_dask.io.open.open_volume`).

    Returns
    -------
    dask.array.Array
        ``(layers, H, W)`` at the surface's full resolution, the volume's dtype; nothing
        is read until it is computed.

    Raises
    ------
    ArgumentError
        A bad ``layers``, ``step``, ``level`` or ``chunks``.
    VolumeError, VolumeNotFoundError
        The surface or the volume cannot be opened.
    """
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    cz, cy, cx = _check(layers, step, level, chunks)
    surf = _as_surface(surface, flip_normals)
    vol = resolve_volume(volume, level=level if is_pathlike(volume) else None,
                         storage_options=storage_options, cache_dir=cache_dir)
    h, w = surf.shape
    name = "render-surface-" + tokenize(surf.token, surf.flip_normals, vol.token, layers,
                                        float(step), level, (cz, cy, cx))
    fn = _Renderer(surf, vol, int(layers), float(step), int(level))
    axes = (_edges(int(layers), cz), _edges(h, cy), _edges(w, cx))
    dsk = {(name, a, b, c): (fn, *za, *ya, *xa)
           for (a, za), (b, ya), (c, xa) in itertools.product(*(list(enumerate(e)) for e in axes))}
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    chunk_sizes = tuple(tuple(e - s for s, e in edges) for edges in axes)
    dtype = np.dtype(vol.dtype)
    return da.Array(graph, name, chunk_sizes, dtype=dtype, meta=np.empty((0, 0, 0), dtype=dtype))


def render_segment(segment: Any, volume: Any, **options: Any) -> Segment:
    """A segment whose volume is its surface rendered from ``volume`` (lazily).

    ``segment`` is a :class:`~vesuvius_dask.io.segments.Segment` or a segment folder
    with a tifxyz surface; ``options`` are :func:`render_surface`'s. The result is
    usable wherever a segment is (``open_volume``, the stream with
    ``labels="segment"``, ``predict``); its mask and labels are checked against the
    render's size.

    Raises
    ------
    VolumeNotFoundError
        The segment has no tifxyz surface.
    VolumeError
        A mask or label whose size differs from the surface's full resolution.
    """
    seg = segment if isinstance(segment, Segment) else open_segment(segment)
    surf = open_surface(seg, flip_normals=bool(options.pop("flip_normals", False)))
    level = options.get("level", 0)
    vol = resolve_volume(volume, level=level if is_pathlike(volume) else None,
                         storage_options=options.pop("storage_options", None),
                         cache_dir=options.pop("cache_dir", None))
    array = render_surface(surf, vol, **options)
    images = {"mask": seg.mask, "labels": seg.labels, "ir": seg.ir}
    sources = {k: seg.sources.get(k, f"{seg.path} ({k})") for k in images}  # errors name the file
    check_images(images, sources, tuple(array.shape[1:]), f"the surface {surf.name} at full resolution")
    what = f"rendered lazily from {vol.name}" + (f" level {level}" if level else "")
    return replace(seg, record=Volume(array, f"{surf.name} {what}"),
                   sources={**seg.sources, "volume": what})
