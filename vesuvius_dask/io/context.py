"""Context from a coarser pyramid level: which coarse block goes with each fine block (torch-free).

A stream with ``context=`` reads, for every block it yields at its own level ``Lf``
(the stream's ``level``, default 0), a second block from a coarser level ``Lc`` of the
same OME-Zarr multiscale image, centred on the fine block:

* The fine block ``[s, s + B)`` (voxel ``i`` covers ``[i, i + 1)``) has centre
  ``c = s + B / 2``; at the coarse level that is ``c / f``, with ``f`` the scale
  factor of the axis (``2^(Lc - Lf)`` for a pyramid that halves every axis per level;
  taken from the OME ``scale`` transforms when the group has them, so an axis the
  pyramid did not halve keeps ``f = 1``).
* The coarse start is the nearest integer to ``c / f - Bc / 2`` (halves up):
  ``floor((2 s + B - f Bc + f) / (2 f))``, computed in integers.
* **At the border the coarse block is shifted inwards** (clamped to
  ``[0, coarse_shape - Bc]``), never padded: every voxel is data, and the fine block
  is then off-centre in it. :func:`context_starts` gives the coarse starts, so the
  offset can be recovered. A coarse level smaller than ``Bc`` is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arguments import positive_triple
from ..errors import InvalidTypeError, SamplingError
from .open import resolve_volume
from .volume import Volume, is_pathlike, multiscale_paths

__all__ = ["Context", "context_spec", "context_starts", "ContextVolumes", "context_volumes"]


@dataclass(frozen=True)
class Context:
    """A coarse block from a lower-resolution pyramid level, centred on each fine block.

    Parameters
    ----------
    level : int
        The coarse pyramid level; above the stream's own ``level``.
    size : int or (int, int, int)
        The coarse block's shape ``(z, y, x)``, in coarse voxels.
    files : list, optional
        The coarse volumes, one per stream volume, when the stream's files are not
        OME-Zarr groups that hold ``level`` (e.g. arrays); their scale factor is then
        ``2^(level - stream level)`` on every axis the coarse volume is smaller.
    """

    level: int
    size: tuple[int, int, int]
    files: Sequence[Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or not isinstance(self.level, (int, np.integer)) or self.level < 1:
            raise InvalidTypeError(f"context level must be an integer >= 1, got {self.level!r}")
        object.__setattr__(self, "size", positive_triple("context size", self.size))


def context_spec(value: Any) -> Context | None:
    """``context=`` as a :class:`Context`: None, a Context, or a dict ``{"level", "size"[, "files"]}``."""
    if value is None or isinstance(value, Context):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"level", "size", "files"}
        if unknown or "level" not in value or "size" not in value:
            raise InvalidTypeError(f"context must be a dict with keys 'level' and 'size' (and optionally "
                                   f"'files'), got keys {sorted(value)}")
        return Context(value["level"], value["size"], value.get("files"))
    raise InvalidTypeError(f"context must be None, a dict {{'level', 'size'}} or a Context, got "
                           f"{type(value).__name__}")


def _ome_scales(source: Any, storage_options: dict | None) -> list[list[float]] | None:
    """The ``scale`` of every level of an OME-Zarr group at ``source`` (None when not found)."""
    if not is_pathlike(source):
        return None
    import zarr

    try:
        extra = {"storage_options": storage_options} if storage_options and "://" in os.fspath(source) else {}
        attrs = zarr.open_group(os.fspath(source), mode="r", **extra).attrs.asdict()
    except Exception:  # noqa: BLE001 - not a group we can read: no metadata, use 2^d
        return None
    if multiscale_paths(attrs) is None:
        return None
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    scales = []
    for d in ms[0].get("datasets", []):
        found = [t.get("scale") for t in d.get("coordinateTransformations", []) if t.get("type") == "scale"]
        if not found or not isinstance(found[0], list) or len(found[0]) < 3:
            return None
        scales.append([float(v) for v in found[0][-3:]])
    return scales


def _factors(fine: Volume, coarse: Volume, scales: list[list[float]] | None, levels: tuple[int, int],
             what: str) -> tuple[int, int, int]:
    """Per-axis scale factor from the fine level to the coarse one, checked against the shapes."""
    lf, lc = levels
    if scales is not None and lc < len(scales) and all(v > 0 for v in scales[lf] + scales[lc]):
        factors = [max(1, round(c / f)) for f, c in zip(scales[lf], scales[lc])]
    else:
        factors = [2 ** (lc - lf) if c < f else 1 for f, c in zip(fine.shape, coarse.shape)]
    for a, (f, n, m) in enumerate(zip(factors, fine.shape, coarse.shape)):
        if abs(m - n / f) > 1:
            raise SamplingError(
                f"{what}: level {lc} has shape {coarse.shape}, not the level-{lf} shape {fine.shape} "
                f"divided by {f} on axis {'zyx'[a]}; context needs a pyramid of the same volume")
    return tuple(factors)  # type: ignore[return-value]


@dataclass
class ContextVolumes:
    """The coarse volumes of a stream, with what maps fine starts to coarse ones."""

    volumes: list[Volume]
    #: ``(V, 3)`` int64: scale factor per volume and axis.
    factors: np.ndarray
    #: ``(V, 3)`` int64: the coarse volumes' shapes.
    shapes: np.ndarray
    size: tuple[int, int, int]
    block: tuple[int, int, int]

    def starts(self, vol_index: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Coarse starts of the blocks at ``starts`` (fine) of volumes ``vol_index``."""
        v = np.asarray(vol_index, dtype=np.int64)
        return context_starts(starts, self.block, self.factors[v], self.size, self.shapes[v])


