"""Where a full-resolution pixel lies on a tifxyz grid, and bilinear upsampling of grid values.

Convention (the ``vesuvius`` Python package's reader): full-resolution pixel ``(r, c)``
lies at grid position ``(r * sy, c * sx)``, where ``(sx, sy)`` is the surface's scale
(``meta.json`` ``"scale"``, x first). Pixel ``(0, 0)`` is grid node ``(0, 0)``; positions
past the last node (the last ``1/s - 1`` pixels of each axis) take the last node's row
or column. (The C++ renderer centres its canvas on the grid's centre instead, about half
a pixel away.) A value between nodes is the bilinear interpolation of the (up to) four
nodes around it; only nodes with a non-zero weight take part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Corners", "corners", "interpolate", "all_set", "full_size"]

#: Grid positions within this of a node count as on it (so 20 * 0.05 is node 1, not 0.999...).
SNAP = 1e-9


def full_size(grid_size: int, scale: float) -> int:
    """Full-resolution pixels along an axis of ``grid_size`` nodes stored at ``scale``: floor(n / s)."""
    return max(1, int(np.floor(grid_size / scale + SNAP)))


@dataclass(frozen=True)
class Corners:
    """The grid nodes around full-resolution pixels and their bilinear weights.

    ``j0, j1`` (rows) and ``i0, i1`` (columns) index the grid; ``wy`` and ``wx`` are the
    weights of ``j1`` and ``i1`` (0 when the pixel lies on a node's row or column).
    """

    j0: np.ndarray
    j1: np.ndarray
    i0: np.ndarray
    i1: np.ndarray
    wy: np.ndarray
    wx: np.ndarray


def _axis(index: np.ndarray, scale: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.clip(np.asarray(index, dtype=np.float64) * scale, 0.0, n - 1)
    lo = np.minimum(np.floor(pos + SNAP), n - 1).astype(np.int64)
    w = pos - lo
    w[w < SNAP] = 0.0
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, w


def corners(rows: np.ndarray, cols: np.ndarray, scale_yx: tuple[float, float],
            grid_shape: tuple[int, int]) -> Corners:
    """The nodes and weights of full-resolution pixels ``(rows, cols)`` (broadcast together)."""
    rows, cols = np.broadcast_arrays(np.asarray(rows), np.asarray(cols))
    j0, j1, wy = _axis(rows, scale_yx[0], grid_shape[0])
    i0, i1, wx = _axis(cols, scale_yx[1], grid_shape[1])
    return Corners(j0, j1, i0, i1, wy, wx)


def interpolate(values: np.ndarray, c: Corners) -> np.ndarray:
    """Bilinear interpolation of grid ``values`` ``(H, W, ...)`` at the pixels of ``c``.

    ``values`` must be finite everywhere: a node of weight 0 still enters as ``0 * v``,
    which is NaN for a NaN ``v`` (so invalid nodes hold 0, see :meth:`Surface.nodes`).
    """
    more = (None,) * (values.ndim - 2)  # weights broadcast over trailing value axes
    wy, wx = c.wy[(..., *more)], c.wx[(..., *more)]
    return ((1 - wy) * ((1 - wx) * values[c.j0, c.i0] + wx * values[c.j0, c.i1])
            + wy * ((1 - wx) * values[c.j1, c.i0] + wx * values[c.j1, c.i1]))


def all_set(flags: np.ndarray, c: Corners) -> np.ndarray:
    """True where every node with a non-zero weight is set in the boolean grid ``flags``."""
    ny, nx = c.wy == 0, c.wx == 0
    return (flags[c.j0, c.i0] & (nx | flags[c.j0, c.i1]) & (ny | flags[c.j1, c.i0])
            & (ny | nx | flags[c.j1, c.i1]))
