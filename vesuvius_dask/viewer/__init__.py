"""Look at volumes, and at where the sampler draws its blocks, in napari (lazily).

Needs the ``viewer`` extra (``pip install "vesuvius-dask[viewer]"``). Nothing here is
read eagerly: layers are dask arrays, OME-Zarr pyramids become multiscale layers (so
napari reads only the chunks of the level on screen), and contrast limits come from
a few chunks of the coarsest level.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_layers", "is_volume_path", "sample_boxes", "sample_outlines", "add_samples", "show",
           "require_napari"]

#: One colour per volume for sample boxes (cycled).
COLORS = ("#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#bf5af2", "#ff9f0a", "#64d2ff")


def require_napari() -> Any:
    """Import napari, or raise :class:`~vesuvius_dask.errors.MissingExtraError` with the install command."""
    from ..extras import require

    return require("napari", "viewer")


def is_volume_path(path: Any) -> bool:
    """Whether the other entry points open ``path`` as a volume (the same answer as theirs).

    A URL (a remote Zarr), a Zarr array, an OME-Zarr multiscale group, a multi-page
    TIFF, a folder of TIFF layers or a segment folder. A single-page TIFF is a 2-D
    image, which napari's own reader shows as such.
    """
    from ..io.paths import PathKind, path_kind

    if isinstance(path, str) and path_kind(path) == PathKind.URL:
        return True
    p = Path(os.fspath(path))
    kind = path_kind(p)
    if kind in (PathKind.SEGMENT, PathKind.TIFF_FOLDER):
        return True
    if kind == PathKind.TIFF_FILE:  # a stack of pages is a volume; one 2-D page stays napari's own
        return _pages(p) > 1
    if kind == PathKind.ZARR:
        import zarr

        node = zarr.open(str(p), mode="r")
        if isinstance(node, zarr.Array):
            return node.ndim == 3
        from ..io.volume import multiscale_paths

        return multiscale_paths(node.attrs.asdict()) is not None
    return False


def _pages(path: Path) -> int:
    """1 or 2: whether a TIFF file has a second page (without walking every page)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        try:
            tif.pages[1]
        except IndexError:
            return 1
        return 2


