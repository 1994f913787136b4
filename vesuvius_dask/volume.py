"""One opened volume: the :class:`Volume` record and how Zarr and numpy arrays become one.

A Zarr-backed volume has one dask chunk per stored chunk, so reading a block touches
only the stored chunks it overlaps; the record keeps what the batch engine needs to
read stored chunks directly (the zarr array, or the in-RAM buffer). Reads of stored
chunks go through :func:`read_stored`, whose errors name the store, the chunk index
and its key. Path dispatch (what a path holds) lives in :mod:`vesuvius_dask.volumes`.
"""

from __future__ import annotations

import mmap
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import dask.array as da
import numpy as np
from dask.base import tokenize

from .errors import CorruptChunkError, VolumeError, VolumeNotFoundError
from .lru import LRU

__all__ = ["Volume", "VolumeSource", "DEFAULT_RAM_CHUNKS", "ORIGIN_ATTR", "MemmapRef", "memmap_ref",
           "check_array", "wrap_numpy", "wrap_zarr", "multiscale_paths", "open_zarr_path",
           "zarr_volume", "read_stored", "chunk_key", "is_pathlike"]

#: Default dask chunking for in-RAM numpy volumes (the converter's default too).
DEFAULT_RAM_CHUNKS = (4, 512, 512)

#: dtype kinds accepted as CT volumes: unsigned, signed integers and floats.
_SUPPORTED_KINDS = "uif"

VolumeSource = Union[str, os.PathLike, np.ndarray, da.Array, Any]

# Attribute set on the dask arrays made here, so that the batch engine can find the
# zarr array or RAM buffer behind an array that came out of ``open_volume``.
ORIGIN_ATTR = "_vesuvius_origin"


