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
    "TIFXYZ_FILES", "LABEL_ZARR_KINDS", "is_label_zarr", "tifxyz_dir",
    "OPEN_DATA_BUCKET", "remote_storage_options",
]

#: Files that make a folder a Zarr node (v3, v2 array, v2 group).
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png",) + TIFF_SUFFIXES
#: Folders of TIFF layers in a segment, in order of preference: fragments (Kaggle
#: ink-detection layout) use surface_volume/, scroll segments (volpkg paths/<id>/) layers/.
LAYER_DIRS = ("surface_volume", "layers")
#: The files that make a folder a tifxyz surface (the grid of points and its metadata).
TIFXYZ_FILES = ("x.tif", "y.tif", "z.tif", "meta.json")
#: Label Zarrs of new segments: ``<id>_<kind>.zarr`` or ``<id>_<kind>_v<N>.zarr`` (never volumes).
LABEL_ZARR_KINDS = ("inklabels", "supervision_mask", "validation_mask")


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


#: The Vesuvius Challenge open-data bucket (AWS Open Data, region us-east-1, public).
OPEN_DATA_BUCKET = "vesuvius-challenge-open-data"
_S3_CREDENTIAL_OPTIONS = ("anon", "key", "secret", "token", "username", "password", "profile", "session")
_S3_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                      "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def _s3_credentials_given(opts: dict) -> bool:
    client = opts.get("client_kwargs") or {}
    if any(k in opts for k in _S3_CREDENTIAL_OPTIONS) or "aws_access_key_id" in client:
        return True
    if any(os.environ.get(k) for k in _S3_CREDENTIAL_ENV):
        return True
    shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join("~", ".aws", "credentials")
    return os.path.isfile(os.path.expanduser(shared))


def remote_storage_options(url: str | os.PathLike, storage_options: dict | None = None) -> dict | None:
    """fsspec options for a URL, with vesuvius-dask's defaults for ``s3://`` filled in.

    For ``s3://`` (and ``s3a://``): anonymous (``anon=True``, unsigned requests) unless
    credentials are given, so that the public open-data bucket reads without an AWS
    account. Credentials are given by the options (``anon``, ``key``/``secret``,
    ``token``, ``profile``, ``session``, or ``client_kwargs["aws_access_key_id"]``), by
    the environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, a web-identity or
    container role) or by a shared credentials file (``AWS_SHARED_CREDENTIALS_FILE``,
    default ``~/.aws/credentials``); otherwise s3fs would look for credentials (an
    instance role: pass ``anon=False``). The open-data bucket is read from its region,
    us-east-1, unless the options name a region or an ``endpoint_url``. Other URLs'
    options are returned as given.
    """
    name = os.fspath(url)
    scheme, _, rest = name.partition("://")
    if scheme.lower() not in ("s3", "s3a"):
        return storage_options
    opts = dict(storage_options or {})
    if not _s3_credentials_given(opts):
        opts["anon"] = True
    client = dict(opts.get("client_kwargs") or {})
    if (rest.split("/", 1)[0] == OPEN_DATA_BUCKET and "region_name" not in client
            and "endpoint_url" not in opts and "endpoint_url" not in client):
        client["region_name"] = "us-east-1"
        opts["client_kwargs"] = client
    return opts


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


def is_label_zarr(p: str | os.PathLike) -> bool:
    """True for a name like ``<id>_inklabels.zarr`` or ``<id>_supervision_mask_v2.zarr``."""
    stem = Path(p).name.removesuffix(".zarr")
    base, _, version = stem.rpartition("_v")
    if base and version.isdigit():
        stem = base
    return any(stem.endswith("_" + kind) or stem == kind for kind in LABEL_ZARR_KINDS)


def tifxyz_dir(p: str | os.PathLike) -> Path | None:
    """The tifxyz surface of a folder: the folder itself, or its ``mesh/tifxyz/`` (open-data tree)."""
    p = Path(p)
    for cand in (p, p / "mesh" / "tifxyz"):
        if all((cand / f).is_file() for f in TIFXYZ_FILES):
            return cand
    return None


def segment_volume_dirs(p: str | os.PathLike) -> list[Path]:
    """The volumes a segment folder holds, in order of preference.

    A Zarr inside the folder (``*.zarr``, label Zarrs excluded) comes first, then
    ``surface_volume/`` and ``layers/``, then the open-data tree's
    ``surface-volumes/<name>.zarr`` and ``surface-volumes/<name>.tifs/``. Empty for a
    folder that is not a segment.
    """
    p = Path(p)
    if not p.is_dir() or is_zarr_node(p):
        return []
    zarrs = sorted(z for z in p.glob("*.zarr") if is_zarr_node(z) and not is_label_zarr(z))
    rendered = p / "surface-volumes"
    zarrs += sorted(z for z in rendered.glob("*.zarr") if is_zarr_node(z))
    tifs = sorted(d for d in rendered.glob("*.tifs") if d.is_dir())
    return zarrs + [p / d for d in LAYER_DIRS if (p / d).is_dir()] + tifs


def path_kind(path: str | os.PathLike) -> str:
    """Classify a path (see :class:`PathKind`).

    * ``"url"``: ``scheme://...`` (opened as remote Zarr);
    * ``"zarr"``: a local Zarr array or group (OME-Zarr included);
    * ``"tiff-file"``: a ``.tif``/``.tiff`` file (one page or many);
    * ``"tiff-folder"``: a folder holding ``.tif`` layers;
    * ``"segment"``: a folder holding ``surface_volume/``, ``layers/`` or a ``*.zarr``,
      or a tifxyz surface (``x/y/z.tif`` and ``meta.json``, or ``mesh/tifxyz/``);
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
    if tifxyz_dir(p) is not None:  # a tifxyz surface (its x/y/z.tif are not layers)
        return PathKind.SEGMENT
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
