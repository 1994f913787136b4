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

import numpy as np

from .errors import SamplingError

__all__ = ["StartGrid", "FeistelPermutation", "EpochPlan", "SAMPLING_METHODS"]

SAMPLING_METHODS = ("uniform", "proportional")

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
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
    label : str
        Volume name for error messages.
    """

    def __init__(self, shape: Sequence[int], block: Sequence[int],
                 stride: Sequence[int], label: str = "volume") -> None:
        self.shape = tuple(int(s) for s in shape)
        self.block = tuple(int(b) for b in block)
        self.stride = tuple(int(s) for s in stride)
        for axis, size, bsize in zip("zyx", self.shape, self.block):
            if bsize > size:
                raise SamplingError(
                    f"{label}: block {axis}_size={bsize} is larger than the volume's {axis} "
                    f"axis ({size}); volume shape {self.shape}, block {self.block}"
                )
        self.counts = tuple(
            (size - b) // s + 1 for size, b, s in zip(self.shape, self.block, self.stride)
        )
        self.n = int(np.prod(self.counts, dtype=object))

    def unravel(self, index: np.ndarray) -> np.ndarray:
        """Map start indices in ``[0, n)`` to ``(k, 3)`` int64 start coordinates."""
        index = np.asarray(index, dtype=np.int64)
        _, ny, nx = self.counts
        iz, rem = np.divmod(index, ny * nx)
        iy, ix = np.divmod(rem, nx)
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


class FeistelPermutation:
    """A seeded bijection of ``[0, n)`` computed on demand, in O(1) memory.

    A balanced Feistel network on the smallest even number of bits covering ``n``,
    with cycle walking to stay inside ``[0, n)``. Evaluating ``k`` indices costs
    O(k) and needs no table, so it scales to the 10^9–10^10 block starts of a
    whole scroll.

    Parameters
    ----------
    n : int
        Size of the domain.
    key : Sequence[int]
        Seed material (any non-negative integers); equal keys give equal permutations.
    rounds : int
        Number of Feistel rounds.
    """

    def __init__(self, n: int, key: Sequence[int], rounds: int = 6) -> None:
        if n < 1:
            raise SamplingError(f"cannot permute an empty range (n={n})")
        if n > 1 << 62:
            raise SamplingError(f"range too large to permute (n={n})")
        self.n = int(n)
        bits = max(2, int(self.n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        state = np.random.SeedSequence([int(k) for k in key]).generate_state(rounds, np.uint64)
        self.keys = [np.uint64(k) for k in state]

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        left = x >> self.half
        right = x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Return the permuted values of ``index`` (int64 array)."""
        x = np.asarray(index, dtype=np.int64).astype(np.uint64)
        with np.errstate(over="ignore"):
            y = self._round_trip(x)
            n = np.uint64(self.n)
            bad = np.nonzero(y >= n)[0]
            while bad.size:
                y[bad] = self._round_trip(y[bad])
                bad = bad[y[bad] >= n]
        return y.astype(np.int64)


def _ranks(labels: np.ndarray, n_groups: int) -> np.ndarray:
    """For each position, how many earlier positions carry the same label."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    counts = np.bincount(sorted_labels, minlength=n_groups)
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = np.empty(labels.size, dtype=np.int64)
    ranks[order] = np.arange(labels.size, dtype=np.int64) - group_start[sorted_labels]
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
            rng = np.random.default_rng([self.seed, self.epoch, 1])
        else:
            offsets = np.concatenate([[0], np.cumsum(self.n_starts)])
            union = FeistelPermutation(int(offsets[-1]), [self.seed, self.epoch, 2])
        for first in range(0, self.samples, _SEGMENT):
            size = min(_SEGMENT, self.samples - first)
            if self.method == "uniform":
                labels = self._uniform_labels(rng, used, size)
            else:
                g = union(np.arange(first, first + size, dtype=np.int64))
                labels = np.searchsorted(offsets, g, side="right") - 1
            ranks = _ranks(labels, n_vol) + used[labels]
            used += np.bincount(labels, minlength=n_vol)
            yield first, labels, ranks

    def _uniform_labels(self, rng: np.random.Generator, used: np.ndarray, size: int) -> np.ndarray:
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
        for _, labels, ranks in self.segments():
            lab = np.concatenate([buf_l, labels])
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
