"""Unit normals of a tifxyz grid by central differences, and at full resolution.

At grid node ``(j, i)`` (points ``P`` in ``(x, y, z)``)::

    tx = P[j, i+1] - P[j, i-1]        ty = P[j+1, i] - P[j-1, i]        n = ty x tx / |ty x tx|

as the ``vesuvius`` Python package computes them (``Tifxyz.compute_normals``). The
current C++ tools (volume-cartographer) use ``tx x ty``, the opposite sign; pass
``flip=True`` (``flip_normals=True`` to :func:`~vesuvius_dask.surfaces.tifxyz.open_surface`)
for theirs. A node's normal is undefined on the grid's border and next to an invalid
point (the node itself or one of its four neighbours invalid), as in both.

At full resolution (see :mod:`.grid`), the normal is the bilinear interpolation of the
defined normals of the pixel's nodes (undefined ones weigh 0), scaled back to unit
length; it is undefined where none of its nodes has one.
"""

from __future__ import annotations

import numpy as np

from .grid import Corners, interpolate

__all__ = ["grid_normals", "pixel_normals"]


def grid_normals(points: np.ndarray, valid: np.ndarray, *, flip: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals of a grid of points.

    Parameters
    ----------
    points : numpy.ndarray
        ``(H, W, 3)`` points in ``(z, y, x)`` order (the volume's axes).
    valid : numpy.ndarray
        ``(H, W)`` bool.
    flip : bool
        Use ``tx x ty`` (volume-cartographer's sign) instead of ``ty x tx``.

    Returns
    -------
    normals : numpy.ndarray
        ``(H, W, 3)`` float32 unit normals in ``(z, y, x)`` order, 0 where undefined.
    defined : numpy.ndarray
        ``(H, W)`` bool.
    """
    h, w = valid.shape
    normals = np.zeros((h, w, 3), dtype=np.float32)
    defined = np.zeros((h, w), dtype=bool)
    if h < 3 or w < 3:
        return normals, defined
    xyz = points[..., ::-1].astype(np.float64)
    tx = xyz[1:-1, 2:] - xyz[1:-1, :-2]
    ty = xyz[2:, 1:-1] - xyz[:-2, 1:-1]
    n = np.cross(tx, ty) if flip else np.cross(ty, tx)
    length = np.linalg.norm(n, axis=-1)
    ok = (valid[1:-1, 1:-1] & valid[1:-1, :-2] & valid[1:-1, 2:] & valid[:-2, 1:-1]
          & valid[2:, 1:-1] & (length > 1e-12))
    n = np.where(ok[..., None], n / np.where(ok, length, 1.0)[..., None], 0.0)
    normals[1:-1, 1:-1] = n[..., ::-1]
    defined[1:-1, 1:-1] = ok
    return normals, defined


def pixel_normals(normals: np.ndarray, defined: np.ndarray, c: Corners
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals at full-resolution pixels: interpolated defined normals, renormalised.

    Returns ``(normals (..., 3) float64, defined (...) bool)``.
    """
    n = interpolate(normals.astype(np.float64), c)  # undefined nodes hold 0: they weigh nothing
    length = np.linalg.norm(n, axis=-1)
    ok = length > 1e-9
    return np.where(ok[..., None], n / np.where(ok, length, 1.0)[..., None], 0.0), ok
