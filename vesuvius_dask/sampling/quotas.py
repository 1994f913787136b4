"""Group quotas per batch: exact counts from each group of volumes, hierarchical weights inside.

A :class:`QuotaSampler` says how many blocks of every batch come from each *group* of
volumes (e.g. the segments of one scroll): ``quotas={"scroll1": 29, "scroll2": 22,
"scroll3": 11, "scroll4": 2}`` gives batches of 64 with exactly those counts, every
batch. Inside a group the epoch's draws are split among its volumes by
``volume_weights`` (``"equal"``: the same count per volume, so a large segment does
not drown a small one; ``"size"``: in proportion to their valid starts; or given
weights), as exact per-epoch counts (largest remainders; a volume with fewer starts
than its share gives the rest to the others).

The plan (:class:`QuotaPlan`) is a pure function of ``(seed, epoch)`` and O(1) memory
per volume: slot ``j`` of group ``g`` in batch ``b`` is the group's draw ``b·q_g + j``,
a seeded Feistel permutation of the group's draws turns it into (volume, how-many-th
draw of it), and the volume's own permutation into a start. So any batch is computed
on its own, and workers and ranks read exactly their batches.

Ranks get whole batches (batch ``b`` to rank ``b % world_size``, padded with the
epoch's first batches to a multiple of ``world_size``), unlike the other samplers'
per-block split, so every rank's batches hold the quotas exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidTypeError, SamplingError
from ..lru import LRU
from .candidates import ListedStarts, background_table, is_background, valid_starts
from .planned import PlannedSampler, draw_seed, my_batches, per_volume, warn_no_background
from .starts import SALTS, FeistelPermutation, LocalityPermutation, StartGrid

__all__ = ["QuotaSampler", "QuotaPlan", "apportion"]

#: Salts of this module's random streams (distinct from :data:`~.starts.SALTS`).
_SALT_GROUP, _SALT_MIX = 201, 202
#: Batches whose starts are computed per vectorised call.
_GROUP_BATCHES = 16


def apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> np.ndarray:
    """``total`` split in proportion to ``weights``, each at most its cap (largest remainders).

    Volumes whose share exceeds their cap get the cap, and the rest is split again
    among the others. Deterministic (ties go to the lower index).
    """
    w = np.asarray(weights, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    counts = np.zeros(w.size, dtype=np.int64)
    fixed = (w <= 0) | (caps <= 0)
    while True:
        left = total - int(counts[fixed].sum())
        active = ~fixed
        if left == 0 or not active.any():
            break
        share = left * w[active] / w[active].sum()
        over = share > caps[active]
        if over.any():
            idx = np.flatnonzero(active)[over]
            counts[idx], fixed[idx] = caps[idx], True
            continue
        floor = np.floor(share).astype(np.int64)
        extra = left - int(floor.sum())
        order = np.argsort(-(share - floor), kind="stable")[:extra]
        floor[order] += 1
        counts[active] = floor
        break
    if int(counts.sum()) != total:
        raise SamplingError(f"cannot draw {total} blocks from volumes with {caps.tolist()} starts "
                            f"(weights {w.tolist()})")
    return counts


def _counts(name: str, quotas: Any) -> dict[str, int]:
    if not isinstance(quotas, Mapping) or not quotas:
        raise InvalidTypeError(f"{name} must be a non-empty dict of group name -> blocks per batch, "
                               f"got {quotas!r}")
    out = {}
    for key, count in quotas.items():
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise SamplingError(f"{name}[{key!r}] must be a non-negative integer, got {count!r}")
        out[str(key)] = int(count)
    if sum(out.values()) == 0:
        raise SamplingError(f"{name} sum to 0: give at least one block per batch")
    return out


def _groups(groups: Any, quotas: dict[str, int]) -> dict[str, tuple[int, ...]]:
    if not isinstance(groups, Mapping):
        raise InvalidTypeError(f"groups must be a dict of group name -> volume indices, got {groups!r}")
    out = {str(k): tuple(int(i) for i in v) for k, v in groups.items()}
    if set(out) != set(quotas):
        raise SamplingError(f"groups {sorted(out)} and quotas {sorted(quotas)} must name the same groups")
    seen = [i for v in out.values() for i in v]
    if len(seen) != len(set(seen)) or any(i < 0 for i in seen) or any(not v for v in out.values()):
        raise SamplingError(f"groups must hold disjoint, non-empty lists of volume indices >= 0, got {out}")
    return out


def _volume_weights(weights: Any) -> Any:
    if isinstance(weights, str):
        if weights not in ("equal", "size"):
            raise SamplingError(f"volume_weights must be 'equal', 'size' or one weight per volume, got "
                                f"{weights!r}")
        return weights
    values = tuple(float(w) for w in weights)
    if any(not np.isfinite(w) or w < 0 for w in values):
        raise SamplingError(f"volume_weights must be finite and >= 0, got {values}")
    return values


@dataclass(frozen=True, kw_only=True)
class QuotaSampler(PlannedSampler):
    """Exact counts per batch from each group of volumes; hierarchical weights inside a group.

    Every batch holds exactly ``quotas[g]`` blocks of group ``g``; each group's blocks
    are drawn without replacement in the epoch, and split among the group's volumes
    by ``volume_weights`` (exact per-epoch counts). Needs the stream's ``batch_size``
    (or ``read_batch``) equal to ``sum(quotas.values())`` and ``samples_per_epoch`` a
    multiple of it.

    Parameters
    ----------
    quotas : dict of str to int
        Blocks per batch from each group (required), e.g. ``{"scroll1": 29, "scroll2": 22,
        "scroll3": 11, "scroll4": 2}`` for batches of 64.
    groups : dict of str to sequence of int, optional
        The volumes (indices into the stream's ``files``) of each group, disjoint;
        volumes in no group are never drawn. ``None``: one group per volume, in the
        order of ``quotas`` (then ``len(quotas)`` must be the number of volumes).
    volume_weights : {"equal", "size"} or sequence of float
        How a group's draws are split among its volumes: ``"equal"`` (default, the
        same count each), ``"size"`` (in proportion to their valid starts), or one
        weight per volume of ``files`` (only the group's volumes' weights matter).
    min_label_coverage : float, optional
        Coverage filter (see :class:`~vesuvius_dask.sampling.planned.PlannedSampler`).

    Other fields as for :class:`~vesuvius_dask.sampling.samplers.RandomSampler`
    (``locality`` only without a 3-D coverage filter).

    Examples
    --------
    >>> sampler = QuotaSampler(640, quotas={"a": 40, "b": 24}, groups={"a": [0, 1], "b": [2]}, seed=0)
    >>> sampler.batch_size
    64
    """

    quotas: dict = field(default_factory=dict)
    groups: dict | None = None
    volume_weights: Any = "equal"

    def __post_init__(self) -> None:
        super().__post_init__()
        quotas = _counts("quotas", self.quotas)
        object.__setattr__(self, "quotas", quotas)
        if self.groups is not None:
            object.__setattr__(self, "groups", _groups(self.groups, quotas))
        object.__setattr__(self, "volume_weights", _volume_weights(self.volume_weights))
        if self.samples_per_epoch is not None and self.samples_per_epoch % self.batch_size:
            raise SamplingError(f"samples_per_epoch={self.samples_per_epoch} is not a multiple of the "
                                f"quotas' batch of {self.batch_size}")

    @property
    def batch_size(self) -> int:
        """Blocks per batch: the sum of the quotas."""
        return sum(self.quotas.values())

    def make_plan(self, volumes: Sequence[Any], block: Sequence[int], *, masks: Sequence[Any] | None,
                  labels: Sequence[Any] | None, read_batch: int) -> QuotaPlan:
        return QuotaPlan(volumes, block, self, masks=masks, labels=labels, read_batch=read_batch)


class QuotaPlan:
    """The epochs of a :class:`QuotaSampler` over a set of volumes (see the module notes).

    Attributes
    ----------
    grids : list
        The valid starts of each volume (mask and coverage filter applied).
    draws : dict of str to numpy.ndarray
        Each group's per-epoch draws of each of its volumes (``group_volumes``).
    """

    sampling_method = "quotas"
    positive_fraction = None

    def __init__(self, volumes: Sequence[Any], block: Sequence[int], sampler: QuotaSampler, *,
                 masks: Sequence[Any] | None = None, labels: Sequence[Any] | None = None,
                 read_batch: int) -> None:
        self.volumes, self.block = list(volumes), tuple(int(b) for b in block)
        self.batch = sampler.batch_size
        if read_batch != self.batch:
            raise SamplingError(f"QuotaSampler: the quotas make batches of {self.batch}; give the stream "
                                f"batch_size={self.batch} (got batches of {read_batch})")
        if sampler.samples_per_epoch is None:
            raise SamplingError("QuotaSampler needs samples_per_epoch (a multiple of its batch)")
        self.read_batch, self.samples_per_epoch = read_batch, sampler.samples_per_epoch
        self.batches_per_epoch = self.samples_per_epoch // self.batch
        self.seed = draw_seed(sampler.seed)
        self.sampler = sampler
        self.stride = sampler.stride or (1, 1, 1)
        masks, labels = per_volume("masks", masks, volumes), per_volume("labels", labels, volumes)
        self.grids = [valid_starts(StartGrid(v.shape, self.block, self.stride, name=f"files[{i}] ({v.name})"),
                                   masks[i], sampler.mask_coverage, labels[i], sampler.min_label_coverage,
                                   name=f"files[{i}] ({v.name})") for i, v in enumerate(self.volumes)]
        if sampler.locality is not None and any(isinstance(g, ListedStarts) for g in self.grids):
            raise SamplingError("QuotaSampler: locality does not combine with a coverage filter on "
                                "3-D labels")
        self.group_volumes = self._groups(sampler)
        self.draws = {g: self._draws(sampler, g, vols) for g, vols in self.group_volumes.items()}
        self._cum = {g: np.concatenate([[0], np.cumsum(d)]) for g, d in self.draws.items()}
        self._background = None if labels[0] is None else [
            background_table(self._base(g), lab, name=f"labels[{i}]") for i, (g, lab) in
            enumerate(zip(self.grids, labels))]
        self._perms = LRU(8 * len(self.grids) + 8)
        self.warned = False

    @staticmethod
    def _base(grid: Any) -> StartGrid:
        return grid.grid if hasattr(grid, "grid") else grid

    def _groups(self, sampler: QuotaSampler) -> dict[str, np.ndarray]:
        n = len(self.volumes)
        if sampler.groups is None:
            if len(sampler.quotas) != n:
                raise SamplingError(f"QuotaSampler without groups needs one quota per volume: "
                                    f"{len(sampler.quotas)} quotas for {n} volumes")
            return {g: np.array([i]) for i, g in enumerate(sampler.quotas)}
        bad = [i for v in sampler.groups.values() for i in v if i >= n]
        if bad:
            raise SamplingError(f"QuotaSampler groups name volume {bad[0]}, but there are {n} volumes")
        return {g: np.asarray(sampler.groups[g], dtype=np.int64) for g in sampler.quotas}

    def _draws(self, sampler: QuotaSampler, group: str, vols: np.ndarray) -> np.ndarray:
        starts = [self.grids[v].n for v in vols]
        if isinstance(sampler.volume_weights, str):
            weights = starts if sampler.volume_weights == "size" else [1.0] * len(vols)
        else:
            if len(sampler.volume_weights) != len(self.volumes):
                raise SamplingError(f"volume_weights has {len(sampler.volume_weights)} entries for "
                                    f"{len(self.volumes)} volumes; give one per volume")
            weights = [sampler.volume_weights[v] for v in vols]
        total = sampler.quotas[group] * self.batches_per_epoch
        if total and not isinstance(sampler.volume_weights, str) and not any(w > 0 for w in weights):
            raise SamplingError(f"group {group!r} needs {total} blocks per epoch ({sampler.quotas[group]} "
                                f"per batch) but volume_weights of its volumes {vols.tolist()} are "
                                f"{[float(w) for w in weights]}: give one of them a weight above 0 "
                                "(or the group a quota of 0)")
        if total > sum(s for s, w in zip(starts, weights) if w > 0):
            zero = [int(v) for v, w in zip(vols, weights) if not w > 0]
            note = f" (volumes {zero} weigh 0: never drawn)" if zero else ""
            raise SamplingError(f"group {group!r} needs {total} blocks per epoch ({sampler.quotas[group]} "
                                f"per batch x {self.batches_per_epoch} batches) but its volumes "
                                f"{vols.tolist()} have {starts} valid starts{note}; lower samples_per_epoch")
        return apportion(total, weights, starts)

    # ------------------------------------------------------------------ epochs
    def permutation(self, epoch: int, v: int) -> Any:
        """The order in which ``epoch`` draws volume ``v``'s valid starts (memoised)."""
        perm = self._perms.get((epoch, v))
        if perm is None:
            grid, key = self.grids[v], [self.seed, epoch, SALTS["volume-order"], v]
            if self.sampler.locality is None:
                perm = FeistelPermutation(grid.n, key)
            else:
                perm = LocalityPermutation(grid, self.volumes[v].bounds, self.sampler.locality,
                                           self.sampler.locality_mix, key)
            self._perms.put((epoch, v), perm)
        return perm

    def batch_draws(self, epoch: int, batches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(vols, ranks)``, each ``(len(batches), batch)``: volume and draw rank of every slot."""
        vols = np.empty((batches.size, self.batch), dtype=np.int64)
        ranks = np.empty_like(vols)
        col = 0
        for g, (name, q) in enumerate(self.sampler.quotas.items()):
            if q == 0:
                continue
            slots = (batches[:, None] * q + np.arange(q)).ravel()
            cum = self._cum[name]
            drawn = FeistelPermutation(int(cum[-1]), [self.seed, epoch, _SALT_GROUP, g])(slots)
            local = np.searchsorted(cum, drawn, side="right") - 1
            vols[:, col:col + q] = self.group_volumes[name][local].reshape(-1, q)
            ranks[:, col:col + q] = (drawn - cum[local]).reshape(-1, q)
            col += q
        for row, b in enumerate(batches.tolist()):  # the groups interleaved inside each batch
            mix = np.random.default_rng([self.seed, epoch, _SALT_MIX, b]).permutation(self.batch)
            vols[row], ranks[row] = vols[row, mix], ranks[row, mix]
        return vols, ranks

    def starts(self, vols: np.ndarray, ranks: np.ndarray, epoch: int) -> np.ndarray:
        """``(k, 3)`` starts of the draws ``(vols[i], ranks[i])`` of ``epoch``."""
        out = np.empty((vols.size, 3), dtype=np.int64)
        for v in np.unique(vols).tolist():
            sel = vols == v
            local = self.permutation(epoch, v)(ranks[sel]) if self.sampler.shuffle else ranks[sel]
            out[sel] = self.grids[v].unravel(local)
        return out

    def _global(self, epoch: int, batches: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for first in range(0, batches.size, _GROUP_BATCHES):
            ids = batches[first:first + _GROUP_BATCHES]
            vols, ranks = self.batch_draws(epoch, ids)
            starts = self.starts(vols.ravel(), ranks.ravel(), epoch).reshape(ids.size, self.batch, 3)
            for row in range(ids.size):
                yield vols[row].copy(), starts[row]

    def batches(self, epoch: int, part: int = 0, parts: int = 1, start_batch: int = 0,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(volume_index, starts)`` of the batches of ``epoch`` that belong to ``part``.

        Batch ``b`` of the epoch goes to rank ``b % world_size`` (the epoch padded with
        its first batches to a multiple of ``world_size``); of the rank's batches,
        batch ``i >= start_batch`` belongs to part ``(i - start_batch) % parts``.
        """
        nb = self.batches_per_epoch
        mine = np.arange(rank, -(-nb // world_size) * world_size, world_size) % nb
        if self._background is not None and part == 0 and start_batch == 0 and rank == 0:
            self.check_background(epoch)
        chosen = np.fromiter(my_batches(mine.size, part, parts, start_batch), dtype=np.int64)
        yield from self._global(epoch, mine[chosen])

    def check_background(self, epoch: int) -> int:
        """Background blocks (no labelled voxel) of ``epoch``; warns once when there are none."""
        count = 0
        for vols, starts in self._global(epoch, np.arange(self.batches_per_epoch)):
            for v in np.unique(vols).tolist():
                sel = vols == v
                count += int(is_background(self._background[v], self._base(self.grids[v]), starts[sel]).sum())
        warn_no_background(self, epoch, count)
        return count

    def epoch_coords(self, epoch: int | None = None) -> np.ndarray:
        """All ``(volume, z, y, x)`` starts of one epoch, in plan order, without reading."""
        every = np.arange(self.batches_per_epoch)
        rows = [np.column_stack([v, s]) for v, s in self._global(epoch or 0, every)]
        return np.concatenate(rows).astype(np.int64)

    @property
    def starts_per_volume(self) -> list[int]:
        """Valid starts of each volume."""
        return [g.n for g in self.grids]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_perms": LRU(8 * len(self.grids) + 8)}

    def __repr__(self) -> str:
        return (f"QuotaPlan({len(self.volumes)} volumes, quotas={self.sampler.quotas}, "
                f"batches_per_epoch={self.batches_per_epoch})")
