"""Segments as published: a surface volume plus ``mask.png`` and ``inklabels.png``.

:func:`open_segment` finds the parts of a segment (or fragment) folder::

    SEGMENT/
      surface_volume/00.tif ... 64.tif   (fragments; scroll segments: layers/00.tif ...;
                                          or a converted Zarr: SEGMENT/*.zarr)
      mask.png        2-D, non-zero = papyrus present     (optional; or <id>_mask.png)
      inklabels.png   2-D, non-zero = ink                  (optional; or <id>_inklabels.png)
      ir.png          2-D infrared photograph              (optional; or <id>_ir.png)

and both published trees of new segments: ``<volpkg>/paths/<id>/`` (the above plus a
tifxyz surface ``x.tif, y.tif, z.tif, meta.json``) and ``<sample>/segments/<id>/``
(``mesh/tifxyz/`` and ``surface-volumes/<name>.zarr`` or ``<name>.tifs/NN.tif``), with
their label Zarrs (``<id>_inklabels.zarr``, ``<id>_supervision_mask.zarr``,
``<id>_validation_mask.zarr``) in the segment folder or beside the tifxyz files. A
segment whose surface was never rendered has no volume; ``render_segment`` renders it
from the scroll (:mod:`vesuvius_dask.surfaces`).

The volume is read lazily: uncompressed TIFF layers are memory-mapped
(:class:`TiffStack`, a block read touches only its rows of each layer), compressed
ones become a lazy dask stack. The 2-D images are lazy dask arrays decoded on first
use.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import config
from ..errors import VolumeError, VolumeNotFoundError
from .catalog import resolve_source
from .label_zarrs import find_label_zarrs, open_label_zarr
from .paths import TIFF_SUFFIXES, is_url, segment_volume_dirs, tifxyz_dir
from .tiff import TiffStack, tiff_volume
from .volume import Volume, zarr_volume

__all__ = ["Segment", "TiffStack", "open_segment", "read_image", "check_images", "MAX_IMAGE_PIXELS",
           "decode_image_bytes"]

#: Largest 2-D image (pixels) read from PNG; Pillow's own decompression-bomb guard
#: (~89 Mpx) is lifted up to this size, because real masks and labels exceed it. The
#: default of config ``vesuvius-dask.limits.image-pixels``, read for each image.
MAX_IMAGE_PIXELS = config.default("limits.image-pixels")
_PIL_LOCK = threading.Lock()

_MASK_NAMES = ("mask.png", "mask.tif", "mask.tiff")
_LABEL_NAMES = ("inklabels.png", "inklabels.tif", "inklabels.tiff")
_IR_NAMES = ("ir.png", "ir.tif", "ir.tiff")


def _open_image(path: Path) -> Any:
    from PIL import Image

    limit = int(config.get("limits.image-pixels"))
    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max(old or 0, limit)
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """A 2-D image (PNG, TIFF) from its bytes (a remote mask or label), as :func:`read_image` reads files.

    Raises
    ------
    VolumeError
        Corrupt or not 2-D (named by ``name``, its URL).
    """
    import io

    arr = _decode(io.BytesIO(data), name)
    if arr.ndim != 2:
        raise VolumeError(f"{name}: expected a 2-D image, got shape {arr.shape}")
    return arr


def _decode(path: Any, name: str | None = None) -> np.ndarray:
    try:
        with _open_image(Path(path) if isinstance(path, str) else path) as img:
            if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                img = img.convert("L")
            arr = np.asarray(img)
    except Exception as err:
        raise VolumeError(f"{name or path}: cannot decode image ({err})") from err
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


def read_image(path: str | os.PathLike) -> Any:
    """A 2-D PNG or TIFF image as a lazy dask array (header read now, pixels on use).

    Large images (beyond Pillow's default decompression-bomb guard, up to config
    ``vesuvius-dask.limits.image-pixels``, :data:`MAX_IMAGE_PIXELS` by default) are
    read; colour images are converted to grayscale.

    Raises
    ------
    VolumeNotFoundError, VolumeError
        Missing file; unreadable or corrupt image (named by its path).
    """
    import dask
    import dask.array as da

    p = Path(path)
    if not p.exists():
        raise VolumeNotFoundError(f"{p}: no such file")
    if p.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        try:
            with tifffile.TiffFile(p) as tif:
                shape, dtype = tuple(tif.pages[0].shape), np.dtype(tif.pages[0].dtype)
        except Exception as err:
            raise VolumeError(f"{p}: unreadable TIFF ({err})") from err
        loader = dask.delayed(tifffile.imread, pure=True)(str(p))
    else:
        try:
            with _open_image(p) as img:
                img.verify()  # checks the whole file (CRCs), without keeping pixels
            with _open_image(p) as img:
                w, h = img.size
                mode = img.mode
        except Exception as err:
            raise VolumeError(f"{p}: corrupt or unreadable image ({err})") from err
        shape = (h, w)
        dtype = np.dtype({"I;16": np.uint16, "I;16B": np.uint16, "I": np.int32,
                          "F": np.float32}.get(mode, np.uint8))
        loader = dask.delayed(_decode, pure=True)(str(p))
    if len(shape) != 2:
        raise VolumeError(f"{p}: expected a 2-D image, got shape {shape}")
    return da.from_delayed(loader, shape=shape, dtype=dtype)


@dataclass
class Segment:
    """A segment or fragment: its volume and, when present, mask, ink labels and IR.

    Attributes
    ----------
    path : Path or str
        The segment folder (its URL, a str, for a segment opened over HTTP).
    volume : dask.array.Array or None
        ``(Z, Y, X)`` surface volume, lazy; None for a surface never rendered (render
        it with :func:`vesuvius_dask.surfaces.render.render_segment`).
    mask, labels, ir : dask.array.Array or None
        Lazy ``(Y, X)`` images (or plane 32 of the supervision mask and ink-label Zarrs).
    tifxyz : Path or None
        The segment's tifxyz surface folder (open it with
        :func:`vesuvius_dask.surfaces.tifxyz.open_surface`).
    label_zarrs : dict
        The label Zarrs found, by kind: ``"inklabels"``, ``"supervision_mask"``,
        ``"validation_mask"`` (see :mod:`vesuvius_dask.io.label_zarrs`).
    """

    path: Path
    record: Volume | None = field(default=None, repr=False)
    mask: Any = None
    labels: Any = None
    ir: Any = None
    tifxyz: Path | None = None
    label_zarrs: dict = field(default_factory=dict)
    #: Where each part came from (``"volume"``, ``"mask"``, ``"labels"``, ``"ir"``: a file or a name).
    sources: dict = field(default_factory=dict, repr=False)

    @property
    def volume(self) -> Any:
        return None if self.record is None else self.record.array

    def __vesuvius_volume__(self) -> Volume:
        if self.record is None:
            raise VolumeNotFoundError(
                f"{self.path}: no rendered surface volume, only the tifxyz surface {self.tifxyz}; "
                "render it from the scroll volume: open_segment(path, volume=SCROLL) (on the command "
                "line --volume SCROLL) or vesuvius_dask.render_segment(segment, volume)")
        return self.record

    def missing(self) -> list[str]:
        """The parts not found: ``volume``, ``surface``, ``mask``, ``labels``, ``ir``, ``validation_mask``."""
        absent = {"volume": self.record is None, "surface": self.tifxyz is None,
                  "mask": self.mask is None, "labels": self.labels is None, "ir": self.ir is None,
                  "validation_mask": "validation_mask" not in self.label_zarrs}
        return [name for name, gone in absent.items() if gone]

    def describe(self) -> str:
        """One line: what was found (and from where) and what is missing."""
        def name(part: str) -> str:
            src = self.sources.get(part)
            return f" ({Path(src).name if isinstance(src, Path) else src})" if src else ""

        found = []
        if self.record is not None:
            found.append(f"volume {tuple(self.volume.shape)} {self.volume.dtype}{name('volume')}")
        if self.tifxyz is not None:
            found.append(f"surface {self.tifxyz}")
        found += [f"{part}{name(part)}" for part in ("mask", "labels", "ir")
                  if getattr(self, part) is not None]
        found += [f"{kind}.zarr" for kind in self.label_zarrs]
        gone = self.missing()
        return (f"segment {self.path}: {', '.join(found) or 'nothing'}"
                + (f"; missing {', '.join(gone)}" if gone else ""))

    def __repr__(self) -> str:
        parts = [f"volume={tuple(self.volume.shape)} {self.volume.dtype}" if self.record is not None
                 else "no volume"]
        for name in ("mask", "labels", "ir"):
            if getattr(self, name) is not None:
                parts.append(name)
        if self.tifxyz is not None:
            parts.append("surface")
        parts += [f"{kind}.zarr" for kind in self.label_zarrs]
        gone = [m for m in self.missing() if m != "volume"]
        missing = f"; missing {', '.join(gone)}" if gone else ""
        return f"Segment({str(self.path)!r}, {', '.join(parts)}{missing})"


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    if tifxyz_dir(folder) == folder:  # its mask.tif is the surface grid's validity, not papyrus
        names = tuple(n for n in names if n not in ("mask.tif", "mask.tiff"))
    for name in names:
        if (folder / name).exists():
            return folder / name
    stem = names[0].split(".")[0]
    matches = sorted(p for p in folder.glob(f"*_{stem}.*")
                     if p.suffix.lower() in (".png",) + TIFF_SUFFIXES
                     and not p.stem.endswith(("_supervision_mask", "_validation_mask")))
    return matches[0] if matches else None


def open_segment(folder: str | os.PathLike, *, level: int | None = None, catalog: Any = None,
                 storage_options: dict | None = None, cache_dir: str | os.PathLike | None = None) -> Segment:
    """Open a segment folder: its surface volume, ``mask.png``, ``inklabels.png``, ``ir.png``.

    The volume is a converted Zarr inside the folder (``*.zarr``; preferred when
    present) or the TIFF layers in ``surface_volume/`` (fragments) or ``layers/``
    (scroll segments), read lazily without conversion. The images are found as
    ``mask.png``, ``inklabels.png``, ``ir.png`` (or ``.tif``), or else as
    ``<anything>_mask.png`` etc. (scroll segments name them after the segment id).

    New segments: the folder may also be (or hold, as ``mesh/tifxyz/``) a tifxyz
    surface; its rendered volume may be ``surface-volumes/<name>.zarr`` or
    ``surface-volumes/<name>.tifs/``; without one the segment has no volume (render
    it with ``render_segment``). Label Zarrs are found in the folder and beside the
    tifxyz files (:func:`~vesuvius_dask.io.label_zarrs.find_label_zarrs`); without a
    mask or ink-label image, plane 32 of the supervision mask and ink-label Zarrs take
    their place.

    Parameters
    ----------
    folder : str or os.PathLike
        The segment folder, or a segment id of the catalogue (``"20230530164535"``,
        resolved offline to its URL; a local path that exists always wins; see
        :mod:`vesuvius_dask.io.catalog`).
    level : int, optional
        OME-Zarr level when the volume is a multiscale Zarr.
    catalog : str, os.PathLike or mapping, optional
        A user's catalogue over the recorded one (default ``$VESUVIUS_DASK_CATALOG``).
    storage_options, cache_dir : optional
        For a segment URL (``https://.../paths/<id>/``): its TIFF layers are read by
        byte range where they are uncompressed strips, else fetched whole (kept in
        ``cache_dir``); see :mod:`vesuvius_dask.io.remote_tiff`.

    Returns
    -------
    Segment

    Raises
    ------
    VolumeNotFoundError
        The folder, or any volume in it, is missing; or a segment id the catalogue
        does not know.
    VolumeError
        A mask, label or IR image whose size differs from the volume's ``(Y, X)``, or
        one that cannot be read.
    """
    folder = resolve_source(folder, catalog=catalog, kind="segment")
    if is_url(folder):
        return _remote_segment(os.fspath(folder), storage_options, cache_dir)
    root = Path(folder)
    if not root.is_dir():
        raise VolumeNotFoundError(f"{root}: no such segment folder")
    surface = tifxyz_dir(root)
    if surface == root and root.parent.name == "mesh":  # <sample>/segments/<id>/mesh/tifxyz/
        root = root.parent.parent
    found = segment_volume_dirs(root)
    if found and found[0].suffix == ".zarr":
        record = zarr_volume(found[0], level=level)
    elif found:
        record = tiff_volume(found[0])
    elif surface is not None:
        record = None  # a surface never rendered: render_segment(segment, scroll volume)
    else:
        raise VolumeNotFoundError(
            f"{root}: no volume found (expected a surface_volume/ or layers/ folder of TIFF "
            "layers, a *.zarr or surface-volumes/ inside the segment folder, or a tifxyz surface)")
    label_zarrs = find_label_zarrs(root, surface)
    images, sources = _segment_images([root] if surface in (None, root) else [root, surface],
                                      label_zarrs)
    if record is not None:
        check_images(images, sources, record.shape[1:], f"the volume {record.name}")
        sources["volume"] = found[0]
    return Segment(root, record, **images, tifxyz=surface, label_zarrs=label_zarrs,
                   sources=dict(sources))


def _remote_segment(url: str, storage_options: dict | None, cache_dir: Any) -> Segment:
    """A segment by URL (:mod:`vesuvius_dask.io.remote_tiff`): its volume, and its images decoded now."""
    import dask.array as da

    from .remote_tiff import open_remote_segment

    record, found = open_remote_segment(url, storage_options=storage_options, cache_dir=cache_dir)
    images: dict[str, Any] = {"mask": None, "labels": None, "ir": None}
    sources: dict[str, Any] = {}
    for name, (source, data) in found.items():
        arr = decode_image_bytes(data, source)
        images[name], sources[name] = da.from_array(arr, chunks=arr.shape), source
    check_images(images, sources, record.shape[1:], f"the volume {record.name}")
    return Segment(url.rstrip("/"), record, **images,  # type: ignore[arg-type]
                   sources={**sources, "volume": record.name})


def _segment_images(folders: list[Path], label_zarrs: dict[str, Path]
                    ) -> tuple[dict[str, Any], dict[str, Path]]:
    """A segment's mask, labels and ir, and the file each came from.

    PNG/TIFF images first, else plane 32 of the supervision-mask and ink-label Zarrs.
    """
    images: dict[str, Any] = {}
    sources: dict[str, Path] = {}
    for name, names in (("mask", _MASK_NAMES), ("labels", _LABEL_NAMES), ("ir", _IR_NAMES)):
        path = next((p for p in (_first(f, names) for f in folders) if p is not None), None)
        images[name] = None if path is None else read_image(path)
        if path is not None:
            sources[name] = path
    for name, kind in (("mask", "supervision_mask"), ("labels", "inklabels")):
        if images[name] is None and kind in label_zarrs:
            images[name] = open_label_zarr(label_zarrs[kind])
            sources[name] = label_zarrs[kind]
    return images, sources


def check_images(images: dict[str, Any], sources: dict[str, Path], shape_yx: tuple[int, int],
                 what: str) -> None:
    """Every 2-D image (mask, labels, ir) must be ``shape_yx``; the error names its file."""
    ny, nx = shape_yx
    for name, img in images.items():
        if img is not None and tuple(img.shape) != (ny, nx):
            path = sources.get(name, name)
            raise VolumeError(
                f"{path}: image is {img.shape[0]}x{img.shape[1]} (height x width) but {what} "
                f"is {ny}x{nx}; they must match")
