"""Segments with their surfaces: opened, rendered when they must be, and described.

:func:`open_segment` is :func:`vesuvius_dask.io.segments.open_segment` plus the scroll
volume: a segment whose surface was never rendered, given ``volume=``, gets its surface
volume rendered lazily (:func:`~.render.render_segment`), so that it is a volume like
any other (the stream, masks and labels, ``predict``, ``convert``). A rendered surface
volume found in the folder always wins over a render.

:func:`describe` is what ``vesuvius-dask info`` prints for a tifxyz folder or a
segment: the stored volume (as :func:`vesuvius_dask.io.info.describe` reports it), the
surface's grid and full-resolution size, scale, bbox and valid fraction, the render a
``volume`` would give, and one line of what was found and what is missing.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import VolumeNotFoundError
from ..io.segments import Segment
from ..io.segments import open_segment as open_stored_segment
from .render import render_segment
from .tifxyz import Surface, open_surface

__all__ = ["open_segment", "describe", "describe_surface"]


def open_segment(folder: Any, *, volume: Any = None, level: int | None = None, layers: int = 65,
                 step: float = 1.0, flip_normals: bool = False, catalog: Any = None,
                 storage_options: dict | None = None,
                 cache_dir: str | os.PathLike | None = None) -> Segment:
    """Open a segment; render its surface volume from ``volume`` when it has none.

    Parameters
    ----------
    folder : str, os.PathLike or Segment
        A segment folder (either published tree), a tifxyz folder, a segment id or
        URL, or a :class:`~vesuvius_dask.io.segments.Segment` already opened (see
        :func:`vesuvius_dask.io.segments.open_segment`).
    volume : path, URL, Volume or array, optional
        The scroll volume the surface lives in (level-0 voxel coordinates at
        ``level=0``). Used only when the segment has no rendered surface volume.
    level : int, optional
        The OME-Zarr level read: of the rendered surface volume when there is one,
        else of ``volume`` (the render samples that pyramid level, its points scaled
        by ``2**-level``; the render keeps the surface's full-resolution size).
    layers, step, flip_normals
        As for :func:`~vesuvius_dask.surfaces.render.render_surface`.
    catalog, storage_options, cache_dir
        As for :func:`vesuvius_dask.io.segments.open_segment`; ``storage_options``
        and ``cache_dir`` also serve a ``volume`` given as a URL.

    Returns
    -------
    Segment
        ``segment.describe()`` says in one line what was found and what is missing.

    Raises
    ------
    VolumeNotFoundError
        No such segment, or ``volume`` given for a segment with neither a rendered
        volume nor a tifxyz surface.
    VolumeError
        As for :func:`~vesuvius_dask.surfaces.render.render_segment` (labels whose size
        is not the surface's).
    """
    seg = folder if isinstance(folder, Segment) else open_stored_segment(
        folder, level=level, catalog=catalog, storage_options=storage_options, cache_dir=cache_dir)
    if volume is None or seg.record is not None:
        return seg
    if seg.tifxyz is None:
        raise VolumeNotFoundError(f"{seg.path}: no tifxyz surface to render from {volume}")
    return render_segment(seg, volume, layers=layers, step=step, level=level or 0,
                          flip_normals=flip_normals, storage_options=storage_options,
                          cache_dir=cache_dir)


def _bbox(bbox: Any) -> str:
    """``meta.json``'s bbox ``[[x, y, z] min, [x, y, z] max]``, rounded; as given if it is not that."""
    try:
        (x0, y0, z0), (x1, y1, z1) = ((float(v) for v in corner) for corner in bbox)
    except (TypeError, ValueError):
        return "none in meta.json" if bbox is None else repr(bbox)
    return f"x {x0:.1f}..{x1:.1f}, y {y0:.1f}..{y1:.1f}, z {z0:.1f}..{z1:.1f} (meta.json)"


def describe_surface(surface: Surface, indent: str = "  ") -> list[str]:
    """Lines describing a surface: grid, full size, scale, bbox, valid fraction (reads the grid)."""
    (gh, gw), (fh, fw), (sx, sy) = surface.grid_shape, surface.shape, surface.scale
    nodes = surface.nodes()
    n_valid, n_defined = int(nodes.valid.sum()), int(nodes.defined.sum())
    total = nodes.valid.size
    lines = [
        f"{indent}tifxyz  {surface.name}",
        f"{indent}grid    {gh}x{gw} nodes (x.tif, y.tif, z.tif)",
        f"{indent}scale   [{sx:g}, {sy:g}] (one node per {1 / sx:g} x {1 / sy:g} pixels)",
        f"{indent}full    {fh}x{fw} pixels (rows x columns)",
        f"{indent}bbox    {_bbox(surface.bbox)}",
        f"{indent}valid   {n_valid / total:.1%} of the grid's nodes ({n_valid} of {total}); "
        f"{n_defined} with a normal",
        f"{indent}uuid    {surface.uuid}",
    ]
    if n_valid:
        pts = nodes.points[nodes.valid]
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        lines.append(f"{indent}points  z {lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f}, "
                     f"x {lo[2]:.0f}..{hi[2]:.0f} (level-0 voxels)")
    return lines


def describe(path: Any, *, level: int | None = None, volume: Any = None, layers: int = 65,
             step: float = 1.0, cache_dir: str | os.PathLike | None = None) -> str:
    """What a tifxyz folder or segment is: volume, surface, labels, and what is missing.

    Parameters
    ----------
    path : str or os.PathLike
        A segment folder (either tree) or a tifxyz folder.
    level : int, optional
        As for :func:`open_segment`.
    volume : optional
        A scroll volume to render the surface from when no rendered volume is found.
    layers, step, cache_dir
        As for :func:`open_segment`.

    Returns
    -------
    str
    """
    from ..io.info import describe as describe_stored

    seg = open_segment(path, volume=volume, level=level, layers=layers, step=step, cache_dir=cache_dir)
    lines = describe_stored(path, level=level).splitlines()
    if seg.tifxyz is not None:
        lines.append("  surface:")
        lines += describe_surface(open_surface(seg), indent="    ")
    if volume is not None and str(seg.sources.get("volume", "")).startswith("rendered"):
        lines.append(f"  render  {tuple(seg.volume.shape)} {seg.volume.dtype}, chunks "
                     f"{seg.volume.chunksize}, {seg.sources['volume']} (lazy: nothing read)")
    elif volume is not None:
        lines.append(f"  render  not needed: the rendered volume found is used, not {volume}")
    lines.append("  " + seg.describe())
    return "\n".join(lines)
