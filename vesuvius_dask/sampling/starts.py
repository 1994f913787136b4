"""Where blocks start, and in which order an epoch visits them.

Everything here is O(1) memory per volume: the valid block starts of a volume are
an index range ``[0, n)`` (:class:`StartGrid` maps an index to ``(z, y, x)``), and an
epoch's order inside a volume is a seeded bijection of that range
(:class:`FeistelPermutation`), never a materialised list or permutation.

:class:`EpochPlan` decides which volume each of the epoch's samples comes from and
the how-many-th draw of that volume it is. It is a pure function of
``(seed, epoch)``: every DataLoader worker computes the same plan and reads only its
own batches, so an epoch has no duplicates and the same blocks whatever the number
of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from ..errors import SamplingError

__all__ = ["StartGrid", "Tiling", "MaskedStartGrid", "footprint_valid", "FeistelPermutation",
           "LocalityPermutation",
           "EpochPlan", "BalancedEpochPlan", "RankSlice", "SAMPLING_METHODS", "ANY_VOXEL", "SALTS"]

SAMPLING_METHODS = ("uniform", "proportional", "grid")

#: A coverage that any one voxel meets: the least fraction above 0 of a block's footprint
#: (``mask_coverage`` / ``positive_coverage`` meaning "any voxel"; :func:`footprint_valid`
#: needs at least one voxel for any coverage above 0).
ANY_VOXEL = 1e-9

#: The salts of an epoch's random streams, all in one place: each stream is seeded with
#: ``[seed, epoch, salt, ...]`` so that the streams are independent of one another. Not a
#: setting: a plan is a pure function of ``(seed, epoch)``, and changing a value here
#: changes every plan drawn with it.
SALTS = MappingProxyType({
    "uniform-volumes": 1,   # EpochPlan, "uniform": the volume of each sample
    "proportional": 2,      # EpochPlan, "proportional": the permutation of all volumes' starts
    "volume-order": 3,      # BlockPlan: the order of one volume's starts (key + [volume])
    "class-slots": 5,       # BalancedEpochPlan: which slots of the epoch are positive
    "locality-runs": 11,    # LocalityPermutation: the order of the runs (after the volume's key)
    "locality-cells": 12,   # LocalityPermutation: the order of the starts inside each cell (likewise)
})

# Plans are generated in fixed segments, so the random stream (and therefore the
# plan) does not depend on the batch size or on the number of workers.
_SEGMENT = 1 << 16


class StartGrid:
    """The valid block starts of one volume, as an index range.

    A start ``(z, y, x)`` is valid when the block lies fully inside the volume and the
    start lies on the stride grid: ``z = iz * stride_z`` with
    ``0 <= z <= Z - z_size`` (likewise for y and x).

    Parameters
    ----------
    shape : tuple of int
        Volume shape ``(Z, Y, X)``.
    block : tuple of int
        Block shape ``(z_size, y_size, x_size)``.
    stride : tuple of int
        Step between starts along each axis.
    name : str
        Volume name for error messages.
    """

    def __init__(self, shape: Sequence[int], block: Sequence[int],
                 stride: Sequence[int], name: str = "volume") -> None:
        self.shape = tuple(int(s) for s in shape)
        self.block = tuple(int(b) for b in block)
        self.stride = tuple(int(s) for s in stride)
        for axis, size, bsize in zip("zyx", self.shape, self.block):
            if bsize > size:
                raise SamplingError(
                    f"{name}: block {axis}_size={bsize} is larger than the volume's {axis} "
                    f"axis ({size}); volume shape {self.shape}, block {self.block}"
                )
        self.counts = tuple(
            (size - b) // s + 1 for size, b, s in zip(self.shape, self.block, self.stride)
        )
        self.n = int(np.prod(self.counts, dtype=object))

    def axis_starts(self, axis: int) -> np.ndarray:
        """The start coordinates along one axis (``counts[axis]`` of them)."""
        return np.arange(self.counts[axis], dtype=np.int64) * self.stride[axis]

    def unravel(self, index: np.ndarray) -> np.ndarray:
        """Map start indices in ``[0, n)`` to ``(k, 3)`` int64 start coordinates."""
        index = np.asarray(index, dtype=np.int64)
        _, ny, nx = self.counts
        iz, rem = np.divmod(index, ny * nx)
        iy, ix = np.divmod(rem, nx)
        return self._coords(iz, iy, ix)

    def _coords(self, iz: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        return np.stack([iz, iy, ix], axis=-1) * np.asarray(self.stride, dtype=np.int64)

    def ravel(self, starts: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`unravel` (for starts on the grid)."""
        idx = np.asarray(starts, dtype=np.int64) // np.asarray(self.stride, dtype=np.int64)
        _, ny, nx = self.counts
        return (idx[..., 0] * ny + idx[..., 1]) * nx + idx[..., 2]

    def __repr__(self) -> str:
        return f"StartGrid(shape={self.shape}, block={self.block}, stride={self.stride}, n={self.n})"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _round(x: np.ndarray, k: np.uint64) -> np.ndarray:
    """Cheap keyed mixing of uint64 arrays (multiply-xorshift)."""
    h = (x ^ k) * np.uint64(0x9E3779B97F4A7C15)
    return h ^ (h >> np.uint64(29))


