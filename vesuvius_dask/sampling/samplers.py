"""Samplers: how an epoch picks its blocks, as small frozen objects (torch-free).

A sampler is a recipe for a :class:`~vesuvius_dask.sampling.plan.BlockPlan`:
:meth:`Sampler.plan_options` gives the keyword arguments the plan takes, and each
subclass supplies only what differs (its method and its own fields). The stream
takes one (``DaskVesuviusStream(files, 4, 64, 64, sampler=UniformSampler(1000,
seed=0))``), as TorchIO's ``Queue`` takes a sampler; its sampling keywords are a thin
convenience that builds the same object (:meth:`Sampler.from_options`). Volumes,
masks and labels are data, so they stay on the stream.

- :class:`UniformSampler`: each block picks a volume uniformly, then an undrawn start;
- :class:`ProportionalSampler`: volumes picked in proportion to their undrawn starts;
- :class:`LocalitySampler`: uniform, drawn in runs of starts from the same stored chunk;
- :class:`BalancedSampler`: a fixed share of blocks with positive labels;
- :class:`GridSampler`: inference, every position of a tiling grid once, in order.

Samplers are plain values: frozen, comparable, picklable (DataLoader workers with
spawn), and checked at construction, so a bad value fails there, naming the field.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field, fields
from typing import Any

import numpy as np

from ..arguments import int_triple, positive_int
from ..errors import InvalidTypeError, ResumeError, SamplingError
from .starts import ANY_VOXEL, SAMPLING_METHODS

__all__ = [
    "Sampler",
    "RandomSampler",
    "UniformSampler",
    "ProportionalSampler",
    "LocalitySampler",
    "BalancedSampler",
    "GridSampler",
    "PLAN_DEFAULTS",
]

#: The sampling keyword arguments of :class:`~vesuvius_dask.sampling.plan.BlockPlan` (and
#: of the stream) with their defaults; :meth:`Sampler.plan_options` starts from these.
PLAN_DEFAULTS: dict[str, Any] = {
    "sampling_method": "uniform",
    "shuffle": True,
    "seed": None,
    "stride": None,
    "overlap": None,
    "mask_coverage": 1.0,
    "locality": None,
    "locality_mix": 8,
    "positive_fraction": None,
    "positive_coverage": ANY_VOXEL,
}


#: Sampling keywords that mean nothing to a grid, and what to say when one is given.
_NOT_FOR_GRID = {
    "stride": "stride does not apply to sampling_method='grid'; use overlap",
    "locality": "locality does not apply to sampling_method='grid' (the grid is read in order)",
    "positive_fraction": "positive_fraction does not apply to sampling_method='grid'",
}


def _fraction(name: str, value: Any, *, closed: bool = False) -> float:
    """``value`` in (0, 1], or in [0, 1] when ``closed``."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not (0 <= value <= 1 if closed else 0 < value <= 1):
        raise SamplingError(f"{name} must be in {'[0' if closed else '(0'}, 1], got {value!r}")
    return float(value)


def _triple(name: str, value: Any, minimum: int) -> tuple[int, int, int]:
    return int_triple(name, value.tolist() if isinstance(value, np.ndarray) else value, minimum=minimum)


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(f"seed must be a non-negative integer or None, got {value!r}")
    if value < 0:
        raise SamplingError(f"seed must be non-negative, got {value}")
    return int(value)


