"""tifxyz surfaces: a grid of points of a sheet in the scroll volume, read lazily.

A tifxyz folder holds ``x.tif``, ``y.tif``, ``z.tif`` (2-D float grids of the same
shape ``(H, W)``; node ``(j, i)`` is the point ``(z, y, x)`` of the sheet in level-0 voxel
coordinates of the scroll volume), ``meta.json`` (``"scale": [sx, sy]``, x first: the
fraction of full resolution the grid is stored at, typically 0.05; ``bbox``, ``uuid``
and any other keys are kept) and optionally ``mask.tif`` (uint8, 255 valid; the grid's
size or an integer multiple of it). A node is invalid where ``z <= 0``, any coordinate is
not finite (published as -1, -1, -1) or beyond :data:`MAX_COORDINATE` in magnitude, or the
mask is below 255 (for a mask ``k`` times the grid, every mask pixel that maps to the node
by integer division must be 255). Invalid nodes hold the point 0 in memory
(:meth:`Surface.nodes`), so that they weigh exactly nothing where they are interpolated
with weight 0. A scale below :data:`MIN_SCALE`, a full-resolution size above
:data:`MAX_FULL_SIZE` pixels per axis, an empty grid and a multi-page grid TIFF are refused.

:func:`open_surface` reads the headers and ``meta.json`` only; the grids load on first
use, once per process (:meth:`Surface.nodes`). Full-resolution points and normals come
from :mod:`.grid` and :mod:`.normals`.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VolumeError, VolumeNotFoundError
from ..io.paths import tifxyz_dir
from .grid import all_set, corners, full_size, interpolate
from .normals import grid_normals, pixel_normals

__all__ = ["Surface", "Nodes", "open_surface", "surface_from_arrays", "read_meta",
           "MIN_SCALE", "MAX_FULL_SIZE", "MAX_COORDINATE"]

#: Smallest scale accepted (published grids are stored at about 0.05 of full resolution).
MIN_SCALE = 1e-4
#: Largest full-resolution size per axis, in pixels.
MAX_FULL_SIZE = 1 << 31
#: A node whose coordinate is this large or larger (in magnitude) is invalid: no scroll is.
MAX_COORDINATE = float(1 << 31)


@dataclass(frozen=True)
class Nodes:
    """A surface's grid in memory: points ``(H, W, 3)`` (z, y, x), validity, normals."""

    points: np.ndarray
    valid: np.ndarray
    normals: np.ndarray
    defined: np.ndarray


