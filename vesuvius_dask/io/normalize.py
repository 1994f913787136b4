"""Intensity normalisation: the official schemes, their volume statistics, vectorised (torch-free).

The schemes and formulas are those of the official ``vesuvius`` package
(``eps = 1e-8``; statistics of an *item* are over one block, of a *volume* over the
volume, see :func:`volume_statistics`):

========================  ==================================================================
``none``                  ``x``
``instance_zscore``       ``(x - mean) / max(std, eps)`` per item
``global_zscore``         ``(x - mean_v) / max(std_v, eps)`` with the volume's mean and std
``instance_minmax``       ``(x - min) / max(max - min, eps)`` per item
``percentile_minmax``     clip to the item's ``[p1, p99]``, then ``(x - p1) / (p99 - p1)``
                          (zeros where ``p99 - p1 <= eps``)
``ct``                    clip to the volume's ``[p0.5, p99.5]``, then
                          ``(x - mean_v) / max(std_v, eps)`` with the volume's mean and std
========================  ==================================================================

A normalisation travels as a small dict, ``{"scheme": name, "statistics": stats or
None}``: ``statistics`` fixed (e.g. those of the training volume, saved with a model)
are used for every volume; without them each volume's own are computed once per
process and cached.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import config
from ..errors import ArgumentError

__all__ = ["SCHEMES", "GLOBAL_SCHEMES", "EPS", "normalization_spec", "normalize", "volume_statistics",
           "Normalizer", "PERCENTILES"]

SCHEMES = ("none", "instance_zscore", "global_zscore", "instance_minmax", "percentile_minmax", "ct")
#: The schemes that use a volume's statistics.
GLOBAL_SCHEMES = ("global_zscore", "ct")
EPS = 1e-8
#: The percentiles :func:`volume_statistics` reports (keys ``"p0.5"``, ``"p1"``, ...).
PERCENTILES = (0.5, 1.0, 99.0, 99.5)
_STAT_KEYS = ("mean", "std", "p0.5", "p99.5")

_cache: dict[tuple, dict] = {}
_cache_lock = threading.Lock()


def normalization_spec(value: Any) -> dict[str, Any]:
    """``{"scheme": name, "statistics": dict or None}`` from a scheme name or such a dict.

    A dict may also hold ``"volumes"`` (what :meth:`Normalizer.describe` saves, not
    read here). Statistics hold ``mean``, ``std``, ``p0.5`` and ``p99.5`` (and may hold
    the other keys :func:`volume_statistics` reports), each a finite number; ``std``
    is positive and ``p0.5 <= p99.5``.

    Raises
    ------
    ArgumentError
        One line naming the key: an unknown scheme or key, statistics without the keys
        the scheme needs, a value that is not a finite number, ``std <= 0``, a low
        percentile above the high one.
    """
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in _SPEC_KEYS)
        if unknown:
            raise ArgumentError(f"normalization: unknown key {unknown[0]!r}; expected "
                                f"{', '.join(_SPEC_KEYS)} (the volume's mean, std... go in 'statistics')")
        scheme, stats = value.get("scheme"), value.get("statistics")
    else:
        scheme, stats = value, None
    if scheme not in SCHEMES:
        raise ArgumentError(f"unknown normalization {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if stats is not None:
        stats = _checked_statistics(stats)
    return {"scheme": scheme, "statistics": stats if scheme in GLOBAL_SCHEMES else None}


#: The keys of a normalisation dict.
_SPEC_KEYS = ("scheme", "statistics", "volumes")
#: The keys statistics may hold (those :func:`volume_statistics` reports).
_KNOWN_STATS = ("mean", "std", "min", "max", "voxels", *(f"p{q:g}" for q in PERCENTILES),
                "chunks", "chunks_total")
#: Pairs of statistics that must be ordered (low <= high) when both are given.
_ORDERED = (("p0.5", "p99.5"), ("p1", "p99"), ("min", "max"))
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _checked_statistics(stats: Any) -> dict[str, float]:
    """Statistics as floats, checked; one-line errors naming the key."""
    if not isinstance(stats, Mapping):
        raise ArgumentError(f"normalization statistics must be a dict of {', '.join(_STAT_KEYS)}; "
                            f"got {stats!r}")
    missing = [k for k in _STAT_KEYS if k not in stats]
    if missing:
        raise ArgumentError(f"normalization statistics: no {missing[0]!r} (they need the keys "
                            f"{', '.join(_STAT_KEYS)}); got {stats!r}")
    out = {}
    for k, v in stats.items():
        if k not in _KNOWN_STATS:
            raise ArgumentError(f"normalization statistics: unknown key {k!r}; expected some of "
                                f"{', '.join(_KNOWN_STATS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not (
                abs(float(v)) <= _FLOAT32_MAX):  # NaN compares False
            raise ArgumentError(f"normalization statistics: {k!r} is {v!r}, not a finite number "
                                "(within float32's range)")
        out[k] = float(v)
    if not out["std"] > 0:
        raise ArgumentError(f"normalization statistics: 'std' is {out['std']!r}; it must be positive")
    for low, high in _ORDERED:
        if low in out and high in out and out[low] > out[high]:
            raise ArgumentError(f"normalization statistics: {low!r} ({out[low]:g}) is above "
                                f"{high!r} ({out[high]:g})")
    return out


def _items(x: np.ndarray) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _per_item(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def normalize(x: np.ndarray, scheme: str, stats: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Normalise a batch ``(B, ...)`` of a floating dtype in place (returned).

    Parameters
    ----------
    x : numpy.ndarray
        The items, first axis the item; float32 or float64, written in place.
    scheme : str
        One of :data:`SCHEMES`.
    stats : dict, optional
        For the global schemes: ``mean``, ``std``, ``p0.5``, ``p99.5``, each an array
        with one value per item (the statistics of the item's volume).
    """
    if scheme == "none":
        return x
    axes = _items(x)
    if scheme == "instance_zscore":
        mean = x.mean(axis=axes, dtype=np.float64, keepdims=True)
        std = x.std(axis=axes, dtype=np.float64, keepdims=True)
        x -= mean.astype(x.dtype)
        x /= np.maximum(std, EPS).astype(x.dtype)
    elif scheme == "instance_minmax":
        lo = x.min(axis=axes, keepdims=True)
        span = x.max(axis=axes, keepdims=True).astype(np.float64) - lo
        x -= lo
        x /= np.maximum(span, EPS).astype(x.dtype)
    elif scheme == "percentile_minmax":
        p1, p99 = np.percentile(x.reshape(x.shape[0], -1), [1, 99], axis=1)
        lo, hi, span = _per_item(p1, x), _per_item(p99, x), p99 - p1
        np.clip(x, lo, hi, out=x)
        x -= lo
        x /= _per_item(np.where(span > EPS, span, 1.0), x)
        x *= _per_item(span > EPS, x)
    elif scheme in GLOBAL_SCHEMES:
        if stats is None:
            raise ArgumentError(f"normalization {scheme!r} needs the volume's statistics")
        if scheme == "ct":
            np.clip(x, _per_item(stats["p0.5"], x), _per_item(stats["p99.5"], x), out=x)
        x -= _per_item(stats["mean"], x)
        x /= _per_item(np.maximum(np.asarray(stats["std"], dtype=np.float64), EPS), x)
    else:
        raise ArgumentError(f"unknown normalization {scheme!r}; expected one of {', '.join(SCHEMES)}")
    return x