def _pick(a: Any, idx: np.ndarray) -> Any:
    return a[idx] if isinstance(a, np.ndarray) and a.ndim else a


def _split(n: np.ndarray | int) -> tuple[Any, Any, Any]:
    """Shift and masks of an unbalanced Feistel on ``bit_length(n - 1)`` bits (>= 2)."""
    if isinstance(n, np.ndarray):
        v = np.maximum(n.astype(np.int64) - 1, 1)
        b = np.floor(np.log2(v)).astype(np.int64) + 1  # bit_length, up to float rounding:
        b += (np.left_shift(1, b) <= v)                # fix it in both directions
        b -= (np.left_shift(1, b - 1) > v)
        bits = np.maximum(b, 2).astype(np.uint64)
    else:
        bits = np.uint64(max(2, int(n - 1).bit_length()))
    low = bits // np.uint64(2)
    one = np.uint64(1)
    return low, (one << low) - one, (one << (bits - low)) - one


def _feistel(x: np.ndarray, n: Any, keys: Sequence[Any]) -> np.ndarray:
    """Permute ``x`` (int64) within ``[0, n)`` with a cycle-walking unbalanced Feistel.

    ``n`` and each round key are scalars (one permutation) or arrays aligned with
    ``x`` (one permutation per element).
    """
    shift, mask_lo, mask_hi = _split(n)
    n64 = np.asarray(n, dtype=np.int64).astype(np.uint64) if isinstance(n, np.ndarray) else np.uint64(n)

    def once(v: np.ndarray, idx: np.ndarray) -> np.ndarray:
        sh, lo_m, hi_m = _pick(shift, idx), _pick(mask_lo, idx), _pick(mask_hi, idx)
        hi, lo = v >> sh, v & lo_m
        for i, k in enumerate(keys):
            if i % 2 == 0:
                hi = hi ^ (_round(lo, _pick(k, idx)) & hi_m)
            else:
                lo = lo ^ (_round(hi, _pick(k, idx)) & lo_m)
        return (hi << sh) | lo

    with np.errstate(over="ignore"):
        everything = np.arange(np.size(x))
        y = once(np.asarray(x, dtype=np.int64).astype(np.uint64), everything)
        bad = np.nonzero(y >= _pick(n64, everything))[0]
        while bad.size:
            y[bad] = once(y[bad], bad)
            bad = bad[y[bad] >= _pick(n64, bad)]
    return y.astype(np.int64)


