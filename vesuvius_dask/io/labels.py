"""Labels and masks per volume: expand, load and check them against their volumes (torch-free)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidTypeError, SamplingError
from .open import resolve_volume
from .volume import Volume

__all__ = ["per_volume", "load_mask", "label_volumes", "IMAGE_FILES"]

#: File endings read as 2-D images (anything else given as a path is opened as Zarr).
IMAGE_FILES = (".png", ".tif", ".tiff", ".jpg")


def per_volume(name: str, value: Any, files: Sequence[Any], attr: str) -> list[Any]:
    """Expand ``labels``/``masks`` to one entry per volume (``"segment"``: from Segments)."""
    if value is None:
        return [None] * len(files)
    if isinstance(value, str) and value == "segment":
        out = []
        for i, f in enumerate(files):
            if not hasattr(f, attr):
                raise InvalidTypeError(
                    f"{name}='segment' needs Segment objects in files (open_segment); "
                    f"files[{i}] is a {type(f).__name__}")
            out.append(getattr(f, attr))
        return out
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidTypeError(f"{name} must be None, 'segment' or a list with one entry per volume")
    if len(value) != len(files):
        raise SamplingError(f"{name} has {len(value)} entries for {len(files)} volumes")
    return list(value)


def load_mask(source: Any, what: str, vol: Volume, kind: str = "masks") -> np.ndarray:
    """A 2-D mask (or label image) as numpy, checked against the volume's (Y, X).

    ``kind`` names the argument in the error's advice (``masks``, ``labels``, ``targets``).
    """
    from .segments import read_image

    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        if p.lower().endswith(IMAGE_FILES):
            source = read_image(p)
        else:
            import zarr

            source = zarr.open(p, mode="r")
    arr = np.asarray(source.compute() if hasattr(source, "compute") else source)
    if arr.ndim != 2 or arr.shape != vol.shape[1:]:
        raise SamplingError(
            f"{what}: shape {arr.shape} does not match the (Y, X) = {vol.shape[1:]} of the "
            f"volume {vol.name}; 2-D {kind} are images of the volume's height and width")
    return arr


def label_volumes(labels: Any, files: Sequence[Any], volumes: list[Volume], what: str = "labels"
                  ) -> tuple[list[Volume] | None, bool]:
    """Labels as volumes the engine can read (2-D become (1, Y, X)), and whether they are 2-D.

    ``what`` names the argument in errors (``labels``, or a target's ``targets['ink']``).
    """
    if labels is None:
        return None, False
    out = []
    dims = set()
    for i, (src, vol) in enumerate(zip(per_volume(what, labels, files, "labels"), volumes)):
        if src is None:
            raise SamplingError(f"{what}[{i}]: volume {vol.name} has no labels; every volume needs them")
        if isinstance(src, (str, os.PathLike)) and not os.fspath(src).lower().endswith(IMAGE_FILES):
            import zarr

            src = zarr.open(os.fspath(src), mode="r")  # a Zarr label array, 2-D or 3-D
        if isinstance(src, (str, os.PathLike)) or getattr(src, "ndim", 3) == 2:
            arr = load_mask(src, f"{what}[{i}]", vol, what.split("[")[0])
            out.append(resolve_volume(arr[None], name=f"{what}[{i}]"))
            dims.add(2)
            continue
        lv = resolve_volume(src, name=f"{what}[{i}]")
        if lv.shape != vol.shape:
            raise SamplingError(
                f"{what}[{i}]: shape {lv.shape} does not match the volume {vol.name} "
                f"{vol.shape}; 3-D {what.split('[')[0]} must have the volume's shape")
        out.append(lv)
        dims.add(3)
    if len(dims) > 1:
        raise SamplingError(f"{what} mix 2-D and 3-D arrays; use one kind for all volumes")
    return out, dims == {2}
