"""Segments over HTTP(S) (and ``s3://``): TIFF layers read by byte range, masks and labels by URL.

:func:`open_remote_segment` opens ``<url>/layers/00.tif ... 64.tif`` (or
``surface_volume/``) and ``<id>_mask.png``, ``<id>_inklabels.png``, ``<id>_ir.png``
(or ``mask.png`` ...) without downloading the segment. Every request goes through
:class:`~vesuvius_dask.remote.fetch.RemoteChunks` (the request window, refusals,
retries, response bounds and faults named in one line).

* **Layers.** A folder listing is not available over plain HTTP, so the published
  names ``00.tif`` .. ``64.tif`` are probed: the first 64 KiB of each is fetched
  (that is its TIFF header, parsed with tifffile; more is fetched when the IFD or
  its strip tables lie further on). The layers are ``00`` up to the first name the
  server does not have (404); a gap (a later layer present) is an error naming the
  missing layer's URL.
* **Uncompressed strips** (one or many) are read by byte range: a block fetches
  only its rows of each layer (from ``StripOffsets``, ``StripByteCounts`` and
  ``RowsPerStrip``), all its layers' ranges at once. Ranges are not kept in
  ``cache_dir``.
* **Compressed or tiled layers** are fetched whole (bounded by the decoded layer
  size plus codec overhead), through ``cache_dir`` when given (kept as a chunk
  named by the layer's file name), and decoded with tifffile.
* **Images** are fetched whole at open (at most config
  ``vesuvius-dask.limits.unknown-chunk-bytes`` each), not kept in ``cache_dir``.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import config
from ..errors import VolumeError, VolumeNotFoundError
from .paths import LAYER_DIRS, remote_storage_options

__all__ = ["REMOTE_LAYERS", "HEAD_BYTES", "RemoteLayer", "RemoteTiffStack", "open_remote_segment",
           "remote_layers"]

#: Layer names probed over HTTP: ``00`` .. ``64``, the 65 layers of published segments.
REMOTE_LAYERS = tuple(f"{i:02d}" for i in range(65))
#: Bytes fetched first from each layer: its TIFF header and (usually) first IFD.
HEAD_BYTES = 64 * 2**10
#: Rows per dask chunk of a remote layer read by range (all of a layer's columns).
REMOTE_ROWS = 64
#: Layers per dask chunk along z (each task fetches its layers' ranges at once).
REMOTE_LAYERS_PER_CHUNK = 16


@dataclass(frozen=True)
class RemoteLayer:
    """One remote 2-D layer: its key under the layer folder and how its pixels are laid out.

    ``strips`` is ``((offset, bytecount), ...)`` with ``rows`` rows per strip when the
    layer reads by byte range, else None (fetched whole).
    """

    key: str
    shape: tuple[int, int]
    dtype: str  # with its byte order
    strips: tuple[tuple[int, int], ...] | None
    rows: int

    def ranges(self, y0: int, y1: int) -> list[tuple[int, int]]:
        """Byte ranges ``[start, end)`` holding rows ``y0:y1``, in row order, adjacent ones merged."""
        assert self.strips is not None
        row_bytes = self.shape[1] * np.dtype(self.dtype).itemsize
        out: list[list[int]] = []
        for s in range(y0 // self.rows, (y1 - 1) // self.rows + 1):
            a, b = max(y0, s * self.rows), min(y1, (s + 1) * self.rows)
            start = self.strips[s][0] + (a - s * self.rows) * row_bytes
            end = start + (b - a) * row_bytes
            if out and out[-1][1] == start:
                out[-1][1] = end
            else:
                out.append([start, end])
        return [(a, b) for a, b in out]


class LazyRangeFile(io.RawIOBase):
    """A read-only file over byte ranges of a remote file, fetched as tifffile asks for them.

    Starts from ``head`` (bytes ``[0, len(head))``); a shorter head than asked for
    means the file ends there. ``fetch(start, end)`` gets more (64 KiB at least).
    """

    def __init__(self, head: bytes, asked: int, fetch: Any) -> None:
        super().__init__()
        self.pieces: list[tuple[int, bytes]] = [(0, head)]
        self.size = len(head) if len(head) < asked else 2**62
        self.fetch = fetch
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), max(0, self.size - self.pos))
        if n == 0:
            return 0
        for start, data in self.pieces:
            if start <= self.pos and self.pos + n <= start + len(data):
                break
        else:
            start = self.pos
            data = self.fetch(start, start + max(n, HEAD_BYTES))
            self.pieces.append((start, data))
        got = data[self.pos - start:self.pos - start + n]
        buf[:len(got)] = got
        self.pos += len(got)
        return len(got)


def parse_layer(key: str, url: str, head: bytes, fetch: Any) -> RemoteLayer:
    """A layer's layout from its first bytes (``fetch(start, end)`` for the rest of its header)."""
    import tifffile

    try:
        with tifffile.TiffFile(LazyRangeFile(head, HEAD_BYTES, fetch)) as tif:
            page = tif.pages[0]
            shape, dtype = tuple(int(s) for s in page.shape), np.dtype(page.dtype).newbyteorder(tif.byteorder)
            offsets, counts = tuple(page.dataoffsets), tuple(page.databytecounts)
            rows = int(min(page.rowsperstrip or shape[0], shape[0])) if len(shape) == 2 else 0
            plain = (page.compression == 1 and not page.is_tiled and page.samplesperpixel == 1
                     and page.bitspersample == 8 * dtype.itemsize and page.fillorder == 1
                     and page.predictor == 1)
    except VolumeError:
        raise
    except Exception as err:
        raise VolumeError(f"{url}: unreadable TIFF header ({type(err).__name__}: {err})") from err
    if len(shape) != 2:
        raise VolumeError(f"{url}: expected a 2-D grayscale layer, got shape {shape}")
    row_bytes = shape[1] * dtype.itemsize
    expected = [min(rows, shape[0] - s * rows) * row_bytes for s in range(len(offsets))]
    strips = tuple(zip(offsets, counts)) if plain and rows and list(counts) == expected \
        and len(offsets) * rows >= shape[0] else None
    return RemoteLayer(key, shape, dtype.str, strips, rows)  # type: ignore[arg-type]


