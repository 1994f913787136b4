"""2-D labels of a surface projected into a 3-D block of the scroll, along the normals.

Each labelled pixel (an ink pixel, or a background pixel: supervised and not ink) has
a point ``p`` and a unit normal ``n`` (:meth:`~vesuvius_dask.surfaces.tifxyz.Surface.sample`,
scaled to the volume's level). It is placed at ``p + s * n`` for the offsets

    ``s = -h, -h + d, ..., h``  with  ``d = 2h / ceil(4h) <= 0.5`` voxel

(``h`` the half thickness in voxels of the level; ``h = 0`` places the point alone),
and each position is rasterised to its **nearest voxel**: voxel ``floor(x + 0.5)`` on
every axis (halves go up). Positions outside the block are dropped. The block gets

- ``inklabels``: 1 where an ink pixel landed, else 0;
- ``supervision``: 1 where any labelled pixel landed (ink ∪ background), else 0.

Labels from several surfaces (crossing segments) merge by max: a voxel is ink when any
ink pixel landed in it. Everything is vectorised: one array operation per group of
pixels, no Python loop per pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["normal_offsets", "project_labels"]

#: Largest step between offsets along the normal, in voxels (so the sheet has no holes).
MAX_STEP = 0.5


def normal_offsets(half_thickness: float) -> np.ndarray:
    """The offsets ``s`` along the normal: ``[-h, h]`` in equal steps of at most 0.5 voxel."""
    h = float(half_thickness)
    if h <= 0:
        return np.zeros(1)
    return np.linspace(-h, h, int(np.ceil(2 * h / MAX_STEP)) + 1)


def project_labels(points: np.ndarray, normals: np.ndarray, ink: np.ndarray, half_thickness: float,
                   start: Sequence[int], inklabels: np.ndarray, supervision: np.ndarray,
                   *, group: int = 1 << 20) -> None:
    """Add the projection of labelled pixels to a block (in place, merged by max).

    Parameters
    ----------
    points, normals : numpy.ndarray
        ``(k, 3)`` ``(z, y, x)`` in voxels of the block's level; normals of unit length.
    ink : numpy.ndarray
        ``(k,)`` bool: the pixel is ink (else background).
    half_thickness : float
        ``h`` in voxels of the block's level.
    start : (int, int, int)
        The block's origin in the volume.
    inklabels, supervision : numpy.ndarray
        ``(Z, Y, X)`` uint8 blocks, written where pixels land (set to 1).
    group : int
        Positions computed per array operation (bounds memory).
    """
    if not (inklabels.flags.c_contiguous and supervision.flags.c_contiguous):
        raise ValueError("project_labels writes into C-contiguous blocks only")
    offsets = normal_offsets(half_thickness)
    shape = np.asarray(inklabels.shape, dtype=np.int64)
    origin = np.asarray(start, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    normals = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    ink = np.asarray(ink, dtype=bool).reshape(-1)
    per = max(1, group // offsets.size)
    flat_ink, flat_sup = inklabels.reshape(-1), supervision.reshape(-1)
    for first in range(0, points.shape[0], per):
        sl = slice(first, first + per)
        pos = (points[sl, None, :] - origin) + offsets[None, :, None] * normals[sl, None, :]
        vox = np.floor(pos + 0.5).astype(np.int64)  # nearest voxel, halves up
        inside = np.all((vox >= 0) & (vox < shape), axis=-1)
        idx = (vox[..., 0] * shape[1] + vox[..., 1]) * shape[2] + vox[..., 2]
        flat_sup[idx[inside]] = 1
        flat_ink[idx[inside & ink[sl, None]]] = 1
