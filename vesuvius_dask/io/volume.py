"""One opened volume: the :class:`Volume` record and how Zarr and numpy arrays become one.

A Zarr-backed volume has one dask chunk per stored chunk, so reading a block touches
only the stored chunks it overlaps; the record keeps what the batch engine needs to
read stored chunks directly (the zarr array, or the in-RAM buffer). Reads of stored
chunks go through :func:`read_stored`, whose errors name the store, the chunk index
and its key. Path dispatch (what a path holds) lives in :mod:`vesuvius_dask.io.open`.

What array metadata declares is checked before anything is made from it
(:func:`check_metadata_file` on the file, before zarr parses it;
:func:`check_zarr` on an opened array): shapes and chunks must be positive
integers, 3-D, at most :data:`MAX_STORED_CHUNKS` stored chunks of at most
:data:`MAX_CHUNK_BYTES` each. An array with more chunks than dask handles cheaply
(:data:`MAX_DASK_CHUNKS`) gets dask chunks spanning several stored chunks
(:func:`dask_chunking`); the batch engine still reads stored chunks. The limits are
config ``vesuvius-dask.limits.*`` (the ``MAX_*`` names here are their defaults), read
at each check.
"""

from __future__ import annotations

import functools
import itertools
import mmap
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import dask.array as da
import numpy as np
from dask.base import tokenize

from .. import config
from ..errors import CorruptChunkError, VolumeError, VolumeNotFoundError
from ..lru import LRU
from .paths import remote_storage_options

__all__ = ["Volume", "VolumeSource", "DEFAULT_RAM_CHUNKS", "ORIGIN_ATTR", "MemmapRef", "memmap_ref",
           "check_array", "wrap_numpy", "wrap_zarr", "multiscale_paths", "open_zarr_path",
           "zarr_volume", "zarr_region", "read_stored", "read_path", "stored_reader",
           "chunk_key", "is_pathlike", "is_remote",
           "remote_chunks", "stored_keys", "disk_cache_for", "REMOTE_GROUP", "check_grid", "check_zarr",
           "check_metadata_file", "dask_chunking", "MAX_STORED_CHUNKS", "MAX_CHUNKS_PER_AXIS",
           "MAX_CHUNK_BYTES", "MAX_AXIS_LENGTH", "MAX_METADATA_BYTES", "MAX_DASK_CHUNKS",
           "MAX_DASK_CHUNKS_PER_AXIS"]

#: Default dask chunking for in-RAM numpy volumes (the converter's default too): config
#: ``vesuvius-dask.chunks``, read when this module is imported.
DEFAULT_RAM_CHUNKS = tuple(int(c) for c in config.get("chunks"))

#: dtype kinds accepted as CT volumes: unsigned, signed integers and floats.
_SUPPORTED_KINDS = "uif"

# -- limits on what array metadata may declare ---------------------------------------------
# Checked before anything is made from the metadata (a 150-byte .zarray can declare
# millions of chunks, and dask's chunk tuples, the engine's chunk boundaries and the
# decode buffers grow with what it says). For scale: Scroll 1 at level 0 is
# 14376 x 7888 x 8096 voxels: about 450 000 stored chunks of 128^3 (4 MiB each in uint16).
# Each is config ``vesuvius-dask.limits.<name>``, read at every check; these are the defaults.

