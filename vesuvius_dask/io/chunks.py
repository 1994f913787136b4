"""Reading one stored chunk at the codec's speed: the chunk file, the array's own codecs, numpy.

``zarr.Array[region]`` costs about 0.6 ms per call in zarr-python's machinery for a
chunk that reads and decodes in 0.03 ms. :func:`fast_reader` returns, for an array
whose storage it understands, a function that reads a chunk's file and decodes it
with numcodecs directly:

* a local store (``LocalStore``), the default chunk key encoding;
* Zarr v2: any numcodecs compressor and filters, C or F order;
* Zarr v3: ``bytes`` (either endianness) followed by one of ``blosc``, ``zstd``,
  ``gzip``;
* fixed-size numeric dtypes; a missing chunk file is the fill value.

:class:`ChunkCodec` is the decoding half, which remote reads share
(:mod:`~vesuvius_dask.remote.fetch` fetches the bytes). Anything else (sharding,
``transpose``, ``crc32c``, several compressors in a row, other dtypes) gets
``None``, and the caller reads through zarr: zarr stays the source of truth, and
the property tests check that both paths give the same bytes.

Decoding is bounded by the array's chunk size, before memory is spent: what a
compressed chunk says it holds (a blosc or LZ4 header, a zstd frame's content
size) must be what the array's chunk holds, and the decompressor writes into a
buffer of that size (zlib, gzip, bz2 and LZMA streams are inflated with an output
limit). A chunk that says or gives another size is a
:class:`~vesuvius_dask.errors.CorruptChunkError` naming the store, the chunk index,
its key and both sizes; a 32 KB chunk declaring a gigabyte is refused after
reading its header. Compressors not listed here decode as zarr would (no bound),
then the decoded size is checked.
"""

from __future__ import annotations

import bz2
import lzma
import os
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptChunkError
from .ranges import open_regular

__all__ = ["ChunkCodec", "fast_reader", "read_file", "max_stored_bytes", "strip_crc32c"]

_V3_CODECS = {"BloscCodec": "Blosc", "ZstdCodec": "Zstd", "GzipCodec": "GZip"}

#: blosc 1 header: version, versionlz, flags, typesize, nbytes, blocksize, cbytes (16 bytes).
_BLOSC_HEADER = struct.Struct("<4xI4xI")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _BadSize(Exception):
    """A compressed chunk declares, or decodes to, another size than the array's chunk (internal)."""


def _v3_decoders(codecs: Any) -> tuple[list[Any], str, bool] | None:
    """``(decompressors, byte order, crc32c last)`` of a v3 codec list, or None (zarr reads it)."""
    import numcodecs

    codecs = list(codecs)
    if not codecs or type(codecs[0]).__name__ != "BytesCodec":
        return None
    endian = getattr(codecs[0].endian, "value", codecs[0].endian) or "little"
    checksum = type(codecs[-1]).__name__ == "Crc32cCodec"
    if checksum:
        codecs = codecs[:-1]
    if len(codecs) > 2:  # several compressors in a row: only the last one's size is known
        return None
    decoders = []
    for c in codecs[1:]:
        name = _V3_CODECS.get(type(c).__name__)
        if name is None:
            return None
        decoders.append(getattr(numcodecs, name)())  # blosc, zstd, gzip frames are self-describing
    return decoders, ("<" if endian == "little" else ">"), checksum


def strip_crc32c(data: Any) -> Any:
    """``data`` without its trailing crc32c (Zarr v3 ``crc32c`` codec), checked.

    Raises
    ------
    ValueError
        Fewer than 4 bytes, or the checksum does not match.
    """
    import numcodecs

    if len(data) < 4:
        raise ValueError(f"{len(data)} bytes cannot hold a crc32c checksum")
    try:
        return numcodecs.CRC32C().decode(data)
    except RuntimeError as err:
        raise ValueError(f"crc32c mismatch ({err})") from None


def _v2_decoders(meta: Any) -> list[Any] | None:
    steps = []
    if meta.compressor is not None:
        if not hasattr(meta.compressor, "decode"):
            return None
        steps.append(meta.compressor)
    for f in reversed(meta.filters or ()):
        if not hasattr(f, "decode"):
            return None
        steps.append(f)
    return steps


def read_file(path: Path, bound: int) -> bytes:
    """The stored bytes of one chunk (the only I/O of the fast path): at most ``bound`` of them.

    Only a regular file is read (opened without blocking: a FIFO is refused, not waited
    on), and not past ``bound`` (a link to ``/dev/zero`` or a huge file is refused
    rather than read into memory).
    """
    fd, st = open_regular(path)
    with open(fd, "rb", buffering=0) as f:
        size = st.st_size
        if size > bound:
            raise OSError(f"{path} holds {size} bytes, more than any compressed chunk of this array "
                          f"takes ({bound})")
        data = f.read(size + 1)  # (sized as the file is: read(bound) would cost 5x here)
    if len(data) > bound:  # it grew meanwhile
        raise OSError(f"{path} holds more than any compressed chunk of this array takes ({bound} bytes)")
    return data


