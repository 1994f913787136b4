"""What a path is: the one answer every entry point uses.

:func:`path_kind` tells a Zarr node, a URL, a TIFF file, a folder of TIFF layers
and a segment folder apart; :func:`protected_roots` says which folders and files a
writer must never touch when a path is one of its inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ZARR_MARKERS", "TIFF_SUFFIXES", "LAYER_DIRS", "IMAGE_SUFFIXES", "PathKind",
    "is_url", "is_zarr_node", "path_kind", "segment_volume_dirs", "protected_roots",
]

#: Files that make a folder a Zarr node (v3, v2 array, v2 group).
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png",) + TIFF_SUFFIXES
#: Folders of TIFF layers in a segment, in order of preference: fragments (Kaggle
#: ink-detection layout) use surface_volume/, scroll segments (volpkg paths/<id>/) layers/.
LAYER_DIRS = ("surface_volume", "layers")


class PathKind:
    """The kinds :func:`path_kind` returns (plain strings, compared with ``==``)."""

    URL = "url"
    ZARR = "zarr"
    TIFF_FILE = "tiff-file"
    TIFF_FOLDER = "tiff-folder"
    SEGMENT = "segment"
    MISSING = "missing"
    OTHER = "other"


def is_url(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` paths (http, https, s3, gs, ...)."""
    return "://" in os.fspath(path)


def is_zarr_node(p: str | os.PathLike) -> bool:
    """True for a local folder that is a Zarr array or group."""
    p = Path(p)
    return p.is_dir() and any((p / m).exists() for m in ZARR_MARKERS)


def _has_tiff_layers(p: Path) -> bool:
    try:
        return any(f.suffix.lower() in TIFF_SUFFIXES and not f.name.startswith(".") and f.is_file()
                   for f in p.iterdir())
    except OSError:
        return False


def segment_volume_dirs(p: str | os.PathLike) -> list[Path]:
    """The volumes a segment folder holds, in order of preference.

    A Zarr inside the folder (``*.zarr``) comes first, then ``surface_volume/`` and
    ``layers/``. Empty for a folder that is not a segment.
    """
    p = Path(p)
    if not p.is_dir() or is_zarr_node(p):
        return []
    zarrs = sorted(z for z in p.glob("*.zarr") if is_zarr_node(z))
    return zarrs + [p / d for d in LAYER_DIRS if (p / d).is_dir()]


def path_kind(path: str | os.PathLike) -> str:
    """Classify a path (see :class:`PathKind`).

    * ``"url"``: ``scheme://...`` (opened as remote Zarr);
    * ``"zarr"``: a local Zarr array or group (OME-Zarr included);
    * ``"tiff-file"``: a ``.tif``/``.tiff`` file (one page or many);
    * ``"tiff-folder"``: a folder holding ``.tif`` layers;
    * ``"segment"``: a folder holding ``surface_volume/``, ``layers/`` or a ``*.zarr``;
    * ``"missing"``: nothing there; ``"other"``: anything else.
    """
    if is_url(path):
        return PathKind.URL
    p = Path(os.fspath(path))
    if not p.exists():
        return PathKind.MISSING
    if p.is_file():
        return PathKind.TIFF_FILE if p.suffix.lower() in TIFF_SUFFIXES else PathKind.OTHER
    if is_zarr_node(p):
        return PathKind.ZARR
    if _has_tiff_layers(p):
        return PathKind.TIFF_FOLDER
    if segment_volume_dirs(p):
        return PathKind.SEGMENT
    return PathKind.OTHER


def _looks_like_segment(p: Path) -> bool:
    """A segment folder, for protection: ``surface_volume/``, or a volume with its 2-D images.

    ``layers/`` or a ``*.zarr`` count only beside a mask or ink-label image (as in a
    scroll segment), so a plain working folder (``work/layers``, ``work/a.zarr``)
    stays writable around its inputs.
    """
    if not p.is_dir() or is_zarr_node(p):
        return False
    if (p / LAYER_DIRS[0]).is_dir():
        return True
    try:
        images = any(f.suffix.lower() in IMAGE_SUFFIXES and f.stem.split("_")[-1] in ("mask", "inklabels")
                     for f in p.iterdir() if f.is_file())
    except OSError:
        return False
    return images and bool(segment_volume_dirs(p))


def protected_roots(path: str | os.PathLike) -> list[Path]:
    """Resolved paths that a writer must neither replace nor write into, for one input.

    The input itself; for a path inside a Zarr hierarchy, its outermost Zarr node;
    for a layer folder, a Zarr or a 2-D image that sits in a segment folder, that
    segment folder. URLs protect nothing local.
    """
    if is_url(path):
        return []
    p = Path(os.path.realpath(os.fspath(path)))
    roots = [p]
    top = p
    while is_zarr_node(top.parent):  # a level of an OME-Zarr, an array in a group
        top = top.parent
    if top != p:
        roots.append(top)
    if _looks_like_segment(top.parent) and (
            top.name in LAYER_DIRS or is_zarr_node(top) or top.suffix.lower() in IMAGE_SUFFIXES
            or top.parent.name in LAYER_DIRS):
        roots.append(top.parent)
    if top.parent.name in LAYER_DIRS and _looks_like_segment(top.parent.parent):
        roots += [top.parent, top.parent.parent]  # one layer file of a segment
    return list(dict.fromkeys(roots))
