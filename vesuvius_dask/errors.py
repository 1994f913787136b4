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
    "ArgumentError",
    "SamplingError",
    "InvalidTypeError",
    "ConversionError",
    "CorruptChunkError",
    "ChunkFetchError",
    "OutputError",
    "OutputExistsError",
    "ResumeError",
    "MissingExtraError",
    "CacheDirError",
    "ModelError",
    "Interrupted",
]


class _InFlagNames:
    """Messages speak Python's names (``overwrite=True``); ``cli`` maps them to the CLI's flags."""

    cli: dict[str, str]

    def cli_message(self) -> str:
        """The message with Python's option names replaced by the CLI's flags."""
        text = str(self)
        for python, flag in self.cli.items():
            text = text.replace(python, flag)
        return text


class VesuviusDaskError(_InFlagNames, Exception):
    """Base class of every error raised by vesuvius-dask.

    Messages speak Python's names (``overwrite=True``). ``cli`` maps those words to
    the command line's (``--overwrite``); :meth:`cli_message` applies it, so the CLI
    prints the same error in its own words.
    """

    def __init__(self, *args: object, cli: dict[str, str] | None = None) -> None:
        super().__init__(*args)
        self.cli = dict(cli or {})


class VolumeError(VesuviusDaskError, ValueError):
    """A volume cannot be opened or is not usable (shape, dtype, level, metadata)."""


class VolumeNotFoundError(VolumeError, FileNotFoundError):
    """A volume path does not exist."""


class ArgumentError(VesuviusDaskError, ValueError):
    """An argument's value is not one vesuvius-dask can use (the message names it and the choices).

    The three kinds of failure have a class each: a bad argument
    (:class:`ArgumentError`, and :class:`InvalidTypeError` for a wrong type), bad data
    (:class:`VolumeError`, :class:`CorruptChunkError`, :class:`ConversionError`) and
    I/O (:class:`ChunkFetchError`, :class:`OutputError`, :class:`CacheDirError`).
    """


class SamplingError(ArgumentError):
    """Block sizes, strides or sample counts do not fit the volumes."""


class InvalidTypeError(VesuviusDaskError, TypeError):
    """An argument has a type vesuvius-dask cannot use."""


class ConversionError(VesuviusDaskError, ValueError):
    """A TIFF stack cannot be converted (missing, mismatched or unreadable layers)."""


class CorruptChunkError(VolumeError):
    """A stored chunk cannot be read or decoded; the message names store, chunk and key."""


class ChunkFetchError(VesuviusDaskError, OSError):
    """A remote chunk could not be fetched (after retries); the message names the chunk and its URL."""


class OutputError(VesuviusDaskError, ValueError):
    """An output path is unsafe: it is, contains, or lies inside one of the job's inputs."""


class OutputExistsError(VesuviusDaskError, FileExistsError):
    """The output exists (or an interrupted run's leftovers do) and nothing says to replace it."""


class ResumeError(VesuviusDaskError, ValueError):
    """An interrupted run cannot be resumed: its inputs or options differ from this run's."""


class CacheDirError(VesuviusDaskError, ValueError):
    """A ``cache_dir`` cannot be used: it holds files that are not a vesuvius-dask cache, or is unsafe."""


class ModelError(VesuviusDaskError, ValueError):
    """A model file cannot be used by ``predict`` (missing, a ``torch.save`` checkpoint, unloadable)."""


class MissingExtraError(VesuviusDaskError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class Interrupted(_InFlagNames, KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a writer; ``signum`` says which (exit status 128 + signum)."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by signal {signum}")
        self.signum = int(signum)
        self.cli = {}
        self.kept = False  # whether the job kept its finished part (the message says where)

    def __reduce__(self) -> tuple:
        return (type(self), (self.signum, str(self)))