class RemoteTiffStack:
    """A 3-D array-like over remote TIFF layers: ``stack[z0:z1, y0:y1, x0:x1]`` fetches just that.

    Layers laid out in uncompressed strips fetch the byte ranges of rows
    ``y0:y1`` (all layers' ranges at once); others are fetched whole. Pickles
    with its fetchers (each process opens its own connections).
    """

    ndim = 3

    def __init__(self, url: str, layers: list[RemoteLayer], remote: Any) -> None:
        self.url = url.rstrip("/")
        self.layers = list(layers)
        self.remote = remote
        first = self.layers[0]
        self.shape = (len(self.layers),) + tuple(first.shape)
        self.dtype = np.dtype(first.dtype).newbyteorder("=")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        zs, ys, xs = key
        squeeze = isinstance(zs, (int, np.integer))
        z_idx = [int(zs)] if squeeze else list(range(*zs.indices(self.shape[0])))
        y0, y1, step = ys.indices(self.shape[1]) if isinstance(ys, slice) else (int(ys), int(ys) + 1, 1)
        out = np.empty((len(z_idx), max(0, y1 - y0), self.shape[2]), self.dtype)
        if z_idx and y1 > y0:
            self.read_rows(z_idx, y0, y1, out)
        out = out[:, ::step] if isinstance(ys, slice) else out[:, 0]
        out = out[..., xs]
        return out[0] if squeeze else out

    def read_rows(self, z_idx: list[int], y0: int, y1: int, out: np.ndarray) -> None:
        """Rows ``y0:y1`` (all columns) of layers ``z_idx`` into ``out``."""
        ranged = [(i, self.layers[z]) for i, z in enumerate(z_idx) if self.layers[z].strips is not None]
        whole = [(i, self.layers[z]) for i, z in enumerate(z_idx) if self.layers[z].strips is None]
        if whole:
            self.remote.prefetch([(layer.key, None) for _, layer in whole])
        requests, owners = [], []
        for i, layer in ranged:
            for a, b in layer.ranges(y0, y1):
                requests.append((layer.key, a, b))
                owners.append(i)
        pieces = self.remote.get_ranges(requests) if requests else []
        for i, layer in ranged:
            data = b"".join(p for p, o in zip(pieces, owners) if o == i)
            want = (y1 - y0) * out.shape[2] * out.itemsize
            if len(data) != want:
                raise VolumeError(f"{self.remote.url(layer.key)}: rows {y0}:{y1} should be {want} bytes, "
                                  f"the server sent {len(data)} (a truncated or changed layer)")
            out[i] = np.frombuffer(data, layer.dtype).reshape(y1 - y0, -1)
        for i, layer in whole:
            out[i] = self.remote.get(layer.key, decode=self.decoder(layer))[y0:y1]
        if whole:
            self.remote.flush()

    def decoder(self, layer: RemoteLayer) -> Any:
        """``decode(bytes) -> the whole layer`` for :meth:`RemoteChunks.get`."""
        return LayerDecoder(self.remote.url(layer.key), layer.shape)

    def __repr__(self) -> str:
        ranged = sum(layer.strips is not None for layer in self.layers)
        return (f"RemoteTiffStack({self.url!r}, {len(self.layers)} layers ({ranged} by range), "
                f"shape={self.shape}, dtype={self.dtype})")


