"""Candidate block starts for the quota and weight-map samplers: coverage filters, block sums.

The samplers of :mod:`~vesuvius_dask.sampling.quotas` and
:mod:`~vesuvius_dask.sampling.weights` draw from each volume's *valid* starts on its
stride grid. A start is valid when the mask covers ``mask_coverage`` of its footprint
(as for every sampler) and, with ``min_label_coverage``, when at least that fraction
of the block's label voxels is *labelled* (non-zero):

- 2-D labels ``(Y, X)``: the fraction of the ``(y, x)`` footprint that is non-zero
  (the same for every z), so the valid starts stay a
  :class:`~vesuvius_dask.sampling.starts.MaskedStartGrid` (O(mask) memory);
- 3-D labels ``(Z, Y, X)``: the fraction of the block's voxels that are non-zero,
  one boolean per grid start (:class:`ListedStarts`, O(starts on the grid): give a
  ``stride`` for large volumes).

Any coverage above 0 needs at least one labelled voxel. Block sums over lazy (dask
or zarr) volumes are read once, coarsened to cells of ``gcd(block, stride)`` per
axis, then summed over windows (:func:`block_sums`), so only one value per cell is
ever held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import SamplingError
from .starts import ANY_VOXEL, MaskedStartGrid, StartGrid, footprint_valid

__all__ = ["ListedStarts", "block_sums", "centre_values", "valid_starts", "labelled_blocks",
           "background_table", "is_background", "MAX_CELLS"]

#: Most values held per volume for 3-D sums, centre weights or listed starts (8 bytes
#: each): a larger grid is refused with a hint to give a coarser ``stride``.
MAX_CELLS = 1 << 26


class ListedStarts:
    """The valid starts of a :class:`StartGrid` given by a 3-D boolean per grid start.

    Index ``k`` maps to the ``k``-th valid start in raster order (as
    :meth:`StartGrid.unravel` does without a filter). O(grid starts) memory.
    """

    def __init__(self, grid: StartGrid, valid: np.ndarray) -> None:
        self.grid = grid
        self.shape, self.block, self.stride, self.counts = grid.shape, grid.block, grid.stride, grid.counts
        self.valid = np.asarray(valid, dtype=bool).reshape(grid.counts)
        self.index = np.flatnonzero(self.valid).astype(np.int64)
        self.n = int(self.index.size)

    def unravel(self, index: np.ndarray) -> np.ndarray:
        """``(k, 3)`` starts of valid-start indices in ``[0, n)``."""
        return self.grid.unravel(self.index[np.asarray(index, dtype=np.int64)])

    def __repr__(self) -> str:
        return f"ListedStarts({self.grid!r}, valid={self.n})"


def _check_size(what: str, counts: Sequence[int], name: str) -> None:
    n = math.prod(int(c) for c in counts)
    if n > MAX_CELLS:
        raise SamplingError(f"{name}: {what} needs {n} values in memory (more than {MAX_CELLS}); "
                            "give the sampler a coarser stride")


def _lazy(array: Any) -> Any:
    import dask.array as da

    return array if isinstance(array, da.Array) else da.from_array(array, chunks="auto")


def block_sums(array: Any, grid: StartGrid, *, nonzero: bool = False, name: str = "volume") -> np.ndarray:
    """``(nz, ny, nx)`` sums of ``array`` over the block at every start of ``grid``.

    Parameters
    ----------
    array : dask array, zarr array or numpy array
        ``(Z, Y, X)``, the shape of the volume ``grid`` was made for.
    grid : StartGrid
        Block, stride and start counts.
    nonzero : bool
        Count the non-zero voxels (int64) instead of summing the values (float64).
    name : str
        For error messages.
    """
    block, stride, counts = grid.block, grid.stride, grid.counts
    cell = tuple(math.gcd(b, s) for b, s in zip(block, stride))
    extent = tuple((n - 1) * s + b for n, s, b in zip(counts, stride, block))
    _check_size("summing blocks", [e // c for e, c in zip(extent, cell)], name)
    import dask.array as da

    a = _lazy(array)[: extent[0], : extent[1], : extent[2]]
    a = (a != 0).astype(np.int64) if nonzero else a.astype(np.float64)
    if cell != (1, 1, 1):
        a = da.coarsen(np.sum, a, dict(enumerate(cell)))
    sums = np.asarray(a.compute(scheduler="synchronous"))
    for axis in range(3):
        width, step = block[axis] // cell[axis], stride[axis] // cell[axis]
        pad = [(0, 0)] * 3
        pad[axis] = (1, 0)
        cum = np.cumsum(np.pad(sums, pad), axis=axis)
        first = np.arange(counts[axis]) * step
        sums = np.take(cum, first + width, axis=axis) - np.take(cum, first, axis=axis)
    return sums


def centre_values(array: Any, grid: StartGrid, name: str = "volume") -> np.ndarray:
    """``(nz, ny, nx)`` values of ``array`` at the centre voxel ``start + block // 2`` of every start."""
    _check_size("centre weights", grid.counts, name)
    sl = tuple(slice(b // 2, b // 2 + (n - 1) * s + 1, s)
               for b, n, s in zip(grid.block, grid.counts, grid.stride))
    return np.asarray(_lazy(array)[sl].compute(scheduler="synchronous"), dtype=np.float64)


def labelled_blocks(grid: StartGrid, label: Any, coverage: float, name: str = "volume") -> np.ndarray:
    """Whether at least ``coverage`` of each start's label voxels are non-zero.

    ``(ny, nx)`` for 2-D labels (the footprint), ``(nz, ny, nx)`` for 3-D ones; any
    ``coverage`` above 0 needs one labelled voxel.
    """
    if np.ndim(label) == 2:
        return footprint_valid(grid, np.asarray(label), coverage)
    need = max(1, math.ceil(coverage * math.prod(grid.block) - 1e-9))
    return block_sums(label, grid, nonzero=True, name=name) >= need


def valid_starts(grid: StartGrid, mask: Any, mask_coverage: float, label: Any,
                 min_label_coverage: float | None, name: str = "volume") -> Any:
    """The starts of ``grid`` that pass the mask and the coverage filter.

    Returns ``grid`` itself, a :class:`MaskedStartGrid` (2-D rules) or a
    :class:`ListedStarts` (3-D labels).
    """
    valid2d = None if mask is None else footprint_valid(grid, mask, mask_coverage)
    if min_label_coverage is not None:
        if label is None:
            raise SamplingError("min_label_coverage needs labels= on the stream (one label volume per "
                                "volume)")
        labelled = labelled_blocks(grid, label, min_label_coverage, name)
        if labelled.ndim == 3:
            if valid2d is not None:
                labelled &= valid2d[None]
            return ListedStarts(grid, labelled)
        valid2d = labelled if valid2d is None else valid2d & labelled
    return grid if valid2d is None else MaskedStartGrid(grid, None, valid=valid2d)


def background_table(grid: StartGrid, label: Any, name: str = "volume") -> np.ndarray:
    """Whether each grid start's label window holds no labelled voxel: ``(ny, nx)`` or ``(nz, ny, nx)``."""
    return ~labelled_blocks(grid, label, ANY_VOXEL, name)


def is_background(table: np.ndarray, grid: StartGrid, starts: np.ndarray) -> np.ndarray:
    """Look ``starts`` (``(k, 3)``, on ``grid``) up in a :func:`background_table`."""
    idx = np.asarray(starts, dtype=np.int64) // np.asarray(grid.stride, dtype=np.int64)
    if table.ndim == 2:
        return table[idx[:, 1], idx[:, 2]]
    return table[idx[:, 0], idx[:, 1], idx[:, 2]]
