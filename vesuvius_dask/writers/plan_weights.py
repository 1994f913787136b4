"""Blending weights divided by their sums up front, for a plan that is a full grid.

``PredictionWriter`` outputs ``Σ wᵢ·pᵢ / Σ wᵢ`` per voxel. In general it adds both sums
and divides each chunk at the end. When the plan (:meth:`PredictionWriter.expect`) is a
full grid, the sums of the weights are known before any prediction arrives: the
blending window is separable (``w = wz ⊗ wy ⊗ wx``) and the block starts are the
product of one set of starts per axis (each start repeated ``m`` times, e.g. the
z-rows of a 3-D grid written into a 2-D map), so

    Σ wᵢ(v) = m · Wz(z) · Wy(y) · Wx(x),   W_a(t) = Σ_{u in starts_a} w_a(t - u),

and each block can be weighted by ``wᵢ / Σ w`` right away: the output is then
``Σ pᵢ·(wᵢ / Σ w)``, with no weight totals to add, keep or divide by. Each block's
normalised weights are the outer product of three 1-D profiles (computed in float64,
rounded once to float32), shared by every block with the same profiles (all of the
interior of a grid). The result equals the divided sums up to float32 rounding (a few
units in the last place), and where one block covers a voxel it is that block's
prediction exactly (its weight divided by itself is 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..lru import LRU

__all__ = ["PlanWeights", "blend_profile"]


def blend_profile(n: int, blend: str) -> np.ndarray:
    """The 1-D blending profile of ``n`` voxels (float64): ``"hann"`` at voxel centres, ``"mean"`` ones."""
    if blend == "mean":
        return np.ones(n, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(n) + 0.5) / n)


class PlanWeights:
    """Per-block blending weights over their sums, for a plan that is a full, covering grid.

    Use :meth:`of`, which returns None for any other plan.

    Parameters
    ----------
    shape, block : tuple of int
        Output and block shapes.
    axis_starts : list of 1-D int arrays
        The sorted distinct starts along each axis.
    multiplicity : int
        How many times the plan holds each grid position.
    blend : str
        ``"hann"`` or ``"mean"`` (see :func:`blend_profile`).
    cache_bytes : int
        Normalised block weights kept (least recently used dropped, recomputed when needed).
    """

    def __init__(self, shape: Sequence[int], block: Sequence[int], axis_starts: list[np.ndarray],
                 multiplicity: int, blend: str, cache_bytes: int = 64 * 2**20) -> None:
        self.shape, self.block = tuple(shape), tuple(block)
        self.multiplicity = int(multiplicity)
        self.axis_starts = [np.asarray(u, dtype=np.int64) for u in axis_starts]
        #: grid positions (the product of the axes' starts)
        self.cells = int(np.prod([len(u) for u in self.axis_starts]))
        self._profiles: list[dict[int, int]] = []   # per axis: start -> profile id
        self._values: list[list[np.ndarray]] = []   # per axis: profile id -> w_a / W_a (float64)
        for n, b, starts in zip(self.shape, self.block, axis_starts):
            w = blend_profile(b, blend)
            total = np.zeros(n, dtype=np.float64)
            for u in starts.tolist():
                total[u:u + b] += w
            ids: dict[bytes, int] = {}
            values: list[np.ndarray] = []
            by_start = {}
            for u in starts.tolist():
                q = w / total[u:u + b]
                key = q.tobytes()
                if key not in ids:
                    ids[key] = len(values)
                    values.append(q)
                by_start[u] = ids[key]
            self._profiles.append(by_start)
            self._values.append(values)
        self._cache = LRU(cache_bytes, size=lambda a: int(a.nbytes))

    @classmethod
    def of(cls, starts: np.ndarray, shape: Sequence[int], block: Sequence[int], blend: str,
           cache_bytes: int = 64 * 2**20) -> PlanWeights | None:
        """The plan's weights when ``starts`` (``(N, ndim)``) is a full grid covering ``shape``, else None.

        A full grid: the starts are every combination of one set of starts per axis,
        each combination the same number of times, and the blocks cover every voxel.
        """
        starts = np.asarray(starts, dtype=np.int64).reshape(-1, len(shape))
        if len(starts) == 0 or blend not in ("hann", "mean"):
            return None
        axis_starts = [np.unique(starts[:, a]) for a in range(len(shape))]
        cells = int(np.prod([len(u) for u in axis_starts]))
        if len(starts) % cells:
            return None
        for u, b, n in zip(axis_starts, block, shape):  # every voxel covered along each axis
            ends = np.maximum.accumulate(u + b)
            if u[0] > 0 or ends[-1] < n or (u[1:] > ends[:-1]).any():
                return None
        index = np.ravel_multi_index(
            tuple(np.searchsorted(u, starts[:, a]) for a, u in enumerate(axis_starts)),
            tuple(len(u) for u in axis_starts))
        counts = np.bincount(index, minlength=cells)
        if counts.min() != counts.max() or counts[0] > np.iinfo(np.uint16).max:
            return None
        return cls(shape, block, axis_starts, int(counts[0]), blend, cache_bytes)

    def same_plan(self, other: PlanWeights | None) -> bool:
        """Whether ``other`` is the same grid, as often."""
        return (other is not None and other.multiplicity == self.multiplicity
                and all(np.array_equal(a, b) for a, b in zip(self.axis_starts, other.axis_starts)))

    def cell(self, starts: np.ndarray) -> np.ndarray:
        """The raster index on the grid of each of ``starts`` (``(N, ndim)``); KeyError: not on it."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1, len(self.shape))
        where = []
        for a, u in enumerate(self.axis_starts):
            i = np.minimum(np.searchsorted(u, starts[:, a]), len(u) - 1)
            bad = u[i] != starts[:, a]
            if bad.any():
                raise KeyError(tuple(int(v) for v in starts[int(np.argmax(bad))]))
            where.append(i)
        return np.ravel_multi_index(tuple(where), tuple(len(u) for u in self.axis_starts))

    def weights(self, start: Sequence[int]) -> np.ndarray:
        """The float32 weights (``wᵢ / Σ w``) of the block at ``start`` (shared: not to be changed)."""
        key = tuple(p[int(s)] for p, s in zip(self._profiles, start))
        w = self._cache.get(key)
        if w is None:
            w = np.ones((), dtype=np.float64) / self.multiplicity
            for a, k in enumerate(key):
                w = np.multiply.outer(w, self._values[a][k])
            w = w.astype(np.float32)
            self._cache.put(key, w)
        return w
