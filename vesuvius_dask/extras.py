"""Optional dependencies: which extra installs which module, and the one message that says so."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import MissingExtraError

__all__ = ["EXTRAS", "missing", "require"]

#: Python modules of the optional extras, and the extra (``pip install "vesuvius-dask[extra]"``)
#: that installs each.
EXTRAS = {"torch": "torch", "napari": "viewer", "qtpy": "viewer", "PyQt6": "viewer", "vispy": "viewer",
          "distributed": "distributed", "fsspec": "remote", "aiohttp": "remote", "s3fs": "remote"}


def missing(module: str, what: str = "this") -> str | None:
    """The install hint for a missing ``module`` (None when no extra provides it).

    ``what`` is who needs it (``"DaskVesuviusStream"``); the default reads "this needs".
    """
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return (f"{what} needs the '{extra}' extra ({top} is not installed): "
            f"pip install \"vesuvius-dask[{extra}]\"")


def require(module: str, extra: str | None = None) -> Any:
    """Import ``module`` or raise :class:`MissingExtraError` with :func:`missing`'s hint."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        hint = missing(module) or (f"this needs the '{extra}' extra ({module} is not installed): "
                                   f"pip install \"vesuvius-dask[{extra}]\"")
        raise MissingExtraError(hint) from err
