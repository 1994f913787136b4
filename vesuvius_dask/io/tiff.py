"""Reading stacks of 2-D TIFF layers: find them, check them, read them in place.

:func:`find_layers` lists a folder's (or glob's, or multi-page file's) layers in z
order and checks the numbering; :func:`inspect_stack` checks every header (shape,
dtype, truncation); :func:`lazy_stack` is the region of interest as a dask array
(one delayed read per layer or band of rows); :class:`TiffStack` is an array-like
that reads blocks in place (memory maps, or tifffile's Zarr interface for compressed
layers); :func:`tiff_volume` makes either into a :class:`~vesuvius_dask.io.volume.Volume`.
Writing Zarr from them is :mod:`vesuvius_dask.writers.convert`'s job.
"""

from __future__ import annotations

import glob as _glob
import itertools
import os
import re
import threading
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import config
from ..errors import ConversionError, VolumeError
from ..lru import LRU
from .paths import LAYER_DIRS, TIFF_SUFFIXES
from .volume import ORIGIN_ATTR, Volume, wrap_numpy

__all__ = ["Layer", "StackInfo", "find_layers", "inspect_stack", "read_layer", "lazy_stack",
           "TiffStack", "inspect_layers", "tiff_volume", "MAX_OPEN_LAYERS"]


@dataclass(frozen=True)
class Layer:
    """One 2-D layer of the source: a file and a page in it."""

    path: str
    page: int
    number: int


@dataclass(frozen=True)
class StackInfo:
    layers: tuple[Layer, ...]
    shape: tuple[int, int, int]
    dtype: np.dtype
    memmappable: bool


def _natural_key(path: str) -> tuple:
    parts = re.split(r"(\d+)", os.path.basename(path))
    return tuple(int(p) if p.isdigit() else p.lower() for p in parts)


def _layer_number(path: str) -> int:
    digits = re.findall(r"\d+", Path(path).stem)
    if not digits:
        raise ConversionError(f"{path}: the file name has no layer number (expected e.g. 00.tif)")
    return int(digits[-1])


def _multipage(path: str) -> list[Layer]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)
    except Exception as err:
        raise ConversionError(f"{path}: not a readable TIFF ({err})") from err
    return [Layer(path, i, i) for i in range(n_pages)]


def _numbered(files: list[str], where: str) -> list[Layer]:
    """Layers ordered by the number in their names; gaps and duplicates are errors."""
    if not files:
        raise ConversionError(f"{where}: contains no .tif/.tiff layers")
    numbered = sorted(((_layer_number(f), f) for f in files), key=lambda t: (t[0], _natural_key(t[1])))
    numbers = [n for n, _ in numbered]
    dupes = sorted(n for n, k in Counter(numbers).items() if k > 1)
    if dupes:
        names = [os.path.basename(f) for n, f in numbered if n == dupes[0]]
        raise ConversionError(f"{where}: layer number {dupes[0]} appears more than once ({', '.join(names)})")
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ConversionError(
            f"{where}: layers {numbers[0]}..{numbers[-1]} have gaps; missing layer number(s) {shown}")
    return [Layer(f, 0, n) for n, f in numbered]


def find_layers(src: str | os.PathLike) -> list[Layer]:
    """List the layers of a source in z order, checking their numbering.

    Parameters
    ----------
    src : str or os.PathLike
        A folder of 2-D TIFFs, a segment folder (its ``surface_volume/`` or
        ``layers/``), a glob pattern, or one multi-page TIFF.

    Returns
    -------
    list of Layer

    Raises
    ------
    ConversionError
        No TIFF found, a file name without a number, duplicate or missing numbers.
    """
    text = os.fspath(src)
    if any(ch in text for ch in "*?["):
        files = [f for f in _glob.glob(text) if f.lower().endswith(TIFF_SUFFIXES)]
        return _numbered(files, f"glob {text!r}")
    if os.path.isfile(text):
        return _multipage(text)
    if not os.path.isdir(text):
        raise ConversionError(f"{text}: no such file, folder or matching glob")
    files = [os.path.join(text, f) for f in os.listdir(text)
             if f.lower().endswith(TIFF_SUFFIXES) and not f.startswith(".")]
    subdirs = [os.path.join(text, d) for d in LAYER_DIRS if os.path.isdir(os.path.join(text, d))]
    if not files and subdirs:  # a segment folder: its layers
        return find_layers(subdirs[0])
    return _numbered(files, text)


