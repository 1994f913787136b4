"""Several aligned label volumes by name (``targets=``), each checked against its volume (torch-free).

``targets={"ink": ..., "supervision": ..., "distance": ...}`` holds, per name, what
``labels=`` takes (one entry per volume: 2-D ``(Y, X)`` maps or 3-D volumes of the
volume's shape, numpy, dask, Zarr or image paths, or ``"segment"``); with one volume
the entry may be given bare instead of as a list of one. Each target keeps its own
dtype. ``labels=x`` is the single-target case, yielded bare instead of in a dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidTypeError
from .labels import label_volumes
from .volume import Volume

__all__ = ["Target", "target_volumes", "RESERVED"]

#: Keys of the item dict that are not targets (the coarse block of ``context=``).
RESERVED = ("context",)


@dataclass
class Target:
    """One named target: its volumes (2-D maps as ``(1, Y, X)``) and whether they are 2-D."""

    name: str
    volumes: list[Volume]
    flat: bool


def _one_per_volume(value: Any, files: Sequence[Any]) -> Any:
    listed = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    if len(files) == 1 and not listed and not (isinstance(value, str) and value == "segment"):
        return [value]
    return value


def target_volumes(targets: Any, files: Sequence[Any], volumes: list[Volume]) -> list[Target] | None:
    """The targets as volumes the engine reads, in the order given."""
    if targets is None:
        return None
    if not isinstance(targets, Mapping) or not targets:
        raise InvalidTypeError(f"targets must be a non-empty dict {{name: labels}}, got {targets!r:.80}")
    out = []
    for name, value in targets.items():
        if not isinstance(name, str) or not name or name in RESERVED:
            raise InvalidTypeError(f"targets: {name!r} is not a usable name (a non-empty string other "
                                   f"than {', '.join(RESERVED)})")
        vols, flat = label_volumes(_one_per_volume(value, files), files, volumes, f"targets[{name!r}]")
        out.append(Target(name, vols, flat))  # type: ignore[arg-type]
    return out
