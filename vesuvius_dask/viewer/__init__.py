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

__all__ = ["read_layers", "is_volume_path", "sample_boxes", "add_samples", "show"]

#: One colour per volume for sample boxes (cycled).
COLORS = ("#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#bf5af2", "#ff9f0a", "#64d2ff")


def _napari() -> Any:
    try:
        import napari
    except ImportError as err:
        raise ImportError(
            "the viewer needs napari: pip install 'vesuvius-dask[viewer]'") from err
    return napari


def is_volume_path(path: Any) -> bool:
    """True for a Zarr array, an OME-Zarr multiscale group, a TIFF layer folder or a segment folder."""
    from ..inference import _is_segment_folder
    from ..volumes import _non_zarr_kind, is_zarr_node

    p = Path(os.fspath(path))
    if not p.is_dir():
        return False
    if is_zarr_node(p):
        import zarr

        node = zarr.open(str(p), mode="r")
        if isinstance(node, zarr.Array):
            return node.ndim == 3
        from ..volumes import _multiscale_paths

        return _multiscale_paths(node.attrs.asdict()) is not None
    return _is_segment_folder(p) or _non_zarr_kind(p) == "tiff"


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


def read_layers(path: Any) -> list[tuple[Any, dict, str]]:
    """napari layer data for a volume path: ``[(data, metadata, layer_type), ...]``.

    A Zarr array gives one lazy image layer; an OME-Zarr group a multiscale image
    layer (one dask array per level); a folder of TIFF layers one lazy image layer
    (memory-mapped layers); a segment folder its volume plus ``mask`` and
    ``inklabels`` as labels layers.
    """
    import zarr

    from ..volumes import _multiscale_paths, _non_zarr_kind, is_zarr_node, open_volume

    if isinstance(path, (list, tuple)):
        path = path[0]
    text = os.fspath(path)
    name = text.rstrip("/").rsplit("/", 1)[-1]
    if "://" in text or is_zarr_node(Path(text)):  # local or remote (fsspec URL) Zarr
        node = zarr.open(text, mode="r")
        if isinstance(node, zarr.Array):
            vol = open_volume(text)
            return [(vol, {"name": name, "contrast_limits": _contrast(vol)}, "image")]
        n_levels = len(_multiscale_paths(node.attrs.asdict()) or [])
        levels = [open_volume(text, level=k) for k in range(n_levels)]
        return [(levels, {"name": name, "multiscale": True,
                          "contrast_limits": _contrast(levels[-1])}, "image")]
    p = Path(text)
    if _non_zarr_kind(p) == "tiff":
        vol = open_volume(p)
        return [(vol, {"name": name, "contrast_limits": _contrast(vol)}, "image")]
    from ..segment import open_segment

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


def add_samples(viewer: Any, stream: Any, n: int | None = 100, epoch: int | None = None) -> list:
    """Add one Shapes layer per volume with the stream's next ``n`` block outlines."""
    layers = []
    for v, rects in sorted(sample_boxes(stream, n, epoch).items()):
        color = COLORS[v % len(COLORS)]
        layers.append(viewer.add_shapes(
            rects, shape_type="rectangle", edge_color=color, face_color="transparent",
            edge_width=2, name=f"samples: volume {v}"))
    return layers


def show(volumes: Sequence[Any] | Any, stream: Any = None, *, samples: int | None = 100,
         epoch: int | None = None, viewer: Any = None, show: bool = True) -> Any:
    """Open volumes lazily in napari, with the stream's sample boxes on top.

    Parameters
    ----------
    volumes : path, array or sequence of them
        Zarr / OME-Zarr / segment paths, or arrays (numpy, dask, zarr).
    stream : DaskVesuviusStream, optional
        Draw where it will sample its next ``samples`` blocks.
    samples : int, optional
        How many blocks to outline (None: the whole epoch).
    epoch : int, optional
        Which epoch's plan (default: the one the next iteration uses).
    viewer : napari.Viewer, optional
        Add to this viewer instead of making one.
    show : bool
        Show the window (False for scripts and tests without a screen).

    Returns
    -------
    napari.Viewer
    """
    napari = _napari()
    from ..volumes import open_volume

    if viewer is None:
        viewer = napari.Viewer(show=show)
    if isinstance(volumes, (str, os.PathLike)) or not isinstance(volumes, Sequence):
        volumes = [volumes]
    for i, vol in enumerate(volumes):
        if isinstance(vol, (str, os.PathLike)):
            for data, meta, kind in read_layers(vol):
                getattr(viewer, f"add_{kind}")(data, **meta)
        else:
            arr = open_volume(vol)
            viewer.add_image(arr, name=f"volume {i}", contrast_limits=_contrast(arr))
    if stream is not None:
        add_samples(viewer, stream, samples, epoch)
    return viewer