def inspect_stack(layers: Sequence[Layer]) -> StackInfo:
    """Read every layer's header; check shape, dtype and that the data is all there."""
    import tifffile

    shape = dtype = None
    memmappable = True
    first = None
    handles: dict[str, Any] = {}
    try:
        for layer in layers:
            try:
                tif = handles.get(layer.path)
                if tif is None:
                    if handles:  # multi-page files keep one handle; folders close as they go
                        for h in handles.values():
                            h.close()
                        handles.clear()
                    tif = handles[layer.path] = tifffile.TiffFile(layer.path)
                page = tif.pages[layer.page]
                size = os.path.getsize(layer.path)
                ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts)]
                if not ends or max(ends) > size:
                    raise ConversionError(
                        f"{layer.path}: truncated TIFF (image data ends at byte "
                        f"{max(ends) if ends else '?'}, file has {size} bytes)")
                pshape, pdtype = tuple(page.shape), np.dtype(page.dtype)
                memmappable = memmappable and bool(page.is_memmappable)
            except ConversionError:
                raise
            except Exception as err:
                raise ConversionError(f"{layer.path}: unreadable TIFF ({err})") from err
            if len(pshape) != 2:
                raise ConversionError(f"{layer.path}: expected a 2-D grayscale layer, got shape {pshape}")
            if shape is None:
                shape, dtype, first = pshape, pdtype, layer.path
            elif pshape != shape or pdtype != dtype:
                raise ConversionError(
                    f"{layer.path}: layer is {pshape[0]}x{pshape[1]} {pdtype}, but {first} is "
                    f"{shape[0]}x{shape[1]} {dtype}; all layers must match")
    finally:
        for h in handles.values():
            h.close()
    assert shape is not None and dtype is not None
    return StackInfo(tuple(layers), (len(layers),) + shape, dtype, memmappable)  # type: ignore[arg-type]


def read_layer(path: str, page: int, ys: tuple[int, int], xs: tuple[int, int],
                memmap: bool) -> np.ndarray:
    """Read rows ``ys`` and columns ``xs`` of one layer (only those, when memory-mappable)."""
    import tifffile

    try:
        if memmap:
            mm = tifffile.memmap(path, page=page, mode="r")
            return np.array(mm[ys[0]:ys[1], xs[0]:xs[1]])
        data = tifffile.imread(path, key=page)
        return np.ascontiguousarray(data[ys[0]:ys[1], xs[0]:xs[1]])
    except Exception as err:
        raise ConversionError(f"{path}: reading layer failed ({err})") from err


def lazy_stack(info: StackInfo, roi: tuple[slice, slice, slice], band: int) -> Any:
    """The region of interest of a TIFF stack as a lazy dask array.

    One delayed read per layer, or per band of ``band`` rows when the TIFF can be
    memory-mapped (then only the region of interest is read).
    """
    import dask
    import dask.array as da

    zs, ys, xs = roi
    height, width = ys.stop - ys.start, xs.stop - xs.start
    read = dask.delayed(read_layer, pure=True)
    layers = []
    for layer in info.layers[zs]:
        if info.memmappable:
            bands = [
                da.from_delayed(
                    read(layer.path, layer.page, (y, min(y + band, ys.stop)), (xs.start, xs.stop), True),
                    shape=(min(y + band, ys.stop) - y, width), dtype=info.dtype)
                for y in range(ys.start, ys.stop, band)
            ]
            layers.append(da.concatenate(bands, axis=0))
        else:
            layers.append(da.from_delayed(
                read(layer.path, layer.page, (ys.start, ys.stop), (xs.start, xs.stop), False),
                shape=(height, width), dtype=info.dtype))
    return da.stack(layers, axis=0)



#: TIFF layers kept open per process (memory maps, or tifffile Zarr stores of compressed
#: layers), over every :class:`TiffStack`: each holds a file descriptor, a scroll has
#: thousands of layers and ``ulimit -n`` is often 1024. The least recently used is closed
#: first (once no read is using it). The default of config ``vesuvius-dask.tiff.max-open-layers``,
#: which each :class:`TiffStack` reads when it is made.
MAX_OPEN_LAYERS = config.default("tiff.max-open-layers")


