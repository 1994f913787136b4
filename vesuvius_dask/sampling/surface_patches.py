"""Native-3D training: blocks of the scroll around segment surfaces, labels along the normals.

The recipe (the official native-3D ink training), at pyramid level ``L``:

1. **Patches** on the flat label grid of each segment (label Zarr level ``L``, plane
   32): corners ``(y0, x0)`` on a stride of ``max(1, round(patch_y * overlap))`` on both
   axes, every patch wholly inside the grid (:func:`find_patches`). Labelled pixels are
   those nonzero in supervision ∪ validation. A patch touching a validation pixel is a
   **validation** patch; any other patch is a **training** patch when it holds
   supervision and its labelled coverage (area of the labelled pixels' bounding box /
   patch area) is at least ``min_labeled_coverage``. A patch with no valid surface
   point is dropped (it has no place in the scroll).
2. **Crop**: exactly the block ``(Z, Y, X)``, centred on the extent (min / max) of the
   patch's valid surface points × ``2^-L``: the start is ``floor(c - (B - 1) / 2 + 0.5)``
   per axis, so the block's centre is within half a voxel of the extent's centre
   ``c``. Training may shift it by a random integer offset in ``[-t, t]`` per axis
   (``translate``), drawn anew each epoch. At the volume's border the crop is **shifted
   inwards** to lie inside the volume (never padded), so image and labels stay aligned;
   a volume smaller than the block is an error.
3. **Labels**: every labelled pixel of the split (training: ink ∪ supervision outside
   validation; validation: the validation pixels) of every segment in the same volume
   whose projection lands in the crop is placed along its normal
   (:mod:`vesuvius_dask.surfaces.project`; ``half_thickness`` in level-0 voxels, divided
   by ``2^L``) and merged by max. So crossing segments' labels merge, and a training
   block never holds a validation pixel's label.

Label pixel ``(r, c)`` at level ``L`` is the surface's full-resolution pixel
``(r·2^L, c·2^L)`` (the published pyramids are nearest-neighbour, ``[::2, ::2]``).

:class:`SurfaceSampler` is the recipe's parameters (a sampler for
:class:`~vesuvius_dask.DaskVesuviusStream`); :class:`SurfaceSegment` is one segment's data
(surface, label Zarrs, scroll volume); :class:`SurfacePlan` is what the stream plans
and labels with: which crops each epoch reads (without replacement, seeded, split by
ranks and workers as for volumes) and their projected labels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..arguments import int_triple, positive_int, positive_triple
from ..errors import InvalidTypeError, SamplingError
from ..io.open import resolve_volume
from ..lru import LRU
from ..surfaces.project import LabelTile, rasterize
from ..surfaces.tifxyz import Surface, open_surface
from .samplers import Sampler
from .starts import FeistelPermutation

__all__ = ["SurfaceSampler", "SurfaceSegment", "SurfacePlan", "find_patches", "crop_starts",
           "SPLITS"]

SPLITS = ("train", "validation")
#: Salts of this module's random streams (distinct from :data:`~.starts.SALTS`).
_SALT_ORDER, _SALT_SHIFT = 101, 102
#: Label pixels per side of a tile of the label index (tiles are found by their 3-D boxes).
TILE = 64
#: Bytes of projected tiles (bit-packed label boxes, :class:`~vesuvius_dask.surfaces.project.LabelTile`) kept
#: per process: about 40 KiB per level-0 tile of a flat-ish sheet with ``half_thickness=8``.
TILE_CACHE_BYTES = 64 << 20


# ---------------------------------------------------------------------- parameters
@dataclass(frozen=True, kw_only=True)
class SurfaceSampler(Sampler):
    """Native-3D sampling along segment surfaces: the recipe's parameters (torch-free).

    Give it to the stream with :class:`SurfaceSegment` files::

        DaskVesuviusStream(segments, block=(80, 128, 128), sampler=SurfaceSampler(
            1000, level=2, half_thickness=8, split="train", translate=(8, 16, 16), seed=0))

    Items are ``(image, targets)``, ``targets`` a dict of ``inklabels`` and
    ``supervision`` (uint8 0/1, the block's shape).

    Parameters
    ----------
    samples_per_epoch : int, optional
        Crops per epoch, without replacement (default: every patch of the split).
    level : int
        Pyramid level ``L`` of the scroll and the label Zarrs.
    overlap : float
        Patch corners on a stride of ``max(1, round(patch_y * overlap))`` label pixels
        (both axes); in (0, 1]: 1 gives abutting patches, 0.5 half-overlapping ones.
    min_labeled_coverage : float
        Least labelled bounding-box area / patch area of a training patch, in [0, 1].
    half_thickness : float
        Labels are placed at offsets ``|s| <= half_thickness / 2^L`` along the normal
        (level-0 voxels; 0: on the surface only).
    split : {"train", "validation"}
        Which patches, and which labelled pixels, the stream yields.
    translate : int or (int, int, int)
        Random shift of each crop, uniform in ``[-t, t]`` voxels per axis, new each epoch.
    seed : int, optional
        Seed of the order and the shifts (None: one is drawn; ``stream.sampler`` holds it).
    shuffle : bool
        Random order per epoch (True) or patch order (segment, row, column).
    """

    level: int = 0
    overlap: float = 0.5
    min_labeled_coverage: float = 0.0
    half_thickness: float = 0.0
    split: str = "train"
    translate: Any = 0
    seed: int | None = None
    shuffle: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = object.__setattr__
        if isinstance(self.level, bool) or not isinstance(self.level, (int, np.integer)) or self.level < 0:
            raise SamplingError(f"level must be a non-negative integer, got {self.level!r}")
        set_(self, "level", int(self.level))
        set_(self, "overlap", _number("overlap", self.overlap, 0, 1, low_open=True))
        set_(self, "min_labeled_coverage", _number("min_labeled_coverage", self.min_labeled_coverage, 0, 1))
        set_(self, "half_thickness", _number("half_thickness", self.half_thickness, 0, np.inf))
        if self.split not in SPLITS:
            raise SamplingError(f"split must be 'train' or 'validation', got {self.split!r}")
        set_(self, "translate", int_triple("translate", self.translate, minimum=0))
        seed = self.seed
        bad_seed = isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0
        if seed is not None and bad_seed:
            raise SamplingError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        set_(self, "shuffle", bool(self.shuffle))

    def _method(self) -> str:
        return "surface"

    def plan_options(self) -> dict[str, Any]:
        raise SamplingError("SurfaceSampler plans with SurfacePlan (give it to DaskVesuviusStream "
                            "with SurfaceSegment files), not BlockPlan")


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not (low < value <= high if low_open else low <= value <= high) or np.isnan(value):
        raise SamplingError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return float(value)


# ---------------------------------------------------------------------- data
@dataclass(eq=False)
class SurfaceSegment:
    """One segment for native-3D training: its surface, label Zarrs and scroll volume.

    Parameters
    ----------
    surface : Surface, str or os.PathLike
        A :class:`~vesuvius_dask.surfaces.tifxyz.Surface`, or what
        :func:`~vesuvius_dask.surfaces.tifxyz.open_surface` opens.
    volume : str, os.PathLike or array
        The scroll it lives in: anything :func:`~vesuvius_dask.open_volume` opens. A
        path or URL of an OME-Zarr group opens at the sampler's level; a numpy, dask or
        ``zarr.Array`` must already be that level (a path to a plain Zarr array works at
        level 0 only). Segments given the same path (or the same array object) share
        one volume, its caches, and each other's labels (crossing segments).
    inklabels, supervision : str, os.PathLike or array
        Label Zarrs (read at the sampler's level, middle plane), or 2-D arrays at the
        surface's full resolution (taken ``[::2^L, ::2^L]``); nonzero is set.
    validation : optional
        The validation mask, likewise (None: no validation pixels).
    name : str, optional
        How errors and coordinates name it.
    """

    surface: Any
    volume: Any
    inklabels: Any
    supervision: Any
    validation: Any = None
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.surface, Surface):
            self.surface = open_surface(self.surface)
        if not self.name:
            self.name = self.surface.uuid

    @classmethod
    def from_segment(cls, segment: Any, volume: Any, *, flip_normals: bool = False) -> SurfaceSegment:
        """A segment folder (or :class:`~vesuvius_dask.Segment`) with its label Zarrs, and its scroll."""
        from ..io.segments import open_segment

        seg = segment if hasattr(segment, "label_zarrs") else open_segment(segment)
        zarrs = seg.label_zarrs
        missing = [k for k in ("inklabels", "supervision_mask") if k not in zarrs]
        if missing:
            raise SamplingError(f"{seg.path}: no {' or '.join(k + '.zarr' for k in missing)} (native-3D "
                                "training needs ink labels and a supervision mask)")
        return cls(open_surface(seg, flip_normals=flip_normals), volume, zarrs["inklabels"],
                   zarrs["supervision_mask"], zarrs.get("validation_mask"), name=Path(seg.path).name)


def _label_plane(src: Any, level: int, what: str, storage_options: dict | None) -> np.ndarray:
    """A label plane at ``level`` as a bool array."""
    if isinstance(src, (str, os.PathLike)):
        from ..io.label_zarrs import open_label_zarr

        return np.asarray(open_label_zarr(src, level=level, storage_options=storage_options).compute()) != 0
    arr = np.asarray(src)
    if arr.ndim != 2:
        raise SamplingError(f"{what}: a label array must be 2-D (the full-resolution plane), got shape "
                            f"{arr.shape}")
    step = 2 ** level
    return arr[::step, ::step] != 0


# ---------------------------------------------------------------------- patches
def find_patches(supervision: np.ndarray, validation: np.ndarray | None, patch: Sequence[int],
                 overlap: float, min_labeled_coverage: float) -> tuple[np.ndarray, np.ndarray]:
    """The recipe's patches on a flat label grid (vectorised).

    Parameters
    ----------
    supervision, validation : numpy.ndarray
        2-D label planes (nonzero set); ``validation`` may be None.
    patch : (int, int)
        ``(patch_y, patch_x)``.
    overlap : float
        Stride ``max(1, round(patch_y * overlap))``.
    min_labeled_coverage : float
        Least bounding-box coverage of a training patch.

    Returns
    -------
    train, validation : numpy.ndarray
        ``(k, 2)`` int64 corners ``(y0, x0)`` in raster order.
    """
    sup = np.asarray(supervision) != 0
    val = np.zeros_like(sup) if validation is None else np.asarray(validation) != 0
    py, px = (int(p) for p in patch)
    stride = max(1, int(round(py * overlap)))
    h, w = sup.shape
    empty = np.zeros((0, 2), dtype=np.int64)
    if h < py or w < px:
        return empty, empty
    ys, xs = np.arange(0, h - py + 1, stride), np.arange(0, w - px + 1, stride)
    labelled = sup | val
    n_sup, n_val = _window_counts(sup, ys, xs, py, px), _window_counts(val, ys, xs, py, px)
    rows = _window_extent(labelled, ys, xs, py, px)
    cols = _window_extent(labelled.T, xs, ys, px, py).transpose(1, 0, 2)
    area = (rows[..., 1] - rows[..., 0] + 1) * (cols[..., 1] - cols[..., 0] + 1)
    coverage = np.where(rows[..., 0] >= 0, area, 0) / float(py * px)
    is_val = n_val > 0
    is_train = ~is_val & (n_sup > 0) & (coverage >= min_labeled_coverage)
    corners = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).astype(np.int64)
    return corners[is_train], corners[is_val]


def _window_counts(a: np.ndarray, ys: np.ndarray, xs: np.ndarray, py: int, px: int) -> np.ndarray:
    """Set pixels in each patch ``[y0:y0+py, x0:x0+px]`` (summed-area table)."""
    s = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.int64)
    s[1:, 1:] = np.cumsum(np.cumsum(a, axis=0, dtype=np.int64), axis=1)
    y0, x0 = ys[:, None], xs[None, :]
    return s[y0 + py, x0 + px] - s[y0, x0 + px] - s[y0 + py, x0] + s[y0, x0]


def _window_extent(a: np.ndarray, ys: np.ndarray, xs: np.ndarray, py: int, px: int) -> np.ndarray:
    """``(ny, nx, 2)``: first and last row (relative) holding a set pixel in each patch; -1 if none."""
    c = np.zeros((a.shape[0], a.shape[1] + 1), dtype=np.int64)
    c[:, 1:] = np.cumsum(a, axis=1, dtype=np.int64)
    row_any = (c[:, xs + px] - c[:, xs]) > 0                       # (H, nx): row y has a set pixel
    win = np.lib.stride_tricks.sliding_window_view(row_any, py, axis=0)[ys]  # (ny, nx, py)
    has = win.any(axis=-1)
    first = np.argmax(win, axis=-1)
    last = py - 1 - np.argmax(win[..., ::-1], axis=-1)
    return np.where(has[..., None], np.stack([first, last], axis=-1), -1)


def _patch_points(surface: Surface, corner: Sequence[int], patch: Sequence[int], level: int,
                  full: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points (level ``L`` voxels), normals and validity of a block of label pixels."""
    f = 2 ** level
    rows = (corner[0] + np.arange(patch[0])) * f
    cols = (corner[1] + np.arange(patch[1])) * f
    pts, nrm, ok = surface.sample(rows[:, None], cols[None, :])
    ok = ok & (rows < full[0])[:, None] & (cols < full[1])[None, :]
    return pts / f, nrm, ok


def crop_starts(low: np.ndarray, high: np.ndarray, block: Sequence[int]) -> np.ndarray:
    """Starts of blocks centred on the extents ``[low, high]`` (``(k, 3)``, level ``L`` voxels).

    ``floor(c - (B - 1) / 2 + 0.5)``, ``c = (low + high) / 2``: the block's centre voxel
    position ``start + (B - 1) / 2`` is within half a voxel of ``c``.
    """
    c = (np.asarray(low, dtype=np.float64) + np.asarray(high, dtype=np.float64)) / 2
    return np.floor(c - (np.asarray(block) - 1) / 2 + 0.5).astype(np.int64)


# ---------------------------------------------------------------------- the plan
@dataclass
class _Labels:
    """One segment's labelled pixels of the split, indexed by tiles with 3-D boxes."""

    surface: Surface
    region: np.ndarray      # labelled pixels of the split (level L)
    ink: np.ndarray         # ink pixels of the split (subset of region)
    tiles: np.ndarray       # (t, 2) tile corners (label pixels)
    boxes: np.ndarray       # (t, 6) min z, y, x, max z, y, x of the projected tile (level L voxels)


class SurfacePlan:
    """The native-3D crops of many segments: patches, epochs, and projected labels.

    Parameters
    ----------
    segments : list of SurfaceSegment
    block : (int, int, int)
        Crop shape at the sampler's level.
    sampler : SurfaceSampler
    read_batch : int
        Crops per batch.
    storage_options, cache_dir : optional
        For remote scrolls and label Zarrs (as for the stream).

    Attributes
    ----------
    volumes : list of Volume
        One per segment (segments of one scroll share the object, so its chunk caches).
    patches : numpy.ndarray
        ``(n, 3)`` int64 ``[segment, y0, x0]``: the split's patches (label grid, level L).
    base_starts : numpy.ndarray
        ``(n, 3)`` crop starts before translation (already inside the volume).
    extents : numpy.ndarray
        ``(n, 6)`` min and max ``(z, y, x)`` of each patch's valid points (level L voxels).
    other_patches : numpy.ndarray
        The other split's patches (``[segment, y0, x0]``), for checks.
    """

    sampling_method = "surface"
    stride = None
    positive_fraction = None
    grids: tuple = ()

    def __init__(self, segments: Sequence[Any], block: Sequence[int], sampler: SurfaceSampler, *,
                 read_batch: int = 128, storage_options: dict | None = None, cache_dir: Any = None) -> None:
        self.segments = [_checked_segment(s, i) for i, s in enumerate(segments)]
        if not self.segments:
            raise SamplingError("no segments: give at least one SurfaceSegment")
        self.block = positive_triple("block", block)
        self.level = sampler.level
        self.half_thickness = sampler.half_thickness / 2 ** self.level
        self.read_batch = positive_int("read_batch", read_batch)
        self.seed = sampler.seed if sampler.seed is not None else \
            int(np.random.SeedSequence().entropy) % (1 << 63)
        self.sampler = replace(sampler, seed=self.seed)
        self.volumes = self._volumes(storage_options, cache_dir)
        self._groups = self._volume_groups()
        rows: dict[str, list] = {"train": [], "validation": []}
        self._labels: list[_Labels] = []
        for i, seg in enumerate(self.segments):
            planes = [None if src is None else
                      _label_plane(src, self.level, f"{seg.name} {what}", storage_options)
                      for src, what in ((seg.inklabels, "inklabels"), (seg.supervision, "supervision"),
                                        (seg.validation, "validation"))]
            ink, sup, val = planes
            _check_planes(seg, ink, sup, val, self.level)
            train, valid = find_patches(sup, val, self.block[1:], sampler.overlap,
                                        sampler.min_labeled_coverage)
            for split, corners in (("train", train), ("validation", valid)):
                rows[split].append(np.column_stack([np.full(len(corners), i), corners]).astype(np.int64))
            self._labels.append(self._index(seg, ink, sup, val, sampler.split))
        mine, other = (rows["train"], rows["validation"]) if sampler.split == "train" else \
            (rows["validation"], rows["train"])
        self.other_patches = np.concatenate(other)
        self.patches, self.extents = self._placed(np.concatenate(mine))
        self.base_starts = self._inside(crop_starts(self.extents[:, :3], self.extents[:, 3:], self.block))
        n = len(self.patches)
        if n == 0:
            raise SamplingError(f"no {sampler.split} patches of {self.block[1]}x{self.block[2]} in "
                                f"{len(self.segments)} segment(s) at level {self.level} (overlap="
                                f"{sampler.overlap:g}, min_labeled_coverage="
                                f"{sampler.min_labeled_coverage:g})")
        self.samples_per_epoch = n if sampler.samples_per_epoch is None else sampler.samples_per_epoch
        if self.samples_per_epoch > n:
            raise SamplingError(f"samples_per_epoch={self.samples_per_epoch} is more than the {n} "
                                f"{sampler.split} patches")
        self.translate = np.asarray(sampler.translate, dtype=np.int64)
        self.shuffle = sampler.shuffle
        self._tiles = LRU(TILE_CACHE_BYTES, size=_tile_bytes)
        self._shifts: tuple[int, np.ndarray] | None = None

    @classmethod
    def for_stream(cls, sampler: Any, files: Sequence[Any], block: Sequence[int], *, level: Any, labels: Any,
                   masks: Any, read_batch: int, storage_options: dict | None, cache_dir: Any
                   ) -> SurfacePlan | None:
        """The stream's plan for a :class:`SurfaceSampler` (None for any other sampler)."""
        if not isinstance(sampler, SurfaceSampler):
            return None
        if labels is not None or masks is not None:
            raise SamplingError("SurfaceSampler takes its labels and masks from the SurfaceSegments' label "
                                "Zarrs: leave labels= and masks= out")
        if level is not None and level != sampler.level:
            raise SamplingError(f"level={level!r} differs from the SurfaceSampler's level={sampler.level}; "
                                "give it on the sampler")
        return cls(files, block, sampler, read_batch=read_batch, storage_options=storage_options,
                   cache_dir=cache_dir)

    # -- construction -------------------------------------------------------
    def _volumes(self, storage_options: dict | None, cache_dir: Any) -> list[Any]:
        opened: dict[Any, Any] = {}
        out = []
        for i, seg in enumerate(self.segments):
            key = os.fspath(seg.volume) if isinstance(seg.volume, (str, os.PathLike)) else id(seg.volume)
            if key not in opened:
                opened[key] = resolve_volume(seg.volume, level=self.level, name=f"segments[{i}] volume",
                                             storage_options=storage_options, cache_dir=cache_dir)
                vol = opened[key]
                small = [a for a, (s, b) in enumerate(zip(vol.shape, self.block)) if s < b]
                if small:
                    raise SamplingError(f"{vol.name}: shape {tuple(vol.shape)} at level {self.level} is "
                                        f"smaller than the block {self.block} along {'zyx'[small[0]]}")
            out.append(opened[key])
        return out

    def _volume_groups(self) -> list[list[int]]:
        """For each segment, the segments that live in the same volume (itself included)."""
        ids = [id(v) for v in self.volumes]
        return [[j for j, o in enumerate(ids) if o == i] for i in ids]

    def _placed(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The patches with valid surface points, and their extents."""
        keep, extents = [], []
        for k, (s, y0, x0) in enumerate(patches.tolist()):
            seg = self.segments[s]
            pts, _, ok = _patch_points(seg.surface, (y0, x0), self.block[1:], self.level, seg.surface.shape)
            if ok.any():
                p = pts[ok]
                keep.append(k)
                extents.append(np.concatenate([p.min(axis=0), p.max(axis=0)]))
        ext = np.asarray(extents, dtype=np.float64).reshape(-1, 6)
        return patches[keep].reshape(-1, 3), ext

    def _inside(self, starts: np.ndarray) -> np.ndarray:
        """Starts shifted inwards so that blocks lie inside their volumes."""
        if starts.size == 0:
            return starts.reshape(-1, 3)
        hi = np.array([np.asarray(self.volumes[s].shape) - self.block for s in self.patches[:, 0]])
        return np.clip(starts, 0, hi)

    def _index(self, seg: SurfaceSegment, ink: np.ndarray, sup: np.ndarray, val: np.ndarray | None,
               split: str) -> _Labels:
        """The split's labelled pixels and the 3-D box of each tile of them."""
        val = np.zeros_like(sup) if val is None else val
        if split == "train":
            ink_s = ink & ~val
            region = (sup | ink) & ~val
        else:
            ink_s, region = ink & val, val.copy()
        h, w = region.shape
        corners, boxes = [], []
        for y0 in range(0, h, TILE):
            for x0 in range(0, w, TILE):
                pts, _, _ = self._tile_pixels(seg, region, ink_s, (y0, x0))
                if len(pts):
                    corners.append((y0, x0))
                    boxes.append(np.concatenate([pts.min(axis=0) - self.half_thickness,
                                                 pts.max(axis=0) + self.half_thickness]))
        return _Labels(seg.surface, region, ink_s, np.asarray(corners, dtype=np.int64).reshape(-1, 2),
                       np.asarray(boxes, dtype=np.float64).reshape(-1, 6))

    def _tile_pixels(self, seg: Any, region: np.ndarray, ink: np.ndarray, corner: tuple[int, int]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Points, normals and ink flags of a tile's labelled pixels with a place in the scroll."""
        y0, x0 = corner
        r = region[y0:y0 + TILE, x0:x0 + TILE]
        if not r.any():
            return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, dtype=bool)
        pts, nrm, ok = _patch_points(seg.surface, corner, r.shape, self.level, seg.surface.shape)
        use = ok & r
        return (pts[use], nrm[use],
                ink[y0:y0 + TILE, x0:x0 + TILE][use])

    # -- epochs ----------------------------------------------------------------
    @property
    def starts_per_volume(self) -> list[int]:
        """Patches of the split per segment."""
        return np.bincount(self.patches[:, 0], minlength=len(self.segments)).tolist()

    def order(self, epoch: int) -> np.ndarray:
        """The patch index of every sample of ``epoch``, in plan order."""
        ranks = np.arange(self.samples_per_epoch, dtype=np.int64)
        if not self.shuffle:
            return ranks
        return FeistelPermutation(len(self.patches), [self.seed, int(epoch), _SALT_ORDER])(ranks)

    def shifts(self, epoch: int) -> np.ndarray:
        """``(n, 3)`` translation of every patch in ``epoch`` (0 without ``translate``)."""
        if self._shifts is None or self._shifts[0] != epoch:
            n = len(self.patches)
            if not self.translate.any():
                shifts = np.zeros((n, 3), dtype=np.int64)
            else:
                rng = np.random.default_rng([self.seed, int(epoch), _SALT_SHIFT])
                shifts = rng.integers(-self.translate, self.translate + 1, size=(n, 3))
            self._shifts = (epoch, shifts)
        return self._shifts[1]

    def crops(self, epoch: int, patches: np.ndarray) -> np.ndarray:
        """Crop starts of ``patches`` (indices) in ``epoch``: translated, kept inside the volume."""
        starts = self.base_starts[patches] + self.shifts(epoch)[patches]
        hi = np.array([np.asarray(self.volumes[s].shape) - self.block for s in self.patches[patches, 0]])
        return np.clip(starts, 0, hi.reshape(-1, 3))

    def batches(self, epoch: int, part: int = 0, parts: int = 1, start_batch: int = 0,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(segment_index, crop_starts)`` of the batches of ``epoch`` that belong to ``part``.

        As :meth:`~vesuvius_dask.sampling.plan.BlockPlan.batches`: sample ``i`` of the
        epoch goes to rank ``i % world_size`` after padding the epoch with its own first
        samples to a multiple of ``world_size``; of the rank's batches, batch ``b >=
        start_batch`` belongs to part ``(b - start_batch) % parts``.
        """
        order = self.order(epoch)
        total = -(-order.size // world_size) * world_size
        mine = order[np.arange(rank, total, world_size) % order.size]
        for b, first in enumerate(range(0, mine.size, self.read_batch)):
            if b < start_batch or (b - start_batch) % parts != part:
                continue
            idx = mine[first:first + self.read_batch]
            yield self.patches[idx, 0].copy(), self.crops(epoch, idx)

    def epoch_coords(self, epoch: int | None = None) -> np.ndarray:
        """All ``(segment, z, y, x)`` crop starts of one epoch, in plan order, without reading."""
        parts = [np.column_stack([s, st]) for s, st in self.batches(epoch or 0)]
        return np.concatenate(parts).astype(np.int64)

    # -- labels ----------------------------------------------------------------
    def targets(self, segments: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
        """The projected labels of a batch of crops: ``inklabels`` and ``supervision``.

        Returns
        -------
        dict
            ``(B, Z, Y, X)`` uint8 (0/1) arrays; every labelled pixel of the split of every
            segment in the crop's volume that lands in the crop, merged by max.
        """
        b = len(segments)
        ink = np.zeros((b, *self.block), dtype=np.uint8)
        sup = np.zeros((b, *self.block), dtype=np.uint8)
        for i, (s, start) in enumerate(zip(np.asarray(segments).tolist(), np.asarray(starts))):
            self.project_into(int(s), start, ink[i], sup[i])
        return {"inklabels": ink, "supervision": sup}

    def project_into(self, segment: int, start: Sequence[int], ink: np.ndarray, sup: np.ndarray) -> None:
        """Project the labels of every segment in ``segment``'s volume into the crop at ``start``."""
        lo = np.asarray(start, dtype=np.float64) - 0.5
        hi = lo + np.asarray(self.block)
        for j in self._groups[segment]:
            lab = self._labels[j]
            if not len(lab.tiles):
                continue
            hit = np.nonzero(np.all(lab.boxes[:, 3:] >= lo, axis=1)
                             & np.all(lab.boxes[:, :3] < hi, axis=1))[0]
            for t in hit.tolist():
                self._tile(j, t).paste(start, ink, sup)

    def _tile(self, seg: int, t: int) -> LabelTile:
        """Tile ``t`` of segment ``seg`` projected once into its box of the volume (kept in an LRU)."""
        key = (seg, t)
        value = self._tiles.get(key)
        if value is None:
            lab = self._labels[seg]
            pts, nrm, flags = self._tile_pixels(self.segments[seg], lab.region, lab.ink,
                                                tuple(lab.tiles[t].tolist()))
            value = rasterize(pts, nrm, flags, self.half_thickness, max(self.volumes[seg].shape))
            self._tiles.put(key, value)
        return value

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tiles"] = LRU(TILE_CACHE_BYTES, size=_tile_bytes)
        state["_shifts"] = None
        return state

    def __repr__(self) -> str:
        return (f"SurfacePlan({len(self.segments)} segments, {len(self.patches)} {self.sampler.split} "
                f"patches, "
                f"block={self.block}, level={self.level}, samples_per_epoch={self.samples_per_epoch})")


def _tile_bytes(value: LabelTile) -> int:
    return value.nbytes


def _checked_segment(seg: Any, i: int) -> SurfaceSegment:
    if not isinstance(seg, SurfaceSegment):
        raise InvalidTypeError(f"files[{i}]: SurfaceSampler needs SurfaceSegment files (a surface, its "
                               f"label Zarrs and its scroll volume), got {type(seg).__name__}")
    return seg


def _check_planes(seg: SurfaceSegment, ink: np.ndarray, sup: np.ndarray, val: np.ndarray | None,
                  level: int = 0) -> None:
    """The label planes agree with each other and with the surface at ``level`` (halved with ceil)."""
    shapes = {"inklabels": ink.shape, "supervision": sup.shape}
    if val is not None:
        shapes["validation"] = val.shape
    if len(set(shapes.values())) > 1:
        raise SamplingError(f"{seg.name}: label planes differ in shape: "
                            + ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in shapes.items()))
    shape = getattr(seg.surface, "shape", None)
    if shape is not None:
        want = tuple(-(-int(n) // 2 ** level) for n in shape)
        got = next(iter(shapes.values()))
        if tuple(got) != want:
            raise SamplingError(
                f"{seg.name}: the label planes are {got[0]}x{got[1]} at level {level}, but the surface's "
                f"full resolution {shape[0]}x{shape[1]} makes {want[0]}x{want[1]} there: labels of "
                "another segment or size")
