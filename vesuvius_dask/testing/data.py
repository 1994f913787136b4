"""Synthetic papyrus-like volumes for examples, tests and benchmarks.

Nothing here is real scroll data: :func:`synthetic_papyrus` draws a few curved,
fibrous sheets in air with CT-like noise, which is enough to exercise chunking,
sampling and training code on a machine without the real data.
"""

from __future__ import annotations

import numpy as np

__all__ = ["synthetic_papyrus", "synthetic_ink", "write_segment", "write_tiff_stack",
           "synthetic_sheet", "write_tifxyz", "write_label_zarr", "write_surface_segments"]


def synthetic_ink(shape_yx: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A 2-D uint8 ink mask (0/1) of a few thick pen strokes."""
    rng = np.random.default_rng(seed)
    h, w = shape_yx
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ink = np.zeros((h, w), dtype=bool)
    for _ in range(max(2, (h * w) // 40000)):
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        length, angle = rng.uniform(0.05, 0.25) * min(h, w), rng.uniform(0, np.pi)
        width = rng.uniform(0.01, 0.025) * min(h, w) + 1
        dy, dx = np.sin(angle), np.cos(angle)
        t = np.clip((yy - cy) * dy + (xx - cx) * dx, -length, length)
        dist = np.hypot(yy - (cy + t * dy), xx - (cx + t * dx))
        ink |= dist < width
    return ink.astype(np.uint8)


def synthetic_papyrus(shape: tuple[int, int, int] = (16, 512, 512), seed: int = 0,
                      ink: np.ndarray | None = None) -> np.ndarray:
    """A uint16 volume of curved papyrus-like sheets with CT-like noise.

    Parameters
    ----------
    shape : tuple of int
        ``(Z, Y, X)``.
    seed : int
        Random seed (same seed, same volume).
    ink : numpy.ndarray, optional
        2-D ``(Y, X)`` mask; where non-zero, the sheets are slightly denser (ink).

    Returns
    -------
    numpy.ndarray
        uint16 volume.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    z = np.arange(nz, dtype=np.float32)[:, None, None]
    vol = rng.normal(11000, 1800, size=shape).astype(np.float32)
    n_sheets = max(1, nz // 6)
    for k in range(n_sheets):
        centre = (k + 0.5) * nz / n_sheets
        amp = rng.uniform(0.5, 1.5) * nz / (3 * n_sheets)
        surface = (centre
                   + amp * np.sin(2 * np.pi * (xx / rng.uniform(200, 400) + rng.uniform()))
                   + 0.5 * amp * np.cos(2 * np.pi * (yy / rng.uniform(150, 350) + rng.uniform())))
        thickness = rng.uniform(0.8, 1.4) * max(1.0, nz / (8 * n_sheets))
        angle = rng.uniform(0, np.pi)
        fibres = 1 + 0.12 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / 7.0)
        density = np.exp(-(((z - surface[None]) / thickness) ** 2)) * fibres[None]
        if ink is not None and k == n_sheets - 1:
            density *= 1 + 0.25 * (ink[None] > 0)
        vol += 26000 * density
    vol += rng.normal(0, 2500, size=shape).astype(np.float32)
    return np.clip(vol, 0, 65535).astype(np.uint16)


def write_segment(folder, shape: tuple[int, int, int] = (16, 256, 256), seed: int = 0,
                  compression: str | None = None) -> dict:
    """Write a synthetic segment folder: surface_volume/NN.tif, mask.png, inklabels.png.

    The mask is an irregular blob covering part of the image; ink strokes lie mostly
    inside it and make the papyrus denser there (so ink is learnable).

    Returns
    -------
    dict
        ``{"volume", "mask", "labels"}`` numpy arrays that were written.
    """
    from pathlib import Path

    from PIL import Image

    root = Path(folder)
    (root / "surface_volume").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radius = 0.42 * min(h, w) * (1 + 0.15 * np.sin(np.arctan2(yy - h / 2, xx - w / 2) * 5
                                                   + rng.uniform(0, 6)))
    mask = (np.hypot(yy - h / 2, xx - w / 2) < radius).astype(np.uint8)
    ink = synthetic_ink((h, w), seed=seed + 1) * mask
    volume = synthetic_papyrus(shape, seed=seed, ink=ink)
    write_tiff_stack(root / "surface_volume", volume, compression=compression)
    Image.fromarray(mask * 255).save(root / "mask.png")
    Image.fromarray(ink * 255).save(root / "inklabels.png")
    return {"volume": volume, "mask": mask, "labels": ink}


def write_tiff_stack(folder, data: np.ndarray, *, width: int | None = None, prefix: str = "",
                     compression: str | None = None, order_seed: int | None = None):
    """Write a 3-D array as a folder of 2-D TIFF layers ``NN.tif`` (the one way tests make them).

    Parameters
    ----------
    folder : str or os.PathLike
        Created if needed.
    data : numpy.ndarray
        ``(Z, Y, X)``; layer ``z`` goes to ``{prefix}{z:0{width}d}.tif``.
    width : int, optional
        Digits of the layer number (default: enough for ``Z - 1``, at least 2).
    prefix : str
        Before the number (``"layer_"``).
    compression : str, optional
        tifffile's ``compression`` (``"zlib"``); default uncompressed (memory-mappable).
    order_seed : int, optional
        Write the layers in a seeded shuffled order, so that listing order is not z
        order (readers must sort by number).

    Returns
    -------
    pathlib.Path
        The folder.
    """
    from pathlib import Path

    import tifffile

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    width = width if width is not None else max(2, len(str(data.shape[0] - 1)))
    order = range(data.shape[0]) if order_seed is None else \
        np.random.default_rng(order_seed).permutation(data.shape[0]).tolist()
    for z in order:
        tifffile.imwrite(root / f"{prefix}{z:0{width}d}.tif", data[z], compression=compression)
    return root


def synthetic_sheet(grid_shape: tuple[int, int], scale: tuple[float, float],
                    volume_shape: tuple[int, int, int], *, seed: int = 0, holes: int = 0
                    ) -> dict[str, np.ndarray]:
    """A curved sheet through a volume as tifxyz grids ``x, y, z`` (float32, level-0 voxels).

    Grid node ``(j, i)`` lies near ``y = 2 + j / sy``, ``x = 2 + i / sx`` (about one voxel
    per full-resolution pixel, slightly stretched) and on ``z = Z/2 + a sin(...)``, a gentle
    wave across the volume. ``holes`` nodes are made invalid (-1, -1, -1), as published.
    """
    rng = np.random.default_rng(seed)
    (h, w), (sx, sy), (nz, _, _) = grid_shape, scale, volume_shape
    j, i = np.mgrid[0:h, 0:w].astype(np.float64)
    x = 2 + i / sx * rng.uniform(0.8, 1.1)
    y = 2 + j / sy * rng.uniform(0.8, 1.1) + 0.05 * x
    z = nz / 2 + nz / 6 * np.sin(2 * np.pi * (x / rng.uniform(40, 80) + rng.uniform())) + 0.02 * y
    grids = {"x": x, "y": y, "z": z}
    bad = rng.choice(h * w, size=min(holes, h * w), replace=False)
    for g in grids.values():
        g.reshape(-1)[bad] = -1.0
    return {k: v.astype(np.float32) for k, v in grids.items()}


def write_tifxyz(folder, x: np.ndarray, y: np.ndarray, z: np.ndarray, scale: tuple[float, float], *,
                 mask: np.ndarray | None = None, meta: dict | None = None):
    """Write a tifxyz folder: ``x.tif``, ``y.tif``, ``z.tif``, ``meta.json`` (and ``mask.tif``).

    ``scale`` is ``(sx, sy)`` and written x first, as published; ``bbox`` is computed
    from the valid points; ``meta`` adds or overrides keys.

    Returns
    -------
    pathlib.Path
        The folder.
    """
    import json
    from pathlib import Path

    import tifffile

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for name, grid in (("x", x), ("y", y), ("z", z)):
        tifffile.imwrite(root / f"{name}.tif", np.asarray(grid, dtype=np.float32))
    if mask is not None:
        tifffile.imwrite(root / "mask.tif", np.asarray(mask, dtype=np.uint8))
    ok = (z > 0) & np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    pts = np.stack([x[ok], y[ok], z[ok]], axis=1) if ok.any() else np.zeros((1, 3))
    info = {"format": "tifxyz", "type": "seg", "uuid": root.name, "scale": [scale[0], scale[1]],
            "bbox": [pts.min(axis=0).tolist(), pts.max(axis=0).tolist()], "area_cm2": 0.0}
    info.update(meta or {})
    (root / "meta.json").write_text(json.dumps(info))
    return root


def write_label_zarr(path, plane: np.ndarray, *, layers: int = 65, levels: int = 3):
    """Write a label Zarr as published: Zarr v2 group of levels ``0``.., "/" keys, plane ``layers // 2``.

    Each level is ``(layers, Y, X)`` (y and x halved per level, nearest neighbour, sizes
    rounded up), zero but for the label on the middle plane, chunks ``(layers, 128,
    128)``, Blosc zstd level 3 with bit-shuffle.

    Returns
    -------
    list of numpy.ndarray
        The label plane of each level.
    """
    import zarr
    from numcodecs import Blosc

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    out = []
    plane = np.asarray(plane)
    for lvl in range(levels):
        img = plane[:: 2 ** lvl, :: 2 ** lvl]
        arr = group.create_array(str(lvl), shape=(layers, *img.shape), dtype=img.dtype,
                                 chunks=(layers, 128, 128), fill_value=0,
                                 chunk_key_encoding={"name": "v2", "separator": "/"},
                                 compressors=Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE))
        arr[layers // 2] = img
        out.append(img)
    return out


def write_surface_segments(root, *, volume_shape: tuple[int, int, int] = (40, 72, 80),
                           grid_shape: tuple[int, int] = (14, 16), scale: tuple[float, float] = (0.25, 0.25),
                           seed: int = 0, rendered: str | None = "zarr") -> dict:
    """Write a scroll volume and one segment in both published trees, for tests and examples.

    Under ``root``: ``scroll.zarr`` (a uint8 :func:`synthetic_papyrus`, chunks 16³);
    the legacy tree ``scroll.volpkg/paths/<id>/`` (``x/y/z.tif``, ``meta.json``,
    ``layers/00..64.tif``, ``<id>_mask.png``, ``<id>_inklabels.png``); and the open-data
    tree ``PHerc0000/segments/<id>/mesh/tifxyz/`` with label Zarrs beside the tifxyz
    files and, by ``rendered``, ``surface-volumes/<name>.zarr`` (``"zarr"``),
    ``<name>.tifs/NN.tif`` (``"tifs"``) or no rendered volume (None). The rendered
    layers are synthetic stand-ins (random), not a render of the sheet.

    Returns
    -------
    dict
        ``volume``, ``x``, ``y``, ``z``, ``layers`` (the stand-in layers), ``mask``,
        ``ink`` (full-resolution 2-D), and the paths ``scroll``, ``legacy``, ``open_data``,
        ``tifxyz``.
    """
    from pathlib import Path

    import zarr
    from PIL import Image

    root = Path(root)
    sid = "20240101000000"
    volume = (synthetic_papyrus(volume_shape, seed=seed) >> 8).astype(np.uint8)
    zarr.create_array(root / "scroll.zarr", data=volume, chunks=(16, 16, 16))
    grids = synthetic_sheet(grid_shape, scale, volume_shape, seed=seed)
    h, w = int(grid_shape[0] / scale[1]), int(grid_shape[1] / scale[0])
    rng = np.random.default_rng(seed)
    layers = rng.integers(0, 255, size=(65, h, w), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 8: -h // 8, w // 8: -w // 8] = 255
    ink = synthetic_ink((h, w), seed=seed + 1) * mask
    legacy = root / "scroll.volpkg" / "paths" / sid
    write_tifxyz(legacy, grids["x"], grids["y"], grids["z"], scale)
    write_tiff_stack(legacy / "layers", layers)
    Image.fromarray(mask).save(legacy / f"{sid}_mask.png")
    Image.fromarray(ink).save(legacy / f"{sid}_inklabels.png")
    open_data = root / "PHerc0000" / "segments" / sid
    tifxyz = write_tifxyz(open_data / "mesh" / "tifxyz", grids["x"], grids["y"], grids["z"], scale)
    write_label_zarr(tifxyz / f"{sid}_inklabels.zarr", ink)
    write_label_zarr(tifxyz / f"{sid}_supervision_mask.zarr", mask)
    name = "7.910um-54keV-volume-scroll"
    if rendered == "zarr":
        zarr.create_array(open_data / "surface-volumes" / f"{name}.zarr", data=layers, chunks=(65, 32, 32))
    elif rendered == "tifs":
        write_tiff_stack(open_data / "surface-volumes" / f"{name}.tifs", layers)
    return {"volume": volume, **grids, "layers": layers, "mask": mask, "ink": ink,
            "scroll": root / "scroll.zarr", "legacy": legacy, "open_data": open_data, "tifxyz": tifxyz}