class _OpenLayer:
    """One open layer and the reads using it; closed once out of the LRU and unused."""

    __slots__ = ("obj", "users", "evicted")

    def __init__(self, obj: Any) -> None:
        self.obj, self.users, self.evicted = obj, 1, False

    def close(self) -> None:
        obj, self.obj = self.obj, None
        store = getattr(obj, "store", None)  # a Zarr array over tifffile's store: its file handles
        if store is not None and hasattr(store, "close"):
            try:
                store.close()
            except Exception:  # pragma: no cover - closing what is being dropped anyway
                pass
        # a memory map is unmapped (and its descriptor closed) with its last reference


def _evicted(key: Any, layer: _OpenLayer) -> None:
    with _LAYERS_LOCK:
        layer.evicted = True
        idle = layer.users == 0
    if idle:
        layer.close()


def _release(layer: _OpenLayer) -> None:
    with _LAYERS_LOCK:
        layer.users -= 1
        idle = layer.evicted and layer.users == 0
    if idle:
        layer.close()


#: The open layers of this process, by ``(stack number, z)``; guarded, with each layer's
#: ``users``, by ``_LAYERS_LOCK``.
_LAYERS = LRU(MAX_OPEN_LAYERS, on_evict=_evicted)
_LAYERS_LOCK = threading.Lock()
_STACK_IDS = itertools.count()


#: Stacks collected since the last miss: their layers are closed then (a finalizer may run
#: inside any lock, from the garbage collector, so it only appends here).
_GONE: list[int] = []


def _forget_stack(stack_id: int) -> None:
    _GONE.append(stack_id)


def _close_gone() -> None:
    """Close the layers of stacks that are gone (each once its reads are done)."""
    gone = set()
    while _GONE:
        try:
            gone.add(_GONE.pop())
        except IndexError:  # another thread took the last one
            break
    for key in _LAYERS.keys() if gone else ():
        if key[0] in gone:
            layer = _LAYERS.pop(key)
            if layer is not None:
                _evicted(key, layer)


def _forget_layers() -> None:
    """In a forked child: a lock of its own, and none of the parent's open layers.

    The child's copies of the parent's descriptors and maps are dropped (closing a
    copy does not touch the parent's); a tifffile handle's file position is shared
    with the parent, so the child must not read through it.
    """
    global _LAYERS, _LAYERS_LOCK
    _LAYERS_LOCK = threading.Lock()
    _LAYERS = LRU(_LAYERS.budget, on_evict=_evicted)


os.register_at_fork(after_in_child=_forget_layers)


