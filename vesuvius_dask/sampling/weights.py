"""Weight-map sampling: blocks drawn with probability proportional to a weight volume.

A :class:`WeightMapSampler` takes one weight volume per image volume (numpy, dask,
zarr, or a path ``open_volume`` reads; the image's shape, read lazily once). The
*candidates* are the starts of the stride grid that pass the mask and the coverage
filter; a candidate's weight is the weight at the block's centre voxel ``start +
block // 2`` (``weight_at="centre"``, the semantics of MONAI's ``RandWeightedCrop``
and TorchIO's ``WeightedSampler``) or the mean over the block (``"mean"``).

Each epoch draws exactly ``samples_per_epoch`` distinct candidates, candidate ``i``
with inclusion probability ``π_i = min(1, c·w_i)`` (``c`` such that ``Σ π_i`` is the
sample count: proportional to the weights, except that a candidate heavier than
``1/samples_per_epoch`` of the total is taken every epoch). The draw is systematic
sampling in a random order: a seeded Feistel permutation orders the candidates,
points ``u, u + 1, …`` (one seeded ``u`` in ``[0, 1)``) fall on the cumulative
``π``, so the counts are exact and no candidate is drawn twice; another Feistel
permutation orders the epoch. A pure function of ``(seed, epoch)``: the same set for
any workers and ranks (split per block, padded, as the other samplers).

Memory: 8 bytes per candidate (at most :data:`~.candidates.MAX_CELLS` per volume):
for large volumes give a ``stride`` (e.g. half the block).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidTypeError, ResumeError, SamplingError
from ..io.open import resolve_volume
from .candidates import (
    background_table,
    block_sums,
    centre_values,
    is_background,
    labelled_blocks,
    valid_starts,
)
from .planned import PlannedSampler, draw_seed, my_batches, per_volume, rank_order, warn_no_background
from .starts import ANY_VOXEL, FeistelPermutation, StartGrid

__all__ = ["WeightMapSampler", "WeightPlan", "inclusion_probabilities", "systematic_sample"]

#: Salts of this module's random streams (distinct from :data:`~.starts.SALTS`).
_SALT_CANDIDATES, _SALT_START, _SALT_ORDER = 301, 302, 303
WEIGHT_AT = ("centre", "mean")


def inclusion_probabilities(weights: np.ndarray, count: int) -> np.ndarray:
    """``π = min(1, c·w)`` with ``Σ π = count`` (weights ``>= 0``, at least ``count`` positive)."""
    w = np.asarray(weights, dtype=np.float64)
    pi = np.zeros_like(w)
    certain = np.zeros(w.shape, dtype=bool)
    while True:
        rest = ~certain & (w > 0)
        left = count - int(certain.sum())
        if left <= 0 or not rest.any():
            break
        pi[rest] = left * w[rest] / w[rest].sum()
        over = rest & (pi >= 1)
        if not over.any():
            break
        certain |= over
        pi[certain] = 1.0
    pi[certain] = 1.0
    return pi


def systematic_sample(pi: np.ndarray, count: int, key: Sequence[int]) -> np.ndarray:
    """``count`` distinct indices, index ``i`` with probability ``pi[i]`` (random-order systematic)."""
    certain = np.flatnonzero(pi >= 1.0)
    left = count - certain.size
    if left <= 0:
        return certain[:count]
    n = pi.size
    order = FeistelPermutation(n, list(key) + [_SALT_CANDIDATES])(np.arange(n, dtype=np.int64))
    p = np.where(pi[order] >= 1.0, 0.0, pi[order])
    cum = np.cumsum(p)
    cum *= left / cum[-1]
    cum[-1] = left  # every point u + k (k < left) falls inside
    u = np.random.default_rng(list(key) + [_SALT_START]).random()
    picked = order[np.searchsorted(cum, u + np.arange(left), side="right")]
    return np.concatenate([certain, picked])


def _describe(source: Any) -> Any:
    if source is None or isinstance(source, (str, os.PathLike)):
        return None if source is None else os.fspath(source)
    return f"<array {tuple(getattr(source, 'shape', ()))} {getattr(source, 'dtype', '?')}>"


@dataclass(frozen=True, kw_only=True)
class WeightMapSampler(PlannedSampler):
    """Blocks drawn with probability proportional to a weight volume, exact counts, no repeats.

    See the module notes for the rule. ``weights=None`` weighs every candidate alike:
    uniform sampling among the starts that pass the mask and ``min_label_coverage``
    (a plain coverage filter).

    Parameters
    ----------
    weights : sequence, optional
        One weight volume per stream volume (numpy, dask, zarr, or a path), the
        volume's shape, values ``>= 0`` and finite. Data, so not compared and saved
        in :meth:`state_dict` as its path (or a description of the array).
    weight_at : {"centre", "mean"}
        A block's weight: the weight at its centre voxel ``start + block // 2``
        (default, as MONAI / TorchIO) or the mean over the block.
    volumes : {"proportional", "uniform"}
        ``"proportional"`` (default): the weights as given, comparable across
        volumes. ``"uniform"``: each volume's candidate weights are scaled to the
        same total, so each volume gets the same expected share.
    positive_fraction : float, optional
        Exactly ``round(positive_fraction * samples_per_epoch)`` blocks of each epoch
        with at least ``positive_coverage`` of their label voxels non-zero (needs
        ``labels``), each class drawn by weight.
    positive_coverage : float
        Fraction of the label voxels that makes a block positive (default: any voxel).
    min_label_coverage : float, optional
        Coverage filter (see :class:`~vesuvius_dask.sampling.planned.PlannedSampler`).

    Other fields as for :class:`~vesuvius_dask.sampling.samplers.RandomSampler`;
    ``locality`` is refused (the weights decide the order). ``shuffle=False`` gives
    the epoch's blocks in raster order (the draw stays random).
    """

    weights: Any = field(default=None, compare=False)
    weight_at: str = "centre"
    volumes: str = "proportional"
    positive_fraction: float | None = None
    positive_coverage: float = ANY_VOXEL

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.locality is not None:
            raise SamplingError("WeightMapSampler does not take locality: the weights decide which blocks "
                                "an epoch reads")
        if self.weight_at not in WEIGHT_AT:
            raise SamplingError(f"weight_at must be 'centre' or 'mean', got {self.weight_at!r}")
        if self.volumes not in ("proportional", "uniform"):
            raise SamplingError(f"volumes must be 'proportional' or 'uniform', got {self.volumes!r}")
        if self.weights is not None:
            if isinstance(self.weights, (str, os.PathLike)) or not isinstance(self.weights, Sequence):
                raise InvalidTypeError("weights must be a list with one weight volume per volume")
            if any(isinstance(w, str) and w.startswith("<array") for w in self.weights):
                raise ResumeError("this sampler state held weights given as arrays: make the "
                                  "WeightMapSampler again with the same weights")
            object.__setattr__(self, "weights", tuple(self.weights))
        if self.positive_fraction is not None:
            f = self.positive_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
                raise SamplingError(f"positive_fraction must be in [0, 1], got {f!r}")
        if isinstance(self.positive_coverage, bool) or not 0 < self.positive_coverage <= 1:
            raise SamplingError(f"positive_coverage must be in (0, 1], got {self.positive_coverage!r}")

    def _state_value(self, name: str) -> Any:
        if name == "weights" and self.weights is not None:
            return [_describe(w) for w in self.weights]
        return getattr(self, name)

    def make_plan(self, volumes: Sequence[Any], block: Sequence[int], *, masks: Sequence[Any] | None,
                  labels: Sequence[Any] | None, read_batch: int) -> WeightPlan:
        return WeightPlan(volumes, block, self, masks=masks, labels=labels, read_batch=read_batch)


def _weight_array(source: Any, i: int, vol: Any) -> Any:
    """Weight volume ``i`` as a lazy array of the volume's shape."""
    if isinstance(source, (str, os.PathLike)) or not hasattr(source, "shape"):
        source = resolve_volume(source, name=f"weights[{i}]").array
    if tuple(source.shape) != tuple(vol.shape):
        raise SamplingError(f"weights[{i}]: shape {tuple(source.shape)} does not match the volume {vol.name} "
                            f"{tuple(vol.shape)}")
    return source


