"""Optional dependencies: import one, or fail with the command that installs it."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import MissingExtraError

__all__ = ["require"]


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install "vesuvius-dask[extra]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"this needs the '{extra}' extra ({module} is not installed): "
            f"pip install \"vesuvius-dask[{extra}]\"") from err