@dataclass(eq=False)
class Surface:
    """A tifxyz surface: lazy grids of points, their validity, scale and metadata.

    Attributes
    ----------
    name : str
        How errors name it (its folder).
    x, y, z : dask.array.Array
        ``(H, W)`` float grids, lazy.
    mask : dask.array.Array or None
        ``(H, W)`` bool, already reduced to the grid (from ``mask.tif``).
    scale : tuple of float
        ``(sx, sy)`` as in ``meta.json`` (x first).
    meta : dict
        ``meta.json`` as read, every key kept.
    flip_normals : bool
        Normals by ``tx x ty`` (volume-cartographer) instead of ``ty x tx`` (the
        ``vesuvius`` Python package, the default); see :mod:`.normals`.
    path : Path or None
        The tifxyz folder (None for a surface made from arrays).
    """

    name: str
    x: Any
    y: Any
    z: Any
    scale: tuple[float, float]
    meta: dict = field(default_factory=dict)
    mask: Any = None
    flip_normals: bool = False
    path: Path | None = None
    token: str = ""

    def __post_init__(self) -> None:
        from dask.base import tokenize

        if not self.token:
            self.token = tokenize(self.x.name, self.y.name, self.z.name,
                                  None if self.mask is None else self.mask.name, self.scale)
        self._cache: Nodes | None = None
        self._lock = threading.Lock()

    # the grids are loaded again in another process, never pickled with it
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_cache", None)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache, self._lock = None, threading.Lock()

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the stored grid."""
        return tuple(int(s) for s in self.z.shape)  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int]:
        """Full-resolution ``(rows, columns)``: floor(grid size / scale)."""
        (h, w), (sx, sy) = self.grid_shape, self.scale
        return full_size(h, sy), full_size(w, sx)

    @property
    def bbox(self) -> Any:
        """``meta.json``'s ``bbox`` (``[[xmin, ymin, zmin], [xmax, ymax, zmax]]``) or None."""
        return self.meta.get("bbox")

    @property
    def uuid(self) -> str:
        return str(self.meta.get("uuid") or (self.path.name if self.path else self.name))

    @property
    def points(self) -> Any:
        """``(H, W, 3)`` lazy grid of points in ``(z, y, x)`` order."""
        import dask.array as da

        return da.stack([self.z, self.y, self.x], axis=-1)

    @property
    def valid(self) -> Any:
        """``(H, W)`` lazy bool: the valid nodes."""
        ok = (self.z > 0) & _usable(self.z) & _usable(self.y) & _usable(self.x)
        return ok if self.mask is None else ok & self.mask

    def with_flip(self, flip_normals: bool) -> Surface:
        """The same surface with the other normal convention (nothing is read)."""
        return replace(self, flip_normals=bool(flip_normals), token="")

    def nodes(self) -> Nodes:
        """The grid in memory, with its normals: loaded once per process, then kept."""
        with self._lock:
            if self._cache is None:
                import dask

                points, valid = dask.compute(self.points, self.valid, scheduler="synchronous")
                points = np.array(points, dtype=np.float64)
                valid = np.asarray(valid, dtype=bool)
                points[~valid] = 0.0  # weight 0 times an invalid node is 0, never NaN
                normals, defined = grid_normals(points, valid, flip=self.flip_normals)
                self._cache = Nodes(points, valid, normals, defined)
            return self._cache

    def sample(self, rows: Any, cols: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Points, unit normals and validity at full-resolution pixels ``(rows, cols)``.

        ``rows`` and ``cols`` broadcast together (e.g. ``(h, 1)`` and ``(1, w)``). A
        pixel is valid when every grid node it is interpolated from is valid and its
        normal is defined (see :mod:`.grid`, :mod:`.normals`).

        Returns
        -------
        points, normals : numpy.ndarray
            ``(..., 3)`` float64 in ``(z, y, x)`` order (level-0 voxels; normals unit).
        valid : numpy.ndarray
            ``(...)`` bool.
        """
        g = self.nodes()
        (sx, sy) = self.scale
        c = corners(rows, cols, (sy, sx), self.grid_shape)
        points = interpolate(g.points, c)
        normals, has_normal = pixel_normals(g.normals, g.defined, c)
        return points, normals, all_set(g.valid, c) & has_normal

    def full_points(self, chunks: tuple[int, int] = (1024, 1024)) -> Any:
        """``(H, W, 3)`` lazy full-resolution points (z, y, x), NaN where invalid."""
        import dask.array as da
        from dask.base import tokenize

        h, w = self.shape
        rows = da.arange(h, chunks=chunks[0])[:, None]
        cols = da.arange(w, chunks=chunks[1])[None, :]

        def block(r: np.ndarray, c: np.ndarray) -> np.ndarray:
            p, _, ok = self.sample(r, c)
            return np.where(ok[..., None], p, np.nan)

        return da.map_blocks(block, rows, cols, new_axis=2, chunks=(rows.chunks[0], cols.chunks[1], (3,)),
                             dtype=np.float64, name="surface-points-" + tokenize(self.token))

    def valid_fraction(self) -> float:
        """The fraction of grid nodes that are valid (reads the grid)."""
        return float(self.nodes().valid.mean())

    def __repr__(self) -> str:
        (h, w), (fh, fw) = self.grid_shape, self.shape
        return (f"Surface({self.name!r}, grid {h}x{w}, full {fh}x{fw}, scale {list(self.scale)}"
                f"{', flipped normals' if self.flip_normals else ''})")


def _usable(v: Any) -> Any:
    """Finite and below :data:`MAX_COORDINATE` in magnitude (lazy, elementwise)."""
    import dask.array as da

    return da.isfinite(v) & (abs(v) < MAX_COORDINATE)


def _check_full_size(grid: tuple[int, int], scale: tuple[float, float], path: Any) -> None:
    """One line naming ``path`` when the grid is empty or its full resolution too large."""
    (h, w), (sx, sy) = grid, scale
    if h < 1 or w < 1:
        raise VolumeError(f"{path}: the grid is empty ({h}x{w} nodes)")
    fh, fw = full_size(h, sy), full_size(w, sx)
    if max(fh, fw) > MAX_FULL_SIZE:
        raise VolumeError(f"{path}: scale [{sx:g}, {sy:g}] makes the {h}x{w} grid {fh}x{fw} pixels at "
                          f"full resolution, above {MAX_FULL_SIZE} per axis")


def read_meta(folder: Path) -> tuple[dict, tuple[float, float]]:
    """``meta.json`` of a tifxyz folder and its ``(sx, sy)``; one-line errors naming the file."""
    path = folder / "meta.json"
    if not path.is_file():
        raise VolumeNotFoundError(f"{path}: no such file (a tifxyz folder needs meta.json)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise VolumeError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise VolumeError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format", "tifxyz") != "tifxyz":
        raise VolumeError(f"{path}: format is {meta['format']!r}, not 'tifxyz'")
    return meta, _scale(meta.get("scale"), path)


def _scale(raw: Any, path: Any) -> tuple[float, float]:
    if raw is None:
        raise VolumeError(f"{path}: no 'scale' ([sx, sy], the fraction of full resolution the "
                          "grid is stored at)")
    try:
        sx, sy = (float(v) for v in raw)
    except (TypeError, ValueError):
        raise VolumeError(f"{path}: scale {raw!r} is not two numbers [sx, sy]") from None
    if not (np.isfinite(sx) and np.isfinite(sy) and sx > 0 and sy > 0):
        raise VolumeError(f"{path}: scale {raw!r} must be two positive numbers [sx, sy]")
    if min(sx, sy) < MIN_SCALE:
        raise VolumeError(f"{path}: scale {raw!r} is below {MIN_SCALE:g} (the grid would be over "
                          f"{1 / MIN_SCALE:g} times smaller than full resolution; published: 0.05)")
    return sx, sy


def _read_page(path: str) -> np.ndarray:
    import tifffile

    try:
        arr = tifffile.imread(path, key=0)
    except Exception as err:
        raise VolumeError(f"{path}: unreadable TIFF ({err})") from err
    return arr[..., 0] if arr.ndim == 3 else arr


def _tiff_header(path: Path, *, single: bool = False) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the first page; ``single``: refuse a TIFF of several pages."""
    import tifffile

    if not path.is_file():
        raise VolumeNotFoundError(f"{path}: no such file")
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            pages = len(tif.pages) if single else 1
            shape, dtype = tuple(int(s) for s in page.shape), np.dtype(page.dtype)
    except Exception as err:
        raise VolumeError(f"{path}: unreadable TIFF ({err})") from err
    if pages > 1:
        raise VolumeError(f"{path}: {pages} pages; a tifxyz grid is a single-page 2-D TIFF")
    return shape, dtype


def _lazy_tiff(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    import dask
    import dask.array as da
    from dask.base import tokenize

    stat = path.stat()  # a rewritten file is a new array
    key = "tifxyz-" + tokenize(str(path), stat.st_mtime_ns, stat.st_size)
    return da.from_delayed(dask.delayed(_read_page)(str(path), dask_key_name=key),
                           shape=shape[:2], dtype=dtype, name=key + "-array")


def _grids(folder: Path) -> tuple[dict[str, Any], tuple[int, int]]:
    """x, y, z as lazy arrays, checked: 2-D, float, one shape."""
    grids, shapes = {}, {}
    for axis in "xyz":
        path = folder / f"{axis}.tif"
        shape, dtype = _tiff_header(path, single=True)
        if len(shape) != 2:
            raise VolumeError(f"{path}: expected a 2-D grid, got shape {shape}")
        if dtype.kind != "f":
            raise VolumeError(f"{path}: dtype {dtype} is not float (tifxyz grids are float32)")
        grids[axis], shapes[axis] = _lazy_tiff(path, shape, dtype), shape
    if len(set(shapes.values())) > 1:
        sizes = ", ".join(f"{a}.tif {s[0]}x{s[1]}" for a, s in shapes.items())
        raise VolumeError(f"{folder}: x.tif, y.tif and z.tif must have the same shape; got {sizes}")
    return grids, shapes["z"]


def _grid_mask(path: Path, grid: tuple[int, int]) -> Any:
    """``mask.tif`` reduced to the grid: a node is valid when all its mask pixels are 255."""
    shape, dtype = _tiff_header(path)
    mh, mw = shape[:2]
    h, w = grid
    if mh % h or mw % w:
        raise VolumeError(f"{path}: mask is {mh}x{mw}, neither the grid's {h}x{w} nor an integer "
                          "multiple of it")
    ky, kx = mh // h, mw // w
    full = _lazy_tiff(path, shape, dtype) == 255
    return full.reshape(h, ky, w, kx).all(axis=(1, 3)) if (ky, kx) != (1, 1) else full


def open_surface(path: Any, *, flip_normals: bool = False) -> Surface:
    """Open a tifxyz surface lazily (headers and ``meta.json`` only).

    Parameters
    ----------
    path : str, os.PathLike or Segment
        A tifxyz folder, a segment folder holding one (itself or as ``mesh/tifxyz/``),
        or a :class:`~vesuvius_dask.io.segments.Segment` with a surface.
    flip_normals : bool
        Normals by ``tx x ty`` (volume-cartographer's sign) instead of the ``vesuvius``
        Python package's ``ty x tx`` (see :mod:`vesuvius_dask.surfaces.normals`).

    Returns
    -------
    Surface

    Raises
    ------
    VolumeNotFoundError
        No such folder, no tifxyz surface in it, or a file missing.
    VolumeError
        One line naming the file: x/y/z shapes differ, a grid is not 2-D float, scale
        missing or not positive, a mask that is not the grid's size or a multiple, an
        unreadable TIFF or JSON.
    """
    surface_dir = getattr(path, "tifxyz", None)
    if surface_dir is None and hasattr(path, "tifxyz"):
        raise VolumeNotFoundError(f"{path.path}: the segment has no tifxyz surface")
    folder = Path(os.fspath(surface_dir if surface_dir is not None else path))
    if not folder.is_dir():
        raise VolumeNotFoundError(f"{folder}: no such tifxyz folder")
    found = tifxyz_dir(folder)
    if found is None:
        missing = [f for f in ("x.tif", "y.tif", "z.tif", "meta.json") if not (folder / f).is_file()]
        raise VolumeNotFoundError(f"{folder}: not a tifxyz surface (missing {', '.join(missing)})")
    meta, scale = read_meta(found)
    grids, grid = _grids(found)
    _check_full_size(grid, scale, found / "z.tif" if 0 in grid else found / "meta.json")
    mask = _grid_mask(found / "mask.tif", grid) if (found / "mask.tif").is_file() else None
    return Surface(str(found), grids["x"], grids["y"], grids["z"], scale, meta, mask,
                   bool(flip_normals), found)


def surface_from_arrays(x: Any, y: Any, z: Any, scale: tuple[float, float], *,
                        mask: Any = None, meta: dict | None = None, flip_normals: bool = False,
                        name: str = "surface") -> Surface:
    """A surface from in-memory grids (numpy or dask), e.g. one computed or made in a test.

    Parameters
    ----------
    x, y, z : array_like
        ``(H, W)`` float grids (level-0 voxel coordinates).
    scale : tuple of float
        ``(sx, sy)``, x first, as in ``meta.json``.
    mask : array_like, optional
        ``(H, W)``: valid where non-zero (unlike ``mask.tif``, which needs 255).
    """
    import dask.array as da

    arrs = [da.asarray(np.asarray(a, dtype=np.float32)) if not isinstance(a, da.Array) else a
            for a in (x, y, z)]
    if len({a.shape for a in arrs}) > 1 or arrs[0].ndim != 2:
        raise VolumeError(f"{name}: x, y and z must be 2-D grids of one shape; got "
                          f"{', '.join(str(a.shape) for a in arrs)}")
    sx, sy = _scale(scale, name)
    _check_full_size(arrs[0].shape, (sx, sy), name)
    m = None if mask is None else da.asarray(np.asarray(mask)) != 0
    if m is not None and m.shape != arrs[0].shape:
        raise VolumeError(f"{name}: mask shape {m.shape} differs from the grid's {arrs[0].shape}")
    return Surface(name, *arrs, (sx, sy), dict(meta or {}), m, bool(flip_normals))