# -- bounded decompression: each returns exactly ``n`` decoded bytes, or raises _BadSize ----------
def _blosc(codec: Any, n: int) -> Callable[[Any], Any]:
    from numcodecs.blosc import decompress

    def run(data: Any) -> Any:
        if len(data) < 16:
            raise _BadSize(f"blosc header is truncated ({len(data)} bytes)")
        declared, cbytes = _BLOSC_HEADER.unpack_from(data)
        if declared != n:
            raise _BadSize(f"blosc header declares {declared} decoded bytes")
        if cbytes > len(data):
            raise _BadSize(f"blosc header declares {cbytes} compressed bytes, the chunk has {len(data)}")
        out = np.empty(n, np.uint8)
        decompress(data, out)
        return out
    return run


def _zstd_content_size(data: Any) -> int | None:
    """The decoded size a zstd frame's header declares, or None when it does not say.

    See the frame header in RFC 8878 (``Frame_Header_Descriptor``, ``Frame_Content_Size``).
    """
    if len(data) < 5 or bytes(data[:4]) != _ZSTD_MAGIC:
        return None
    fhd = data[4]
    single = (fhd >> 5) & 1
    size = (single, 2, 4, 8)[fhd >> 6]
    if not size:
        return None
    at = 5 + (1 - single) + (0, 1, 2, 4)[fhd & 3]
    if len(data) < at + size:
        raise _BadSize(f"zstd frame header is truncated ({len(data)} bytes)")
    value = int.from_bytes(bytes(data[at:at + size]), "little")
    return value + 256 if size == 2 else value


def _zstd(codec: Any, n: int) -> Callable[[Any], Any]:
    from numcodecs.zstd import decompress

    def run(data: Any) -> Any:
        declared = _zstd_content_size(data)
        if declared is not None and declared != n:
            raise _BadSize(f"zstd frame declares {declared} decoded bytes")
        out = np.empty(n, np.uint8)  # without a declared size, zstd stops at the buffer's end
        if declared is not None:
            decompress(data, out)
            return out
        try:
            decompress(data, out)
        except RuntimeError as err:
            got = re.search(r"got (\d+)", str(err))
            if got or "too small" in str(err):
                raise _BadSize("zstd frame (no declared size) decodes to "
                               + (f"{got.group(1)} bytes" if got else f"more than {n} bytes")) from None
            raise
        return out
    return run


def _lz4(codec: Any, n: int) -> Callable[[Any], Any]:
    from numcodecs.lz4 import decompress

    def run(data: Any) -> Any:
        declared = int.from_bytes(bytes(data[:4]), "little") if len(data) >= 4 else -1
        if declared != n:
            raise _BadSize(f"LZ4 header declares {declared} decoded bytes")
        out = np.empty(n, np.uint8)
        decompress(data, out)
        return out
    return run


def _inflate(wbits: int, members: bool) -> Callable[[Any, int], Any]:
    def run(codec: Any, n: int) -> Callable[[Any], Any]:
        def inflate(data: Any) -> Any:
            parts, left = [], n
            while True:
                d = zlib.decompressobj(wbits)
                part = d.decompress(data, left or 1)  # max_length 0 would mean no limit
                if len(part) > left or (not d.eof and d.decompress(d.unconsumed_tail, 1)):
                    raise _BadSize(f"the stream inflates to more than {n} bytes")
                if not d.eof:
                    raise _BadSize(f"the stream is truncated after {n - left + len(part)} bytes")
                parts.append(part)
                left -= len(part)
                data = d.unused_data
                if not (members and data):
                    break
            if left:
                raise _BadSize(f"the stream inflates to {n - left} bytes")
            return parts[0] if len(parts) == 1 else b"".join(parts)
        return inflate
    return run


def _stdlib(make: Callable[[Any], Any]) -> Callable[[Any, int], Any]:
    def run(codec: Any, n: int) -> Callable[[Any], Any]:
        def decompress(data: Any) -> Any:
            d = make(codec)
            out = d.decompress(data, n)
            if len(out) == n and not d.eof and d.decompress(b"", 1):
                raise _BadSize(f"the stream decompresses to more than {n} bytes")
            if len(out) != n or not d.eof:
                raise _BadSize(f"the stream decompresses to {len(out)} bytes")
            return out
        return decompress
    return run


#: Memory an LZMA stream's decoder may take (its dictionary; ``xz -9`` needs 65 MB).
_LZMA_MEMLIMIT = 2**28