@dataclass(frozen=True)
class LayerDecoder:
    """Decodes a whole fetched layer with tifffile, checking its shape."""

    url: str
    shape: tuple[int, int]

    def __call__(self, data: bytes | None) -> np.ndarray:
        import tifffile

        if data is None:
            raise VolumeError(f"{self.url}: missing on the server")
        arr = tifffile.imread(io.BytesIO(data))
        if tuple(arr.shape) != tuple(self.shape):
            raise VolumeError(f"{self.url}: layer is {arr.shape}, expected {self.shape}")
        return arr


def split_url(url: str) -> tuple[str, str]:
    """``(protocol, base)`` of a URL as RemoteChunks takes them."""
    protocol = url.split("://", 1)[0].lower()
    base = url if protocol in ("http", "https") else url.split("://", 1)[1]
    return protocol, base.rstrip("/")


def probe_fetcher(url: str, storage_options: dict | None) -> Any:
    """A fetcher under ``url`` for which a 404 is an answer (None), not a fault: for probing."""
    from ..remote.fetch import RemoteChunks, RemoteSettings

    protocol, base = split_url(url)
    settings = dataclasses.replace(RemoteSettings.from_config(), missing="fill")
    return RemoteChunks(protocol, base, url, remote_storage_options(url, storage_options), settings,
                        max_stored_bytes=config.get_bytes("limits.unknown-chunk-bytes"))


def remote_layers(url: str, probe: Any) -> tuple[str, list[RemoteLayer]]:
    """The layer folder under segment ``url`` and its layers (see the module notes)."""
    url = url.rstrip("/")
    folder = head = None
    for name in ("layers",) + tuple(d for d in LAYER_DIRS if d != "layers"):
        head = probe.get_ranges([(f"{name}/{REMOTE_LAYERS[0]}.tif", 0, HEAD_BYTES)])[0]
        if head is not None:
            folder = name
            break
    if folder is None:
        tried = " nor ".join(f"{url}/{d}/00.tif" for d in ("layers",) + LAYER_DIRS[:1])
        raise VolumeNotFoundError(f"{url}: no segment layers found (neither {tried} exists)")
    keys = [f"{folder}/{n}.tif" for n in REMOTE_LAYERS]
    heads = [head] + probe.get_ranges([(k, 0, HEAD_BYTES) for k in keys[1:]])
    present = [h is not None for h in heads]
    count = present.index(False) if False in present else len(keys)
    if any(present[count:]):
        last = len(present) - 1 - present[::-1].index(True)
        raise VolumeNotFoundError(f"{url}/{keys[count]}: missing (HTTP 404), but layers up to "
                                  f"{keys[last]} exist")
    layers = []
    for key, head in zip(keys[:count], heads[:count]):
        def fetch(a: int, b: int, key: str = key) -> bytes:
            return probe.get_ranges([(key, a, b)])[0] or b""
        layers.append(parse_layer(f"{key.split('/', 1)[1]}", f"{url}/{key}", head, fetch))
    first = layers[0]
    for key, layer in zip(keys, layers):
        if (layer.shape, np.dtype(layer.dtype).newbyteorder("=")) != \
                (first.shape, np.dtype(first.dtype).newbyteorder("=")):
            raise VolumeError(f"{url}/{key}: layer is {layer.shape} {layer.dtype}, but {url}/{keys[0]} is "
                              f"{first.shape} {first.dtype}; all layers must match")
    return folder, layers