@dataclass(eq=False)
class Volume:
    """One opened volume: the dask array plus what the engine needs to read it fast.

    Attributes
    ----------
    array : dask.array.Array
        The lazy, chunk-aligned 3-D array.
    label : str
        How errors name this volume (its path, or ``"array #i"``).
    zarr : zarr.Array or None
        The zarr array behind ``array`` when it is Zarr-backed.
    data : numpy.ndarray or None
        The in-RAM buffer (or memory map) behind ``array`` when there is one.
    """

    array: da.Array
    label: str
    zarr: Any = None
    data: np.ndarray | None = None
    token: str = field(default="")

    def __post_init__(self) -> None:
        if not self.token:
            self.token = self.array.name

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chunk boundaries along z, y, x (``len(chunks)+1`` offsets each)."""
        return tuple(  # type: ignore[return-value]
            np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for c in self.array.chunks
        )

    # Memory maps pickle as a reference to their file, not as a copy of the data,
    # so a stream over memory-mapped volumes stays cheap to send to spawned workers.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        ref = memmap_ref(self.data, self.array.chunks)
        if ref is not None:
            state["data"] = ref
            state["array"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        data = state.get("data")
        if isinstance(data, MemmapRef):
            state["data"] = data.open()
            state["array"] = wrap_numpy(state["data"], data.chunks, state["token"])
        self.__dict__.update(state)


@dataclass(frozen=True)
class MemmapRef:
    filename: str
    offset: int
    dtype: str
    shape: tuple[int, ...]
    order: str
    chunks: tuple[tuple[int, ...], ...]

    def open(self) -> np.memmap:
        return np.memmap(
            self.filename, dtype=self.dtype, mode="r", offset=self.offset,
            shape=self.shape, order=self.order,
        )


def memmap_ref(data: Any, chunks: tuple[tuple[int, ...], ...]) -> MemmapRef | None:
    if not isinstance(data, np.memmap) or not getattr(data, "filename", None):
        return None
    if not isinstance(data.base, mmap.mmap):  # a view of a memmap: pickle normally
        return None
    order = "F" if data.flags.f_contiguous and not data.flags.c_contiguous else "C"
    return MemmapRef(str(data.filename), int(data.offset), data.dtype.str, data.shape, order,
                      chunks)


def check_array(shape: tuple[int, ...], dtype: np.dtype, label: str) -> None:
    if len(shape) != 3:
        raise VolumeError(
            f"{label}: volumes must be 3-D (z, y, x), got {len(shape)}-D with shape {tuple(shape)}"
        )
    if any(int(s) <= 0 for s in shape):
        raise VolumeError(f"{label}: volume has an empty axis, shape {tuple(shape)}")
    if np.dtype(dtype).kind not in _SUPPORTED_KINDS:
        raise VolumeError(
            f"{label}: unsupported dtype {np.dtype(dtype)}; volumes must be unsigned or signed "
            "integers or floats"
        )


def wrap_numpy(arr: np.ndarray, chunks: Any, token: str | None = None) -> da.Array:
    if chunks is None:
        chunks = tuple(min(c, s) for c, s in zip(DEFAULT_RAM_CHUNKS, arr.shape))
    # Name by buffer address, shape and strides: hashing the data of a multi-GB array
    # (dask's default) would read all of it.
    name = token or "volume-ram-" + tokenize(
        arr.__array_interface__["data"][0], arr.shape, arr.strides, arr.dtype.str,
        getattr(arr, "filename", None), os.getpid(),
    )
    out = da.from_array(arr, chunks=chunks, name=name, asarray=False)
    setattr(out, ORIGIN_ATTR, ("numpy", arr))
    return out


def is_pathlike(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def multiscale_paths(attrs: dict[str, Any]) -> list[str] | None:
    """Dataset paths of an OME-Zarr multiscales group (v0.4 or v0.5 metadata)."""
    ms = attrs.get("multiscales")
    if ms is None and isinstance(attrs.get("ome"), dict):
        ms = attrs["ome"].get("multiscales")
    if not ms or not isinstance(ms, list) or not isinstance(ms[0], dict):
        return None
    datasets = ms[0].get("datasets") or []
    paths = [d.get("path") for d in datasets if isinstance(d, dict)]
    return [str(p) for p in paths if p is not None] or None


def open_zarr_path(source: str | os.PathLike, level: int | None,
                   storage_options: dict | None = None) -> tuple[Any, str]:
    import zarr

    label = os.fspath(source)
    if "://" not in label and not Path(label).exists():
        raise VolumeNotFoundError(f"{label}: no such file or directory")
    try:
        extra = {"storage_options": storage_options} if storage_options and "://" in label else {}
        node = zarr.open(label, mode="r", **extra)
    except Exception as err:  # zarr raises several types for "not a zarr node"
        also = ("" if "://" in label else
                "; nor is it a folder of TIFF layers, a TIFF file or a segment folder")
        raise VolumeError(f"{label}: cannot be opened as a Zarr array or group ({err}){also}") from err
    if isinstance(node, zarr.Array):
        if level not in (None, 0):
            raise VolumeError(
                f"{label}: level={level} asked for, but this is a single Zarr array, "
                "not an OME-Zarr multiscale group"
            )
        return node, label
    paths = multiscale_paths(node.attrs.asdict())
    if paths is None:
        members = sorted(k for k, _ in node.arrays())
        raise VolumeError(
            f"{label}: is a Zarr group but not an OME-Zarr multiscale image (no 'multiscales' "
            f"metadata); its arrays are {members or 'none'} — open one of them by path"
        )
    lvl = 0 if level is None else level
    if not isinstance(lvl, (int, np.integer)) or not 0 <= lvl < len(paths):
        raise VolumeError(
            f"{label}: level {level!r} does not exist; this multiscale image has levels "
            f"0..{len(paths) - 1} ({', '.join(paths)})"
        )
    try:
        arr = node[paths[lvl]]
    except KeyError as err:
        raise VolumeError(
            f"{label}: multiscale level {lvl} names dataset '{paths[lvl]}', which is missing"
        ) from err
    return arr, f"{label} (level {lvl})"


def chunk_key(arr: Any, region: tuple[slice, ...]) -> tuple[tuple[int, ...], str]:
    """The stored chunk index and store key that ``region`` (one chunk) starts in.

    For a sharded array the key is the shard's (that is the object in the store).
    """
    chunks = tuple(int(c) for c in arr.chunks)
    index = tuple(int(s.start or 0) // c for s, c in zip(region, chunks))
    outer = getattr(arr, "shards", None) or chunks
    try:
        key = arr.metadata.encode_chunk_key(tuple(int(s.start or 0) // c for s, c in zip(region, outer)))
    except Exception:  # pragma: no cover - metadata without a key encoder
        key = "?"
    return index, key


def read_stored(arr: Any, region: tuple[slice, ...], label: str) -> np.ndarray:
    """``arr[region]`` as numpy; a chunk that fails to read names the store, index and key.

    A region that is one stored chunk of a local Zarr the fast path understands is
    read by :mod:`vesuvius_dask.chunkio` (the file and the codecs, without
    zarr-python's per-call machinery); anything else goes through zarr.

    Raises
    ------
    CorruptChunkError
        The bytes could not be read or decoded.
    """
    try:
        fast = _fast(arr)
        if fast is not None and _one_chunk(arr, region):
            return fast(region)
        return np.asarray(arr[region])
    except Exception as err:
        index, key = chunk_key(arr, region)
        raise CorruptChunkError(
            f"{label}: chunk {index} (key {key!r} in store {arr.store_path}) cannot be read: "
            f"{type(err).__name__}: {err}") from err


#: Fast chunk readers by array object (the entry holds the array, so its id stays its own).
_FAST = LRU(256)
os.register_at_fork(after_in_child=_FAST.after_fork)  # a parent thread may hold its lock at fork


def _fast(arr: Any) -> Any:
    """The array's fast chunk reader (or None), made once per array object."""
    entry = _FAST.get(id(arr))
    if entry is None or entry[0] is not arr:
        from .chunkio import fast_reader

        entry = (arr, fast_reader(arr))
        _FAST.pop(id(arr))
        _FAST.put(id(arr), entry)
    return entry[1]


def _one_chunk(arr: Any, region: tuple[slice, ...]) -> bool:
    return all(isinstance(s, slice) and s.step in (None, 1) and (s.start or 0) % c == 0
               and s.stop == min((s.start or 0) + c, n)
               for s, c, n in zip(region, arr.chunks, arr.shape)) and len(region) == len(arr.shape)


class _NamedRead:
    """dask getter for Zarr-backed arrays: errors name the chunk (see :func:`read_stored`)."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __call__(self, a: Any, b: Any, asarray: bool = True, lock: Any = None) -> np.ndarray:
        return read_stored(a, b, self.label)


def wrap_zarr(arr: Any, label: str, chunks: Any) -> da.Array:
    stored = tuple(int(c) for c in arr.chunks)
    if chunks is not None:
        chunks = tuple(int(c) for c in chunks)
        bad = [
            (axis, c, s) for axis, c, s in zip("zyx", chunks, stored)
            if c % s and c < arr.shape["zyx".index(axis)]
        ]
        if bad:
            axis, c, s = bad[0]
            warnings.warn(
                f"{label}: chunks {chunks} are not multiples of the stored chunks {stored} "
                f"(axis {axis}: {c} is not a multiple of {s}); a dask chunk will read several "
                f"stored chunks partially. Pass chunks=None to use the stored chunks.",
                stacklevel=3,
            )
    name = "volume-zarr-" + tokenize(label, arr.shape, arr.dtype.str, stored, chunks)
    out = da.from_array(arr, chunks=chunks or stored, name=name, getitem=_NamedRead(label),
                        meta=np.empty((0,) * arr.ndim, dtype=arr.dtype), asarray=False, fancy=False)
    setattr(out, ORIGIN_ATTR, ("zarr", arr))
    return out


def zarr_volume(source: str | os.PathLike, *, level: int | None = None, chunks: Any = None,
                storage_options: dict | None = None) -> Volume:
    """A Zarr array or OME-Zarr group path (local or URL) as a :class:`Volume`."""
    arr, lbl = open_zarr_path(source, level, storage_options)
    check_array(arr.shape, arr.dtype, lbl)
    return Volume(wrap_zarr(arr, lbl, chunks), lbl, zarr=arr)
