"""Label Zarrs of new segments: ink labels, supervision and validation masks as published.

A segment's labels come as ``<id>_inklabels.zarr``, ``<id>_supervision_mask.zarr``
(training needs both) and ``<id>_validation_mask.zarr`` (optional), possibly versioned
``<id>_inklabels_v2.zarr``. Each is a Zarr v2 group of levels ``0``, ``1``, ...
(halving y and x; z stays), each level a ``(65, Y, X)`` array whose label lies on
plane 32 (the surface's layer). :func:`find_label_zarrs` finds them in the folders a
published tree puts them in, :func:`open_label_zarr` reads one plane of one level as a
lazy 2-D dask array.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import VolumeError, VolumeNotFoundError
from .paths import LABEL_ZARR_KINDS, is_url, is_zarr_node
from .volume import check_zarr, multiscale_paths, wrap_zarr

__all__ = ["find_label_zarrs", "open_label_zarr", "label_zarr_levels", "LABEL_ZARR_KINDS"]


def find_label_zarrs(*folders: str | os.PathLike | None) -> dict[str, Path]:
    """The label Zarrs in ``folders``, by kind (``"inklabels"``, ...), newest version first.

    A name matches ``<anything>_<kind>.zarr`` or ``<anything>_<kind>_v<N>.zarr``; of
    several, the highest ``N`` wins (the unversioned name counts as version 0). Folders
    that do not exist are skipped; the first folder holding a kind wins.
    """
    found: dict[str, Path] = {}
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        for kind in LABEL_ZARR_KINDS:
            if kind in found:
                continue
            pattern = re.compile(rf"(?:.*_)?{kind}(?:_v(\d+))?\.zarr$")
            cands = []
            for p in Path(folder).glob(f"*{kind}*.zarr"):
                m = pattern.fullmatch(p.name)
                if m and is_zarr_node(p):
                    cands.append((int(m.group(1) or 0), p.name, p))
            if cands:
                found[kind] = max(cands)[2]
    return found


def _levels(node: Any, name: str) -> list[Any]:
    """The level arrays of a label Zarr: an array (one level) or a group of levels."""
    import zarr

    if isinstance(node, zarr.Array):
        return [node]
    paths = multiscale_paths(node.attrs.asdict())
    if paths is None:  # the published groups: arrays named 0, 1, 2, ...
        paths = sorted((k for k, _ in node.arrays() if k.isdigit()), key=int)
    if not paths:
        raise VolumeError(f"{name}: a Zarr group without label levels (expected arrays 0, 1, ...)")
    out = []
    for p in paths:
        try:
            out.append(node[p])
        except KeyError as err:
            raise VolumeError(f"{name}: level {p!r} is named in its metadata but missing") from err
    return out


def _open(path: str | os.PathLike, storage_options: dict | None) -> list[Any]:
    import zarr

    name = os.fspath(path)
    if not is_url(name) and not Path(name).exists():
        raise VolumeNotFoundError(f"{name}: no such label Zarr")
    try:
        extra = {"storage_options": storage_options} if storage_options and is_url(name) else {}
        node = zarr.open(name, mode="r", **extra)
    except Exception as err:
        raise VolumeError(f"{name}: cannot be opened as a label Zarr ({err})") from err
    return _levels(node, name)


def label_zarr_levels(path: str | os.PathLike, *, storage_options: dict | None = None
                      ) -> list[tuple[int, ...]]:
    """The shape of each level of a label Zarr, finest first."""
    return [tuple(int(s) for s in a.shape) for a in _open(path, storage_options)]


def open_label_zarr(path: str | os.PathLike, *, level: int = 0, plane: int | None = None,
                    storage_options: dict | None = None) -> Any:
    """One plane of one level of a label Zarr, as a lazy 2-D ``(Y, X)`` dask array.

    Parameters
    ----------
    path : str or os.PathLike
        ``<id>_inklabels.zarr`` (or a supervision / validation mask), local or a URL.
    level : int
        Pyramid level (0: the surface's full resolution; each level halves y and x).
    plane : int, optional
        The plane holding the label; default the middle one, ``Z // 2`` (32 of 65, the
        published convention).
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    dask.array.Array
        ``(Y, X)``, the stored dtype (published: uint8, 0 or 255). A 2-D array is
        returned as is (``plane`` must then be None).

    Raises
    ------
    VolumeNotFoundError
        No such path.
    VolumeError
        Not a Zarr, no such level or plane, or not 2-D or 3-D.
    """
    name = os.fspath(path)
    levels = _open(path, storage_options)
    if not isinstance(level, int) or not 0 <= level < len(levels):
        raise VolumeError(f"{name}: level {level!r} does not exist; this label Zarr has levels "
                          f"0..{len(levels) - 1}")
    arr = levels[level]
    lbl = f"{name} (level {level})"
    if arr.ndim == 2 and plane is None:
        import dask.array as da
        from dask.base import tokenize

        return da.from_array(arr, chunks=arr.chunks, name="label-zarr-" + tokenize(lbl, arr.shape))
    if arr.ndim != 3:
        raise VolumeError(f"{lbl}: label arrays are (planes, Y, X), got shape {tuple(arr.shape)}")
    check_zarr(arr, lbl)
    nz = int(arr.shape[0])
    k = nz // 2 if plane is None else plane
    if not isinstance(k, int) or not 0 <= k < nz:
        raise VolumeError(f"{lbl}: plane {plane!r} does not exist; it has planes 0..{nz - 1}")
    return wrap_zarr(arr, lbl, None)[k]
