"""2-D labels of a surface projected into a 3-D block of the scroll, along the normals.

Each labelled pixel (an ink pixel, or a background pixel: supervised and not ink) has
a point ``p`` and a unit normal ``n`` (:meth:`~vesuvius_dask.surfaces.tifxyz.Surface.sample`,
scaled to the volume's level). It is placed at ``p + s * n`` for the offsets

    ``s = -h, -h + d, ..., h``  with  ``d = 2h / ceil(4h) <= 0.5`` voxel

(``h`` the half thickness in voxels of the level; ``h = 0`` places the point alone),
and each position is rasterised to its **nearest voxel**: voxel ``floor(x + 0.5)`` on
every axis (halves go up). Positions outside the block are dropped. The block gets

- ``inklabels``: 1 where an ink pixel landed, else 0;
- ``supervision``: 1 where any labelled pixel landed (ink ∪ background), else 0.

Labels from several surfaces (crossing segments) merge by max: a voxel is ink when any
ink pixel landed in it. Everything is vectorised: one array operation per group of
pixels, no Python loop per pixel.

Two ways give the same voxels:

- :func:`project_labels` projects pixels into one block (pixels that cannot reach the
  block are dropped first, by a conservative box test on each pixel).
- :func:`rasterize` projects a group of pixels (a tile of a segment) **once** into a
  box of the volume (:class:`LabelTile`, bit-packed); :meth:`LabelTile.paste` then ORs
  the box into any block it overlaps. The nearest voxel of ``(p - start) + s·n`` can
  depend on the block's ``start`` through floating-point rounding only when the
  position lies within a few ulps of a voxel boundary (``x + 0.5`` next to an
  integer) and the arithmetic is inexact; those few positions are kept aside and
  projected into each block with the block's own ``start``, so the result is
  bit-identical to :func:`project_labels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["normal_offsets", "project_labels", "rasterize", "LabelTile"]

#: Largest step between offsets along the normal, in voxels (so the sheet has no holes).
MAX_STEP = 0.5
#: Coordinates (voxels) below which tie positions on a 2^-24 grid are computed exactly in any frame.
_EXACT_BOUND = 2.0 ** 25
_EXACT_GRID = 24
#: Largest box of a :class:`LabelTile` (voxels); a tile reaching further is projected per block.
MAX_BOX_VOXELS = 1 << 24
#: Positions per pass of :func:`rasterize`.
_GROUP = 1 << 14


def normal_offsets(half_thickness: float) -> np.ndarray:
    """The offsets ``s`` along the normal: ``[-h, h]`` in equal steps of at most 0.5 voxel."""
    h = float(half_thickness)
    if h <= 0:
        return np.zeros(1)
    return np.linspace(-h, h, int(np.ceil(2 * h / MAX_STEP)) + 1)


def _check_blocks(inklabels: np.ndarray, supervision: np.ndarray) -> None:
    if not (inklabels.flags.c_contiguous and supervision.flags.c_contiguous):
        raise ValueError("project_labels writes into C-contiguous blocks only")


def _pixels(points: np.ndarray, normals: np.ndarray, ink: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(points, dtype=np.float64).reshape(-1, 3),
            np.asarray(normals, dtype=np.float64).reshape(-1, 3),
            np.asarray(ink, dtype=bool).reshape(-1))


def project_labels(points: np.ndarray, normals: np.ndarray, ink: np.ndarray, half_thickness: float,
                   start: Sequence[int], inklabels: np.ndarray, supervision: np.ndarray,
                   *, group: int = 1 << 20) -> None:
    """Add the projection of labelled pixels to a block (in place, merged by max).

    Parameters
    ----------
    points, normals : numpy.ndarray
        ``(k, 3)`` ``(z, y, x)`` in voxels of the block's level; normals of unit length.
    ink : numpy.ndarray
        ``(k,)`` bool: the pixel is ink (else background).
    half_thickness : float
        ``h`` in voxels of the block's level.
    start : (int, int, int)
        The block's origin in the volume.
    inklabels, supervision : numpy.ndarray
        ``(Z, Y, X)`` uint8 blocks, written where pixels land (set to 1).
    group : int
        Positions computed per array operation (bounds memory).
    """
    _check_blocks(inklabels, supervision)
    offsets = normal_offsets(half_thickness)
    points, normals, ink = _pixels(points, normals, ink)
    origin = np.asarray(start, dtype=np.float64)
    shape = inklabels.shape
    rel = points - origin
    # a pixel reaches the block only if its segment [rel - h|n|, rel + h|n|] (+1 voxel) meets
    # [-0.5, shape - 0.5) on every axis (non-finite pixels never land: dropped here)
    reach = float(offsets[-1]) * np.abs(normals) + 1.0
    near = np.all((rel + reach >= -0.5) & (rel - reach < np.asarray(shape) - 0.5), axis=1)
    if not near.all():
        rel, normals, ink = rel[near], normals[near], ink[near]
    _scatter(rel, normals, offsets[None, :], ink, shape, inklabels, supervision, group)


def _scatter(rel: np.ndarray, normals: np.ndarray, offsets: np.ndarray, ink: np.ndarray,
             shape: Sequence[int], inklabels: np.ndarray, supervision: np.ndarray, group: int) -> None:
    """Set the voxels ``floor(rel + s·n + 0.5)`` inside ``shape`` (``offsets``: ``(1, S)`` or ``(k, 1)``)."""
    per = max(1, group // offsets.size) if offsets.shape[0] == 1 else max(1, group)
    flat_ink, flat_sup = inklabels.reshape(-1), supervision.reshape(-1)
    for first in range(0, rel.shape[0], per):
        sl = slice(first, first + per)
        s = offsets if offsets.shape[0] == 1 else offsets[sl]
        inside = idx = None
        for a in range(3):
            # (p - start) + s * n, then + 0.5 (the order of project_labels' reference)
            y = rel[sl, a, None] + s * normals[sl, a, None]
            y += 0.5
            ok = (y >= 0) & (y < shape[a])   # floor(y) in [0, shape): y >= 0, so floor is the cast
            v = y.astype(np.intp)
            inside = ok if inside is None else inside & ok
            idx = v if idx is None else idx * shape[a] + v
        flat_sup[idx[inside]] = 1
        flat_ink[idx[inside & ink[sl, None]]] = 1


@dataclass(eq=False)
class LabelTile:
    """A group of pixels projected once into a box of the volume (see :func:`rasterize`).

    Attributes
    ----------
    origin, shape : numpy.ndarray
        The box in volume voxels (``(3,)`` int64), or None when the tile has no box.
    supervision, ink : numpy.ndarray
        ``(Z, Y, ceil(X / 8))`` bits of the box (packed along x).
    rest : tuple
        Positions projected per block: ``(points, normals, offsets, ink)``, ``offsets``
        ``(q, 1)`` (one per position) or ``(1, S)`` (every offset of every pixel).
    """

    origin: np.ndarray | None
    shape: np.ndarray | None
    supervision: np.ndarray | None
    ink: np.ndarray | None
    rest: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

    @property
    def nbytes(self) -> int:
        arrays = [a for a in (self.supervision, self.ink) if a is not None] + list(self.rest)
        return sum(a.nbytes for a in arrays)

    def paste(self, start: Sequence[int], inklabels: np.ndarray, supervision: np.ndarray) -> None:
        """OR the tile's labels into the block at ``start`` (``(Z, Y, X)`` uint8, in place)."""
        _check_blocks(inklabels, supervision)
        start = np.asarray(start, dtype=np.int64)
        block = np.asarray(inklabels.shape, dtype=np.int64)
        if self.origin is not None:
            rel = self.origin - start
            lo, hi = np.maximum(rel, 0), np.minimum(rel + self.shape, block)
            if (hi > lo).all():
                (z0, y0, x0), (z1, y1, x1) = (lo - rel).tolist(), (hi - rel).tolist()
                out = tuple(slice(a, b) for a, b in zip(lo.tolist(), hi.tolist()))
                for bits, dest in ((self.supervision, supervision), (self.ink, inklabels)):
                    rows = bits[z0:z1, y0:y1]   # rows are whole bytes: unpack flat, then cut x
                    box = np.unpackbits(rows.reshape(-1)).reshape(z1 - z0, y1 - y0, -1)
                    dest[out] |= box[..., x0:x1]
        pts, nrm, offsets, ink = self.rest
        if len(pts):
            rel_pts = pts - start.astype(np.float64)
            _scatter(rel_pts, nrm, offsets, ink, inklabels.shape, inklabels, supervision, 1 << 20)