#: Stored chunks one array may have (16 M); more is refused (``limits.stored-chunks``).
MAX_STORED_CHUNKS = config.default("limits.stored-chunks")
#: Stored chunks along one axis (the engine keeps one boundary per chunk and axis: 8 MB)
#: (``limits.chunks-per-axis``).
MAX_CHUNKS_PER_AXIS = config.default("limits.chunks-per-axis")
#: Decoded bytes of one stored chunk (2 GiB); every read of a chunk allocates this much
#: (``limits.chunk-bytes``).
MAX_CHUNK_BYTES = config.default_bytes("limits.chunk-bytes")
#: Voxels along one axis (far beyond any scan; keeps sizes and products exact and small)
#: (``limits.axis-length``).
MAX_AXIS_LENGTH = config.default("limits.axis-length")
#: Bytes of one Zarr metadata file (``.zarray``, ``zarr.json``...) read before zarr parses it
#: (``limits.metadata-bytes``).
MAX_METADATA_BYTES = config.default_bytes("limits.metadata-bytes")
#: Dask chunks of an opened Zarr volume, and along one axis: above either, each dask chunk
#: spans several stored chunks (a power of two along the longest axes; the batch engine
#: still reads stored chunks). dask's per-chunk bookkeeping is about 100 bytes a chunk
#: per axis, and some operations walk every chunk (``limits.dask-chunks``,
#: ``limits.dask-chunks-per-axis``).
MAX_DASK_CHUNKS = config.default("limits.dask-chunks")
MAX_DASK_CHUNKS_PER_AXIS = config.default("limits.dask-chunks-per-axis")


