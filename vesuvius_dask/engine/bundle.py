"""Several engines read as one: the named targets and the context of a batch, in the batch's graph.

An :class:`EngineBundle` stands where the stream's label engine would: the reader
hands it the batch's block starts, and it builds one graph holding a sub-graph per
part (each part an ordinary :class:`~vesuvius_dask.engine.batches.BatchEngine` with
its own volumes, block and dtype, reading at starts mapped from the fine ones).
:func:`~vesuvius_dask.engine.batches.read_together` merges that graph with the
blocks' graph, so blocks, targets and context are read as one graph per batch.

Its output is one ``(B, item_bytes)`` uint8 buffer (so the reader can put it in
shared memory like any batch). Part ``k`` occupies bytes ``[B·offset_k, B·(offset_k +
nbytes_k))`` of it, contiguous; :meth:`EngineBundle.layout` says where, and
:meth:`EngineBundle.split` cuts numpy views out of it.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SamplingError
from ..io.context import ContextVolumes
from .batches import BatchEngine, EngineStats

__all__ = ["EngineBundle", "BundlePart", "StartMap", "ALIGN"]

#: Byte alignment of every part inside the bundle's buffer.
ALIGN = 64

_counter = itertools.count()


@dataclass
class StartMap:
    """How a part's starts follow the fine ones: the same, on the plane (z = 0), or the context's."""

    kind: str = "same"
    context: ContextVolumes | None = None

    def __call__(self, vol_index: np.ndarray, starts: np.ndarray) -> np.ndarray:
        if self.kind == "plane":
            out = starts.copy()
            out[:, 0] = 0
            return out
        if self.context is not None:
            return self.context.starts(vol_index, starts)
        return starts


@dataclass
class BundlePart:
    """One part: its name in the item dict, its engine, its start map, and whether it is 2-D."""

    name: str
    engine: BatchEngine
    starts: StartMap
    flat: bool = False

    @property
    def item_shape(self) -> tuple[int, ...]:
        """The shape of one item: ``(y, x)`` for 2-D parts, else the engine's block."""
        return self.engine.block[1:] if self.flat else self.engine.block

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.engine.block)) * self.engine.dtype.itemsize


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class EngineBundle:
    """Read several parts (targets, context) at the starts of a batch, as one request.

    Parameters
    ----------
    parts : sequence of BundlePart
        The parts, in the order of the item dict.
    """

    def __init__(self, parts: Sequence[BundlePart]) -> None:
        if not parts:
            raise SamplingError("an engine bundle needs at least one part")
        self.parts = list(parts)
        self.offsets = []
        row = 0
        for p in self.parts:
            self.offsets.append(row)
            row += _aligned(p.nbytes)
        #: Read as ``(B, item_bytes)`` uint8 by the reader: the engine protocol's block and dtype.
        self.block = (row,)
        self.dtype = np.dtype(np.uint8)
        self.volumes = [v for p in self.parts for v in p.engine.volumes]
        self.stats = EngineStats()
        self.uid = uuid.uuid4().hex
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_lock=None, stats=EngineStats())
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _own_process(self) -> None:
        for p in self.parts:
            p.engine._own_process()

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    # -- remote volumes: what the reader's fetch-ahead asks ----------------------
    @property
    def remote(self) -> bool:
        return any(p.engine.remote for p in self.parts)

    def prefetch(self, vol_index: np.ndarray, starts: np.ndarray) -> int:
        vol_index = np.asarray(vol_index, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
        return sum(p.engine.prefetch(vol_index, p.starts(vol_index, starts))
                   for p in self.parts if p.engine.remote)

    def pending_fetches(self) -> int:
        return sum(p.engine.pending_fetches() for p in self.parts)

    def flush_fetches(self) -> None:
        for p in self.parts:
            p.engine.flush_fetches()

    # -- the graph -----------------------------------------------------------------
    def layout(self, batch: int) -> list[tuple[BundlePart, int, int]]:
        """``(part, first byte, end byte)`` of each part in the buffer of a ``batch``-block batch."""
        return [(p, batch * off, batch * off + batch * p.nbytes) for p, off in zip(self.parts, self.offsets)]

    def split(self, buffer: np.ndarray) -> dict[str, np.ndarray]:
        """The parts of a numpy buffer, as views: ``{name: (B, *item_shape)}``."""
        b = buffer.shape[0]
        flat = buffer.reshape(-1)
        return {p.name: flat[lo:hi].view(p.engine.dtype).reshape((b,) + p.item_shape)
                for p, lo, hi in self.layout(b)}

    def batch_graph(self, vol_index: np.ndarray, starts: np.ndarray,
                    out: np.ndarray | None = None) -> tuple[dict, Any, np.ndarray, int]:
        """The graph of every part of one batch, written into ``out`` (as :meth:`BatchEngine.batch_graph`)."""
        vol_index = np.asarray(vol_index, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
        shape = (starts.shape[0],) + self.block
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise SamplingError(f"out has shape {out.shape} and dtype {out.dtype}; expected a "
                                f"C-contiguous {shape} {self.dtype}")
        graph: dict = {}
        keys = []
        n_reads = 0
        views = self.split(out)
        for p in self.parts:
            view = views[p.name].reshape((shape[0],) + p.engine.block)
            g, key, _, n = p.engine.batch_graph(vol_index, p.starts(vol_index, starts), view)
            graph.update(g)
            keys.append(key)
            n_reads += n
        key = (f"vd-bundle-{next(_counter)}-{self.uid[:8]}",)
        graph[key] = (_assemble, out, *keys)
        return graph, key, out, n_reads


def _assemble(out: np.ndarray, *_deps: Any) -> np.ndarray:
    return out