#: Compressors whose decoded size is bounded before memory is spent, by numcodecs ``codec_id``.
_BOUNDED: dict[str, Callable[[Any, int], Callable[[Any], Any]]] = {
    "blosc": _blosc, "zstd": _zstd, "lz4": _lz4,
    "gzip": _inflate(31, members=True), "zlib": _inflate(15, members=False),
    "bz2": _stdlib(lambda c: bz2.BZ2Decompressor()),
    "lzma": _stdlib(lambda c: lzma.LZMADecompressor(format=c.format, filters=c.filters)
                    if c.format == lzma.FORMAT_RAW else
                    lzma.LZMADecompressor(format=c.format, memlimit=_LZMA_MEMLIMIT)),
}


def _encoded_nbytes(filters: list[Any], dtype: np.dtype, n: int) -> int | None:
    """Bytes that ``n`` values take after the v2 ``filters`` (what the compressor holds).

    Filters are element-wise (delta, scale-offset, astype...): the size is found by
    encoding 8, 16 and 24 zeros; None if it is not linear in the count.
    """
    if not filters:
        return n * dtype.itemsize
    sizes = []
    for k in (8, 16, 24):
        buf: Any = np.zeros(k, dtype)
        try:
            for f in filters:
                buf = f.encode(buf)
            sizes.append(memoryview(buf).nbytes)
        except Exception:
            return None
    per, extra = divmod(sizes[1] - sizes[0], 8)
    head = sizes[0] - 8 * per
    if extra or sizes[2] != head + 24 * per or head < 0:
        return None
    return head + n * per


def max_stored_bytes(nbytes: int) -> int:
    """The most bytes a compressed chunk of ``nbytes`` decoded bytes can take.

    Incompressible data grows by at most a few per mille with every compressor
    handled here (blosc, zstd, LZ4, zlib, gzip, bz2, LZMA); a chunk file or a
    response larger than this is not that chunk.
    """
    return nbytes + nbytes // 64 + 65536