def _dask_limits() -> tuple[int, int]:
    """``(dask chunks, dask chunks per axis)`` allowed now."""
    return int(config.get("limits.dask-chunks")), int(config.get("limits.dask-chunks-per-axis"))

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
    name : str
        How errors name this volume (its path, or ``"array #i"``).
    zarr : zarr.Array or None
        The zarr array behind ``array`` when it is Zarr-backed.
    data : numpy.ndarray or None
        The in-RAM buffer (or memory map) behind ``array`` when there is one.
    """

    array: da.Array
    name: str
    zarr: Any = None
    data: np.ndarray | None = None
    token: str = field(default="")
    #: Fetches stored chunks of a remote Zarr (:class:`~vesuvius_dask.remote.fetch.RemoteChunks`).
    remote: Any = None

    def __post_init__(self) -> None:
        if not self.token:
            self.token = self.array.name

    @property
    def read_path(self) -> str:
        """How the batch engine reads this volume's stored chunks.

        ``partial-uncompressed``, ``sharded``, ``whole-chunk`` or ``zarr`` for a Zarr
        volume (see :mod:`vesuvius_dask.io.partial`); ``memory`` for an in-RAM or
        memory-mapped one, ``dask`` for anything else (its own dask graph).
        """
        if self.zarr is not None:
            return read_path(self.zarr, self.remote)
        return "memory" if self.data is not None else "dask"

    @property
    def label(self) -> str:
        """Deprecated: the volume's :attr:`name` (*label* now means ink labels only)."""
        import warnings

        warnings.warn("Volume.label is now Volume.name", DeprecationWarning, stacklevel=2)
        return self.name

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chunk boundaries along z, y, x (``len(chunks)+1`` offsets each).

        The stored chunks of a Zarr volume (what the engine reads), else the dask chunks.
        """
        if self.zarr is not None:
            return tuple(  # type: ignore[return-value]
                np.append(np.arange(0, n, int(c), dtype=np.int64), np.int64(n))
                for n, c in zip(self.zarr.shape, self.zarr.chunks))
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


def check_array(shape: tuple[int, ...], dtype: np.dtype, name: str) -> None:
    if len(shape) != 3:
        raise VolumeError(
            f"{name}: volumes must be 3-D (z, y, x), got {len(shape)}-D with shape {_short(tuple(shape))}"
        )
    if any(int(s) <= 0 for s in shape):
        raise VolumeError(f"{name}: volume has an empty axis, shape {tuple(shape)}")
    if np.dtype(dtype).kind not in _SUPPORTED_KINDS:
        raise VolumeError(
            f"{name}: unsupported dtype {np.dtype(dtype)}; volumes must be unsigned or signed "
            "integers or floats"
        )


def _short(values: Any) -> str:
    text = repr(values)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_grid(shape: Any, chunks: Any, itemsize: int | None, where: str) -> None:
    """Refuse a shape and chunk shape no volume has, before anything is made from them.

    Parameters
    ----------
    shape, chunks : sequence of int
        What the metadata declares (any JSON value: it is checked).
    itemsize : int, optional
        Bytes per voxel, when known.
    where : str
        Names the file (or array) in the error.

    Raises
    ------
    VolumeError
        One line naming ``where`` and the bad value: not integers, not 3-D, a size
        outside 1..:data:`MAX_AXIS_LENGTH`, more than :data:`MAX_STORED_CHUNKS`
        chunks (or :data:`MAX_CHUNKS_PER_AXIS` along an axis), a chunk above
        :data:`MAX_CHUNK_BYTES`.
    """
    for name, values in (("shape", shape), ("chunks", chunks)):
        if not isinstance(values, (list, tuple)) or not all(_is_int(v) for v in values):
            raise VolumeError(f"{where}: {name} {_short(values)} is not a list of integers")
    if len(shape) != 3:
        raise VolumeError(f"{where}: volumes must be 3-D (z, y, x), got {len(shape)}-D with shape "
                          f"{_short(tuple(shape))}")
    if len(chunks) != 3:
        raise VolumeError(f"{where}: chunks {_short(list(chunks))} do not match the 3-D shape {list(shape)}")
    axis_length = int(config.get("limits.axis-length"))
    for name, values in (("shape", shape), ("chunks", chunks)):
        if not all(1 <= int(v) <= axis_length for v in values):
            raise VolumeError(f"{where}: {name} {[int(v) for v in values]} has a size outside "
                              f"1..{axis_length}")
    shape, chunks = [int(v) for v in shape], [int(v) for v in chunks]
    per_axis = [-(-s // c) for s, c in zip(shape, chunks)]
    total = per_axis[0] * per_axis[1] * per_axis[2]
    most, most_per_axis = int(config.get("limits.stored-chunks")), int(config.get("limits.chunks-per-axis"))
    if total > most or max(per_axis) > most_per_axis:
        raise VolumeError(
            f"{where}: shape {shape} in chunks {chunks} is {total} stored chunks ({per_axis} per axis); "
            f"at most {most} ({most_per_axis} per axis) are supported")
    nbytes = chunks[0] * chunks[1] * chunks[2] * (itemsize or 1)
    chunk_bytes = config.get_bytes("limits.chunk-bytes")
    if nbytes > chunk_bytes:
        raise VolumeError(f"{where}: one chunk {chunks} holds {nbytes} bytes; at most {chunk_bytes} "
                          "are supported")


def check_zarr(arr: Any, name: str) -> None:
    """:func:`check_array` and :func:`check_grid` for an opened Zarr array (its inner chunks).

    Raises
    ------
    VolumeError
        One line naming ``name`` and the bad value.
    """
    shape = tuple(arr.shape)
    if len(shape) != 3:
        check_array(shape, arr.dtype, name)
    try:
        itemsize = np.dtype(arr.dtype).itemsize
    except TypeError:
        itemsize = None
    check_grid(list(shape), list(arr.chunks), itemsize, f"{name} (metadata)")
    check_array(shape, arr.dtype, name)


def _metadata_file(folder: Path) -> tuple[Path, dict] | None:
    """The array metadata a Zarr folder holds (``.zarray`` or ``zarr.json``), read within limits."""
    import json

    limit = config.get_bytes("limits.metadata-bytes")
    for name in (".zarray", "zarr.json"):
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size > limit:
            raise VolumeError(f"{path}: {size} bytes of metadata; at most {limit} are read")
        try:
            meta = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None  # zarr says what is wrong with it
        return (path, meta) if isinstance(meta, dict) else None
    return None


def _declared_grid(meta: dict) -> tuple[Any, list[Any], Any]:
    """``shape``, the chunk shapes (outer, and inner when sharded) and the dtype a metadata dict declares."""
    if "chunk_grid" not in meta:  # Zarr v2
        return meta.get("shape"), [meta.get("chunks")], meta.get("dtype")
    grid = meta.get("chunk_grid")
    grid_conf = grid.get("configuration") if isinstance(grid, dict) else None
    chunks = [grid_conf.get("chunk_shape") if isinstance(grid_conf, dict) else grid]
    for codec in meta.get("codecs") or ():
        if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
            inner = codec.get("configuration")
            chunks.append(inner.get("chunk_shape") if isinstance(inner, dict) else inner)
    return meta.get("shape"), chunks, meta.get("data_type")


def check_metadata_file(folder: Path) -> None:
    """Check the array metadata file in a local Zarr folder before zarr reads it (if it is an array).

    Raises
    ------
    VolumeError
        The file is too large, or declares a grid :func:`check_grid` refuses.
    """
    found = _metadata_file(folder)
    if found is None:
        return
    path, meta = found
    if meta.get("node_type", "array") != "array" or "shape" not in meta:
        return
    shape, chunk_shapes, dtype = _declared_grid(meta)
    if isinstance(shape, list) and len(shape) != 3:
        return  # opened, then refused by check_array, which names the array as users know it
    try:
        itemsize = np.dtype(dtype).itemsize if isinstance(dtype, str) else None
    except (TypeError, ValueError):
        itemsize = None
    if itemsize is None or np.dtype(dtype).kind not in _SUPPORTED_KINDS:
        raise VolumeError(f"{path}: unsupported dtype {_short(dtype)}; volumes must be unsigned or "
                          "signed integers or floats")
    for chunks in chunk_shapes:
        check_grid(shape, chunks, itemsize, str(path))


def dask_chunking(shape: tuple[int, ...], stored: tuple[int, ...]) -> tuple[int, ...]:
    """The stored chunks, or multiples of them few enough for dask (:data:`MAX_DASK_CHUNKS`).

    The axis with the most chunks is doubled until the counts fit.
    """
    chunks = [int(c) for c in stored]
    most, most_per_axis = _dask_limits()
    while True:
        per_axis = [-(-int(s) // c) for s, c in zip(shape, chunks)]
        total = int(np.prod(per_axis, dtype=object))
        if max(per_axis) <= most_per_axis and total <= most:
            return tuple(chunks)
        a = per_axis.index(max(per_axis))
        chunks[a] = min(chunks[a] * 2, int(shape[a]))


def _check_dask_chunks(shape: tuple[int, ...], chunks: Any, name: str) -> None:
    """Refuse a ``chunks=`` that is not positive integers or makes too many dask chunks."""
    if (not isinstance(chunks, (list, tuple)) or len(chunks) != len(shape)
            or not all(_is_int(c) and c >= 1 for c in chunks)):
        raise VolumeError(f"{name}: chunks={_short(chunks)} must be {len(shape)} positive integers")
    per_axis = [-(-int(s) // int(c)) for s, c in zip(shape, chunks)]
    most, most_per_axis = _dask_limits()
    if max(per_axis) > most_per_axis or int(np.prod(per_axis, dtype=object)) > most:
        raise VolumeError(f"{name}: chunks={tuple(chunks)} make {per_axis} dask chunks per axis; at most "
                          f"{most} ({most_per_axis} per axis) are supported; pass "
                          "larger chunks, or chunks=None")


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

    name = os.fspath(source)
    if "://" not in name and not Path(name).exists():
        raise VolumeNotFoundError(f"{name}: no such file or directory")
    local = "://" not in name
    if local:
        check_metadata_file(Path(name))
    if not local:
        storage_options = remote_storage_options(name, storage_options)  # s3: anonymous by default
    try:
        extra = {"storage_options": storage_options} if storage_options and not local else {}
        node = zarr.open(name, mode="r", **extra)
    except Exception as err:  # zarr raises several types for "not a zarr node"
        also = ("" if "://" in name else
                "; nor is it a folder of TIFF layers, a TIFF file or a segment folder")
        raise VolumeError(f"{name}: cannot be opened as a Zarr array or group ({err}){also}") from err
    if isinstance(node, zarr.Array):
        if level not in (None, 0):
            raise VolumeError(
                f"{name}: level={level} asked for, but this is a single Zarr array, "
                "not an OME-Zarr multiscale group"
            )
        return node, name
    paths = multiscale_paths(node.attrs.asdict())
    if paths is None:
        members = sorted(k for k, _ in node.arrays())
        raise VolumeError(
            f"{name}: is a Zarr group but not an OME-Zarr multiscale image (no 'multiscales' "
            f"metadata); its arrays are {members or 'none'} — open one of them by path"
        )
    lvl = 0 if level is None else level
    if not isinstance(lvl, (int, np.integer)) or not 0 <= lvl < len(paths):
        raise VolumeError(
            f"{name}: level {level!r} does not exist; this multiscale image has levels "
            f"0..{len(paths) - 1} ({', '.join(paths)})"
        )
    if local:
        check_metadata_file(Path(name) / paths[lvl])
    try:
        arr = node[paths[lvl]]
    except KeyError as err:
        raise VolumeError(
            f"{name}: multiscale level {lvl} names dataset '{paths[lvl]}', which is missing"
        ) from err
    return arr, f"{name} (level {lvl})"


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


def read_stored(arr: Any, region: tuple[slice, ...], name: str, remote: Any = None) -> np.ndarray:
    """``arr[region]`` as numpy; a chunk that fails to read names the store, index and key.

    A region that is one stored chunk of a local Zarr the fast path understands is
    read by :mod:`vesuvius_dask.io.chunks` (the file and the codecs, without
    zarr-python's per-call machinery). With ``remote`` (a
    :class:`~vesuvius_dask.remote.fetch.RemoteChunks` of ``arr``), the stored chunks the
    region covers are fetched concurrently (and through its disk cache) and
    decoded by the same codecs. Anything else goes through zarr.

    Raises
    ------
    CorruptChunkError
        The bytes could not be read or decoded.
    ChunkFetchError
        A remote chunk could not be fetched, after retries.
    """
    try:
        reader = stored_reader(arr, remote)
        fast, codec = reader.chunk, reader.codec
    except Exception as err:
        raise _corrupt(arr, region, name, err) from err
    if remote is not None and reader.pieces is not None:  # by byte range (a remote partial path)
        return _read_by_pieces(arr, region, name, reader.pieces)
    if remote is not None and codec is not None:
        return _read_remote(arr, region, name, remote, codec)
    try:
        if fast is not None and _one_chunk(arr, region):
            return fast(region)
        return np.asarray(arr[region])
    except Exception as err:
        raise _corrupt(arr, region, name, err) from err


def _corrupt(arr: Any, region: tuple[slice, ...], name: str, err: Exception) -> CorruptChunkError:
    if isinstance(err, CorruptChunkError):  # chunkio's: it names the chunk, key and store already
        return CorruptChunkError(f"{name}: {err}")
    index, key = chunk_key(arr, region)
    where = arr.store_path if getattr(arr, "store_path", None) is not None else "?"
    return CorruptChunkError(f"{name}: chunk {index} (key {key!r} in store {where}) cannot be read: "
                             f"{type(err).__name__}: {err}")


def _read_remote(arr: Any, region: tuple[slice, ...], name: str, remote: Any, codec: Any) -> np.ndarray:
    """Fetch (concurrently) and decode the stored chunks a region covers, and assemble them."""
    region = tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, arr.shape))
    chunks = codec.chunks
    ranges = [range(s.start // c, max(s.start // c, (s.stop - 1) // c) + 1)
              for s, c in zip(region, chunks)]
    wanted = [(codec.key(cid), cid) for cid in itertools.product(*ranges)]
    if len(wanted) > 1:
        remote.prefetch(wanted, limit=len(wanted) + 4 * remote.settings.concurrency)
    out = np.empty(tuple(s.stop - s.start for s in region), dtype=codec.dtype)
    for key, cid in wanted:
        own = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cid, chunks, arr.shape))
        # decoded before it is kept in cache_dir; errors say where the bytes came from
        chunk = remote.get(key, cid, decode=functools.partial(codec.decode, region=own))
        lo = [max(r.start, o.start) for r, o in zip(region, own)]
        hi = [min(r.stop, o.stop) for r, o in zip(region, own)]
        out[tuple(slice(a - r.start, b - r.start) for a, b, r in zip(lo, hi, region))] = \
            chunk[tuple(slice(a - o.start, b - o.start) for a, b, o in zip(lo, hi, own))]
    return out


def _read_by_pieces(arr: Any, region: tuple[slice, ...], name: str, reader: Any) -> np.ndarray:
    """A region read by a partial reader (:mod:`~vesuvius_dask.io.partial`).

    The pieces of its stored chunks, one read unit (a chunk, or a shard) at a time.
    """
    region = tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, arr.shape))
    chunks = tuple(int(c) for c in arr.chunks)
    shape = tuple(s.stop - s.start for s in region)
    out = np.empty((1,) + shape, dtype=arr.dtype)
    units: dict[tuple[int, ...], list] = {}
    spans = [range(s.start // c, max(s.start // c, (s.stop - 1) // c) + 1) for s, c in zip(region, chunks)]
    for cid in itertools.product(*spans):
        lo = [max(r.start, i * c) for r, i, c in zip(region, cid, chunks)]
        hi = [min(r.stop, (i + 1) * c) for r, i, c in zip(region, cid, chunks)]
        row = [0]
        for a, b, r in zip(lo, hi, region):
            row += [a - r.start, b - r.start]
        row += [a - i * c for a, i, c in zip(lo, cid, chunks)]
        unit = tuple(i // u for i, u in zip(cid, reader.unit))
        units.setdefault(unit, []).append((cid, np.array([row], dtype=np.int64)))
    try:
        for items in units.values():
            reader.read_pieces(items, out)
    except CorruptChunkError as err:  # it names the chunk, its key and store already
        raise CorruptChunkError(f"{name}: {err}") from None
    return out[0]


#: Fast chunk readers and codecs by array object (the entry holds the array, so its id
#: stays its own).
_FAST = LRU(256)
os.register_at_fork(after_in_child=_FAST.after_fork)  # a parent thread may hold its lock at fork


def stored_reader(arr: Any, remote: Any = None) -> Any:
    """The array's :class:`~vesuvius_dask.io.partial.ArrayReader` (its read path), made once.

    With ``remote`` (the array's :class:`~vesuvius_dask.remote.fetch.RemoteChunks`), the
    readers of a remote array's partial paths fetch byte ranges through it.
    """
    slot = (id(arr), id(remote))
    entry = _FAST.get(slot)
    if entry is None or entry[0] is not arr or entry[1] is not remote:
        from .partial import array_reader

        entry = (arr, remote, array_reader(arr, remote=remote))
        _FAST.pop(slot)
        _FAST.put(slot, entry)
    return entry[2]


def _readers(arr: Any) -> tuple[Any, Any]:
    """The array's local fast chunk reader and its chunk codec (either may be None), made once."""
    reader = stored_reader(arr)
    return reader.chunk, reader.codec


def read_path(arr: Any, remote: Any = None) -> str:
    """How stored chunks of a Zarr array are read.

    ``partial-uncompressed``, ``sharded``, ``whole-chunk`` or ``zarr`` (see
    :mod:`vesuvius_dask.io.partial`); for a remote array, what it gets with ``remote``
    (its fetcher; without one: as opened without ``cache_dir``).
    """
    return stored_reader(arr, remote).path


def _one_chunk(arr: Any, region: tuple[slice, ...]) -> bool:
    return all(isinstance(s, slice) and s.step in (None, 1) and (s.start or 0) % c == 0
               and s.stop == min((s.start or 0) + c, n)
               for s, c, n in zip(region, arr.chunks, arr.shape)) and len(region) == len(arr.shape)


def stored_keys(arr: Any, chunk_ids: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``(store key, chunk index)`` of stored chunks of ``arr`` (for :meth:`RemoteChunks.prefetch`)."""
    codec = _readers(arr)[1]
    if codec is None:
        return []
    out = []
    for cid in chunk_ids:
        cid = tuple(int(c) for c in cid)
        out.append((codec.key(cid), cid))
    return out


def is_remote(arr: Any) -> bool:
    """Whether a zarr array's store is reached over the network (an fsspec store)."""
    return type(getattr(arr, "store", None)).__name__ == "FsspecStore"


def remote_chunks(arr: Any, name: str, storage_options: dict | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Any:
    """The :class:`~vesuvius_dask.remote.fetch.RemoteChunks` of a remote zarr array, or None.

    None for a local array, and for codecs :mod:`~vesuvius_dask.io.chunks` does not
    decode (zarr then reads it).
    """
    if not is_remote(arr):
        return None
    if _readers(arr)[1] is None and read_path(arr) != "sharded":
        if cache_dir is not None:
            warnings.warn(f"{name}: cache_dir is not used for this array: its layout or codecs "
                          "(sharding, for one) are read through zarr, one request per task",
                          stacklevel=4)
        return None
    from ..remote.fetch import RemoteChunks, RemoteSettings

    store = arr.store
    protocol = store.fs.protocol
    protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
    base = "/".join(p for p in (str(store.path).rstrip("/"), arr.store_path.path) if p)
    settings = RemoteSettings.from_config()
    nbytes = int(np.prod(arr.chunks)) * np.dtype(arr.dtype).itemsize  # an inner chunk's when sharded
    storage_options = remote_storage_options(f"{protocol}://{base}", storage_options)
    remote = RemoteChunks(protocol, base, name, storage_options, settings, chunk_nbytes=nbytes)
    if cache_dir is not None:
        remote = remote.with_cache(disk_cache_for(remote, arr, cache_dir))
    return remote


def disk_cache_for(remote: Any, arr: Any, cache_dir: str | os.PathLike) -> Any:
    """The on-disk cache of ``arr``'s chunks in ``cache_dir`` (a folder per array and metadata)."""
    from ..remote.disk_cache import DiskChunkCache, array_id

    budget = config.get_bytes("remote.cache-dir-bytes")  # None: DiskChunkCache's default
    url = remote.url("").rstrip("/")
    meta = arr.metadata.to_dict()
    try:
        return DiskChunkCache(cache_dir, array_id(url, meta), budget, about={"url": url, "metadata": meta})
    except OSError as err:
        raise VolumeError(f"cache_dir={os.fspath(cache_dir)!r} cannot be used: {err}") from err


class _NamedRead:
    """dask getter for Zarr-backed arrays: errors name the chunk (see :func:`read_stored`)."""

    def __init__(self, name: str, remote: Any = None) -> None:
        self.name, self.remote = name, remote

    def __call__(self, a: Any, b: Any, asarray: bool = True, lock: Any = None) -> np.ndarray:
        return _read_settled(a, b, self.name, self.remote)


def _read_settled(arr: Any, region: tuple[slice, ...], name: str, remote: Any) -> np.ndarray:
    """:func:`read_stored`, then wait until what was fetched is in ``cache_dir``.

    For dask tasks: once a compute returns, its chunks are cached (another process
    started then finds them). The stream waits once per epoch instead.
    """
    out = read_stored(arr, region, name, remote)
    if remote is not None:
        remote.flush()
    return out


#: Stored chunks per dask chunk along y and x for remote Zarr arrays (see :func:`wrap_zarr`):
#: the default of config ``vesuvius-dask.remote.group``, read when an array is opened.
REMOTE_GROUP = config.default("remote.group")


def _grouped(arr: Any) -> tuple[int, ...]:
    """Dask chunks of ``g`` x ``g`` stored chunks in y, x, of at most ``remote.group-bytes``.

    ``g`` is config ``vesuvius-dask.remote.group`` (4), halved while a dask chunk would
    hold more than ``vesuvius-dask.remote.group-bytes`` (256 MiB) decoded.
    """
    cz, cy, cx = (int(c) for c in arr.chunks)
    item = np.dtype(arr.dtype).itemsize
    g = int(config.get("remote.group"))
    most = config.get_bytes("remote.group-bytes")
    while g > 1 and cz * cy * cx * g * g * item > most:
        g //= 2
    return cz, min(cy * g, int(arr.shape[1])), min(cx * g, int(arr.shape[2]))


def wrap_zarr(arr: Any, name: str, chunks: Any, remote: Any = None) -> da.Array:
    """A zarr array as a dask array, one task per stored chunk.

    For a remote array, one task per group of stored chunks, fetched concurrently.
    """
    stored = tuple(int(c) for c in arr.chunks)
    if chunks is None and is_remote(arr) and len(stored) == 3:
        chunks = dask_chunking(arr.shape, _grouped(arr))
    elif chunks is None:  # the stored chunks, unless there are too many for dask
        coarse = dask_chunking(arr.shape, stored)
        chunks = None if coarse == stored else coarse
    else:
        _check_dask_chunks(arr.shape, chunks, name)
        chunks = tuple(int(c) for c in chunks)
        bad = [
            (axis, c, s) for axis, c, s in zip("zyx", chunks, stored)
            if c % s and c < arr.shape["zyx".index(axis)]
        ]
        if bad:
            axis, c, s = bad[0]
            warnings.warn(
                f"{name}: chunks {chunks} are not multiples of the stored chunks {stored} "
                f"(axis {axis}: {c} is not a multiple of {s}); a dask chunk will read several "
                f"stored chunks partially. Pass chunks=None to use the stored chunks.",
                stacklevel=3,
            )
    graph = "volume-zarr-" + tokenize(name, arr.shape, arr.dtype.str, stored, chunks)
    out = da.from_array(arr, chunks=chunks or stored, name=graph, getitem=_NamedRead(name, remote),
                        meta=np.empty((0,) * arr.ndim, dtype=arr.dtype), asarray=False, fancy=False)
    setattr(out, ORIGIN_ATTR, ("zarr", arr, remote))
    return out


def _read_region(arr: Any, name: str, remote: Any, origin: tuple[int, ...], dtype: np.dtype,
                 block_info: Any = None) -> np.ndarray:
    loc = block_info[None]["array-location"]
    region = tuple(slice(o + a, o + b) for o, (a, b) in zip(origin, loc))
    return _read_settled(arr, region, name, remote).astype(dtype, copy=False)


def zarr_region(arr: Any, roi: tuple[slice, ...], name: str, remote: Any = None) -> da.Array:
    """``arr[roi]`` as a dask array whose tasks read only the stored chunks they cover.

    Task edges fall on the stored chunk grid (on groups of ``remote.group`` x
    ``remote.group`` chunks in y and x for a remote array, whose tasks fetch their
    chunks concurrently), clipped to ``roi``: unlike slicing :func:`wrap_zarr`'s
    array, nothing outside the chunks the region touches is read or fetched.
    """
    step = _grouped(arr) if remote is not None and arr.ndim == 3 else tuple(int(c) for c in arr.chunks)
    step = dask_chunking(arr.shape, step)
    chunks = []
    for s, c in zip(roi, step):
        edges = [s.start, *range((s.start // c + 1) * c, s.stop, c), s.stop]
        chunks.append(tuple(int(b - a) for a, b in zip(edges[:-1], edges[1:])))
    origin = tuple(int(s.start) for s in roi)
    dtype = np.dtype(arr.dtype)
    graph = "zarr-region-" + tokenize(name, arr.shape, dtype.str, step, origin, chunks)
    return da.map_blocks(_read_region, arr, name, remote, origin, dtype, chunks=tuple(chunks),
                         dtype=dtype, meta=np.empty((0,) * arr.ndim, dtype=dtype), name=graph)


def zarr_volume(source: str | os.PathLike, *, level: int | None = None, chunks: Any = None,
                storage_options: dict | None = None,
                cache_dir: str | os.PathLike | None = None) -> Volume:
    """A Zarr array or OME-Zarr group path (local or URL) as a :class:`Volume`."""
    arr, lbl = open_zarr_path(source, level, storage_options)
    check_zarr(arr, lbl)
    remote = remote_chunks(arr, lbl, storage_options, cache_dir)
    return Volume(wrap_zarr(arr, lbl, chunks, remote), lbl, zarr=arr, remote=remote)