def rasterize(points: np.ndarray, normals: np.ndarray, ink: np.ndarray, half_thickness: float,
              frame: int, *, max_box: int = MAX_BOX_VOXELS) -> LabelTile:
    """Project pixels once into a box of the volume, for :meth:`LabelTile.paste` into any block.

    Parameters
    ----------
    points, normals, ink, half_thickness
        As for :func:`project_labels` (volume voxels of the level).
    frame : int
        The largest extent of the volume (block starts lie in ``[0, frame]``).
    max_box : int
        Largest box (voxels); pixels reaching further are projected per block.

    Returns
    -------
    LabelTile
        Pasting it into a block sets exactly the voxels :func:`project_labels` sets.
    """
    offsets = normal_offsets(half_thickness)
    h = float(offsets[-1])
    points, normals, ink = _pixels(points, normals, ink)
    # pixels that can land in no block of the volume are dropped (non-finite ones too)
    with np.errstate(invalid="ignore"):
        reach = h * np.abs(normals) + 2
        live = np.all((points + reach >= 0) & (points - reach <= frame), axis=1)
    points, normals, ink, reach = points[live], normals[live], ink[live], reach[live]
    empty = (np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 1)), np.zeros(0, dtype=bool))
    if not len(points):
        return LabelTile(None, None, None, None, empty)
    lo = np.floor((points - reach).min(axis=0))
    hi = np.floor((points + reach).max(axis=0)) + 1
    if np.prod(hi - lo) > max_box:   # far-flung pixels: no box, every position per block
        return LabelTile(None, None, None, None, (points, normals, offsets[None, :], ink))
    # rounding differs between two frames by at most ~6 ulps of the largest magnitude involved
    eps = 2.0 ** -48 * (float(np.abs(points).max()) + frame + float(reach.max()) + 4)
    exact_ok = frame < _EXACT_BOUND and float(np.abs(points).max()) < _EXACT_BOUND
    rel = points - lo
    shape = (hi - lo).astype(np.int64)
    sup_box = np.zeros(int(np.prod(shape)), dtype=bool)
    ink_box = np.zeros_like(sup_box)
    ambiguous: list[tuple[np.ndarray, np.ndarray]] = []
    per = max(1, _GROUP // offsets.size)   # pixels per pass (temporaries stay in cache)
    for first in range(0, len(points), per):
        sl = slice(first, first + per)
        idx, near_rc = _box_voxels(rel[sl], normals[sl], points[sl], offsets, shape, eps, exact_ok)
        if near_rc is None:
            sup_box[idx] = True
            ink_box[idx[ink[sl]]] = True
        else:
            keep = np.ones(idx.shape, dtype=bool)
            keep[near_rc] = False
            sup_box[idx[keep]] = True
            ink_box[idx[keep & ink[sl, None]]] = True
            ambiguous.append((near_rc[0] + first, near_rc[1]))
    rest = empty
    if ambiguous:
        r, c = (np.concatenate(a) for a in zip(*ambiguous))
        rest = (points[r], normals[r], offsets[c][:, None], ink[r])
    sup_box, ink_box = sup_box.reshape(tuple(shape)), ink_box.reshape(tuple(shape))
    if not sup_box.any():
        return LabelTile(None, None, None, None, rest)
    cut = []   # the box trimmed to its set voxels (ink is a subset of supervision)
    for a in range(3):
        used = np.nonzero(sup_box.any(axis=tuple(b for b in range(3) if b != a)))[0]
        cut.append(slice(int(used[0]), int(used[-1]) + 1))
    cut_t = tuple(cut)
    origin = lo.astype(np.int64) + [c.start for c in cut]
    shape = np.array([c.stop - c.start for c in cut], dtype=np.int64)
    return LabelTile(origin, shape, np.packbits(sup_box[cut_t], axis=-1),
                     np.packbits(ink_box[cut_t], axis=-1), rest)


def _box_voxels(rel: np.ndarray, normals: np.ndarray, points: np.ndarray, offsets: np.ndarray,
                shape: np.ndarray, eps: float, exact_ok: bool
                ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Box indices of ``floor(rel + s·n + 0.5)`` (``(k, S)``) and the ambiguous ``(pixel, offset)``s."""
    idx = None
    ambiguous = None
    for a in range(3):
        t = offsets[None, :] * normals[:, a, None]
        y = rel[:, a, None] + t
        y += 0.5                          # > 0 inside the box, so the cast is the floor
        v = y.astype(np.int32)
        y -= v                            # the fraction, exactly
        y -= 0.5
        np.abs(y, out=y)
        near = y > 0.5 - eps              # within eps of a voxel boundary
        if near.any():
            r, c = np.nonzero(near)
            if exact_ok:   # p and s·n on a fine dyadic grid: exact in every frame, so no ambiguity
                tt, pp = t[r, c], points[r, a]
                exact = _on_grid(tt) & _on_grid(pp) & (np.abs(tt) < _EXACT_BOUND)
                r, c = r[~exact], c[~exact]
            if len(r):
                if ambiguous is None:
                    ambiguous = np.zeros(near.shape, dtype=bool)
                ambiguous[r, c] = True
        if idx is None:
            idx = v
        else:
            idx *= int(shape[a])
            idx += v
    return idx, None if ambiguous is None else np.nonzero(ambiguous)


def _on_grid(x: np.ndarray) -> np.ndarray:
    """``x`` is a multiple of ``2^-24`` (so sums with integers below 2^25 are exact)."""
    scaled = np.ldexp(x, _EXACT_GRID)
    return scaled == np.floor(scaled)