def context_starts(starts: np.ndarray, block: Sequence[int], factors: Any, size: Sequence[int],
                   coarse_shape: Any) -> np.ndarray:
    """Starts of the coarse blocks centred on fine blocks, shifted inwards at the border.

    Parameters
    ----------
    starts : (k, 3) int array
        Fine block starts.
    block : (int, int, int)
        Fine block shape.
    factors : (3,) or (k, 3) int array
        Scale factor per axis (per block).
    size : (int, int, int)
        Coarse block shape.
    coarse_shape : (3,) or (k, 3) int array
        Shape of the coarse volume (per block).

    Returns
    -------
    numpy.ndarray
        ``(k, 3)`` int64: ``clip(floor((2 s + B - f Bc + f) / (2 f)), 0, shape - Bc)``.
    """
    s = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
    f = np.asarray(factors, dtype=np.int64)
    b = np.asarray(block, dtype=np.int64)
    bc = np.asarray(size, dtype=np.int64)
    first = (2 * s + b - f * bc + f) // (2 * f)
    return np.clip(first, 0, np.asarray(coarse_shape, dtype=np.int64) - bc)


def context_volumes(context: Context, files: Sequence[Any], volumes: list[Volume], block: Sequence[int], *,
                    level: int | None, storage_options: dict | None = None, cache_dir: Any = None
                    ) -> ContextVolumes:
    """Open the coarse level of every stream volume and check it against the fine one."""
    lf = 0 if level is None else int(level)
    if context.level <= lf:
        raise SamplingError(f"context level {context.level} must be coarser than the stream's level {lf}")
    sources = files if context.files is None else list(context.files)
    if len(sources) != len(volumes):
        raise SamplingError(f"context files has {len(sources)} entries for {len(volumes)} volumes")
    out, factors = [], []
    for i, (src, vol) in enumerate(zip(sources, volumes)):
        what = f"context of files[{i}] ({vol.name})"
        if context.files is None and not is_pathlike(src):
            raise SamplingError(f"{what}: context needs OME-Zarr multiscale paths in files, or "
                                "context files= (one coarse volume per volume)")
        coarse = resolve_volume(src, level=context.level if context.files is None else None,
                                name=f"context[{i}]", storage_options=storage_options, cache_dir=cache_dir)
        scales = _ome_scales(src, storage_options) if context.files is None else None
        factors.append(_factors(vol, coarse, scales, (lf, context.level), what))
        small = [a for a in range(3) if coarse.shape[a] < context.size[a]]
        if small:
            raise SamplingError(f"{what}: context size {context.size} is larger than level {context.level}'s "
                                f"shape {coarse.shape} on axis {'zyx'[small[0]]}")
        out.append(coarse)
    return ContextVolumes(out, np.array(factors, dtype=np.int64),
                          np.array([v.shape for v in out], dtype=np.int64), context.size,
                          tuple(int(b) for b in block))  # type: ignore[arg-type]
