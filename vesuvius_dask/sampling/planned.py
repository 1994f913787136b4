"""Samplers that plan their epochs themselves (quotas, weight maps, coverage filters).

:class:`PlannedSampler` is the base of :class:`~vesuvius_dask.sampling.quotas.QuotaSampler`
and :class:`~vesuvius_dask.sampling.weights.WeightMapSampler`: random samplers whose
plan is not a :class:`~vesuvius_dask.sampling.plan.BlockPlan` but an object of their own
(:meth:`PlannedSampler.make_plan`) with the same interface (``batches``,
``epoch_coords``, ``samples_per_epoch``, ``read_batch``, ...). :func:`plan_for` is how
the stream makes the plan of any sampler.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..errors import InvalidTypeError, SamplingError
from .plan import BlockPlan
from .samplers import RandomSampler, Sampler

__all__ = ["PlannedSampler", "plan_for", "draw_seed", "warn_no_background", "NO_BACKGROUND"]

#: The warning an epoch without a background block gives (once per plan and process).
NO_BACKGROUND = ("epoch {epoch} holds no background block (every block has labelled voxels): the "
                 "model sees no background; lower min_label_coverage or the weights' contrast")


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and mappings as dicts with string keys, all the way down."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def coverage_field(name: str, value: Any) -> float | None:
    """``None``, or a fraction in (0, 1]."""
    if value is None:
        return None
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not 0 < value <= 1:
        raise SamplingError(f"{name} must be in (0, 1] or None, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class PlannedSampler(RandomSampler):
    """The base of the samplers that make their own plan (not instantiated itself).

    Parameters
    ----------
    min_label_coverage : float, optional
        Coverage filter: only blocks with at least this fraction of their label
        voxels labelled (non-zero) are drawn (needs ``labels=`` on the stream; 2-D
        labels: the fraction of the ``(y, x)`` footprint). See
        :mod:`~vesuvius_dask.sampling.candidates`.

    Other fields as for :class:`~vesuvius_dask.sampling.samplers.RandomSampler`.
    """

    min_label_coverage: float | None = None

    def __post_init__(self) -> None:
        if type(self) is PlannedSampler:
            raise InvalidTypeError("PlannedSampler is a base class: use QuotaSampler or WeightMapSampler")
        super().__post_init__()
        object.__setattr__(self, "min_label_coverage",
                           coverage_field("min_label_coverage", self.min_label_coverage))

    def _method(self) -> str:
        return type(self).__name__

    def plan_options(self) -> dict[str, Any]:
        raise SamplingError(f"{type(self).__name__} makes its own plan (make_plan), not a BlockPlan")

    def make_plan(self, volumes: Sequence[Any], block: Sequence[int], *, masks: Sequence[Any] | None,
                  labels: Sequence[Any] | None, read_batch: int) -> Any:
        """The plan of this sampler over ``volumes`` (what the stream iterates)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`Sampler.state_dict`, with nested values (dicts, tuples) made plain."""
        return {"type": type(self).__name__,
                **{f.name: _plain(self._state_value(f.name)) for f in fields(self)}}

    def _state_value(self, name: str) -> Any:
        return getattr(self, name)


def plan_for(sampler: Sampler, volumes: Sequence[Any], block: Sequence[int], *, masks: Sequence[Any] | None,
             read_batch: int, label_volumes: Sequence[Any] | None = None, label_2d: bool = False) -> Any:
    """The plan of any sampler: its own for a :class:`PlannedSampler`, else a ``BlockPlan``.

    ``label_volumes`` are the stream's label volumes (2-D ones as ``(1, Y, X)``
    in-RAM volumes when ``label_2d``), or None.
    """
    labels_2d = [lv.data[0] for lv in label_volumes] if label_volumes and label_2d else None
    if isinstance(sampler, PlannedSampler):
        labels = labels_2d or (None if label_volumes is None else [lv.array for lv in label_volumes])
        return sampler.make_plan(volumes, block, masks=masks, labels=labels, read_batch=read_batch)
    return BlockPlan(volumes, block, **sampler.plan_options(), masks=masks, read_batch=read_batch,
                     labels_2d=labels_2d)


def draw_seed(seed: int | None) -> int:
    """The seed, or a fresh one (drawn once, so pickled copies agree)."""
    return int(np.random.SeedSequence().entropy) % (1 << 63) if seed is None else int(seed)


def per_volume(name: str, values: Sequence[Any] | None, volumes: Sequence[Any]) -> list[Any]:
    """One entry per volume (None when ``values`` is None); a wrong length is an error."""
    if values is None:
        return [None] * len(volumes)
    if len(values) != len(volumes):
        raise SamplingError(f"{name} has {len(values)} entries for {len(volumes)} volumes; "
                            "give one per volume")
    return list(values)


def rank_order(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The rank's items of ``order`` (item ``i`` to rank ``i % world``, padded with the first ones)."""
    total = -(-order.size // world_size) * world_size
    return order[np.arange(rank, total, world_size) % order.size]


def my_batches(count: int, part: int, parts: int, start_batch: int) -> Iterator[int]:
    """Of ``count`` batches, the numbers that belong to ``part`` from ``start_batch`` on."""
    return (b for b in range(start_batch, count) if (b - start_batch) % parts == part)


def warn_no_background(plan: Any, epoch: int, background: int) -> None:
    """Warn once per plan (and process) when an epoch drew ``background == 0`` background blocks."""
    if background == 0 and not getattr(plan, "warned", False):
        plan.warned = True
        warnings.warn(NO_BACKGROUND.format(epoch=epoch), RuntimeWarning, stacklevel=3)
