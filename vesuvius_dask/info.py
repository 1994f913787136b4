"""Describe a stored volume: shape, dtype, chunks, shards, codecs, levels, sizes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .volumes import _multiscale_paths, _open_zarr_path

__all__ = ["describe", "stored_bytes"]


def stored_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk under ``path`` (a local Zarr array or group)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _codecs(arr: Any) -> str:
    meta = arr.metadata
    if getattr(meta, "zarr_format", 3) == 2:
        comp = meta.compressor
        filters = meta.filters or ()
        return ", ".join([repr(f) for f in filters] + [repr(comp) if comp else "no compressor"])
    return ", ".join(type(c).__name__ + (f"({c.cname.value}, clevel={c.clevel}, {c.shuffle.value})"
                                         if hasattr(c, "cname") else "")
                     for c in meta.codecs)


def _array_lines(arr: Any, indent: str = "  ") -> list[str]:
    import numpy as np

    logical = int(np.prod(arr.shape)) * arr.dtype.itemsize
    shards = getattr(arr, "shards", None)
    return [
        f"{indent}shape   {tuple(arr.shape)}",
        f"{indent}dtype   {arr.dtype}",
        f"{indent}chunks  {tuple(arr.chunks)}",
        f"{indent}shards  {tuple(shards) if shards else 'none'}",
        f"{indent}format  Zarr v{arr.metadata.zarr_format}",
        f"{indent}codecs  {_codecs(arr)}",
        f"{indent}logical {logical:,} bytes",
    ]


def describe(path: str | os.PathLike, *, level: int | None = None) -> str:
    """Return a human-readable description of a Zarr array or OME-Zarr group.

    Parameters
    ----------
    path : str or os.PathLike
        A Zarr array or an OME-Zarr multiscale group.
    level : int, optional
        Only this level of a multiscale group (default: every level).

    Returns
    -------
    str
    """
    import zarr

    label = os.fspath(path)
    arr, _ = _open_zarr_path(path, level)  # validates the path and the level
    node = zarr.open(label, mode="r")
    lines = [label]
    if isinstance(node, zarr.Array):
        lines += _array_lines(node)
    else:
        paths = _multiscale_paths(node.attrs.asdict()) or []
        lines.append(f"  OME-Zarr multiscale image, {len(paths)} levels")
        for i, p in enumerate(paths):
            if level is not None and i != level:
                continue
            lines.append(f"  level {i} ('{p}'):")
            lines += _array_lines(node[p], indent="    ")
    if "://" not in label:
        lines.append(f"  stored  {stored_bytes(label):,} bytes on disk")
    attrs = dict(node.attrs)
    prov = attrs.get("vesuvius_dask")
    if prov:
        lines.append(f"  provenance {prov}")
    return "\n".join(lines)