class ChunkCodec:
    """Decode the stored bytes of one chunk of ``arr`` with the array's own codecs.

    Use :meth:`of`, which says None for arrays this path does not understand
    (sharding, other codecs or key encodings, non-numeric dtypes).

    Attributes
    ----------
    nbytes : int
        Decoded bytes of one stored chunk.
    """

    def __init__(self, arr: Any, decoders: list[Any], stored: np.dtype, order: str,
                 checksum: bool = False, chunks: Any = None, key: Any = None, kind: str = "chunk") -> None:
        self.dtype = np.dtype(arr.dtype)
        self.chunks = tuple(int(c) for c in (chunks or arr.chunks))
        fill = arr.metadata.fill_value  # v2's null: absent chunks read as zeros, as zarr reads them
        self.fill = np.zeros((), self.dtype)[()] if fill is None else fill
        self.decoders, self.stored, self.order, self.checksum = decoders, stored, order, checksum
        self._encode = key or arr.metadata.encode_chunk_key
        self.kind = kind
        self.where = str(getattr(arr, "store_path", "?"))
        self.count = int(np.prod(self.chunks, dtype=object))
        self.nbytes = self.count * self.stored.itemsize
        self._steps = self._plan(decoders)

    @property
    def uncompressed(self) -> bool:
        """Whether a stored chunk is its values as they are, in C order (readable in part)."""
        return not self.decoders and not self.checksum and self.order == "C"

    @property
    def stored_limit(self) -> int:
        """The most bytes a stored chunk of this array can take."""
        extra = 4 if self.checksum else 0
        if not self.decoders:
            return self.nbytes + extra
        return (self._limit if self._limit is not None else max_stored_bytes(self.nbytes)) + extra

    def _plan(self, decoders: list[Any]) -> list[Callable[[Any], Any]]:
        """One function per decoder; a known compressor (the first) decodes to a bounded size."""
        steps = [d.decode for d in decoders]
        bounded = _BOUNDED.get(getattr(decoders[0], "codec_id", None) or "") if decoders else None
        self._limit: int | None = None
        if bounded is not None:
            # what the compressor holds: the values after the (v2) filters, in encoding order
            encoded = _encoded_nbytes(decoders[:0:-1], self.stored, self.count)
            if encoded is not None:
                steps[0] = bounded(decoders[0], encoded)
                self._limit = max_stored_bytes(encoded)
        return steps

    @classmethod
    def of(cls, arr: Any) -> ChunkCodec | None:
        if getattr(arr, "shards", None):
            return None
        meta = arr.metadata
        dtype = np.dtype(arr.dtype)
        if dtype.kind not in "biuf" or dtype.hasobject:
            return None
        if getattr(meta, "zarr_format", 3) == 2:
            decoders = _v2_decoders(meta)
            return None if decoders is None else cls(arr, decoders, dtype, meta.order)
        v3 = _v3_decoders(meta.codecs)
        if v3 is None or type(meta.chunk_key_encoding).__name__ != "DefaultChunkKeyEncoding":
            return None
        decoders, byteorder, checksum = v3
        return cls(arr, decoders, dtype.newbyteorder(byteorder), "C", checksum)

    @classmethod
    def inner(cls, arr: Any, sharding: Any) -> ChunkCodec | None:
        """The codec of the inner chunks of a sharded array (``sharding``: its ``ShardingCodec``).

        Errors name the inner chunk and its shard's key.
        """
        dtype = np.dtype(arr.dtype)
        v3 = _v3_decoders(sharding.codecs)
        if (v3 is None or dtype.kind not in "biuf" or dtype.hasobject
                or type(arr.metadata.chunk_key_encoding).__name__ != "DefaultChunkKeyEncoding"):
            return None
        inner = tuple(int(c) for c in sharding.chunk_shape)
        per = tuple(int(s) // c for s, c in zip(arr.shards, inner))
        encode = arr.metadata.encode_chunk_key

        def key(coords: tuple[int, ...]) -> str:
            return encode(tuple(c // p for c, p in zip(coords, per)))

        decoders, byteorder, checksum = v3
        return cls(arr, decoders, dtype.newbyteorder(byteorder), "C", checksum, inner, key, "inner chunk")

    def coords(self, region: tuple[slice, ...]) -> tuple[int, ...]:
        """The chunk index of a region that is one stored chunk."""
        return tuple(int(s.start or 0) // c for s, c in zip(region, self.chunks))

    def key(self, coords: tuple[int, ...]) -> str:
        """The chunk's store key, relative to the array (``c/0/1/2``, ``0.1.2``)."""
        return self._encode(coords)

    def decode(self, data: Any, region: tuple[slice, ...]) -> np.ndarray:
        """The chunk's values in ``region`` (its stored chunk clipped to the array).

        ``data`` None is an absent chunk (the fill value).

        Raises
        ------
        CorruptChunkError
            The stored bytes declare or decode to another size than the array's
            chunk; nothing of the declared size was allocated.
        """
        shape = tuple(s.stop - (s.start or 0) for s in region)
        if data is None:
            return np.full(shape, self.fill, dtype=self.dtype)
        try:
            if self.checksum:
                try:
                    data = strip_crc32c(data)
                except ValueError as err:
                    raise _BadSize(str(err)) from None
            if self._limit is not None and len(data) > self._limit:
                raise _BadSize(f"{len(data)} stored bytes are more than any compressed chunk takes")
            for step in self._steps:
                data = step(data)
        except _BadSize as err:
            raise self._refused(region, str(err)) from None
        full = np.frombuffer(data, dtype=self.stored)
        if full.size != self.count:
            raise self._refused(region, f"it decodes to {full.nbytes} bytes")
        out = full.reshape(self.chunks, order=self.order)[tuple(slice(0, k) for k in shape)]
        if self.stored != self.dtype:
            out = out.astype(self.dtype)
        return np.ascontiguousarray(out)

    def _refused(self, region: tuple[slice, ...], what: str) -> CorruptChunkError:
        return self.corrupt(self.coords(region), what)

    def corrupt(self, coords: tuple[int, ...], what: str) -> CorruptChunkError:
        """The one-line error for stored chunk ``coords``: its index, key and store, ``what`` is wrong."""
        shape = "x".join(map(str, self.chunks))
        return CorruptChunkError(
            f"{self.kind} {tuple(coords)} (key {self.key(coords)!r} in store {self.where}): {what}; "
            f"the array's {self.kind}s hold {self.nbytes} bytes ({shape} {self.dtype})")


def fast_reader(arr: Any) -> Callable[[tuple[slice, ...]], np.ndarray] | None:
    """A function ``region -> numpy`` reading one stored chunk of a local array, or None (use zarr).

    ``region`` must be exactly one stored chunk clipped to the array (what the batch
    engine and ``info --check`` ask for).
    """
    store = getattr(arr, "store", None)
    if type(store).__name__ != "LocalStore":
        return None
    codec = ChunkCodec.of(arr)
    if codec is None:
        return None
    root = Path(str(store.root)) / arr.store_path.path
    bound = max_stored_bytes(codec.nbytes)

    def read(region: tuple[slice, ...]) -> np.ndarray:
        try:
            data: Any = read_file(root / codec.key(codec.coords(region)), bound)
        except FileNotFoundError:
            data = None
        return codec.decode(data, region)

    return read if os.path.isdir(root) else None