class WeightPlan:
    """The epochs of a :class:`WeightMapSampler` (see the module notes).

    Attributes
    ----------
    grids : list
        The valid starts of each volume (mask and coverage filter applied).
    candidate_weights : numpy.ndarray
        The weight of every candidate of every volume (volume after volume, each in
        raster order of its stride grid); 0 for starts that are not valid.
    inclusion : numpy.ndarray
        Each candidate's probability of being drawn in an epoch.
    """

    sampling_method = "weights"

    def __init__(self, volumes: Sequence[Any], block: Sequence[int], sampler: WeightMapSampler, *,
                 masks: Sequence[Any] | None = None, labels: Sequence[Any] | None = None,
                 read_batch: int) -> None:
        self.volumes, self.block = list(volumes), tuple(int(b) for b in block)
        self.read_batch = int(read_batch)
        self.sampler, self.seed = sampler, draw_seed(sampler.seed)
        if sampler.samples_per_epoch is None:
            raise SamplingError("WeightMapSampler needs samples_per_epoch")
        self.samples_per_epoch = sampler.samples_per_epoch
        self.stride = sampler.stride or (1, 1, 1)
        self.positive_fraction = sampler.positive_fraction
        masks, labels = per_volume("masks", masks, volumes), per_volume("labels", labels, volumes)
        weights = per_volume("weights", sampler.weights, volumes)
        if sampler.positive_fraction is not None and labels[0] is None:
            raise SamplingError("positive_fraction needs labels= on the stream")
        self.base = [StartGrid(v.shape, self.block, self.stride, name=f"files[{i}] ({v.name})")
                     for i, v in enumerate(self.volumes)]
        self.grids, parts, classes = [], [], []
        for i, (vol, grid) in enumerate(zip(self.volumes, self.base)):
            name = f"files[{i}] ({vol.name})"
            valid = valid_starts(grid, masks[i], sampler.mask_coverage, labels[i],
                                 sampler.min_label_coverage, name)
            self.grids.append(valid)
            w = self._weights(weights[i], i, vol, grid) * self._valid(valid, grid)
            if sampler.volumes == "uniform" and w.sum() > 0:
                w = w / w.sum()
            parts.append(w.ravel())
            if sampler.positive_fraction is not None:
                pos = labelled_blocks(grid, labels[i], sampler.positive_coverage, name)
                classes.append(np.broadcast_to(pos, grid.counts).ravel())
        self.candidate_weights = np.concatenate(parts)
        self.offsets = np.concatenate([[0], np.cumsum([p.size for p in parts])])
        self._classes = self._split(np.concatenate(classes) if classes else None)
        self._background = None if labels[0] is None else [
            background_table(g, lab, name=f"labels[{i}]")
            for i, (g, lab) in enumerate(zip(self.base, labels))]
        self._epoch: tuple[int, np.ndarray] | None = None
        self.warned = False

    @staticmethod
    def _valid(valid: Any, grid: StartGrid) -> np.ndarray:
        if valid is grid:
            return np.ones(grid.counts, dtype=bool)
        v = valid.valid
        return np.broadcast_to(v, grid.counts) if v.ndim == 2 else v

    def _weights(self, source: Any, i: int, vol: Any, grid: StartGrid) -> np.ndarray:
        if source is None:
            return np.ones(grid.counts, dtype=np.float64)
        array = _weight_array(source, i, vol)
        name = f"weights[{i}]"
        if self.sampler.weight_at == "centre":
            w = centre_values(array, grid, name)
        else:
            w = block_sums(array, grid, name=name) / float(np.prod(self.block))
        if not np.isfinite(w).all() or (w < 0).any():
            raise SamplingError(f"{name}: weights must be finite and >= 0 (found "
                                f"{'negative' if (w < 0).any() else 'non-finite'} values)")
        return w

    def _split(self, positive: np.ndarray | None) -> list[tuple[np.ndarray, int, np.ndarray]]:
        """``(candidate indices, count, inclusion probabilities)`` of each class drawn apart."""
        n, w = self.samples_per_epoch, self.candidate_weights
        if positive is None:
            parts = [(np.arange(w.size, dtype=np.int64), n, "")]
        else:
            k = int(round(self.positive_fraction * n))
            parts = [(np.flatnonzero(positive), k, "positive "),
                     (np.flatnonzero(~positive), n - k, "negative ")]
        out = []
        for idx, count, what in parts:
            have = int((w[idx] > 0).sum())
            if count > have:
                raise SamplingError(
                    f"WeightMapSampler: samples_per_epoch asks for {count} {what}blocks but only {have} "
                    f"{what}candidates have a weight above 0 (stride {self.stride}, mask and coverage "
                    "filter applied); lower samples_per_epoch or the stride")
            out.append((idx, count, inclusion_probabilities(w[idx], count)))
        return out

    @property
    def inclusion(self) -> np.ndarray:
        pi = np.zeros(self.candidate_weights.size)
        for idx, _, p in self._classes:
            pi[idx] = p
        return pi

    # ------------------------------------------------------------------ epochs
    def order(self, epoch: int) -> np.ndarray:
        """The candidates of ``epoch`` (indices into :attr:`candidate_weights`), in plan order."""
        if self._epoch is None or self._epoch[0] != epoch:
            chosen = [idx[systematic_sample(pi, count, [self.seed, epoch, c])]
                      for c, (idx, count, pi) in enumerate(self._classes) if count]
            picked = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
            if self.sampler.shuffle:
                picked = picked[FeistelPermutation(picked.size, [self.seed, epoch, _SALT_ORDER])(
                    np.arange(picked.size, dtype=np.int64))]
            else:
                picked = np.sort(picked)
            self._epoch = (epoch, picked)
        return self._epoch[1]

    def locate(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(volume, (k, 3) starts)`` of candidate indices."""
        vols = np.searchsorted(self.offsets, candidates, side="right") - 1
        starts = np.empty((candidates.size, 3), dtype=np.int64)
        for v in np.unique(vols).tolist():
            sel = vols == v
            starts[sel] = self.base[v].unravel(candidates[sel] - self.offsets[v])
        return vols.astype(np.int64), starts

    def batches(self, epoch: int, part: int = 0, parts: int = 1, start_batch: int = 0,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(volume_index, starts)`` of the batches of ``epoch`` that belong to ``part``.

        Sample ``i`` goes to rank ``i % world_size`` (padded, as ``DistributedSampler``);
        of the rank's batches, batch ``b >= start_batch`` belongs to part ``(b - start_batch) % parts``.
        """
        order = self.order(epoch)
        if self._background is not None and part == 0 and start_batch == 0 and rank == 0:
            self.check_background(epoch)
        mine = rank_order(order, rank, world_size)
        for b in my_batches(-(-mine.size // self.read_batch), part, parts, start_batch):
            yield self.locate(mine[b * self.read_batch:(b + 1) * self.read_batch])

    def check_background(self, epoch: int) -> int:
        """Background blocks (no labelled voxel) of ``epoch``; warns once when there are none."""
        vols, starts = self.locate(self.order(epoch))
        count = sum(int(is_background(self._background[v], self.base[v], starts[vols == v]).sum())
                    for v in np.unique(vols).tolist())
        warn_no_background(self, epoch, count)
        return count

    def epoch_coords(self, epoch: int | None = None) -> np.ndarray:
        """All ``(volume, z, y, x)`` starts of one epoch, in plan order, without reading."""
        vols, starts = self.locate(self.order(epoch or 0))
        return np.column_stack([vols, starts]).astype(np.int64)

    @property
    def starts_per_volume(self) -> list[int]:
        """Candidates with a weight above 0 in each volume."""
        w = self.candidate_weights
        return [int((w[a:b] > 0).sum()) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def __repr__(self) -> str:
        return f"WeightPlan({len(self.volumes)} volumes, {self.candidate_weights.size} candidates)"