def _sample_regions(bounds: Sequence[np.ndarray], limit: int) -> tuple[list[tuple[slice, ...]], int]:
    """Up to ``limit`` stored chunks spread evenly over the chunk grid (raster order), and their count."""
    counts = [len(b) - 1 for b in bounds]
    total = int(np.prod(counts))
    picks = range(total) if total <= limit else np.unique(
        np.linspace(0, total - 1, limit).round().astype(np.int64)).tolist()
    regions = []
    for i in picks:
        idx = np.unravel_index(int(i), counts)
        regions.append(tuple(slice(int(b[k]), int(b[k + 1])) for b, k in zip(bounds, idx)))
    return regions, total


def _percentiles(values: np.ndarray, counts: np.ndarray | None, qs: Sequence[float]) -> list[float]:
    """``np.percentile(sample, qs)`` (linear), from the sample or from its histogram ``counts``."""
    if counts is None:
        return [float(v) for v in np.percentile(values, qs)]
    cum = np.cumsum(counts)
    n = int(cum[-1])
    out = []
    for q in qs:
        pos = q / 100 * (n - 1)
        lo, frac = int(np.floor(pos)), pos - np.floor(pos)
        a = float(np.searchsorted(cum, lo, side="right"))
        b = float(np.searchsorted(cum, min(lo + 1, n - 1), side="right"))
        out.append(a + frac * (b - a))
    return out


