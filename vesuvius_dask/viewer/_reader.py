"""napari reader hook: decide only; the work is in :mod:`vesuvius_dask.viewer`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


def napari_get_reader(path: Any) -> Callable[[Any], list] | None:
    """Return a reader for a Zarr array, OME-Zarr group or segment folder, else None."""
    from . import is_volume_path, read_layers

    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        if not is_volume_path(path):
            return None
    except Exception as err:  # never let a probe break napari's reader search
        warnings.warn(f"vesuvius-dask: cannot read {path}: {err}", stacklevel=2)
        return None
    return read_layers
