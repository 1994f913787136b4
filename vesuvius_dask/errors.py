"""Exception hierarchy of vesuvius-dask.

Every error the library raises on bad input derives from :class:`VesuviusDaskError`
and, where it fits, from the matching built-in (``ValueError``, ``TypeError``,
``FileNotFoundError``), so callers can catch either.
"""

from __future__ import annotations

__all__ = [
    "VesuviusDaskError",
    "VolumeError",
    "VolumeNotFoundError",
    "SamplingError",
    "InvalidTypeError",
    "ConversionError",
]


class VesuviusDaskError(Exception):
    """Base class of every error raised by vesuvius-dask."""


class VolumeError(VesuviusDaskError, ValueError):
    """A volume cannot be opened or is not usable (shape, dtype, level, metadata)."""


class VolumeNotFoundError(VolumeError, FileNotFoundError):
    """A volume path does not exist."""


class SamplingError(VesuviusDaskError, ValueError):
    """Block sizes, strides or sample counts do not fit the volumes."""


class InvalidTypeError(VesuviusDaskError, TypeError):
    """An argument has a type vesuvius-dask cannot use."""


class ConversionError(VesuviusDaskError, ValueError):
    """A TIFF stack cannot be converted (missing, mismatched or unreadable layers)."""
