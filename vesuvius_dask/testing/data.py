"""Synthetic papyrus-like volumes for examples, tests and benchmarks.

Nothing here is real scroll data: :func:`synthetic_papyrus` draws a few curved,
fibrous sheets in air with CT-like noise, which is enough to exercise chunking,
sampling and training code on a machine without the real data.
"""

from __future__ import annotations

import numpy as np

__all__ = ["synthetic_papyrus", "synthetic_ink", "write_segment", "write_tiff_stack"]


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