def _set(obj: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen sampler (in ``__post_init__`` only)."""
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class Sampler:
    """The shared base of the samplers: what every sampler has, and the plan it makes.

    Subclasses override only :meth:`_method` (the plan's ``sampling_method``) and
    :meth:`_options` (their own fields as plan keywords), and check their fields in
    ``__post_init__``. Not instantiated itself.

    Parameters
    ----------
    samples_per_epoch : int, optional
        Blocks per epoch. ``None``: the stream's ``samples_per_epoch``; for
        :class:`GridSampler`, every grid position. The only positional field.
    mask_coverage : float
        Fraction of a block's ``(y, x)`` footprint the volume's mask must cover
        (default 1.0; any value > 0 needs at least one voxel). Used only with masks.
    """

    samples_per_epoch: int | None = None
    _: KW_ONLY
    mask_coverage: float = 1.0

    def __post_init__(self) -> None:
        if type(self) in (Sampler, RandomSampler):
            raise InvalidTypeError(
                f"{type(self).__name__} is a base class: use UniformSampler, ProportionalSampler, "
                "LocalitySampler, BalancedSampler or GridSampler")
        if self.samples_per_epoch is not None:
            _set(self, "samples_per_epoch", positive_int("samples_per_epoch", self.samples_per_epoch))
        _set(self, "mask_coverage", _fraction("mask_coverage", self.mask_coverage))

    def _method(self) -> str:
        """The plan's ``sampling_method``."""
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        """The plan keywords of this sampler's own fields (the rest keep :data:`PLAN_DEFAULTS`)."""
        return {}

    def plan_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~vesuvius_dask.sampling.plan.BlockPlan` this sampler means.

        Returns
        -------
        dict
            ``samples_per_epoch`` and every key of :data:`PLAN_DEFAULTS`:
            ``BlockPlan(volumes, block, **sampler.plan_options(), masks=...)``.
        """
        return {**PLAN_DEFAULTS, "samples_per_epoch": self.samples_per_epoch,
                "mask_coverage": self.mask_coverage, "sampling_method": self._method(),
                **self._options()}

    def state_dict(self) -> dict[str, Any]:
        """The sampler as plain values (its class and fields), for a checkpoint.

        A sampler is a frozen value and its plan a pure function of ``(seed,
        epoch)``: where an epoch stands is the stream's state
        (:meth:`~vesuvius_dask.DaskVesuviusStream.state_dict`), which includes this.

        Returns
        -------
        dict
            ``{"type": class name, field: value, ...}``, JSON-serialisable.
        """
        def plain(value: Any) -> Any:
            return list(value) if isinstance(value, tuple) else value

        return {"type": type(self).__name__, **{f.name: plain(getattr(self, f.name)) for f in fields(self)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that ``state`` (from :meth:`state_dict`) describes this sampler.

        Samplers are frozen, so there is nothing to restore: a state of another
        sampler (another class, seed, stride, ...) is refused.

        Raises
        ------
        ResumeError
            Naming the first field that differs.
        """
        mine = self.state_dict()
        for key in sorted(set(mine) | set(state)):
            if mine.get(key) != state.get(key):
                raise ResumeError(f"this state is of a sampler with {key}={state.get(key)!r}; this "
                                  f"sampler has {key}={mine.get(key)!r}")

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Sampler:
        """The sampler a :meth:`state_dict` describes."""
        kinds, todo = {}, [Sampler]
        while todo:  # every subclass (QuotaSampler, WeightMapSampler, ... register by existing)
            for sub in todo.pop().__subclasses__():
                kinds[sub.__name__] = sub
                todo.append(sub)
        kind = kinds.get(state.get("type")) if isinstance(state, dict) else None
        if kind is None:
            raise ResumeError(f"not a sampler state: {state!r}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in state.items() if k != "type"}
        return kind(values.pop("samples_per_epoch", None), **values)

    @classmethod
    def from_options(cls, samples_per_epoch: int | None = None, **options: Any) -> Sampler:
        """The sampler that the stream's sampling keywords describe (the thin convenience).

        Parameters
        ----------
        samples_per_epoch : int, optional
            Blocks per epoch.
        **options
            Keys of :data:`PLAN_DEFAULTS` (``sampling_method``, ``shuffle``, ``seed``,
            ``stride``, ``overlap``, ``mask_coverage``, ``locality``, ``locality_mix``,
            ``positive_fraction``, ``positive_coverage``); missing ones keep their
            defaults.

        Returns
        -------
        Sampler
            Its :meth:`plan_options` give the same plan as the keywords did:
            :class:`GridSampler` for ``sampling_method="grid"``, else
            :class:`BalancedSampler` with ``positive_fraction``,
            :class:`LocalitySampler` with ``locality`` (uniform), or
            :class:`UniformSampler` / :class:`ProportionalSampler`. ``seed`` and
            ``shuffle`` mean nothing to a grid and are dropped there, as before.

        Raises
        ------
        SamplingError
            Unknown ``sampling_method``, or an option that does not apply to it.
        """
        unknown = sorted(set(options) - set(PLAN_DEFAULTS))
        if unknown:
            raise InvalidTypeError(f"unknown sampling option {unknown[0]!r}; expected one of "
                                   f"{sorted(PLAN_DEFAULTS)}")
        kw = {**PLAN_DEFAULTS, **options}
        method = kw["sampling_method"]
        if method not in SAMPLING_METHODS:
            raise SamplingError(f"unknown sampling_method {method!r}; expected one of {SAMPLING_METHODS}")
        if method == "grid":
            return GridSampler._from_keywords(samples_per_epoch, kw)
        if kw["overlap"] is not None:
            raise SamplingError("overlap applies to sampling_method='grid' only")
        common = {k: kw[k] for k in ("seed", "stride", "shuffle", "mask_coverage", "locality",
                                     "locality_mix")}
        if kw["positive_fraction"] is not None:
            return BalancedSampler(samples_per_epoch, positive_fraction=kw["positive_fraction"],
                                   positive_coverage=kw["positive_coverage"], volumes=method, **common)
        if method == "uniform" and kw["locality"] is not None:
            return LocalitySampler(samples_per_epoch, **common)
        kind = ProportionalSampler if method == "proportional" else UniformSampler
        return kind(samples_per_epoch, **common)


@dataclass(frozen=True, kw_only=True)
class RandomSampler(Sampler):
    """The shared base of the random samplers: seeded draws without replacement.

    Parameters
    ----------
    samples_per_epoch : int, optional
        Blocks per epoch (at most the number of valid starts); ``None`` takes the
        stream's ``samples_per_epoch``.
    seed : int, optional
        Seed of the whole epoch plan. ``None``: the stream draws one at
        construction (``stream.sampler`` then holds it).
    stride : int or (int, int, int), optional
        Only starts on this grid are drawn (default 1; ``stride == block`` gives
        non-overlapping blocks).
    shuffle : bool
        ``True``: starts inside a volume come in a seeded random order. ``False``:
        raster order (z, then y, then x); the volume choice stays random.
    mask_coverage : float
        See :class:`Sampler`.
    locality : int, optional
        Draw blocks in runs of ``locality`` starts from the same stored chunk (see
        :class:`LocalitySampler`); needs ``shuffle=True``.
    locality_mix : int
        Runs interleaved at a time with ``locality`` (default 8).
    """

    seed: int | None = None
    stride: int | tuple[int, int, int] | None = None
    shuffle: bool = True
    locality: int | None = None
    locality_mix: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "seed", _seed(self.seed))
        if self.stride is not None:
            _set(self, "stride", _triple("stride", self.stride, 1))
        _set(self, "shuffle", bool(self.shuffle))
        if self.locality is not None:
            _set(self, "locality", positive_int("locality", self.locality))
            if not self.shuffle:
                raise SamplingError("locality needs shuffle=True (it reorders starts randomly by chunk)")
        _set(self, "locality_mix", positive_int("locality_mix", self.locality_mix))

    def _options(self) -> dict[str, Any]:
        return {"seed": self.seed, "stride": self.stride, "shuffle": self.shuffle,
                "locality": self.locality, "locality_mix": self.locality_mix}


@dataclass(frozen=True, kw_only=True)
class UniformSampler(RandomSampler):
    """Each block picks a volume uniformly at random, then an undrawn start in it.

    The volume is drawn among those with undrawn starts left, so small volumes are
    seen as often as large ones. Fields as for :class:`RandomSampler`.

    Examples
    --------
    >>> sampler = UniformSampler(1000, seed=0, stride=(4, 32, 32))
    >>> sampler.plan_options()["sampling_method"], sampler.stride
    ('uniform', (4, 32, 32))
    """

    def _method(self) -> str:
        return "uniform"


@dataclass(frozen=True, kw_only=True)
class ProportionalSampler(RandomSampler):
    """Each block picks a volume with probability proportional to its undrawn starts.

    Every start of every volume is equally likely: large volumes are seen more.
    Fields as for :class:`RandomSampler`.
    """

    def _method(self) -> str:
        return "proportional"


@dataclass(frozen=True, kw_only=True)
class LocalitySampler(RandomSampler):
    """Uniform sampling, drawn in runs of starts from the same stored chunk.

    For volumes far larger than the decoded-chunk cache: ``locality_mix`` runs of
    ``locality`` starts are interleaved at a time (see
    :class:`~vesuvius_dask.sampling.starts.LocalityPermutation`), so consecutive blocks
    come from a few chunks. Still without replacement and reproducible, less random.
    Keep the stream's ``cache_bytes`` above ``locality_mix`` × 8 chunks.

    Parameters
    ----------
    locality : int
        Starts per run (required).
    locality_mix : int
        Runs interleaved at a time (default 8).

    Other fields as for :class:`RandomSampler` (``shuffle`` must stay True).
    """

    locality: int = field()

    def _method(self) -> str:
        return "uniform"


@dataclass(frozen=True, kw_only=True)
class BalancedSampler(RandomSampler):
    """Label-balanced sampling: a fixed share of every epoch's blocks is positive.

    Exactly ``round(positive_fraction * samples_per_epoch)`` blocks of each epoch have
    at least ``positive_coverage`` of their label footprint positive (non-zero), the
    rest less; each class drawn without replacement, inside the masks. Needs 2-D
    ``labels`` on the stream. Composes with ``stride``, ``locality`` and masks.

    Parameters
    ----------
    positive_fraction : float
        Share of positive blocks, in [0, 1] (required).
    positive_coverage : float
        Fraction of the label footprint that makes a start positive (default: any
        positive voxel).
    volumes : {"uniform", "proportional"}
        How each draw picks its volume inside its class (as :class:`UniformSampler`
        or :class:`ProportionalSampler`).

    Other fields as for :class:`RandomSampler`.
    """

    positive_fraction: float = field()
    positive_coverage: float = ANY_VOXEL
    volumes: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "positive_fraction", _fraction("positive_fraction", self.positive_fraction, closed=True))
        _set(self, "positive_coverage", _fraction("positive_coverage", self.positive_coverage))
        if self.volumes not in ("uniform", "proportional"):
            raise SamplingError(f"volumes must be 'uniform' or 'proportional', got {self.volumes!r}")

    def _method(self) -> str:
        return self.volumes

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "positive_fraction": self.positive_fraction,
                "positive_coverage": self.positive_coverage}


@dataclass(frozen=True, kw_only=True)
class GridSampler(Sampler):
    """Inference: every position of a regular grid that tiles each volume, once, in order.

    Volume after volume, in raster order (z, then y, then x: consecutive blocks share
    stored chunks); see :class:`~vesuvius_dask.sampling.starts.Tiling`. There is no
    seed, stride or shuffle: the grid has one order. Masks skip positions outside
    the mask. Under several ranks, positions are split without padding, so
    inference visits each exactly once overall.

    Parameters
    ----------
    samples_per_epoch : int, optional
        ``None`` (default): every grid position; an int: the first ones.
    overlap : int or (int, int, int)
        Overlap between neighbouring blocks (default 0; each must be below the
        block). The last block along an axis is shifted inwards to end at the
        volume's edge, so it may overlap more.
    mask_coverage : float
        See :class:`Sampler` (``predict`` uses "any voxel":
        :data:`~vesuvius_dask.sampling.starts.ANY_VOXEL`).

    Examples
    --------
    >>> GridSampler(overlap=(0, 16, 16))
    GridSampler(samples_per_epoch=None, mask_coverage=1.0, overlap=(0, 16, 16))
    """

    overlap: int | tuple[int, int, int] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _set(self, "overlap", _triple("overlap", self.overlap, 0))

    def _method(self) -> str:
        return "grid"

    def _options(self) -> dict[str, Any]:
        return {"overlap": self.overlap, "shuffle": False}

    @classmethod
    def _from_keywords(cls, samples_per_epoch: int | None, kw: dict[str, Any]) -> GridSampler:
        """The grid the stream's keywords describe (``seed`` and ``shuffle`` are moot)."""
        for name, message in _NOT_FOR_GRID.items():
            if kw[name] is not None:
                raise SamplingError(message)
        return cls(samples_per_epoch, overlap=0 if kw["overlap"] is None else kw["overlap"],
                   mask_coverage=kw["mask_coverage"])
