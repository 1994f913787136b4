"""Segments as published: a surface volume plus ``mask.png`` and ``inklabels.png``.

:func:`open_segment` finds the parts of a segment (or fragment) folder::

    SEGMENT/
      surface_volume/00.tif ... 64.tif   (fragments; scroll segments: layers/00.tif ...;
                                          or a converted Zarr: SEGMENT/*.zarr)
      mask.png        2-D, non-zero = papyrus present     (optional; or <id>_mask.png)
      inklabels.png   2-D, non-zero = ink                  (optional; or <id>_inklabels.png)
      ir.png          2-D infrared photograph              (optional; or <id>_ir.png)

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
from .paths import TIFF_SUFFIXES, segment_volume_dirs
from .tiff import TiffStack, tiff_volume
from .volume import Volume, zarr_volume

__all__ = ["Segment", "TiffStack", "open_segment", "read_image", "MAX_IMAGE_PIXELS"]

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


def _decode(path: str) -> np.ndarray:
    try:
        with _open_image(Path(path)) as img:
            if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                img = img.convert("L")
            arr = np.asarray(img)
    except Exception as err:
        raise VolumeError(f"{path}: cannot decode image ({err})") from err
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
    path : Path
        The segment folder.
    volume : dask.array.Array
        ``(Z, Y, X)`` surface volume, lazy.
    mask, labels, ir : dask.array.Array or None
        Lazy ``(Y, X)`` images.
    """

    path: Path
    record: Volume = field(repr=False)
    mask: Any = None
    labels: Any = None
    ir: Any = None

    @property
    def volume(self) -> Any:
        return self.record.array

    def __vesuvius_volume__(self) -> Volume:
        return self.record

    def __repr__(self) -> str:
        parts = [f"volume={tuple(self.volume.shape)} {self.volume.dtype}"]
        for name in ("mask", "labels", "ir"):
            if getattr(self, name) is not None:
                parts.append(name)
        return f"Segment({str(self.path)!r}, {', '.join(parts)})"


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).exists():
            return folder / name
    stem = names[0].split(".")[0]
    matches = sorted(p for p in folder.glob(f"*_{stem}.*")
                     if p.suffix.lower() in (".png",) + TIFF_SUFFIXES)
    return matches[0] if matches else None


def open_segment(folder: str | os.PathLike, *, level: int | None = None) -> Segment:
    """Open a segment folder: its surface volume, ``mask.png``, ``inklabels.png``, ``ir.png``.

    The volume is a converted Zarr inside the folder (``*.zarr``; preferred when
    present) or the TIFF layers in ``surface_volume/`` (fragments) or ``layers/``
    (scroll segments), read lazily without conversion. The images are found as
    ``mask.png``, ``inklabels.png``, ``ir.png`` (or ``.tif``), or else as
    ``<anything>_mask.png`` etc. (scroll segments name them after the segment id).

    Parameters
    ----------
    folder : str or os.PathLike
        The segment folder.
    level : int, optional
        OME-Zarr level when the volume is a multiscale Zarr.

    Returns
    -------
    Segment

    Raises
    ------
    VolumeNotFoundError
        The folder, or any volume in it, is missing.
    VolumeError
        A mask, label or IR image whose size differs from the volume's ``(Y, X)``, or
        one that cannot be read.
    """
    root = Path(folder)
    if not root.is_dir():
        raise VolumeNotFoundError(f"{root}: no such segment folder")
    found = segment_volume_dirs(root)
    if found and found[0].suffix == ".zarr":
        record = zarr_volume(found[0], level=level)
    elif found:
        record = tiff_volume(found[0])
    else:
        raise VolumeNotFoundError(
            f"{root}: no volume found (expected a surface_volume/ or layers/ folder of TIFF "
            "layers, or a *.zarr inside the segment folder)")
    _, ny, nx = record.shape
    images = {}
    for name, names in (("mask", _MASK_NAMES), ("labels", _LABEL_NAMES), ("ir", _IR_NAMES)):
        path = _first(root, names)
        if path is None:
            images[name] = None
            continue
        img = read_image(path)
        if img.shape != (ny, nx):
            raise VolumeError(
                f"{path}: image is {img.shape[0]}x{img.shape[1]} (height x width) but the volume "
                f"{record.name} is {ny}x{nx}; they must match")
        images[name] = img
    return Segment(root, record, **images)
