"""Pieces of blocks cut out of stored chunks: in memory, or straight from byte ranges.

A piece is a row of :func:`~vesuvius_dask.engine.batches.plan_pieces`:
``[row, dz0, dz1, dy0, dy1, dx0, dx1, sz, sy, sx]``, written to
``out[row, dz0:dz1, dy0:dy1, dx0:dx1]`` from ``chunk[sz:, sy:, sx:]``. Shared by the
batch engine and the partial read paths (:mod:`vesuvius_dask.io.partial`,
:mod:`vesuvius_dask.io.shards`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["cut_pieces", "fill_pieces", "cut_ranges", "span_bytes"]


def cut_pieces(chunk: np.ndarray, out: np.ndarray, pieces: np.ndarray) -> None:
    """``out[row, dz0:dz1, dy0:dy1, dx0:dx1] = chunk[sz:.., sy:.., sx:..]`` per piece."""
    bz, by, bx = out.shape[1:]
    if len(pieces) <= 8:  # a chunk's pieces in one batch are few: plain slicing, no mask to build
        for b, dz0, dz1, dy0, dy1, dx0, dx1, sz, sy, sx in pieces.tolist():
            out[b, dz0:dz1, dy0:dy1, dx0:dx1] = chunk[sz:sz + dz1 - dz0, sy:sy + dy1 - dy0,
                                                      sx:sx + dx1 - dx0]
        return
    whole = ((pieces[:, 2] - pieces[:, 1] == bz) & (pieces[:, 4] - pieces[:, 3] == by)
             & (pieces[:, 6] - pieces[:, 5] == bx))
    if whole.any():  # pieces that are whole blocks: the cheapest indexing
        for b, sz, sy, sx in pieces[whole][:, [0, 7, 8, 9]].tolist():
            out[b] = chunk[sz:sz + bz, sy:sy + by, sx:sx + bx]
        pieces = pieces[~whole]
    for b, dz0, dz1, dy0, dy1, dx0, dx1, sz, sy, sx in pieces.tolist():
        out[b, dz0:dz1, dy0:dy1, dx0:dx1] = chunk[
            sz:sz + dz1 - dz0, sy:sy + dy1 - dy0, sx:sx + dx1 - dx0
        ]


def fill_pieces(out: np.ndarray, pieces: np.ndarray, value: Any) -> None:
    """The pieces of an absent chunk: the fill value."""
    for b, dz0, dz1, dy0, dy1, dx0, dx1 in pieces[:, :7].tolist():
        out[b, dz0:dz1, dy0:dy1, dx0:dx1] = value


def span_bytes(pieces: np.ndarray, chunks: tuple[int, ...], itemsize: int) -> int:
    """Bytes the pieces span in a C-order chunk, row by row (what a partial read touches)."""
    row = chunks[2]
    return sum((dz1 - dz0) * ((dy1 - dy0 - 1) * row + dx1 - dx0)
               for _, dz0, dz1, dy0, dy1, dx0, dx1 in pieces[:, :7].tolist()) * itemsize


def cut_ranges(source: Any, key: str, base: int, codec: Any, pieces: np.ndarray,
               out: np.ndarray, coords: tuple[int, ...]) -> int | None:
    """Cut pieces of an uncompressed C-order chunk stored at byte ``base`` of object ``key``.

    One byte range per plane of each piece (from its first to its last voxel in that
    plane), ranges merged as the source says (``source.merge``: locally across gaps of
    :data:`~vesuvius_dask.io.ranges.MERGE_GAP`, remotely across gaps of up to
    :data:`~vesuvius_dask.io.ranges.REMOTE_GAP`, at most twice the bytes), all asked in
    one ``source.read_ranges`` call. Returns the bytes read, None when the object is
    absent (nothing written).

    Raises
    ------
    CorruptChunkError
        The object ends before a range does.
    """
    cz, cy, cx = codec.chunks
    item = codec.stored.itemsize
    plane, row = cy * cx * item, cx * item
    asks: list[tuple[int, int]] = []
    runs = []
    for b, dz0, dz1, dy0, dy1, dx0, dx1, sz, sy, sx in pieces.tolist():
        first = base + sz * plane + sy * row + sx * item
        length = ((dy1 - dy0 - 1) * cx + dx1 - dx0) * item
        k = 0
        for a, stop, n in source.merge([(first + i * plane, first + i * plane + length)
                                        for i in range(dz1 - dz0)]):
            runs.append((len(asks), b, dz0 + k, n, dy0, dy1, dx0, dx1, stop - a))
            asks.append((a, stop))
            k += n
    got = source.read_ranges(key, asks)
    if got is None:
        return None
    total = 0
    for i, b, z0, n, dy0, dy1, dx0, dx1, length in runs:
        data = got[i]
        if len(data) != length:
            raise codec.corrupt(coords, f"truncated: bytes {asks[i][0]}..{asks[i][1]} asked, "
                                        f"{len(data)} read")
        flat = np.frombuffer(data, dtype=codec.stored)
        view = np.lib.stride_tricks.as_strided(flat, (n, dy1 - dy0, dx1 - dx0), (plane, row, item),
                                               writeable=False)
        out[b, z0:z0 + n, dy0:dy1, dx0:dx1] = view
        total += length
    return total