def _contrast(arr: Any, n_chunks: int = 3) -> tuple[float, float]:
    """Percentiles 0.5/99.5 of a few chunks around the middle (never the whole array)."""
    grid = [len(c) for c in arr.chunks]
    middle = [g // 2 for g in grid]
    picks = {tuple(middle)}
    for axis in (2, 1):
        for d in (-1, 1):
            if len(picks) < n_chunks and 0 <= middle[axis] + d < grid[axis]:
                c = list(middle)
                c[axis] += d
                picks.add(tuple(c))
    samples = [np.asarray(arr.blocks[c]).ravel() for c in picks]
    values = np.concatenate(samples).astype(np.float64)
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1
    return float(lo), float(hi)


def read_layers(path: Any, cache_dir: Any = None) -> list[tuple[Any, dict, str]]:
    """napari layer data for a volume path: ``[(data, metadata, layer_type), ...]``.

    A Zarr array gives one lazy image layer; an OME-Zarr group a multiscale image
    layer (one dask array per level); a folder of TIFF layers one lazy image layer
    (memory-mapped layers); a segment folder its volume plus ``mask`` and
    ``inklabels`` as labels layers. ``cache_dir`` keeps the chunks of a URL (see
    :func:`~vesuvius_dask.open_volume`).
    """
    import zarr

    from ..io.open import open_volume
    from ..io.paths import PathKind, path_kind
    from ..io.volume import multiscale_paths

    if isinstance(path, (list, tuple)):
        path = path[0]
    text = os.fspath(path)
    name = text.rstrip("/").rsplit("/", 1)[-1]
    kind = path_kind(text)
    if kind in (PathKind.URL, PathKind.ZARR):  # local or remote (fsspec URL) Zarr
        node = zarr.open(text, mode="r")
        if isinstance(node, zarr.Array):
            vol = open_volume(text, cache_dir=cache_dir)
            return [(vol, {"name": name, "contrast_limits": _contrast(vol)}, "image")]
        n_levels = len(multiscale_paths(node.attrs.asdict()) or [])
        levels = [open_volume(text, level=k, cache_dir=cache_dir) for k in range(n_levels)]
        return [(levels, {"name": name, "multiscale": True,
                          "contrast_limits": _contrast(levels[-1])}, "image")]
    p = Path(text)
    if kind in (PathKind.TIFF_FILE, PathKind.TIFF_FOLDER):
        vol = open_volume(p)
        return [(vol, {"name": name, "contrast_limits": _contrast(vol)}, "image")]
    from ..io.segments import open_segment

    seg = open_segment(p)
    layers: list[tuple[Any, dict, str]] = [
        (seg.volume, {"name": f"{name} volume", "contrast_limits": _contrast(seg.volume)}, "image")]
    for attr, label in (("mask", "mask"), ("labels", "inklabels")):
        img = getattr(seg, attr)
        if img is not None:
            layers.append(((img != 0).astype(np.uint8), {"name": f"{name} {label}",
                                                         "opacity": 0.3}, "labels"))
    return layers


def sample_boxes(stream: Any, n: int | None = 100, epoch: int | None = None
                 ) -> dict[int, list[np.ndarray]]:
    """Where ``stream`` will draw its next ``n`` blocks, as napari rectangles per volume.

    Each block becomes one rectangle per z layer it spans, with vertices on pixel
    edges: the block at ``(z, y, x)`` covers pixels ``y .. y+y_size-1``, so its
    rectangle runs from ``y - 0.5`` to ``y + y_size - 0.5`` (likewise in x).

    Returns
    -------
    dict
        volume index -> list of ``(4, 3)`` vertex arrays ``(z, y, x)``.
    """
    coords = stream.epoch_coords(epoch)
    if n is not None:
        coords = coords[:n]
    bz, by, bx = stream.block
    out: dict[int, list[np.ndarray]] = {}
    for v, z, y, x in coords.tolist():
        y0, y1, x0, x1 = y - 0.5, y + by - 0.5, x - 0.5, x + bx - 0.5
        for zz in range(z, z + bz):
            out.setdefault(v, []).append(np.array(
                [[zz, y0, x0], [zz, y0, x1], [zz, y1, x1], [zz, y1, x0]], dtype=float))
    return out


def _outline_slice(block: np.ndarray, starts: np.ndarray, size: tuple[int, int, int],
                   thickness: int, block_info: Any = None) -> np.ndarray:
    """One z slice of the outlines of every block spanning it (1 on an outline, else 0).

    Each block's outline is its footprint minus the footprint shrunk by
    ``thickness`` on every side, counted with 2-D difference arrays and prefix
    sums: O(blocks + pixels), whatever the number of blocks.
    """
    z = block_info[0]["array-location"][0][0]
    _, ny, nx = block.shape
    bz, by, bx = size
    sel = starts[(starts[:, 0] <= z) & (z < starts[:, 0] + bz)]
    diff = np.zeros((ny + 1, nx + 1), dtype=np.int64)
    t = min(thickness, by // 2, bx // 2)
    for sign, inset in ((1, 0), (-1, t)):
        y0, x0 = sel[:, 1] + inset, sel[:, 2] + inset
        y1, x1 = sel[:, 1] + by - inset, sel[:, 2] + bx - inset
        keep = (y1 > y0) & (x1 > x0)
        for ys, xs, w in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
            np.add.at(diff, (ys[keep], xs[keep]), sign * w)
    count = diff.cumsum(axis=0).cumsum(axis=1)[:ny, :nx]
    return (count > 0).astype(np.uint8)[None]


def sample_outlines(stream: Any, n: int | None = 100, epoch: int | None = None
                    ) -> dict[int, Any]:
    """Outlines of the stream's next ``n`` blocks, one lazy ``uint8`` volume per volume index.

    Each z slice is drawn only when napari shows it, in time linear in the blocks
    that span it (a million blocks draw in about a second), with outlines
    ``ceil(size / 400)`` pixels thick so they stay visible when the whole slice is shown.
    """
    import dask.array as da

    coords = stream.epoch_coords(epoch)
    if n is not None:
        coords = coords[:n]
    out = {}
    for v in np.unique(coords[:, 0]).tolist():
        starts = np.ascontiguousarray(coords[coords[:, 0] == v, 1:])
        shape = tuple(stream.volumes[v].shape)
        thickness = max(1, -(-max(shape[1:]) // 400))
        base = da.zeros(shape, dtype=np.uint8, chunks=(1,) + shape[1:])
        out[v] = base.map_blocks(_outline_slice, starts, tuple(stream.block), thickness,
                                 dtype=np.uint8)
    return out


def add_samples(viewer: Any, stream: Any, n: int | None = 100, epoch: int | None = None) -> list:
    """Add one outline layer per volume with the stream's next ``n`` blocks (see :func:`sample_outlines`)."""
    from napari.utils.colormaps import Colormap

    layers = []
    for v, outline in sorted(sample_outlines(stream, n, epoch).items()):
        rgb = [int(COLORS[v % len(COLORS)][i:i + 2], 16) / 255 for i in (1, 3, 5)]
        cmap = Colormap([[0, 0, 0, 0], rgb + [1]], name=f"vesuvius-samples-{v}")
        layers.append(viewer.add_image(outline, name=f"samples: volume {v}", colormap=cmap,
                                       contrast_limits=(0, 1), blending="translucent",
                                       interpolation2d="nearest"))
    return layers


def show(volumes: Sequence[Any] | Any, stream: Any = None, *, samples: int | None = 100,
         epoch: int | None = None, viewer: Any = None, show: bool = True,
         cache_dir: Any = None) -> Any:
    """Open volumes lazily in napari, with the stream's sample boxes on top.

    Parameters
    ----------
    volumes : path, array or sequence of them
        Zarr / OME-Zarr / segment paths, or arrays (numpy, dask, zarr).
    stream : DaskVesuviusStream or BlockPlan, optional
        Draw where it will sample its next ``samples`` blocks (a
        :class:`~vesuvius_dask.sampling.plan.BlockPlan` needs no torch).
    samples : int, optional
        How many blocks to outline (None: the whole epoch).
    epoch : int, optional
        Which epoch's plan (default: the one the next iteration uses).
    viewer : napari.Viewer, optional
        Add to this viewer instead of making one.
    show : bool
        Show the window (False for scripts and tests without a screen).
    cache_dir : str, optional
        Keep the chunks of URL volumes in this folder (see :func:`~vesuvius_dask.open_volume`).

    Returns
    -------
    napari.Viewer
    """
    napari = require_napari()
    from ..io.open import open_volume

    if viewer is None:
        viewer = napari.Viewer(show=show)
    if isinstance(volumes, (str, os.PathLike)) or not isinstance(volumes, Sequence):
        volumes = [volumes]
    for i, vol in enumerate(volumes):
        if isinstance(vol, (str, os.PathLike)):
            for data, meta, kind in read_layers(vol, cache_dir):
                getattr(viewer, f"add_{kind}")(data, **meta)
        else:
            arr = open_volume(vol)
            viewer.add_image(arr, name=f"volume {i}", contrast_limits=_contrast(arr))
    if stream is not None:
        add_samples(viewer, stream, samples, epoch)
    return viewer
