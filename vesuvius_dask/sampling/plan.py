"""Which blocks an epoch draws from a set of volumes, and how the draws are split (torch-free).

:class:`BlockPlan` holds one start grid per volume (regular, strided, masked, or an
inference grid) and turns ``(seed, epoch)`` into batches of ``(volume, start)``:
the :class:`~vesuvius_dask.sampling.starts.EpochPlan` picks the volume and the draw rank of
each sample, a per-volume permutation (Feistel, or locality runs) turns ranks into
starts. Batches are split among consumers by index, so any split yields the same
set. The stream, the viewer and ``predict`` all plan through it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from .. import config
from ..arguments import positive_int, positive_triple
from ..errors import SamplingError
from ..io.volume import Volume
from ..lru import LRU
from .starts import (
    ANY_VOXEL,
    SALTS,
    SAMPLING_METHODS,
    BalancedEpochPlan,
    EpochPlan,
    FeistelPermutation,
    LocalityPermutation,
    MaskedStartGrid,
    RankSlice,
    StartGrid,
    Tiling,
    footprint_valid,
)

__all__ = ["BlockPlan", "Starts", "STARTS_GROUP", "DEFAULT_READ_BATCH", "ANY_VOXEL"]

#: Block starts computed per vectorised call (rounded to whole batches): the default of
#: config ``vesuvius-dask.sampling.starts-group``, read by each :meth:`BlockPlan.batches`.
STARTS_GROUP = config.default("sampling.starts-group")
#: Samples per batch of a plan by default: config ``vesuvius-dask.read-batch``, read when
#: this module is imported.
DEFAULT_READ_BATCH = int(config.get("read-batch"))


class Starts(Protocol):
    """What a start grid offers: how many valid starts, and the start of each rank."""

    n: int

    def unravel(self, index: np.ndarray) -> np.ndarray:
        """``(k, 3)`` starts of the ranks ``index``."""


def _check_method(method: str, samples: Any, stride: Any, overlap: Any) -> None:
    if method not in SAMPLING_METHODS:
        raise SamplingError(f"unknown sampling_method {method!r}; expected one of {SAMPLING_METHODS}")
    grid_mode = method == "grid"
    if grid_mode and stride is not None:
        raise SamplingError("stride does not apply to sampling_method='grid'; use overlap")
    if overlap is not None and not grid_mode:
        raise SamplingError("overlap applies to sampling_method='grid' only")
    if samples is None and not grid_mode:
        raise SamplingError("samples_per_epoch is needed unless sampling_method='grid' "
                            "(where None means every grid position)")


def _coverage(value: Any, name: str = "mask_coverage") -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise SamplingError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _seed(seed: Any) -> int:
    """The seed, or a fresh one (drawn once, so pickled copies agree)."""
    value = int(np.random.SeedSequence().entropy) if seed is None else int(seed)
    if value < 0:
        raise SamplingError(f"seed must be non-negative, got {seed}")
    return value


class BlockPlan:
    """The epoch plans of a set of volumes.

    Parameters
    ----------
    volumes : list of Volume
        The volumes.
    block : (int, int, int)
        Block shape.
    samples_per_epoch : int, optional
        Blocks per epoch; ``None`` only with ``sampling_method="grid"`` (every position).
    sampling_method, shuffle, seed, stride, overlap, mask_coverage, locality, locality_mix
        As for :class:`~vesuvius_dask.DaskVesuviusStream`.
    masks : list, optional
        One 2-D numpy mask (or None) per volume, already checked against the volume.
    read_batch : int
        Samples per batch.
    labels_2d : list, optional
        One 2-D numpy label image per volume, for ``positive_fraction``.
    positive_fraction : float, optional
        Exactly ``round(positive_fraction * samples_per_epoch)`` blocks of each epoch
        have at least ``positive_coverage`` of their label footprint positive
        (non-zero); the rest have less. Each class is drawn without replacement.
    positive_coverage : float
        Fraction of the footprint that makes a start positive (default: any voxel).
    """

    def __init__(self, volumes: Sequence[Volume], block: Sequence[int], samples_per_epoch: int | None, *,
                 sampling_method: str = "uniform", shuffle: bool = True, seed: int | None = None,
                 stride: Any = None, overlap: Any = None, masks: Sequence[Any] | None = None,
                 mask_coverage: float = 1.0, locality: int | None = None, locality_mix: int = 8,
                 read_batch: int = DEFAULT_READ_BATCH, labels_2d: Sequence[Any] | None = None,
                 positive_fraction: float | None = None, positive_coverage: float = ANY_VOXEL) -> None:
        _check_method(sampling_method, samples_per_epoch, stride, overlap)
        grid_mode = sampling_method == "grid"
        self.volumes = list(volumes)
        self.block = tuple(int(b) for b in block)
        self.sampling_method = sampling_method
        self.shuffle = bool(shuffle) and not grid_mode  # the grid is visited in order
        self.stride = (1, 1, 1) if stride is None else positive_triple("stride", stride)
        self.overlap = (0, 0, 0) if overlap is None else tuple(
            int(o) for o in ((overlap,) * 3 if isinstance(overlap, (int, np.integer)) else overlap))
        self.read_batch = positive_int("read_batch", read_batch)
        self.locality = None if locality is None else positive_int("locality", locality)
        self.locality_mix = positive_int("locality_mix", locality_mix)
        if self.locality is not None and not self.shuffle:
            raise SamplingError("locality needs shuffle=True (it reorders starts randomly by chunk)")
        self.mask_coverage = _coverage(mask_coverage)
        self.seed = _seed(seed)
        self.grids: list[Any] = [self._grid(i, v, grid_mode) for i, v in enumerate(self.volumes)]
        for i, mask in enumerate(masks or []):
            if mask is not None:
                self.grids[i] = MaskedStartGrid(self.grids[i], mask, self.mask_coverage)
        self.masked = any(isinstance(g, MaskedStartGrid) for g in self.grids)
        total = sum(g.n for g in self.grids)
        self.samples_per_epoch = total if samples_per_epoch is None else positive_int(
            "samples_per_epoch", samples_per_epoch)
        if self.samples_per_epoch > total:
            raise SamplingError(
                f"samples_per_epoch={self.samples_per_epoch} is more than the {total} block "
                f"starts available for block {self.block} and stride {self.stride} "
                f"(per volume: {', '.join(str(g.n) for g in self.grids)})")
        self.positive_fraction = positive_fraction
        self.class_grids = None if positive_fraction is None else self._class_grids(
            masks, labels_2d, positive_fraction, positive_coverage)
        self._perms = LRU(8 * len(self.grids))

    def _class_grids(self, masks: Any, labels_2d: Any, fraction: float, coverage: float) -> list[Any]:
        """Positive then negative start grids of every volume (label-balanced sampling)."""
        if self.sampling_method == "grid":
            raise SamplingError("positive_fraction does not apply to sampling_method='grid'")
        if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 <= fraction <= 1):
            raise SamplingError(f"positive_fraction must be in [0, 1], got {fraction!r}")
        if labels_2d is None or any(lab is None for lab in labels_2d):
            raise SamplingError("positive_fraction needs 2-D labels (labels=...) for every volume")
        coverage = _coverage(coverage, "positive_coverage")
        pos, neg = [], []
        for i, grid in enumerate(self.grids):
            base = grid.grid if isinstance(grid, MaskedStartGrid) else grid
            inside = grid.valid if isinstance(grid, MaskedStartGrid) else True
            ink = footprint_valid(base, labels_2d[i], coverage)
            pos.append(MaskedStartGrid(base, None, valid=ink & inside))
            neg.append(MaskedStartGrid(base, None, valid=~ink & inside))
        self.positives = int(round(fraction * self.samples_per_epoch))
        n_pos, n_neg = sum(g.n for g in pos), sum(g.n for g in neg)
        if self.positives > n_pos or self.samples_per_epoch - self.positives > n_neg:
            raise SamplingError(
                f"positive_fraction={fraction} asks for {self.positives} positive and "
                f"{self.samples_per_epoch - self.positives} negative blocks, but there are "
                f"{n_pos} positive and {n_neg} negative starts (per volume: "
                f"{', '.join(f'{p.n}+{q.n}' for p, q in zip(pos, neg))}; positive_coverage="
                f"{coverage:g}); lower samples_per_epoch or change positive_fraction")
        return pos + neg

    def _grid(self, i: int, vol: Volume, grid_mode: bool) -> Any:
        name = f"files[{i}] ({vol.name})"
        if grid_mode:
            return Tiling(vol.shape, self.block, self.overlap, name=name)
        return StartGrid(vol.shape, self.block, self.stride, name=name)

    @property
    def _draw_grids(self) -> list[Any]:
        return self.grids if self.class_grids is None else self.class_grids

    @property
    def starts_per_volume(self) -> list[int]:
        """Number of valid block starts in each volume."""
        return [g.n for g in self.grids]

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """Volume (class grid, when balanced) and draw rank of every sample of ``epoch``."""
        if self.class_grids is not None:
            v = len(self.grids)
            return BalancedEpochPlan([g.n for g in self.class_grids[:v]], [g.n for g in self.class_grids[v:]],
                                     self.samples_per_epoch, self.positives, self.sampling_method,
                                     self.seed, epoch)
        return EpochPlan(self.starts_per_volume, self.samples_per_epoch, self.sampling_method,
                         self.seed, epoch)

    def starts(self, vols: np.ndarray, ranks: np.ndarray, epoch: int) -> np.ndarray:
        """``(k, 3)`` starts of the samples ``(vols[i], ranks[i])`` of ``epoch``."""
        starts = np.empty((vols.size, 3), dtype=np.int64)
        for v in np.unique(vols).tolist():
            sel = vols == v
            local = ranks[sel]
            if self.shuffle:
                local = self.permutation(epoch, v)(local)
            starts[sel] = self._draw_grids[v].unravel(local)
        return starts

    def permutation(self, epoch: int, v: int) -> Any:
        """The order in which ``epoch`` draws volume ``v``'s starts (memoised)."""
        perm = self._perms.get((epoch, v))
        if perm is None:
            grid, key = self._draw_grids[v], [self.seed, epoch, SALTS["volume-order"], v]
            if self.locality is None:
                perm = FeistelPermutation(grid.n, key)
            else:
                perm = LocalityPermutation(grid, self.volumes[v % len(self.volumes)].bounds,
                                           self.locality, self.locality_mix, key)
            self._perms.put((epoch, v), perm)
        return perm

    def batches(self, epoch: int, part: int = 0, parts: int = 1, start_batch: int = 0,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(volume_index, starts)`` of the batches of ``epoch`` that belong to ``part``.

        With ``world_size > 1`` the epoch is first split among torch.distributed
        ranks as :class:`~vesuvius_dask.sampling.starts.RankSlice` does (padded to equal
        counts, except for inference grids). Then, of this rank's batches, batch
        ``b >= start_batch`` belongs to part ``(b - start_batch) % parts``: the parts
        together yield the rank's share exactly once, in order when read round-robin.
        """
        plan: Any = self.epoch_plan(epoch)
        if world_size > 1:
            plan = RankSlice(plan, rank, world_size, pad=self.sampling_method != "grid")
        selected = plan.batches(
            self.read_batch, select=lambda b: b >= start_batch and (b - start_batch) % parts == part)
        # Starts are computed for several batches at once: the permutations are
        # vectorised, so fewer, larger calls cost less per block.
        group = max(1, int(config.get("sampling.starts-group")) // self.read_batch)
        while True:
            pending = list(itertools.islice(selected, group))
            if not pending:
                return
            vols = np.concatenate([lab for _, lab, _ in pending])
            starts = self.starts(vols, np.concatenate([r for _, _, r in pending]), epoch)
            first = 0
            volumes = len(self.volumes)
            for _, lab, _ in pending:  # class grids map back to their volume
                yield lab % volumes, starts[first:first + lab.size]
                first += lab.size

    def epoch_coords(self, epoch: int | None = None) -> np.ndarray:
        """All ``(volume, z, y, x)`` starts of one epoch, in plan order, without reading."""
        parts = [np.column_stack([vols, starts]) for vols, starts in self.batches(epoch or 0)]
        return np.concatenate(parts).astype(np.int64)