class Tiling(StartGrid):
    """Block starts that tile a volume completely, with overlap, each exactly once.

    Along each axis starts are ``0, step, 2*step, ...`` with ``step = block - overlap``
    while the block fits; when that leaves the far edge uncovered, one more start at
    ``size - block`` is added (the last block is shifted inwards, so it overlaps its
    neighbour more than ``overlap``). Every voxel is covered, no block sticks out.

    Parameters
    ----------
    shape, block : tuple of int
        Volume and block shapes.
    overlap : tuple of int
        Overlap between neighbouring blocks along z, y, x (``0 <= overlap < block``).
    name : str
        Volume name for error messages.
    """

    def __init__(self, shape: Sequence[int], block: Sequence[int], overlap: Sequence[int],
                 name: str = "volume") -> None:
        super().__init__(shape, block, (1, 1, 1), name=name)
        self.overlap = tuple(int(o) for o in overlap)
        self._starts = []
        for axis, size, b, o in zip("zyx", self.shape, self.block, self.overlap):
            if not 0 <= o < b:
                raise SamplingError(
                    f"{name}: overlap along {axis} must be in [0, {b}) for a block of {b}, got {o}")
            starts = list(range(0, size - b + 1, b - o))
            if starts[-1] != size - b:
                starts.append(size - b)
            self._starts.append(np.asarray(starts, dtype=np.int64))
        self.counts = tuple(len(s) for s in self._starts)
        self.n = int(np.prod(self.counts, dtype=object))

    def axis_starts(self, axis: int) -> np.ndarray:
        return self._starts[axis]

    def _coords(self, iz: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        return np.stack([self._starts[0][iz], self._starts[1][iy], self._starts[2][ix]], axis=-1)

    def __repr__(self) -> str:
        return f"Tiling(shape={self.shape}, block={self.block}, overlap={self.overlap}, n={self.n})"


class FeistelPermutation:
    """A seeded bijection of ``[0, n)`` computed on demand, in O(1) memory.

    An unbalanced Feistel network on exactly ``bit_length(n - 1)`` bits (so the
    domain is less than ``2n``) with cycle walking to stay inside ``[0, n)``.
    Evaluating ``k`` indices costs O(k) and needs no table, so it scales to the
    10^9–10^10 block starts of a whole scroll.

    Parameters
    ----------
    n : int
        Size of the domain.
    key : Sequence[int]
        Seed material (any non-negative integers); equal keys give equal permutations.
    rounds : int
        Number of Feistel rounds (alternating halves).
    """

    def __init__(self, n: int, key: Sequence[int], rounds: int = 4) -> None:
        if n < 1:
            raise SamplingError(f"cannot permute an empty range (n={n})")
        if n > 1 << 62:
            raise SamplingError(f"range too large to permute (n={n})")
        self.n = int(n)
        state = np.random.SeedSequence([int(k) for k in key]).generate_state(rounds, np.uint64)
        self.keys = [np.uint64(k) for k in state]

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Return the permuted values of ``index`` (int64 array)."""
        return _feistel(index, self.n, self.keys)


def _ranks(vols: np.ndarray, n_groups: int) -> np.ndarray:
    """For each position, how many earlier positions are of the same volume."""
    order = np.argsort(vols, kind="stable")
    sorted_vols = vols[order]
    counts = np.bincount(sorted_vols, minlength=n_groups)
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = np.empty(vols.size, dtype=np.int64)
    ranks[order] = np.arange(vols.size, dtype=np.int64) - group_start[sorted_vols]
    return ranks


class EpochPlan:
    """Which volume, and which draw of it, each sample of one epoch is.

    The plan is a pure function of ``(n_starts, samples, method, seed, epoch)``.

    * ``uniform``: each sample picks a volume uniformly at random among the volumes
      that still have undrawn starts this epoch.
    * ``proportional``: each sample picks a volume with probability proportional to
      its undrawn starts (equivalently: the epoch is the first ``samples`` items of a
      uniformly random order of all starts of all volumes).

    Parameters
    ----------
    n_starts : Sequence[int]
        Number of valid starts of each volume.
    samples : int
        Samples in the epoch (at most ``sum(n_starts)``).
    method : {"uniform", "proportional"}
        Volume selection rule.
    seed : int
        Non-negative seed.
    epoch : int
        Epoch number; each epoch has its own order.
    """

    def __init__(self, n_starts: Sequence[int], samples: int, method: str,
                 seed: int, epoch: int) -> None:
        if method not in SAMPLING_METHODS:
            raise SamplingError(
                f"unknown sampling_method {method!r}; expected one of {SAMPLING_METHODS}"
            )
        self.n_starts = np.asarray([int(n) for n in n_starts], dtype=np.int64)
        self.samples = int(samples)
        total = int(self.n_starts.sum())
        if self.samples > total:
            raise SamplingError(
                f"samples_per_epoch={self.samples} is more than the {total} block starts "
                f"available ({', '.join(str(int(n)) for n in self.n_starts)} per volume)"
            )
        self.method = method
        self.seed = int(seed)
        self.epoch = int(epoch)

    def segments(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(first_sample, volume_index, draw_rank)`` for consecutive segments.

        ``draw_rank[i]`` counts how many earlier samples of the epoch came from the
        same volume: the sample is that volume's ``draw_rank``-th start this epoch.
        """
        n_vol = self.n_starts.size
        used = np.zeros(n_vol, dtype=np.int64)
        if self.method == "uniform":
            rng = np.random.default_rng([self.seed, self.epoch, SALTS["uniform-volumes"]])
        elif self.method == "grid":  # volume after volume, each in its own order
            offsets = np.concatenate([[0], np.cumsum(self.n_starts)])
        else:
            offsets = np.concatenate([[0], np.cumsum(self.n_starts)])
            union = FeistelPermutation(int(offsets[-1]), [self.seed, self.epoch, SALTS["proportional"]])
        for first in range(0, self.samples, _SEGMENT):
            size = min(_SEGMENT, self.samples - first)
            if self.method == "uniform":
                vols = self._uniform_volumes(rng, used, size)
            elif self.method == "grid":
                vols = np.searchsorted(offsets, np.arange(first, first + size), side="right") - 1
            else:
                g = union(np.arange(first, first + size, dtype=np.int64))
                vols = np.searchsorted(offsets, g, side="right") - 1
            ranks = _ranks(vols, n_vol) + used[vols]
            used += np.bincount(vols, minlength=n_vol)
            yield first, vols, ranks

    def _uniform_volumes(self, rng: np.random.Generator, used: np.ndarray, size: int) -> np.ndarray:
        remaining = self.n_starts - used
        out = np.empty(size, dtype=np.int64)
        filled = 0
        while filled < size:
            active = np.nonzero(remaining > 0)[0]
            draw = active[rng.integers(0, active.size, size=size - filled)]
            # Stop at the first draw that takes a volume past its last start; the
            # exhausted volume leaves the active set and the rest is drawn again.
            ranks = _ranks(draw, self.n_starts.size)
            over = np.nonzero(ranks >= remaining[draw])[0]
            keep = draw if over.size == 0 else draw[: over[0]]
            out[filled:filled + keep.size] = keep
            filled += keep.size
            remaining = remaining - np.bincount(keep, minlength=self.n_starts.size)
        return out

    def batches(self, batch_size: int, select: Callable[[int], bool] | None = None
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(batch_index, volume_index, draw_rank)`` per batch of the epoch.

        Parameters
        ----------
        batch_size : int
            Samples per batch (the last batch may be smaller).
        select : callable, optional
            ``select(batch_index) -> bool``; batches for which it is false are skipped
            (used to give each DataLoader worker its share).
        """
        empty = np.empty(0, dtype=np.int64)
        buf_l, buf_r = empty, empty
        batch = 0
        for _, vols, ranks in self.segments():
            lab = np.concatenate([buf_l, vols])
            rnk = np.concatenate([buf_r, ranks])
            n_full = lab.size // batch_size
            for j in range(n_full):
                if select is None or select(batch):
                    sl = slice(j * batch_size, (j + 1) * batch_size)
                    yield batch, lab[sl], rnk[sl]
                batch += 1
            buf_l, buf_r = lab[n_full * batch_size:], rnk[n_full * batch_size:]
        if buf_l.size and (select is None or select(batch)):
            yield batch, buf_l, buf_r


def _feistel_many(x: np.ndarray, n: np.ndarray, salt: np.ndarray, key: Sequence[int],
                  rounds: int = 4) -> np.ndarray:
    """Element-wise Feistel bijections: ``x[i]`` is permuted within ``[0, n[i])``.

    Each distinct ``salt`` value (e.g. a chunk cell id) gets its own permutation.
    """
    base = np.random.SeedSequence([int(k) for k in key]).generate_state(rounds, np.uint64)
    salt64 = np.asarray(salt, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        keys = [_mix(salt64 * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(k)) for k in base]
    return _feistel(x, np.asarray(n, dtype=np.int64), keys)


class LocalityPermutation:
    """A seeded bijection of a volume's start indices that keeps reads local.

    Starts are grouped by the stored chunk (cell) they fall in, shuffled within
    their cell, and cut into *runs* of ``run`` starts (a run lies in one cell, or
    two). The epoch visits runs in a random order, ``mix`` runs at a time
    interleaved, so consecutive draws come from ``mix`` cells and every decoded
    chunk serves about ``run`` blocks while it is in the cache. Randomness is traded
    for fewer chunk reads: blocks drawn close together in the epoch come from the
    same few chunks. O(number of chunks) memory, plus O(mask) for a masked grid.

    Parameters
    ----------
    grid : StartGrid or MaskedStartGrid
        The volume's valid starts. With a mask, indices are valid-start indices
        (as :meth:`MaskedStartGrid.unravel` takes them) and each cell holds only its
        valid starts.
    bounds : sequence of 3 int64 arrays
        Chunk boundaries (voxels) along z, y, x.
    run : int
        Starts drawn from one cell per visit.
    mix : int
        Runs interleaved at a time.
    key : Sequence[int]
        Seed material.
    """

    def __init__(self, grid: StartGrid | MaskedStartGrid, bounds: Sequence[np.ndarray], run: int,
                 mix: int, key: Sequence[int]) -> None:
        self.grid, self.run, self.mix, self.key = grid, int(run), int(mix), [int(k) for k in key]
        self.masked = isinstance(grid, MaskedStartGrid)
        base = grid.grid if isinstance(grid, MaskedStartGrid) else grid
        # cell edges in start-grid index space, per axis
        self.edges = []
        for a in range(3):
            e = -(-np.asarray(bounds[a], dtype=np.int64) // base.stride[a])  # ceil division
            self.edges.append(np.clip(e, 0, base.counts[a]))
        lens = [np.diff(e) for e in self.edges]
        self.cell_shape = tuple(len(x) for x in lens)
        self.lens = lens
        if isinstance(grid, MaskedStartGrid):
            self._layout = _masked_cells(grid, self.edges[1], self.edges[2])
            yx_sizes = self._layout.valid_counts
        else:
            yx_sizes = (lens[1][:, None] * lens[2][None, :]).ravel()
        sizes = (lens[0][:, None] * yx_sizes[None, :]).ravel()
        self.yx_sizes = yx_sizes
        self.cum = np.concatenate([[0], np.cumsum(sizes)])
        self.n = grid.n
        group = self.run * self.mix
        self.n_groups = self.n // group
        self.runs = FeistelPermutation(max(1, self.n_groups * self.mix), self.key + [SALTS["locality-runs"]])

    def __call__(self, d: np.ndarray) -> np.ndarray:
        """Map draw ranks ``d`` (in ``[0, n)``) to start indices of ``grid``."""
        d = np.asarray(d, dtype=np.int64)
        group = self.run * self.mix
        m = d.copy()
        body = d < self.n_groups * group
        if body.any():
            db = d[body]
            g, q = np.divmod(db, group)
            run_id = self.runs(g * self.mix + q % self.mix)
            m[body] = run_id * self.run + q // self.mix
        # cell-major index -> cell and offset inside the cell
        cell = np.searchsorted(self.cum, m, side="right") - 1
        off = m - self.cum[cell]
        size = self.cum[cell + 1] - self.cum[cell]
        off = _feistel_many(off, size, cell, self.key + [SALTS["locality-cells"]])
        n_yx_cells = self.cell_shape[1] * self.cell_shape[2]
        cz, cyx = np.divmod(cell, n_yx_cells)
        cy, cx = np.divmod(cyx, self.cell_shape[2])
        iz, k = np.divmod(off, self.yx_sizes[cyx])
        gz = self.edges[0][cz] + iz
        # raster position inside the cell's (y, x) rectangle (masked: of its k-th valid one)
        local = self._layout.select(cyx, k) if self.masked else k
        ly, lx = np.divmod(local, self.lens[2][cx])
        gy, gx = self.edges[1][cy] + ly, self.edges[2][cx] + lx
        if isinstance(self.grid, MaskedStartGrid):
            return gz * self.grid.n_yx + self.grid.rank_yx(gy, gx)
        _, ny, nx = self.grid.counts
        return (gz * ny + gy) * nx + gx


class _MaskedCells:
    """Valid ``(y, x)`` grid positions of a masked grid, regrouped by chunk cell.

    The positions of each ``(y, x)`` cell are laid out one cell after another (each
    cell in raster order), with a rank table over 64-position words, so the k-th
    valid position of a cell is found without listing positions. O(mask) memory.
    """

    def __init__(self, valid: np.ndarray, edges_y: np.ndarray, edges_x: np.ndarray) -> None:
        rects = [valid[edges_y[i]:edges_y[i + 1], edges_x[j]:edges_x[j + 1]]
                 for i in range(len(edges_y) - 1) for j in range(len(edges_x) - 1)]
        self.valid_counts = np.array([int(r.sum()) for r in rects], dtype=np.int64)
        self.rect_base = np.concatenate([[0], np.cumsum([r.size for r in rects])]).astype(np.int64)
        self.valid_base = np.concatenate([[0], np.cumsum(self.valid_counts)]).astype(np.int64)
        flat = np.zeros(-(-max(int(self.rect_base[-1]), 1) // 64) * 64, dtype=bool)
        if rects:
            flat[: self.rect_base[-1]] = np.concatenate([r.ravel() for r in rects])
        self._words = flat.reshape(-1, 64)
        self._rank = np.concatenate([[0], np.cumsum(self._words.sum(axis=1))]).astype(np.int64)

    def select(self, cell: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Position (raster order inside its cell) of the ``k``-th valid start of ``cell``."""
        r = self.valid_base[cell] + k
        word = np.searchsorted(self._rank, r, side="right") - 1
        within = r - self._rank[word]
        pos = np.argmax(np.cumsum(self._words[word], axis=1) > within[:, None], axis=1)
        return word * 64 + pos - self.rect_base[cell]


def _masked_cells(grid: MaskedStartGrid, edges_y: np.ndarray, edges_x: np.ndarray) -> _MaskedCells:
    """The cell layout of ``grid`` for these edges (kept on the grid: epochs reuse it)."""
    key = (edges_y.tobytes(), edges_x.tobytes())
    cached = grid._cells.get(key)
    if cached is None:
        cached = grid._cells[key] = _MaskedCells(grid.valid, edges_y, edges_x)
    return cached


def _take_axis(x: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """``x[start:stop]`` along ``axis`` (a view)."""
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _window_sum(a: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Sums of every run of ``width`` consecutive entries along ``axis``.

    Built from windows of doubling widths (binary decomposition of ``width``), so it
    costs O(log width) whole-array additions; numpy's cumsum is much slower here.
    """
    n_out = a.shape[axis] - width + 1

    result = None
    offset = 0
    span = 1
    doubled = a
    remaining = width
    while remaining:
        if remaining & 1:
            part = _take_axis(doubled, axis, offset, offset + n_out)
            result = part.copy() if result is None else np.add(result, part, out=result)
            offset += span
        remaining >>= 1
        if remaining:
            length = doubled.shape[axis]
            doubled = _take_axis(doubled, axis, 0, length - span) + _take_axis(doubled, axis, span, length)
            span *= 2
    assert result is not None
    return result


def _at_starts(a: np.ndarray, starts: np.ndarray, axis: int) -> np.ndarray:
    """``a`` at ``starts`` along ``axis``: a strided view when they are evenly spaced."""
    step = int(starts[1] - starts[0]) if starts.size > 1 else 1
    if step > 0 and np.array_equal(starts, starts[0] + step * np.arange(starts.size)):
        index = [slice(None)] * a.ndim
        index[axis] = slice(int(starts[0]), int(starts[-1]) + 1, step)
        return a[tuple(index)]
    return np.take(a, starts, axis=axis)


def _window_any(a: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Whether any of every run of ``width`` consecutive booleans along ``axis`` is set."""
    n_out = a.shape[axis] - width + 1

    # cover [i, i + width) with two windows of the largest power of two <= width
    span, doubled = 1, a
    while span * 2 <= width:
        length = doubled.shape[axis]
        doubled = _take_axis(doubled, axis, 0, length - span) | _take_axis(doubled, axis, span, length)
        span *= 2
    return _take_axis(doubled, axis, 0, n_out) | _take_axis(doubled, axis, width - span, width - span + n_out)


def footprint_valid(grid: StartGrid, mask: np.ndarray, coverage: float) -> np.ndarray:
    """``(ny, nx)`` booleans: whether ``coverage`` of each grid start's footprint is non-zero.

    Window sums of the footprint on the stride grid: along y, keep the grid rows, then
    along x, keep the grid columns (whole-array adds, no prefix sums). Any coverage > 0
    needs at least one voxel. "Any voxel" and "every voxel" are boolean windows (OR of
    two overlapping power-of-two runs), half the memory traffic of counting.
    """
    _, by, bx = grid.block
    need = max(1, int(np.ceil(coverage * by * bx - 1e-9)))
    ys, xs = grid.axis_starts(1), grid.axis_starts(2)
    if need in (1, by * bx):
        m = np.asarray(mask) != 0
        if need > 1:
            m = ~m  # every voxel set <=> no voxel unset
        vert = np.ascontiguousarray(_at_starts(_window_any(m, by, axis=0), ys, 0))
        del m
        hit = np.ascontiguousarray(_at_starts(_window_any(vert, bx, axis=1), xs, 1))
        return ~hit if need > 1 else hit
    acc = np.uint16 if by * bx < 2**16 else np.uint32
    m = (np.asarray(mask) != 0).astype(acc)
    vert = np.ascontiguousarray(_at_starts(_window_sum(m, by, axis=0), ys, 0))
    del m
    return np.ascontiguousarray(_at_starts(_window_sum(vert, bx, axis=1), xs, 1) >= need)


class MaskedStartGrid:
    """The starts of a :class:`StartGrid` whose footprint a 2-D mask covers.

    Rule: a start ``(z, y, x)`` is valid when at least ``coverage`` of the block's
    ``(y_size, x_size)`` footprint ``mask[y:y+y_size, x:x+x_size]`` is non-zero
    (``coverage=1.0``: fully inside the mask; any ``coverage`` > 0 needs at least one
    voxel). The mask is 2-D, so validity does not depend on z.

    The valid ``(y, x)`` grid is one boolean per grid position plus a rank table
    (one integer per 64 positions): O(mask) memory, never a list of starts. Index
    ``k`` maps to the ``k``-th valid start in raster order, exactly as
    :meth:`StartGrid.unravel` does without a mask.

    Parameters
    ----------
    grid : StartGrid
        The unmasked starts.
    mask : numpy.ndarray
        ``(Y, X)`` array, same height and width as the volume.
    coverage : float
        Fraction of the footprint that must be non-zero, in ``(0, 1]``.
    valid : numpy.ndarray, optional
        The ``(ny, nx)`` valid grid positions, given directly (``mask`` is then
        ignored): how label-balanced sampling splits a grid into classes.
    """

    def __init__(self, grid: StartGrid, mask: np.ndarray | None, coverage: float = 1.0, *,
                 valid: np.ndarray | None = None) -> None:
        self.grid = grid
        self.shape, self.block, self.stride = grid.shape, grid.block, grid.stride
        nz = grid.counts[0]
        self.valid = footprint_valid(grid, mask, coverage) if valid is None else np.asarray(valid, bool)
        flat = np.zeros(-(-self.valid.size // 64) * 64, dtype=bool)
        flat[: self.valid.size] = self.valid.ravel()
        self._words = flat.reshape(-1, 64)
        self._rank = np.concatenate([[0], np.cumsum(self._words.sum(axis=1))]).astype(np.int64)
        self.n_yx = int(self._rank[-1])
        self.counts = grid.counts
        self.n = nz * self.n_yx
        self._cells: dict = {}  # locality layouts by chunk edges (see LocalityPermutation)

    def unravel(self, index: np.ndarray) -> np.ndarray:
        """Map valid-start indices in ``[0, n)`` to ``(k, 3)`` start coordinates."""
        index = np.asarray(index, dtype=np.int64)
        iz, j = np.divmod(index, max(self.n_yx, 1))
        word = np.searchsorted(self._rank, j, side="right") - 1
        r = j - self._rank[word]
        pos = np.argmax(np.cumsum(self._words[word], axis=1) > r[:, None], axis=1)
        iy, ix = np.divmod(word * 64 + pos, self.grid.counts[2])
        return self.grid._coords(iz, iy, ix)

    def rank_yx(self, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        """Index among the valid ``(y, x)`` positions (raster order) of valid grid positions."""
        q = np.asarray(iy, dtype=np.int64) * self.grid.counts[2] + np.asarray(ix, dtype=np.int64)
        word, bit = np.divmod(q, 64)
        before = np.cumsum(self._words[word], axis=1, dtype=np.int64)[np.arange(q.size), bit]
        return self._rank[word] + before - 1  # the position itself is valid: count it out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cells": {}}  # layouts are rebuilt where needed

    def __repr__(self) -> str:
        return f"MaskedStartGrid({self.grid!r}, valid={self.n})"


class BalancedEpochPlan(EpochPlan):
    """An epoch with exactly ``positives`` samples of one class and the rest of the other.

    The draw is over ``2V`` class grids: ``0..V-1`` hold each volume's positive
    starts, ``V..2V-1`` its negative starts. Each class is drawn without replacement
    by its own :class:`EpochPlan` (same ``method`` across volumes), and a seeded
    permutation of the epoch's slots decides which slots are positive: slot ``i`` is
    positive when ``perm(i) < positives``. So the count is exact, the classes are
    interleaved at random, and the plan stays a pure function of ``(seed, epoch)``.

    Parameters
    ----------
    pos_starts, neg_starts : Sequence[int]
        Valid positive and negative starts of each volume.
    samples : int
        Samples in the epoch.
    positives : int
        How many of them are positive.
    method : {"uniform", "proportional"}
        Volume selection rule within each class.
    seed, epoch : int
        As for :class:`EpochPlan`.
    """

    def __init__(self, pos_starts: Sequence[int], neg_starts: Sequence[int], samples: int,
                 positives: int, method: str, seed: int, epoch: int) -> None:
        super().__init__(list(pos_starts) + list(neg_starts), samples, method, seed, epoch)
        self.volumes = len(pos_starts)
        self.positives = int(positives)
        self.pos = EpochPlan(pos_starts, self.positives, method, seed, 2 * epoch)
        self.neg = EpochPlan(neg_starts, self.samples - self.positives, method, seed, 2 * epoch + 1)

    @staticmethod
    def _stream(plan: EpochPlan) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _, vols, ranks in plan.segments():
            yield vols, ranks

    def segments(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        slots = FeistelPermutation(max(self.samples, 1), [self.seed, self.epoch, SALTS["class-slots"]])
        takers = [_Taker(self._stream(self.pos)), _Taker(self._stream(self.neg))]
        for first in range(0, self.samples, _SEGMENT):
            size = min(_SEGMENT, self.samples - first)
            positive = slots(np.arange(first, first + size, dtype=np.int64)) < self.positives
            vols = np.empty(size, dtype=np.int64)
            ranks = np.empty(size, dtype=np.int64)
            for taker, where, offset in ((takers[0], positive, 0), (takers[1], ~positive, self.volumes)):
                lab, rnk = taker.take(int(where.sum()))
                vols[where], ranks[where] = lab + offset, rnk
            yield first, vols, ranks


class _Taker:
    """Consume ``(vols, ranks)`` segments in pieces of any size."""

    def __init__(self, source: Iterator[tuple[np.ndarray, np.ndarray]]) -> None:
        self.source = source
        self.vols = np.empty(0, dtype=np.int64)
        self.ranks = np.empty(0, dtype=np.int64)

    def take(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        while self.vols.size < k:
            lab, rnk = next(self.source)
            self.vols = np.concatenate([self.vols, lab])
            self.ranks = np.concatenate([self.ranks, rnk])
        out = self.vols[:k], self.ranks[:k]
        self.vols, self.ranks = self.vols[k:], self.ranks[k:]
        return out


class RankSlice:
    """One torch.distributed rank's share of an epoch plan, as ``DistributedSampler`` splits.

    Sample ``i`` of the epoch (in plan order) belongs to rank ``i % world``. With
    ``pad``, the epoch is first extended by its own first samples to a multiple of
    ``world``, so every rank gets exactly ``ceil(samples / world)`` samples (fewer
    than ``world`` of them repeated, overall): DDP needs the same number of batches
    on every rank. Without ``pad`` (inference grids) every sample is drawn exactly
    once overall and ranks may differ by one sample.

    Parameters
    ----------
    plan : EpochPlan
        The whole epoch.
    rank, world : int
        This rank and the number of ranks.
    pad : bool
        Pad to equal counts (see above).
    """

    def __init__(self, plan: EpochPlan, rank: int, world: int, pad: bool = True) -> None:
        self.plan, self.rank, self.world = plan, int(rank), int(world)
        n = plan.samples
        self.total = -(-n // self.world) * self.world if pad else n
        self.samples = len(range(self.rank, self.total, self.world))

    def _mine(self, first: int, vols: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = (np.arange(first, first + vols.size) % self.world) == self.rank
        return vols[keep], ranks[keep]

    def segments(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        out = 0
        for first, vols, ranks in self.plan.segments():
            lab, rnk = self._mine(first, vols, ranks)
            yield out, lab, rnk
            out += lab.size
        extra = self.total - self.plan.samples  # positions n.. repeat samples 0..
        if extra > 0:
            for first, vols, ranks in self.plan.segments():
                size = min(vols.size, extra - first)
                if size <= 0:
                    break
                lab, rnk = self._mine(first + self.plan.samples, vols[:size], ranks[:size])
                yield out, lab, rnk
                out += lab.size

    batches = EpochPlan.batches
