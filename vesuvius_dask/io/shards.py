"""Zarr v3 sharding (``sharding_indexed``) read by inner chunk: the read path ``sharded``.

A shard is one stored object holding a grid of inner chunks and an index of
``(offset, nbytes)`` pairs (little-endian uint64, C order over the inner grid) at
its start or end, optionally followed by a crc32c. The index is read once per
shard and kept (:data:`SHARD_INDEXES`, a byte budget per process: config
``vesuvius-dask.shard-index-bytes``); inner chunks are then read by byte range
through the source's ``read_ranges`` (or its memory map), decoded with the inner
codecs (:class:`~vesuvius_dask.io.chunks.ChunkCodec`: numcodecs, sizes bounded),
and uncompressed inner chunks are cut in part. An absent shard, or an index entry
of ``2**64 - 1`` twice, is the fill value.

Everything the shard says is checked before it is used: the index has the size the
metadata gives (a shard shorter than its index is truncated), its crc32c matches,
and each entry lies inside the shard and holds at most what the inner codecs can
produce from one inner chunk (exactly one inner chunk's bytes when uncompressed).
Anything else is a :class:`~vesuvius_dask.errors.CorruptChunkError` in one line,
naming the store, the shard's key and the inner chunk.

Arrays whose index codecs are not ``bytes`` (little-endian) with an optional
``crc32c``, whose inner codecs the fast path does not decode, or that are not
local, are left to zarr (read path ``zarr``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .. import config
from ..errors import CorruptChunkError
from ..lru import LRU
from .chunks import ChunkCodec, strip_crc32c
from .pieces import cut_pieces, cut_ranges, fill_pieces, span_bytes
from .ranges import merge_ranges

__all__ = ["ShardedChunks", "SHARD_INDEXES", "MISSING"]

#: An index entry's offset and size for an absent inner chunk.
MISSING = 2**64 - 1


def _index_bytes(entry: Any) -> int:
    index = entry[0]
    return 64 + (int(index.nbytes) if isinstance(index, np.ndarray) else 0)


#: Parsed shard indexes and shard sizes ``(index or None, size)``, by shard file or URL (and the
#: file's stamp: a rewritten file is read again; a remote shard is taken as unchanged), within a byte budget
#: (set from config ``vesuvius-dask.shard-index-bytes`` when a sharded array is opened).
SHARD_INDEXES = LRU(config.default_bytes("shard-index-bytes"), size=_index_bytes)
os.register_at_fork(after_in_child=SHARD_INDEXES.after_fork)


def _index_layout(sharding: Any) -> bool | None:
    """Whether the index ends with a crc32c, or None when its codecs are not the usual ones."""
    codecs = list(sharding.index_codecs)
    if not codecs or type(codecs[0]).__name__ != "BytesCodec":
        return None
    if (getattr(codecs[0].endian, "value", codecs[0].endian) or "little") != "little":
        return None
    rest = [type(c).__name__ for c in codecs[1:]]
    if rest not in ([], ["Crc32cCodec"]):
        return None
    return bool(rest)


class ShardedChunks:
    """Inner chunks of a local sharded Zarr v3 array, read through the shard index.

    Use :meth:`of`, which says None for what this path does not read.
    """

    path = "sharded"

    def __init__(self, arr: Any, source: Any, codec: ChunkCodec, checksum: bool, at_end: bool) -> None:
        self.source, self.codec = source, codec
        self.shape = tuple(int(s) for s in arr.shape)
        self.shards = tuple(int(s) for s in arr.shards)
        #: Inner chunks per shard along each axis: the engine's read unit.
        self.unit = tuple(s // c for s, c in zip(self.shards, codec.chunks))
        self.count = int(np.prod(self.unit))
        self.checksum, self.at_end = checksum, at_end
        self.index_nbytes = 16 * self.count + (4 if checksum else 0)
        self.encode = arr.metadata.encode_chunk_key
        if source is not None and not source.local:
            codec.where = source.url("").rstrip("/")  # errors name the URL
        self.where = codec.where
        self._limit = codec.stored_limit
        self._exact = not codec.decoders  # uncompressed inner chunks: exactly their bytes
        self.index_limit = config.get_bytes("shard-index-bytes")
        SHARD_INDEXES.budget = self.index_limit

    @classmethod
    def of(cls, arr: Any, source: Any) -> ShardedChunks | None:
        codecs = list(arr.metadata.codecs)
        if len(codecs) != 1 or type(codecs[0]).__name__ != "ShardingCodec" or len(arr.shape) != 3:
            return None
        sharding = codecs[0]
        codec = ChunkCodec.inner(arr, sharding)
        checksum = _index_layout(sharding)
        if codec is None or checksum is None:
            return None
        at_end = getattr(sharding.index_location, "value", sharding.index_location) == "end"
        return cls(arr, source, codec, checksum, at_end)

    # -- the index ---------------------------------------------------------------------
    def _shard_error(self, shard: tuple[int, ...], what: str) -> Exception:
        key = self.encode(shard)
        if not self.source.local:
            what += f"; fetched from {self.source.url(key)}"
        return CorruptChunkError(f"shard {shard} (key {key!r} in store {self.where}): "
                                 f"{what}; its index holds {self.index_nbytes} bytes "
                                 f"({'x'.join(map(str, self.unit))} inner chunks)")

    def _parse(self, shard: tuple[int, ...], raw: Any, size: int | None) -> np.ndarray:
        if len(raw) != self.index_nbytes:
            raise self._shard_error(shard, f"truncated: {len(raw)} bytes where its index should be"
                                    + (f" (the shard holds {size} bytes)" if size is not None else ""))
        if self.checksum:
            try:
                raw = strip_crc32c(raw)
            except ValueError as err:
                raise self._shard_error(shard, f"the index is corrupt: {err}") from None
        index = np.frombuffer(raw, dtype="<u8").reshape(self.count, 2).copy()
        return index

    def index(self, shard: tuple[int, ...]) -> tuple[np.ndarray | None, Any, int, int | None]:
        """``(index, map or None, index bytes read, shard size)`` of a shard.

        The index is None when the shard is absent; the size None when the source
        does not say it.

        Raises
        ------
        CorruptChunkError
            The index is truncated or its checksum does not match.
        """
        if self.index_nbytes > self.index_limit:
            raise self._shard_error(shard, f"an index of {self.index_nbytes} bytes is more than "
                                    f"shard-index-bytes ({self.index_limit}) allows")
        key = self.encode(shard)
        if self.source.mapping:
            got = self.source.mapped(key)
            if got is None:
                return None, None, 0, None
            buf, size, stamp = got
            cache_key = (str(self.source.path(key)), stamp)
            hit = SHARD_INDEXES.get(cache_key)
            if hit is not None:
                return hit[0], buf, 0, size
            if size < self.index_nbytes:
                raise self._shard_error(shard, f"truncated: the shard holds {size} bytes")
            raw = buf[size - self.index_nbytes:] if self.at_end else buf[:self.index_nbytes]
            index = self._parse(shard, raw, size)
            SHARD_INDEXES.put(cache_key, (index, size))
            return index, buf, self.index_nbytes, size
        stamp = self.source.stamp(key)  # remote: () (no request), the size asked once below
        if stamp is None:
            return None, None, 0, None
        cache_key = (self.source.url(key), stamp)
        hit = SHARD_INDEXES.get(cache_key)
        if hit is not None:
            return hit[0], None, 0, hit[1]
        size = stamp[1] if stamp else self.source.size(key)
        if size is None:  # remote, absent, read as the fill value
            SHARD_INDEXES.put(cache_key, (None, None))
            return None, None, 0, None
        if size < self.index_nbytes:
            raise self._shard_error(shard, f"truncated: the shard holds {size} bytes")
        got = self.source.read_ranges(key, [(size - self.index_nbytes, size) if self.at_end
                                            else (0, self.index_nbytes)])
        if got is None:
            return None, None, 0, None
        index = self._parse(shard, got[0], size)
        SHARD_INDEXES.put(cache_key, (index, size))
        return index, None, self.index_nbytes, size

    def _entry(self, index: np.ndarray, coords: tuple[int, ...], size: int | None) -> tuple[int, int] | None:
        """``(offset, nbytes)`` of an inner chunk, None when absent; checked against the shard."""
        local = [c % u for c, u in zip(coords, self.unit)]
        i = (local[0] * self.unit[1] + local[1]) * self.unit[2] + local[2]
        offset, nbytes = int(index[i, 0]), int(index[i, 1])
        if offset == MISSING and nbytes == MISSING:
            return None
        if nbytes > self._limit or (self._exact and nbytes != self._limit):
            raise self.codec.corrupt(coords, f"the shard index gives it {nbytes} bytes, "
                                             f"{'not' if self._exact else 'more than'} {self._limit}"
                                             + self._from(coords))
        lo = self.index_nbytes if not self.at_end else 0
        hi = None if size is None else size - (self.index_nbytes if self.at_end else 0)
        if offset < lo or (hi is not None and offset + nbytes > hi):
            data = (f"bytes {lo}..{hi}" if hi is not None else f"from byte {lo}") + (
                ", after the index" if lo else ", before the index")
            raise self.codec.corrupt(coords, f"the shard index puts it at bytes {offset}..{offset + nbytes}, "
                                             f"outside the shard's data ({data}){self._from(coords)}")
        return offset, nbytes

    def _from(self, coords: tuple[int, ...]) -> str:
        """Where a remote shard was fetched from, for errors (nothing locally: the key names the file)."""
        return "" if self.source.local else f"; fetched from {self.source.url(self.codec.key(coords))}"

    # -- inner chunks ------------------------------------------------------------------
    def _region(self, coords: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(c * k, min((c + 1) * k, n))
                     for c, k, n in zip(coords, self.codec.chunks, self.shape))

    def _whole(self, key: str, coords: tuple[int, ...], where: tuple[int, int], buf: Any
               ) -> tuple[np.ndarray, int]:
        """An inner chunk decoded (or, uncompressed and mapped, a view of it) and the bytes read."""
        offset, nbytes = where
        if not self.source.local:
            chunks, n = self._remote_inner(key, [(coords, where)])
            return chunks[0], n
        if buf is not None:
            if self.codec.uncompressed:
                view = np.frombuffer(buf, dtype=self.codec.stored, count=self.codec.count, offset=offset)
                return view.reshape(self.codec.chunks), 0
            data: Any = memoryview(buf)[offset:offset + nbytes]
        else:
            got = self.source.read_ranges(key, [(offset, offset + nbytes)])
            data = got[0] if got is not None else b""
            if len(data) != nbytes:
                raise self.codec.corrupt(coords, f"truncated: bytes {offset}..{offset + nbytes} asked, "
                                                 f"{len(data)} read")
        return self.codec.decode(data, self._region(coords)), nbytes

    def read_chunk(self, region: tuple[slice, ...]) -> np.ndarray:
        """One inner chunk (``region``, clipped to the array), as a new array of the array's dtype."""
        coords = self.codec.coords(region)
        shard = tuple(c // u for c, u in zip(coords, self.unit))
        shape = tuple(s.stop - (s.start or 0) for s in region)
        index, buf, _, size = self.index(shard)
        where = None if index is None else self._entry(index, coords, size)
        if where is None:
            return np.full(shape, self.codec.fill, dtype=self.codec.dtype)
        chunk, _ = self._whole(self.encode(shard), coords, where, buf)
        return np.array(chunk[tuple(slice(0, k) for k in shape)], dtype=self.codec.dtype)

    def read_pieces(self, items: list[tuple[tuple[int, ...], np.ndarray]], out: np.ndarray
                    ) -> tuple[list[tuple[tuple[int, ...], np.ndarray]], int]:
        """Write the pieces of each ``(inner chunk index, pieces)`` of one shard into ``out``.

        Returns ``(decoded inner chunks worth caching, bytes read)``; uncompressed
        inner chunks of a local shard are cut in place and not returned. A remote
        shard's inner chunks are read whole, all in one :meth:`_remote_inner`.
        """
        shard = tuple(c // u for c, u in zip(items[0][0], self.unit))
        key = self.encode(shard)
        index, buf, total, size = self.index(shard)
        decoded = []
        remote = []
        item = self.codec.stored.itemsize
        for coords, pieces in items:
            where = None if index is None else self._entry(index, coords, size)
            if where is None:
                fill_pieces(out, pieces, self.codec.fill)
            elif not self.source.local:
                remote.append((coords, pieces, where))
            elif self.codec.uncompressed and buf is None:
                n = cut_ranges(self.source, key, where[0], self.codec, pieces, out, coords)
                if n is None:
                    raise self.codec.corrupt(coords, "the shard holding it is gone since its index was read")
                total += n
            else:
                chunk, n = self._whole(key, coords, where, buf)
                cut_pieces(chunk, out, pieces)
                if n:
                    decoded.append((coords, chunk))
                total += n or span_bytes(pieces, self.codec.chunks, item)
        if remote:
            chunks, n = self._remote_inner(key, [(coords, where) for coords, _, where in remote])
            total += n
            for (coords, pieces, _), chunk in zip(remote, chunks):
                cut_pieces(chunk, out, pieces)
                decoded.append((coords, chunk))
        return decoded, total

    # -- remote shards -------------------------------------------------------------------
    def cache_key(self, key: str, coords: tuple[int, ...]) -> str:
        """The ``cache_dir`` key of an inner chunk: ``<shard key>#<z>.<y>.<x>`` (its place in the shard)."""
        return f"{key}#" + ".".join(str(c % u) for c, u in zip(coords, self.unit))

    def _remote_inner(self, key: str, wanted: list[tuple[tuple[int, ...], tuple[int, int]]]
                      ) -> tuple[list[np.ndarray], int]:
        """Inner chunks of one remote shard, decoded, and the stored bytes read.

        From the fetcher's ``cache_dir`` (key :meth:`cache_key`) when it has them, the
        others by byte range in one ``read_ranges`` call (neighbours in the shard as
        one request); bytes are kept in ``cache_dir`` once they decoded. Cached bytes
        that do not decode are removed and fetched again.
        """
        cache = self.source.cache
        names = [self.cache_key(key, coords) for coords, _ in wanted]
        data: list[Any] = [None] * len(wanted)
        if cache is not None:
            for i, name in enumerate(names):
                hit = cache.get(name)
                data[i] = hit if isinstance(hit, bytes) and len(hit) == wanted[i][1][1] else None
        fresh = [i for i, d in enumerate(data) if d is None]
        total = self._fetch_inner(key, wanted, fresh, data) + sum(len(data[i]) for i in range(len(wanted))
                                                                  if i not in fresh)
        chunks: list[Any] = [None] * len(wanted)
        again = []
        for i, (coords, _) in enumerate(wanted):
            try:
                chunks[i] = self.codec.decode(data[i], self._region(coords))
            except CorruptChunkError as err:
                if i in fresh:
                    raise CorruptChunkError(f"{err}{self._from(coords)}") from None
                cache.remove(names[i], data[i])
                again.append(i)
        if again:  # bad copies in cache_dir: from the server once more
            total += self._fetch_inner(key, wanted, again, data)
            for i in again:
                coords = wanted[i][0]
                try:
                    chunks[i] = self.codec.decode(data[i], self._region(coords))
                except CorruptChunkError as err:
                    raise CorruptChunkError(f"{err}{self._from(coords)}") from None
            fresh += again
        if cache is not None:
            for i in fresh:
                cache.put(names[i], bytes(data[i]))
        return chunks, total

    def _fetch_inner(self, key: str, wanted: list[tuple[tuple[int, ...], tuple[int, int]]],
                     which: list[int], data: list[Any]) -> int:
        """Fetch the stored bytes of ``wanted[i]`` for ``i`` in ``which`` into ``data``; the bytes fetched."""
        if not which:
            return 0
        spans = sorted((wanted[i][1][0], wanted[i][1][0] + wanted[i][1][1], i) for i in which)
        merged = merge_ranges([(a, b) for a, b, _ in spans], gap=0, slack=0.0)  # neighbours only
        got = self.source.read_ranges(key, [(a, b) for a, b, _ in merged])
        if got is None:
            raise self.codec.corrupt(wanted[which[0]][0], "the shard holding it is gone since its index "
                                     f"was read{self._from(wanted[which[0]][0])}")
        j = 0
        for (start, _, count), block in zip(merged, got):
            for a, b, i in spans[j:j + count]:
                data[i] = block[a - start:b - start]
                if len(data[i]) != b - a:
                    raise self.codec.corrupt(wanted[i][0], f"truncated: bytes {a}..{b} asked, "
                                             f"{len(data[i])} read{self._from(wanted[i][0])}")
            j += count
        return sum(len(g) for g in got)