def layer_fetcher(url: str, layers: list[RemoteLayer], storage_options: dict | None,
                  cache_dir: Any) -> Any:
    """The fetcher of a layer folder: whole layers (bounded by their decoded size) and row ranges."""
    from ..remote.disk_cache import DiskChunkCache, array_id
    from ..remote.fetch import RemoteChunks, RemoteSettings

    protocol, base = split_url(url)
    first = layers[0]
    nbytes = first.shape[0] * first.shape[1] * np.dtype(first.dtype).itemsize
    remote = RemoteChunks(protocol, base, url, remote_storage_options(url, storage_options),
                          RemoteSettings.from_config(), chunk_nbytes=nbytes)
    if cache_dir is None or all(layer.strips is not None for layer in layers):
        return remote
    meta = {"tiff-layers": [[layer.key, list(layer.shape), layer.dtype,
                             None if layer.strips is None else len(layer.strips)] for layer in layers]}
    try:
        cache = DiskChunkCache(cache_dir, array_id(url, meta), config.get_bytes("remote.cache-dir-bytes"),
                               about={"url": url, "metadata": meta})
    except OSError as err:
        raise VolumeError(f"cache_dir={os.fspath(cache_dir)!r} cannot be used: {err}") from err
    return remote.with_cache(cache)


def remote_images(url: str, probe: Any) -> dict[str, tuple[str, bytes]]:
    """The segment's mask, ink labels and IR image (``<id>_mask.png`` or ``mask.png`` ...), fetched whole.

    ``{"mask" | "labels" | "ir": (URL, bytes)}`` for those the server has.
    """
    seg_id = url.rstrip("/").rsplit("/", 1)[-1]
    found: dict[str, tuple[str, bytes]] = {}
    for name, stem in (("mask", "mask"), ("labels", "inklabels"), ("ir", "ir")):
        for key in (f"{seg_id}_{stem}.png", f"{stem}.png"):
            data = probe.get(key)
            if data is not None:
                found[name] = (probe.url(key), data)
                break
    return found


def open_remote_segment(url: str, *, storage_options: dict | None = None, cache_dir: Any = None,
                        chunks: Any = None) -> tuple[Any, dict[str, tuple[str, bytes]]]:
    """A segment folder by URL: its volume (a :class:`~vesuvius_dask.io.volume.Volume`) and images.

    :func:`~vesuvius_dask.io.segments.open_segment` makes the
    :class:`~vesuvius_dask.io.segments.Segment` of them (see the module notes).

    Parameters
    ----------
    url : str
        ``https://.../paths/<id>/`` (or ``s3://...``).
    storage_options : dict, optional
        fsspec options.
    cache_dir : str or os.PathLike, optional
        Keep whole fetched (compressed or tiled) layers here; row ranges are not kept.
    chunks : tuple of int, optional
        Dask chunks (default: up to 16 layers x 64 rows x all columns; a whole layer
        per chunk when no layer reads by range).

    Returns
    -------
    (Volume, dict)
        The volume, and ``{"mask" | "labels" | "ir": (URL, PNG bytes)}`` found.

    Raises
    ------
    VolumeNotFoundError
        No layer ``00`` under ``layers/`` or ``surface_volume/``, or a gap in the layers.
    VolumeError
        An unreadable TIFF header or layers that differ (naming the URL).
    ChunkFetchError
        The server failed (after retries), naming the URL.
    """
    import dask.array as da
    from dask.base import tokenize

    from .volume import Volume

    url = url.rstrip("/")
    probe = probe_fetcher(url, storage_options)
    folder, layers = remote_layers(url, probe)
    stack = RemoteTiffStack(f"{url}/{folder}", layers, layer_fetcher(f"{url}/{folder}", layers,
                                                                     storage_options, cache_dir))
    if chunks is None:
        ranged = any(layer.strips is not None for layer in layers)
        nz, ny, nx = stack.shape
        chunks = (min(nz, REMOTE_LAYERS_PER_CHUNK), min(ny, REMOTE_ROWS), nx) if ranged else (1, ny, nx)
    token = "volume-remote-tiff-" + tokenize(stack.url, layers)
    arr = da.from_array(stack, chunks=chunks, name=token, asarray=False)
    return Volume(arr, f"{url}/{folder}"), remote_images(url, probe)