class TiffStack:
    """A read-only 3-D array-like over 2-D TIFF layers, read in place.

    Slicing ``stack[z0:z1, y0:y1, x0:x1]`` reads just those rows and columns of
    those layers: uncompressed layers are memory-mapped; compressed (or tiled)
    ones are opened through tifffile's Zarr interface, which decodes only the
    strips or tiles the region touches. It pickles as its list of files (each
    process opens them anew). At most config ``vesuvius-dask.tiff.max-open-layers``
    (128) layers stay open in the process, over all stacks (least recently used
    out): each holds a file descriptor, and a whole scroll has thousands of layers.

    Parameters
    ----------
    paths : sequence of str
        The layers, in z order; all of one shape and dtype.
    shape : tuple of int
        ``(Z, Y, X)``.
    dtype : numpy dtype
        Pixel type.
    memmap : bool
        Whether every layer can be memory-mapped (uncompressed, contiguous).
    """

    ndim = 3
    #: Layers kept open at once, per process, over all stacks (None: config
    #: ``vesuvius-dask.tiff.max-open-layers``, as it was when the stack was made).
    max_open: int | None = None

    def __init__(self, paths: list[str], shape: tuple[int, int, int], dtype: Any,
                 memmap: bool = True) -> None:
        self.paths = list(paths)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.memmap = bool(memmap)
        self._max_open = int(config.get("tiff.max-open-layers"))
        self._id = next(_STACK_IDS)
        weakref.finalize(self, _forget_stack, self._id)

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "shape": self.shape, "dtype": self.dtype.str,
                "memmap": self.memmap}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"], state["shape"], state["dtype"],  # type: ignore[misc]
                      state.get("memmap", True))

    @property
    def _maps(self) -> dict[int, Any]:
        """The layers of the stack open now, by z (the process keeps at most ``max_open``)."""
        layers = {key[1]: _LAYERS.get(key) for key in _LAYERS.keys() if key[0] == self._id}
        return {z: layer.obj for z, layer in layers.items() if layer is not None}

    def _open(self, z: int) -> Any:
        import tifffile

        if self.memmap:
            return tifffile.memmap(self.paths[z], mode="r")
        import zarr

        try:
            return zarr.open_array(tifffile.imread(self.paths[z], aszarr=True), mode="r")
        except Exception as err:
            raise VolumeError(f"{self.paths[z]}: cannot read the TIFF layer ({err})") from err

    def _layer(self, z: int) -> _OpenLayer:
        """Layer ``z``, open, counted as in use until :func:`_release`."""
        key = (self._id, z)
        with _LAYERS_LOCK:
            layer = _LAYERS.get(key)
            if layer is not None:
                layer.users += 1
                return layer
        _close_gone()
        layer = _OpenLayer(self._open(z))
        with _LAYERS_LOCK:
            other = _LAYERS.get(key)  # opened meanwhile by another thread
            if other is not None:
                other.users += 1
        if other is not None:
            layer.users = 0
            layer.close()
            return other
        _LAYERS.budget = max(1, int(self._max_open if self.max_open is None else self.max_open))
        _LAYERS.put(key, layer)
        with _LAYERS_LOCK:
            if _LAYERS.get(key) is not layer:  # another thread's, or already pushed out
                layer.evicted = True
        return layer

    def _read(self, z: int, ys: Any, xs: Any, out: np.ndarray | None = None) -> np.ndarray:
        layer = self._layer(z)
        try:
            if out is None:
                return np.array(layer.obj[ys, xs])
            out[...] = layer.obj[ys, xs]
            return out
        finally:
            _release(layer)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        zs, ys, xs = key
        if isinstance(zs, (int, np.integer)):
            return self._read(int(zs), ys, xs)
        z_idx = range(*zs.indices(self.shape[0]))
        if not z_idx:
            return np.empty((0,) + np.empty(self.shape[1:], dtype=bool)[ys, xs].shape, self.dtype)
        first = self._read(z_idx[0], ys, xs)
        out = np.empty((len(z_idx),) + first.shape, first.dtype)
        out[0] = first
        for i, z in enumerate(z_idx[1:], 1):
            self._read(z, ys, xs, out[i])
        return out

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        how = "memory-mapped" if self.memmap else "compressed"
        return f"TiffStack({len(self.paths)} {how} layers, shape={self.shape}, dtype={self.dtype})"


def inspect_layers(path: str | os.PathLike) -> Any:
    """Find and check the TIFF layers at ``path`` (see :func:`find_layers`).

    Returns the :class:`StackInfo`; a stack error (numbering,
    shapes, unreadable files, naming the file) is raised as :class:`VolumeError`.
    """
    try:
        return inspect_stack(find_layers(path))
    except ConversionError as err:
        raise VolumeError(str(err)) from err


def tiff_volume(folder: Path, chunks: Any = None) -> Volume:
    """A TIFF layer folder (or multi-page TIFF) as a Volume, read in place.

    One file per layer: a :class:`TiffStack` (memory-mapped when uncompressed, else
    region reads of the strips or tiles needed). A multi-page TIFF: a lazy dask
    stack of whole pages. Stack errors (numbering, shapes, unreadable files) name
    the file.
    """
    from dask.base import tokenize

    info = inspect_layers(folder)
    name = str(folder)
    if all(layer.page == 0 for layer in info.layers):
        stack = TiffStack([layer.path for layer in info.layers], info.shape, info.dtype,
                          memmap=info.memmappable)
        token = "volume-tiff-" + tokenize(stack.paths, [os.path.getmtime(p) for p in stack.paths])
        arr = wrap_numpy(stack, chunks, token)  # type: ignore[arg-type]
        setattr(arr, ORIGIN_ATTR, ("numpy", stack))
        return Volume(arr, name, data=stack)  # type: ignore[arg-type]
    full = tuple(slice(0, s) for s in info.shape)
    default = tuple(min(c, s) for c, s in zip((4, 512, 512), info.shape))
    arr = lazy_stack(info, full, band=512).rechunk(chunks or default)  # type: ignore[arg-type]
    return Volume(arr, name)