def _statistics(arrays: list[np.ndarray], dtype: np.dtype) -> dict[str, float]:
    n = sum(a.size for a in arrays)
    total = sum(float(a.sum(dtype=np.float64)) for a in arrays)
    mean = total / n
    var = sum(float(np.square(a.astype(np.float64) - mean).sum()) for a in arrays) / n
    small_int = dtype.kind in "ui" and dtype.itemsize <= 2
    if small_int:  # a histogram: exact percentiles of the sample in O(65536) memory
        offset = int(np.iinfo(dtype).min)
        counts = sum(np.bincount((a.astype(np.int64) - offset).ravel(),
                                 minlength=int(np.iinfo(dtype).max) - offset + 1) for a in arrays)
        pcts = [p + offset for p in _percentiles(np.empty(0), counts, PERCENTILES)]
    else:
        pcts = _percentiles(np.concatenate([a.ravel() for a in arrays]), None, PERCENTILES)
    stats = {"mean": mean, "std": var ** 0.5, "min": float(min(a.min() for a in arrays)),
             "max": float(max(a.max() for a in arrays)), "voxels": n}
    stats.update({f"p{q:g}": float(v) for q, v in zip(PERCENTILES, pcts)})
    return stats


def volume_statistics(volume: Any, sample_chunks: int | None = None) -> dict[str, float]:
    """Mean, std, min, max and the 0.5/1/99/99.5 percentiles of a volume, from a bounded sample.

    The sample is up to ``sample_chunks`` stored chunks (default: config
    ``vesuvius-dask.normalize.sample-chunks``, 64) spread evenly over the volume's
    chunk grid in raster order — every chunk when there are no more, so then the
    statistics are exact. Percentiles are linear (``numpy.percentile``) over the
    sampled voxels. The result is cached per volume (its token) and process.

    Parameters
    ----------
    volume : Volume
        An opened volume (:func:`~vesuvius_dask.io.open.resolve_volume`).
    sample_chunks : int, optional
        How many stored chunks at most.

    Returns
    -------
    dict
        ``mean``, ``std``, ``min``, ``max``, ``p0.5``, ``p1``, ``p99``, ``p99.5``,
        ``voxels`` (sampled), ``chunks`` (sampled) and ``chunks_total``.
    """
    limit = int(config.get("normalize.sample-chunks") if sample_chunks is None else sample_chunks)
    if limit < 1:
        raise ArgumentError(f"sample_chunks must be at least 1, got {limit}")
    key = (volume.token, tuple(volume.shape), str(volume.dtype), limit)
    with _cache_lock:
        if key in _cache:
            return dict(_cache[key])
    regions, total = _sample_regions(volume.bounds, limit)
    arrays = [np.asarray(volume.array[r].compute()) for r in regions]
    stats = _statistics(arrays, np.dtype(volume.dtype))
    stats.update({"chunks": len(regions), "chunks_total": total})
    with _cache_lock:
        _cache[key] = stats
    return dict(stats)


class Normalizer:
    """A scheme with the statistics of each volume, applied to batches ``(B, ...)`` in place.

    Parameters
    ----------
    spec : dict
        From :func:`normalization_spec`.
    volumes : list of Volume
        The volumes the items come from (their statistics are computed when the
        scheme needs them and ``spec`` has none).
    """

    def __init__(self, spec: Mapping[str, Any], volumes: Sequence[Any]) -> None:
        self.scheme = spec["scheme"]
        fixed = spec.get("statistics")
        self.per_volume: list[dict[str, float]] | None = None
        if self.scheme in GLOBAL_SCHEMES:
            self.per_volume = [dict(fixed) if fixed else volume_statistics(v) for v in volumes]
        self._table = None if self.per_volume is None else {
            k: np.array([s[k] for s in self.per_volume], dtype=np.float64) for k in _STAT_KEYS}

    def __call__(self, batch: np.ndarray, vols: np.ndarray) -> np.ndarray:
        if not batch.flags.writeable:
            batch = batch.copy()
        stats = None if self._table is None else {k: v[vols] for k, v in self._table.items()}
        return normalize(batch, self.scheme, stats)

    def describe(self) -> dict[str, Any]:
        """What to save with a model: the scheme, and the statistics of each volume."""
        return {"scheme": self.scheme,
                "statistics": self.per_volume[0] if self.per_volume and len(self.per_volume) == 1 else None,
                "volumes": self.per_volume}
