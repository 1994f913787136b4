"""Whole-segment inference: blend overlapping block predictions into Zarr, out of core.

:class:`PredictionWriter` takes ``(prediction, coords)`` batches in any order and
accumulates ``sum(weight * prediction)`` and ``sum(weight)`` per output chunk. Only a
bounded number of output chunks is kept in memory (``memory_bytes``); the others are
added into on-disk accumulators with chunk-aligned read-modify-writes.
:meth:`PredictionWriter.finalize` divides, writes the output chunk by chunk and
renames it into place. :func:`predict` runs a TorchScript model over a grid stream.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import config
from ..arguments import renamed
from ..errors import ArgumentError, ModelError, OutputError, SamplingError, VesuviusDaskError
from ..lru import LRU
from ..sampling.starts import ANY_VOXEL
from .accumulate import (
    ChunkFiles,
    ChunkGeometry,
    WritePool,
    add_pieces,
    normalized,
    output_codec,
    pack_bits,
    pack_counts,
    piece_torch,
    plan_counts,
    unpack_bits,
    unpack_counts,
)
from .plan_weights import PlanWeights

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da

__all__ = ["PredictionWriter", "predict", "predict_join", "model_metadata", "BLENDS"]

BLENDS = ("hann", "mean")

#: Threads ``PredictionWriter`` divides, encodes and writes on (its ``write_threads`` default):
#: more than the cores they use, since with ``O_DIRECT`` a write waits for the disk.
WRITE_THREADS = 3
#: Cores ``predict`` leaves to the write threads (torch's intra-op threads get the rest).
ENCODE_CORES = 2


def blend_window(block: Sequence[int], blend: str) -> np.ndarray:
    """Per-voxel weights of one block prediction.

    ``"mean"``: all ones (overlaps are averaged). ``"hann"``: a separable Hann window
    sampled at voxel centres (never zero), which down-weights block edges, where
    predictions are least reliable, so seams between blocks fade out.
    """
    if blend not in BLENDS:
        raise ArgumentError(f"unknown blend {blend!r}; expected one of {BLENDS}")
    w = np.ones(tuple(block), dtype=np.float32)
    if blend == "mean":
        return w
    for axis, n in enumerate(block):
        profile = 0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(n) + 0.5) / n)
        shape = [1] * len(block)
        shape[axis] = n
        w = w * profile.astype(np.float32).reshape(shape)
    return w


class PredictionWriter:
    """Accumulate overlapping block predictions into a Zarr array, out of core, resumably.

    Parameters
    ----------
    output : str or os.PathLike
        Output Zarr array; built in ``.NAME.partial/`` beside it and renamed into
        place by :meth:`finalize` (see :class:`~vesuvius_dask.writers.outputs.OutputJob`).
    shape : tuple of int
        Output shape: ``(Y, X)`` for 2-D maps (e.g. ink) or ``(Z, Y, X)``.
    block : tuple of int
        Shape of one prediction, ``(y, x)`` or ``(z, y, x)`` (same length as ``shape``).
    chunks : tuple of int, optional
        Output chunks (default 1024×1024 in 2-D, 16×256×256 in 3-D, clipped).
    blend : {"hann", "mean"}
        Weighting of overlapping predictions (see :func:`blend_window`).
    memory_bytes : int
        Budget for in-memory accumulator chunks (default 256 MiB). Besides it, up to
        ``2 * write_threads + 2`` buffers of written chunks are kept for reuse, and weight
        totals shared by chunks laid out alike up to half of it (at least 8 chunks' worth).
    volume : int, optional
        Only rows of ``coords`` whose first column (volume index) equals this are used.
    overwrite : bool
        Replace an existing output at ``finalize`` (and discard an interrupted
        run's leftovers).
    resume : bool
        Continue an interrupted run: the accumulators as of its last
        :meth:`checkpoint` come back, and :attr:`progress` says what that checkpoint
        had done, so the caller adds only what came after.
    fill_value : float
        Output value where no prediction landed (e.g. outside a mask).
    inputs : sequence of paths
        The job's inputs: the output may not be, contain or lie inside any of them.
    identity : dict, optional
        More of the job's description (model, source, options) that a resumed run
        must match.
    part : (int, int), optional
        ``(k, n)``: accumulate only the output chunks part ``k`` of ``n`` owns
        (:func:`chunk_owner`); the others are skipped. ``predict(..., part=)`` uses it.
    compressor : {"blosc-lz4", "zstd", "none"}
        Codec of the output's chunks (default blosc-lz4 with byte shuffle: about as
        small as zstd on float32 predictions, and ~30x faster to encode).
    write_threads : int, optional
        Threads that normalise, encode and write completed chunks (default
        :data:`WRITE_THREADS`: with ``O_DIRECT`` they mostly wait for the disk).
    exact : bool
        ``True`` (default): the output is ``Σ w·p / Σ w`` with each voxel's terms added
        in the order of :meth:`add`, bit for bit whatever the batching, the memory
        budget, the checkpoints or the release. ``False``: when the plan given to
        :meth:`expect` is a full grid, weight each block by ``w / Σ w`` as it comes
        (:class:`~vesuvius_dask.writers.plan_weights.PlanWeights`): no weight sums, no
        division, one fused multiply-add per piece; ~20% less time for a 3-D
        ``predict`` on the machine measured, equal to the exact output up to float32
        rounding (a few units in the last place).

    Notes
    -----
    Feed it from one process (e.g. the training/inference loop fed by a DataLoader
    with workers): :meth:`add` is thread-safe, not multi-process-safe. A batch is
    added per output chunk: its blocks' pieces in each chunk are added with numpy
    slicing, in the order of :meth:`add` (each voxel's sums are added in that order,
    so the grouping changes no bit). After :meth:`expect` (the plan's block starts),
    a chunk whose last block was added is divided and written on a thread pool right
    away, and its accumulator freed; the rest are written by :meth:`finalize`. Between
    checkpoints, flushed chunks are written as new files (generations); a
    checkpoint commits them, so a kill never leaves a half-added batch behind.
    A chunk pushed out of memory is written whole and read back when touched again,
    so each chunk's sums are added in the order of :meth:`add` whatever the memory
    budget or the checkpoints: the output does not depend on them, bit for bit.

    With ``exact=False``, when the plan given to :meth:`expect` before any :meth:`add`
    is a full grid (:attr:`plan_weights` says so), each block is added as
    ``p · w / Σ w`` right away: equal to ``Σ w·p / Σ w`` up to float32 rounding, and
    exactly ``p`` where one block covers a voxel. Blocks outside that plan, blocks
    added more often than it has them and a :meth:`finalize` before all of it was
    added are then refused.
    """

    @renamed(path="output")
    def __init__(self, output: str | os.PathLike, shape: Sequence[int], block: Sequence[int], *,
                 chunks: Sequence[int] | None = None, blend: str = "hann",
                 memory_bytes: int = config.get_bytes("predict.memory-bytes"), volume: int | None = None,
                 overwrite: bool = False, resume: bool = False, fill_value: float = 0.0,
                 inputs: Sequence[Any] = (), identity: dict | None = None,
                 part: tuple[int, int] | None = None, compressor: str = "blosc-lz4",
                 write_threads: int | None = None, exact: bool = True) -> None:
        from .outputs import OutputJob

        self.path = Path(output)
        self.shape = tuple(int(s) for s in shape)
        self.block = tuple(int(b) for b in block)
        if len(self.shape) not in (2, 3) or len(self.block) != len(self.shape):
            raise SamplingError(
                f"{self.path}: shape {self.shape} and block {self.block} must both be 2-D or 3-D")
        if any(b > s for b, s in zip(self.block, self.shape)):
            raise SamplingError(f"{self.path}: block {self.block} is larger than the output {self.shape}")
        default = (1024, 1024) if len(self.shape) == 2 else (16, 256, 256)
        self.chunks = tuple(min(int(c), s) for c, s in zip(chunks or default, self.shape))
        self.weights = blend_window(self.block, blend)
        self.blend = blend
        self.volume = volume
        self.overwrite = overwrite
        self.fill_value = float(fill_value)
        self.memory_bytes = int(memory_bytes)
        self.grid = tuple(-(-n // c) for n, c in zip(self.shape, self.chunks))
        self.part = None if part is None else (int(part[0]), int(part[1]))
        output_codec(compressor, 3)  # a known name
        self.compressor = compressor
        self.geometry = ChunkGeometry(self.shape, self.block, self.chunks, self.part)
        ident = {"shape": list(self.shape), "block": list(self.block), "chunks": list(self.chunks),
                 "blend": blend, "volume": volume, "fill_value": self.fill_value,
                 "compressor": compressor}
        self.exact = bool(exact)
        if not self.exact:  # (an exact run's identity is the one earlier releases wrote)
            ident["exact"] = False
        ident.update(identity or {})
        self.job = OutputJob(self.path, inputs, ident, overwrite=overwrite, resume=resume,
                             what="predict")
        self._acc_dir = self.job.partial / "acc"
        self._acc_dir.mkdir(exist_ok=True)
        self._chunk_bytes = 2 * 4 * int(np.prod(self.chunks))
        # in-memory accumulators, flushed to disk when the budget pushes them out
        self._buffers = LRU(self.memory_bytes, size=self._buffer_bytes, on_evict=self._flush,
                            keep_newest=True)
        self._latest: dict[tuple[int, ...], int] = {}     # chunk -> generation on disk
        self._committed: dict[tuple[int, ...], int] = {}  # as of the last checkpoint
        self._next_gen = 0
        self.progress: Any = None
        # after expect(): blocks still to come per chunk, and the chunks already written
        self._expected: np.ndarray | None = None
        # a full-grid plan: blocks weighted by w / Σ w as they come (no weight totals, no division)
        self._plan: PlanWeights | None = None
        self._plan_added: np.ndarray | None = None  # per grid position: blocks added so far
        self._restored_mode: str | None = None
        self._restored_added: str | None = None
        self._seen: dict[tuple[int, ...], int] = {}
        self._written = np.zeros(self.grid, dtype=bool)
        self._out: Any = None
        self._files: ChunkFiles | None = None
        self._zarr_format: int | None = None
        self._pool = WritePool(WRITE_THREADS if write_threads is None else write_threads)
        self._scratch = np.empty((0, *self.block), dtype=np.float32)  # a batch's p * w, reused
        # chunk buffers of written chunks, reused (zeroed) for new accumulators: fresh memory
        # costs a page fault per 4 KiB on first touch, more than the additions themselves
        self._spare: list[np.ndarray] = []
        self._flats: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # the ones _zeros made
        self._spare_max = 2 * self._pool.workers + 2
        self._spare_lock = threading.Lock()
        # weight totals of chunks laid out alike (a grid repeats a few layouts): the same
        # additions in the same order give the same bits, so they are replayed once per layout
        self._shared_weights = LRU(max(8 * self._chunk_bytes // 2, self.memory_bytes // 2),
                                   size=lambda w: int(w.nbytes))
        if self.job.resumed:
            self._restore()
        self._lock = threading.Lock()
        self.items = 0
        self.flushes = 0

    # ------------------------------------------------------------------ files
    def _file(self, cid: tuple[int, ...], gen: int) -> Path:
        return self._acc_dir / (".".join(map(str, cid)) + f"-{gen}.npy")

    def _restore(self) -> None:
        state = self.job.load_state("state.json") or {}
        chunks = {tuple(int(c) for c in k.split(".")): int(g) for k, g in state.get("chunks", {}).items()}
        keep = {self._file(c, g).name for c, g in chunks.items()}
        for f in self._acc_dir.iterdir():  # generations written after the last checkpoint
            if f.name not in keep:
                f.unlink()
        self._latest, self._committed = dict(chunks), dict(chunks)
        self._next_gen = int(state.get("next_gen", 0))
        self.progress = state.get("progress")
        self._restored_mode = state.get("mode", "weights" if chunks else None)
        self._restored_added = state.get("plan_added")
        self._seen = {tuple(int(c) for c in k.split(".")): int(n) for k, n in state.get("seen", {}).items()}
        if state.get("written"):
            self._written = unpack_bits(state["written"], self.grid)

    # ------------------------------------------------------------------ adding
    def add(self, prediction: Any, coords: Any) -> None:
        """Accumulate a batch of predictions.

        Parameters
        ----------
        prediction : array or tensor
            ``(B, *block)`` or ``(B, 1, *block)``.
        coords : array or tensor
            ``(B, 4)`` ``[volume, z, y, x]`` as yielded with ``return_coords=True``,
            or ``(B, 3)`` ``[z, y, x]``. For 2-D outputs only ``y, x`` are used.
        """
        pred = _numpy(prediction).astype(np.float32, copy=False)
        coords = _numpy(coords).astype(np.int64).reshape(pred.shape[0], -1)
        if pred.ndim == len(self.block) + 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if pred.shape[1:] != self.block:
            raise SamplingError(
                f"{self.path}: predictions have shape {pred.shape[1:]}, expected {self.block}")
        keep, starts = self._starts(coords)
        if keep is not None:
            pred = pred[keep]
        for start in starts:
            if any(s < 0 or s + b > n for s, b, n in zip(start, self.block, self.shape)):
                raise SamplingError(f"{self.path}: block at {tuple(start)} sticks out of {self.shape}")
        with self._lock:
            self._add_batch(pred, starts)
            self.items += len(starts)

    def _starts(self, coords: np.ndarray) -> tuple[np.ndarray | None, list[list[int]]]:
        """The rows of ``coords`` for this writer's volume (None: all) and their starts in the output."""
        keep = None
        if coords.shape[1] == 4:
            if self.volume is not None:
                keep = coords[:, 0] == self.volume
                coords = coords[keep]
            coords = coords[:, 1:]
        return keep, (coords[:, 1:] if len(self.shape) == 2 else coords).tolist()

    def _add_batch(self, pred: np.ndarray, starts: list[list[int]]) -> None:
        """Add each block's weighted pieces, chunk by chunk (in each chunk, in the batch's order)."""
        groups: dict[tuple[int, ...], list[tuple[int, tuple, tuple]]] = {}
        for i, start in enumerate(starts):
            for cid, src, dst in self.geometry.pieces(start):
                groups.setdefault(cid, []).append((i, src, dst))
        for cid, pieces in groups.items():
            if self._written[cid]:
                raise SamplingError(f"{self.path}: a block at {tuple(starts[pieces[0][0]])} touches output "
                                    f"chunk {cid}, already complete and written (not in the plan "
                                    "given to expect())")
        self._count_plan_blocks(starts)
        plan_add = self._plan_adder(pred, starts) if self._plan is not None else None
        weighted = self._weighted(pred) if plan_add is None else None
        for cid, pieces in groups.items():
            acc_sum, _, added = self._buffer(cid)
            if plan_add is not None:
                plan_add(acc_sum, pieces)
            else:
                add_pieces(acc_sum, weighted, pieces)  # type: ignore[arg-type]
                added.extend((src, dst) for _, src, dst in pieces)  # their weights: added later, in order
            if self._expected is not None:  # a plan: count down to the chunk's last block
                seen = self._seen[cid] = self._seen.get(cid, 0) + len(pieces)
                if seen >= self._expected[cid]:
                    self._complete(cid)

    def _batch_buffer(self, n: int) -> np.ndarray:
        if self._scratch.shape[0] < n:
            self._scratch = np.empty((n, *self.block), dtype=np.float32)
        return self._scratch[:n]

    def _weighted(self, pred: np.ndarray) -> np.ndarray:
        """The batch's ``p · w`` in one contiguous pass (the same products as piece by piece)."""
        return np.multiply(pred, self.weights, out=self._batch_buffer(len(pred)))

    def _plan_adder(self, pred: np.ndarray, starts: list[list[int]]) -> Any:
        """``add(acc, pieces)``: adds the pieces' ``p · w / Σ w`` (full-grid plan) into a chunk's sums.

        With torch (:func:`piece_torch`), one fused multiply-add per piece (``addcmul_``:
        a pass over the piece instead of two); else numpy's product, then the additions.
        """
        weights = [self._plan.weights(start) for start in starts]  # type: ignore[union-attr]
        torch = piece_torch()
        if torch is None:
            weighted = self._batch_buffer(len(pred))
            for i, w in enumerate(weights):
                np.multiply(pred[i], w, out=weighted[i])

            def add_numpy(acc: np.ndarray, pieces: list) -> None:
                add_pieces(acc, weighted, pieces)
            return add_numpy
        if not pred.flags.writeable or min(pred.strides, default=0) < 0:
            pred = pred.copy()  # (torch takes neither read-only nor flipped arrays)
        p = torch.from_numpy(pred)
        ws = [torch.from_numpy(w) for w in weights]

        def add_torch(acc: np.ndarray, pieces: list) -> None:
            a = torch.from_numpy(acc)
            for i, src, dst in pieces:
                a[dst].addcmul_(p[i][src], ws[i][src])
        return add_torch

    @property
    def plan_weights(self) -> bool:
        """Whether the plan given to :meth:`expect` is a full grid, weighted up front (see below)."""
        return self._plan is not None

    def expect(self, coords: Any, zarr_format: int = 3) -> None:
        """Declare every block that will be added (the plan, e.g. ``stream.epoch_coords()``).

        ``coords`` as for :meth:`add` (all the plan's, in any order).

        From then on, a chunk is divided and written (on the write threads) as soon as
        the last block touching it has been added, and its accumulator is freed; a
        block touching a chunk already written is refused. ``zarr_format`` must then be
        the one given to :meth:`finalize`. A resumed writer takes the same plan.
        """
        coords = _numpy(coords).astype(np.int64)
        starts = np.asarray(self._starts(coords.reshape(len(coords), -1))[1], dtype=np.int64)
        starts = starts.reshape(-1, len(self.shape))
        out = ((starts < 0) | (starts + np.asarray(self.block) > np.asarray(self.shape))).any(axis=1)
        if out.any():
            first = tuple(starts[int(np.argmax(out))].tolist())
            raise SamplingError(f"{self.path}: a block of the plan at {first} sticks out of {self.shape}")
        with self._lock:
            self._expect_plan(starts)
            self._zarr_format = int(zarr_format)
            self._expected = plan_counts(self.geometry, starts)
            for cid in list(self._seen):
                if self._seen[cid] >= self._expected[cid] and not self._written[cid]:
                    self._complete(cid)

    def _expect_plan(self, starts: np.ndarray) -> None:
        """Weight blocks up front when the plan is a full grid and nothing was added yet (or resumed so)."""
        fresh = self.items == 0 and not self._latest and not self._buffers and not self._seen
        weighting = self._plan is not None or self._restored_mode == "plan"
        if not (weighting or (fresh and self._restored_mode is None and not self.exact)):
            return  # exact sums: asked for, blocks were added before, or an exact-sums run resumed
        plan = PlanWeights.of(starts, self.shape, self.block, self.blend)
        if weighting and (plan is None or (self._plan is not None and not self._plan.same_plan(plan))):
            raise SamplingError(f"{self.path}: expect() was given another plan than the one this run "
                                "weights its blocks by (the first expect(), or the resumed run's); "
                                "give it the same plan")
        if plan is None or self._plan is not None:
            return
        self._plan = plan
        self._plan_added = np.zeros(plan.cells, dtype=np.uint16)
        if self._restored_added is not None:
            self._plan_added = unpack_counts(self._restored_added, plan.cells)

    def _count_plan_blocks(self, starts: list[list[int]]) -> None:
        """Refuse blocks outside a full-grid plan or added more often than it has them; count the rest."""
        plan, added = self._plan, self._plan_added
        if plan is None or added is None or not starts:
            if self._restored_mode == "plan" and plan is None:
                raise SamplingError(f"{self.path}: this run resumes one that weighted its blocks by the "
                                    "plan: call expect() with the same plan before add()")
            return
        try:
            cells = plan.cell(np.asarray(starts))
        except KeyError as err:
            raise SamplingError(f"{self.path}: a block at {err.args[0]} is not in the plan given "
                                "to expect()") from None
        where, times = np.unique(cells, return_counts=True)
        over = added[where].astype(np.int64) + times > plan.multiplicity
        if over.any():
            first = starts[int(np.nonzero(cells == where[np.argmax(over)])[0][0])]
            raise SamplingError(f"{self.path}: a block at {tuple(first)} was added more often than the plan "
                                f"given to expect() has it ({plan.multiplicity}); its weights count each "
                                "block of the plan once")
        added[where] += times.astype(np.uint16)

    def _check_complete(self) -> None:
        """A full-grid plan's output is whole only once every block of the plan was added."""
        if self._restored_mode == "plan" and self._plan is None:
            raise SamplingError(f"{self.path}: this run resumes one that weighted its blocks by the plan: "
                                "call expect() with the same plan (and add the rest) before finalize()")
        if self._plan is None or self._plan_added is None or self._expected is None:
            return
        waiting = int(((self._expected > 0) & ~self._written).sum())
        if waiting:
            missing = int(self._plan.cells * self._plan.multiplicity - self._plan_added.sum())
            raise SamplingError(
                f"{self.path}: finalize() while {waiting} output chunk(s) wait for blocks of the plan "
                f"given to expect() ({missing} of its {self._plan.cells * self._plan.multiplicity} "
                "blocks not added to this writer); add them, or leave expect() out to average "
                "whatever was added")

    def _complete(self, cid: tuple[int, ...]) -> None:
        """Divide the chunk's totals and write them on the pool; drop its accumulator."""
        totals = self._totals(cid)
        self._written[cid] = True
        self._seen.pop(cid, None)
        gen = self._latest.pop(cid, None)
        if gen is not None and self._committed.get(cid) != gen:
            self._file(cid, gen).unlink()  # never committed; a committed one goes at the next checkpoint
        if totals is not None:
            self._output(self._zarr_format or 3)
            self._pool.submit(self._write_chunk, cid, totals)

    def _write_chunk(self, cid: tuple[int, ...], buf: list) -> None:
        """Divide the chunk's totals (in place: they are ours) and store it (see :class:`ChunkFiles`)."""
        values = buf[0] if self._plan is not None else normalized(
            buf[0], self._weights(buf), self.fill_value, inplace=True)
        self._files.write(cid, values)  # type: ignore[union-attr]
        self._recycle(buf[0], buf[1])

    def _zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        """A zeroed float32 array of ``shape`` (at most a chunk): a spare chunk buffer when there is one."""
        with self._spare_lock:
            flat = self._spare.pop() if self._spare else None
        if flat is None:  # written now, not read first: one page fault per page instead of two
            flat = np.empty(int(np.prod(self.chunks)), np.float32)
            self._flats[id(flat)] = flat
        flat.fill(0)
        return flat[:int(np.prod(shape))].reshape(shape)

    def _recycle(self, *arrays: np.ndarray | None) -> None:
        """Keep the buffers of :meth:`_zeros` behind ``arrays`` (no longer used) for later chunks.

        Only buffers :meth:`_zeros` made (not, e.g., a loaded accumulator's), each once;
        never a read-only (shared) weight total.
        """
        with self._spare_lock:
            for a in arrays:
                base = None if a is None or not a.flags.writeable else a.base
                if (base is not None and self._flats.get(id(base)) is base
                        and not any(base is s for s in self._spare) and len(self._spare) < self._spare_max):
                    self._spare.append(base)

    def _weights(self, buf: list) -> np.ndarray:
        """The chunk's weight totals: ``Σ w`` of the pieces added since it was (re)loaded, in order.

        The weights of a piece do not depend on the prediction, so they are added when
        they are needed (on a write thread, when the chunk is written) rather than with
        each batch; each voxel's weights are still added in the order of :meth:`add`.
        """
        s, w, added = buf
        key = None
        if w is None and added:  # a fresh chunk: its totals depend only on its pieces
            key = (s.shape, tuple(tuple((a.start, a.stop) for a in src + dst) for src, dst in added))
            shared = self._shared_weights.get(key)
            if shared is not None:
                buf[1], buf[2] = shared, []
                return shared
        if w is None:
            w = self._zeros(s.shape)
        add_pieces(w, self.weights[None], [(0, src, dst) for src, dst in added])
        buf[1], buf[2] = w, []
        if key is not None:  # kept for the next chunk laid out alike: read only, so never recycled
            w.flags.writeable = False
            self._shared_weights.put(key, w)
        return w

    def _output(self, zarr_format: int) -> Any:
        """The output array in the partial folder: created once (or the resumed run's, reopened)."""
        import zarr

        if self._out is None:
            if self.job.resumed and self.job.data.exists():  # chunks the interrupted run wrote
                self._out = zarr.open_array(self.job.data, mode="r+")
            else:
                self._out = zarr.create_array(self.job.data, shape=self.shape, chunks=self.chunks,
                                              dtype="float32", fill_value=self.fill_value,
                                              zarr_format=zarr_format, overwrite=True,
                                              compressors=output_codec(self.compressor, zarr_format))
        if self._out.metadata.zarr_format != zarr_format:
            raise ArgumentError(f"{self.path}: zarr_format={zarr_format}, but expect() wrote the "
                                f"output as format {self._out.metadata.zarr_format}")
        if self._files is None:
            self._files = ChunkFiles(self._out, self.job.data, self.compressor)
        return self._out

    def _region(self, cid: tuple[int, ...]) -> tuple[slice, ...]:
        return self.geometry.region(cid)

    def _buffer_bytes(self, buf: Any) -> int:
        return self._chunk_bytes  # every buffer counts as a whole chunk, as the budget says

    def _buffer(self, cid: tuple[int, ...]) -> list:
        """``[Σ w·p, Σ w or None, pieces whose weights are not in Σ w yet]`` of the chunk."""
        buf = self._buffers.get(cid)
        if buf is not None:
            return buf
        gen = self._latest.get(cid)
        if gen is not None:  # pushed out before: go on adding to its totals, in order
            buf = self._load(cid, gen)
        else:
            shape = self.geometry.chunk_shape(cid)
            buf = [self._zeros(shape), None, []]
        self._buffers.put(cid, buf)  # may flush the least recently used others
        return buf

    def _flush(self, cid: tuple[int, ...], buf: list) -> None:
        """Write the chunk's totals as a new generation file (the old one stays until committed)."""
        totals = buf[0][None] if self._plan is not None else np.stack((buf[0], self._weights(buf)))
        prev = self._latest.get(cid)
        gen = self._next_gen
        self._next_gen += 1
        np.save(self._file(cid, gen), totals)
        self._recycle(buf[0], buf[1])
        self._latest[cid] = gen
        if prev is not None and self._committed.get(cid) != prev:
            self._file(cid, prev).unlink()  # superseded and never committed
        self.flushes += 1

    def checkpoint(self, progress: Any) -> None:
        """Flush every chunk and commit: a resumed run restarts from here.

        Parameters
        ----------
        progress : JSON-serialisable
            What the caller has added so far (e.g. the number of batches); a resumed
            writer hands it back as :attr:`progress`.
        """
        from .outputs import critical

        with self._lock:
            while self._buffers:
                self._flush(*self._buffers.pop_oldest())
            self._pool.wait()  # the chunks recorded as written are written
            os.sync()  # the generation files and chunks reach the disk before the state naming them
            with critical():
                self.job.save_state("state.json", {
                    "progress": progress, "next_gen": self._next_gen,
                    "mode": "plan" if self._plan is not None else "weights",
                    "plan_added": None if self._plan_added is None else pack_counts(self._plan_added),
                    "chunks": {".".join(map(str, c)): g for c, g in self._latest.items()},
                    "seen": {".".join(map(str, c)): n for c, n in self._seen.items()},
                    "written": pack_bits(self._written) if self._written.any() else None})
                for cid, gen in self._committed.items():
                    if self._latest.get(cid) != gen:
                        self._file(cid, gen).unlink()
                self._committed = dict(self._latest)
            self.progress = progress

    def _totals(self, cid: tuple[int, ...]) -> list | None:
        """Sum and weight of one chunk: in-memory part plus flushed part (None: empty)."""
        buf = self._buffers.pop(cid, None)
        gen = self._latest.get(cid)
        if buf is not None or gen is None:  # in memory, the totals are whole
            return buf
        return self._load(cid, gen)

    def _load(self, cid: tuple[int, ...], gen: int) -> list:
        """A flushed chunk: ``[Σ w·p, Σ w, []]`` (a full-grid plan's: ``[Σ p·w/Σw, None, []]``)."""
        totals = np.load(self._file(cid, gen))
        return [totals[0], totals[1] if len(totals) > 1 else None, []]

    # ------------------------------------------------------------------ output
    def finalize(self, png: str | os.PathLike | None = None, *, zarr_format: int = 3,
                 attrs: dict | None = None) -> da.Array:
        """Divide by the weights, write the output chunk by chunk, rename it into place.

        Parameters
        ----------
        png : str or os.PathLike, optional
            Also save a 2-D output as an 8-bit PNG (values in [0, 1] map to 0..255;
            values outside are clipped).
        zarr_format : {2, 3}
            Format of the output array.
        attrs : dict, optional
            More of the output's ``vesuvius_dask`` attributes.

        Returns
        -------
        dask.array.Array
            The written output.
        """
        import dask.array as da
        import zarr

        if png is not None and len(self.shape) != 2:
            raise SamplingError("png= needs a 2-D output")
        with self._lock:
            pending = sorted(set(self._latest) | set(self._buffers.keys()))
            self._check_complete()
            out = self._output(zarr_format)
            out.attrs["vesuvius_dask"] = {"blend": self.blend, "block": list(self.block),
                                          "predictions": self.items, **(attrs or {})}
            for cid in pending:
                totals = self._totals(cid)
                if totals is not None:  # (nothing landed elsewhere: the fill value stays)
                    self._pool.submit(self._write_chunk, cid, totals)
            self._pool.wait()
            self._pool.close()
            if png is not None:
                write_preview(np.asarray(out[...]), self.job.partial / "preview.png")
            self.job.publish(extra=[(self.job.partial / "preview.png", Path(png))]
                             if png is not None else [])
        return da.from_zarr(zarr.open(self.path, mode="r"))

    def abort(self, keep: bool | None = None, error: BaseException | None = None) -> None:
        """Drop everything accumulated since the last checkpoint (no output is written).

        Parameters
        ----------
        keep : bool, optional
            Keep the last checkpoint for a later ``resume=True`` (default: when there
            is one, or this writer resumed one: finished work is never thrown away).
        error : BaseException, optional
            What stopped the job: when the checkpoint is kept, its message says so
            (see :meth:`~vesuvius_dask.writers.outputs.OutputJob.stopped`).
        """
        with self._lock:
            self._buffers.clear()
            self._pool.close(cancel=True)  # no write runs into a folder being removed
            if error is not None and keep is None:
                self.job.stopped(error)
            else:
                self.job.abandon(keep)

    def __repr__(self) -> str:
        return (f"PredictionWriter({str(self.path)!r}, shape={self.shape}, block={self.block}, "
                f"chunks={self.chunks}, blend={self.blend!r}, items={self.items})")


def write_preview(values: np.ndarray, path: Path) -> None:
    """A 2-D output as an 8-bit PNG (``[0, 1]`` to 0..255, clipped), marked as ours."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .outputs import PNG_SOFTWARE

    info = PngInfo()  # how a later overwrite=True recognises the PNG as ours
    info.add_text("Software", f"{PNG_SOFTWARE} predict")
    img = np.clip(values, 0, 1) * 255
    Image.fromarray(np.round(img).astype(np.uint8)).save(path, format="PNG", pnginfo=info)


def chunk_owner(cid: Sequence[int], grid: Sequence[int], parts: int) -> int:
    """The part (of ``parts``) that owns output chunk ``cid``: contiguous runs of chunks in raster order."""
    return int(np.ravel_multi_index(tuple(cid), tuple(grid))) * parts // int(np.prod(grid))


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


#: Blocks between two checkpoints of ``predict`` (a resumed run restarts from the last one).
CHECKPOINT_BLOCKS = int(config.get("predict.checkpoint-blocks"))


def _model_identity(model: Any) -> str:
    """What a resumed run must match: the file, the module's weights, or the callable's name."""
    if isinstance(model, (str, os.PathLike)):
        from .outputs import file_stamp

        return file_stamp(model)
    if hasattr(model, "state_dict"):
        import hashlib

        h = hashlib.sha256(type(model).__qualname__.encode())
        for name, tensor in model.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    return f"{getattr(model, '__module__', '')}.{getattr(model, '__qualname__', type(model).__qualname__)}"


#: How to turn a ``torch.save`` checkpoint into a file ``predict`` can load.
EXPORT_HINT = ("export the model first: model.load_state_dict(torch.load(FILE)); "
               "torch.jit.script(model).save('model.pt') (see examples/export_model.py)")


def _saved_weights(path: str) -> bool:
    """Whether ``path`` is a ``torch.save`` pickle (a state_dict or a module), not TorchScript/export.

    Both are zip archives; TorchScript's holds ``constants.pkl`` and ``code/``, an
    export archive ``models/``; a ``torch.save`` one only ``data.pkl`` and tensors.
    Old-style ``torch.save`` files are plain pickles.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = [n.split("/", 1)[-1] for n in z.namelist()]
    except (zipfile.BadZipFile, OSError):
        with open(path, "rb") as f:
            return f.read(2) in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    return "data.pkl" in names and "constants.pkl" not in names and not any(
        n.startswith(("code/", "models/")) for n in names)


def _in_predict_words(err: Exception) -> Exception:
    """A stream error about predict's one source and mask, in predict's words (``mask``, not ``masks[0]``)."""
    import re

    if len(err.args) == 1 and isinstance(err.args[0], str):
        text = re.sub(r"\bfiles\[0\] \((.*?)\)", r"\1", err.args[0])
        err.args = (text.replace("masks[0]", "mask"),)
    if hasattr(err, "cli"):
        err.cli.update({"overlap along": "--overlap along", "mask:": "--mask:"})
    return err


def _source_name(source: Any) -> str:
    """How a job's identity names its source: the URL, the resolved path, or the object's kind."""
    from ..io.paths import is_url

    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source) if is_url(source) else os.path.realpath(source)
    path = getattr(source, "path", None)
    return os.path.realpath(path) if isinstance(path, (str, os.PathLike)) else type(source).__name__


def _content(source: Any) -> str | None:
    """What changes when the source's voxels change: its files' stamps, or a token of an array.

    Local paths: :func:`~vesuvius_dask.writers.outputs.source_stamp` (every file's size and
    modification time). Arrays in memory: dask's ``tokenize`` (a hash of the data
    for numpy, the graph's name for dask). URLs: None (the metadata is what a
    server says; see the README's notes on resuming from URLs).
    """
    from .outputs import source_stamp

    path = source if isinstance(source, (str, os.PathLike)) else getattr(source, "path", None)
    if isinstance(path, (str, os.PathLike)):
        return source_stamp(path)
    from dask.base import tokenize

    return tokenize(source)


#: The TorchScript extra file that carries what ``predict`` must reproduce (the normalisation).
METADATA_FILE = "vesuvius_dask.json"


def model_metadata(normalization: Any) -> dict[str, str]:
    """Extra files to save with a TorchScript model so that ``predict`` normalises as in training.

    ``torch.jit.save(scripted, "model.pt", _extra_files=model_metadata(stream.normalization))``:
    ``predict`` then applies that scheme (and those statistics) by default, and
    refuses another one given explicitly.

    Parameters
    ----------
    normalization : str or dict
        A scheme name or ``stream.normalization``.

    Returns
    -------
    dict
        ``{"vesuvius_dask.json": JSON text}``.
    """
    import json

    from ..io.normalize import normalization_spec

    return {METADATA_FILE: json.dumps({"normalization": normalization_spec(normalization)})}


def _load_model(model: Any) -> tuple[Any, dict]:
    """The model, loaded (a file is code: loading runs it), and its vesuvius-dask metadata ({} if none)."""
    import json

    import torch

    meta: dict = {}
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise ModelError(f"{path}: no such model file")
        if _saved_weights(path):
            raise ModelError(f"{path}: this is a torch.save checkpoint (weights or a pickled module), "
                             f"not a TorchScript or torch.export file; {EXPORT_HINT}")
        try:  # a model file is code: loading runs it (see the README)
            if path.endswith(".pt2"):  # torch.export archive
                model = torch.export.load(path).module()
            else:
                extra = {METADATA_FILE: ""}
                model = torch.jit.load(path, map_location="cpu", _extra_files=extra)
                meta = json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"{path}: cannot load the model as TorchScript or torch.export "
                             f"({first})") from err
    if hasattr(model, "eval"):
        model.eval()
    return model, meta if isinstance(meta, dict) else {}


def _masks(mask: Any, source: Any) -> Any:
    from ..io.segments import Segment

    if mask is None:
        return None
    masks = "segment" if isinstance(mask, str) and mask == "segment" else [mask]
    if masks == "segment" and not isinstance(source, Segment):
        raise SamplingError("masks='segment' needs a segment folder as the source",
                            cli={"masks='segment'": "--mask (with no value)"})
    if masks == "segment" and source.mask is None:
        raise SamplingError(f"{source.path}: the segment has no mask.png")
    return masks


def default_block(shape: Sequence[int], block: Sequence[int] | None) -> tuple[int, int, int]:
    """``block`` as given, or 16×64×64 clipped to the volume's shape."""
    if block is None:
        return tuple(min(b, s) for b, s in zip((16, 64, 64), shape))  # type: ignore[return-value]
    return tuple(int(b) for b in block)  # type: ignore[return-value]


@renamed(out="output", mask="masks")
def predict(model: Any, source: Any, output: str | os.PathLike, *,
            block: Sequence[int] | None = None, overlap: Sequence[int] | None = None,
            batch_size: int = 32, masks: Any = None, mask_coverage: float = ANY_VOXEL,
            blend: str = "hann", png: str | os.PathLike | None = None, overwrite: bool = False,
            resume: bool = False, num_workers: int = 0, client: Any = None,
            quiet: bool = True, checkpoint_blocks: int = CHECKPOINT_BLOCKS,
            cache_dir: str | os.PathLike | None = None,
            storage_options: dict | None = None, normalization: Any = None,
            part: tuple[int, int] | None = None, chunks: Sequence[int] | None = None,
            exact: bool = True) -> da.Array:
    """Run a model over every grid block of a volume and write the blended prediction.

    Parameters
    ----------
    model : torch.nn.Module, callable or path
        A TorchScript file (``torch.jit.save``) or a ``torch.export`` archive
        (``.pt2``) — a model file is code, so load only files you trust — or a
        callable mapping a ``(B, 1, z, y, x)`` float32 batch to ``(B, y, x)`` /
        ``(B, 1, y, x)`` (2-D output) or ``(B, z, y, x)`` / ``(B, 1, z, y, x)`` (3-D output).
    source : Segment, path or array
        A segment (folder path or :class:`~vesuvius_dask.Segment`) or any volume.
    output : str or os.PathLike
        Output Zarr path. It may not be, contain, or lie inside an input (the
        source, its segment folder, the model, the mask).
    block : tuple of int, optional
        Grid block (default 16×64×64, clipped to the volume).
    overlap : tuple of int, optional
        Overlap between neighbouring blocks (see :class:`~vesuvius_dask.sampling.starts.Tiling`);
        default a quarter of the block in y and x, none in z (16 for 64-pixel blocks).
    batch_size : int
        Blocks per model call.
    masks : array, path, "segment" or None
        The source's mask (one, as the stream's ``masks`` has one per volume): only
        blocks the mask touches are predicted (``mask_coverage``: fraction of
        the footprint, default: any voxel); elsewhere the output is 0.
    blend, png, overwrite : see :class:`PredictionWriter`.
    resume : bool
        Continue a killed run from its last checkpoint (every ``checkpoint_blocks``
        blocks); refused if the model file, the source or the options differ.
    num_workers : int
        DataLoader workers reading blocks.
    client : distributed.Client or str, optional
        Read blocks on a dask.distributed cluster.
    quiet : bool
        No progress output.
    checkpoint_blocks : int
        Blocks between checkpoints. Checkpoints fall on fixed batches, so a resumed
        run gives exactly the bytes of an uninterrupted one.
    cache_dir : str or os.PathLike, optional
        For a URL source: keep its fetched chunks in this folder (a resumed or
        repeated run reads them from there; see :func:`~vesuvius_dask.open_volume`).
    storage_options : dict, optional
        fsspec options for a URL source (e.g. ``{"anon": True}`` for S3).
    normalization : str or dict, optional
        How blocks are scaled before the model sees them: a scheme of
        :data:`~vesuvius_dask.io.normalize.SCHEMES` or ``stream.normalization``
        (with fixed statistics, e.g. the training volume's). Default: what the
        model file's metadata says (:func:`model_metadata`), else the historical
        scaling of integer volumes to [0, 1] by their dtype's maximum. A scheme
        other than the one in the model's metadata is refused.
    part : (int, int), optional
        ``(k, n)``: compute part ``k`` (0-based) of ``n``, e.g. one task of a job
        array: the output chunks are split into ``n`` runs in raster order and part
        ``k`` predicts every block that touches its chunks (blocks across a border
        are predicted by both parts). Its result goes to ``.NAME.part-K-of-N``
        beside ``output`` (atomically, resumable like a whole run);
        :func:`predict_join` then publishes ``output``, equal to a single run's.
    chunks : tuple of int, optional
        Output chunks (see :class:`PredictionWriter`); also the unit parts split.
    exact : bool
        See :class:`PredictionWriter`: ``False`` weights the grid's blocks up front
        (faster; equal up to float32 rounding). Without a mask the grid is a full one.

    Returns
    -------
    dask.array.Array
        The written prediction (with ``part``: the part's chunks).

    Raises
    ------
    OutputError, OutputExistsError, ResumeError
        See :class:`~vesuvius_dask.writers.outputs.OutputJob`.
    ModelError
        The model file is missing, is a ``torch.save`` checkpoint (export it first),
        or cannot be loaded. A model file is code: loading it runs it.
    Interrupted
        SIGINT or SIGTERM: before the first checkpoint nothing is left behind; after
        it the checkpoint is kept and the message says how to resume it.
    """
    from ..io.paths import PathKind, path_kind
    from ..io.segments import open_segment
    from .outputs import interruptible

    out, mask = output, masks[0] if isinstance(masks, (list, tuple)) and len(masks) == 1 else masks
    part = _check_part(part)
    if isinstance(model, (str, os.PathLike)) and not os.path.isfile(model):
        raise ModelError(f"{os.fspath(model)}: no such model file")
    segment_mask = isinstance(mask, str) and mask == "segment"
    inputs = [p for p in (source, model, None if segment_mask else mask, cache_dir)
              if isinstance(p, (str, os.PathLike))]
    if getattr(source, "path", None) is not None:
        inputs.append(source.path)
    _check_outputs(out, part, png, inputs, overwrite, resume)
    loaded, meta = _load_model(model)
    identity = {"source": _source_name(source), "source_stamp": _content(source),
                "overlap": None if overlap is None else [int(o) for o in overlap],
                "batch_size": int(batch_size), **_mask_identity(mask, segment_mask),
                "mask_coverage": float(mask_coverage),
                "checkpoint_blocks": int(checkpoint_blocks),
                "model": _model_identity(model),
                "normalization": _normalization(normalization, meta),
                "chunks": None if chunks is None else [int(c) for c in chunks]}
    if not exact:  # (an exact run's identity is the one earlier releases wrote)
        identity["exact"] = False
    if isinstance(source, (str, os.PathLike)) and path_kind(source) == PathKind.SEGMENT:
        source = open_segment(source)
    job = _Job(out, blend, png if part is None else None, overwrite, resume, inputs, identity, part,
               chunks)
    with interruptible():
        return _predict(loaded, source, job, block, overlap, batch_size, _masks(mask, source),
                        mask_coverage, num_workers, client, quiet, checkpoint_blocks, cache_dir,
                        storage_options)


def _mask_identity(mask: Any, segment_mask: bool) -> dict:
    """The mask as a resumed run must find it again: its path (or type) and content stamp."""
    path = isinstance(mask, (str, os.PathLike))
    return {"mask": os.fspath(mask) if path else repr(type(mask)),
            "mask_stamp": _content(mask) if path and not segment_mask else None}


def _check_outputs(out: Any, part: Any, png: Any, inputs: list, overwrite: bool, resume: bool) -> None:
    """Every output path of ``predict``, checked before any work starts."""
    from .outputs import check_destination, check_job, same_or_inside

    check_job(out if part is None else part_path(out, *part), inputs, overwrite=overwrite, resume=resume)
    if part is not None:
        check_destination(out, inputs, overwrite=True)  # where the join will publish
    if png is not None:
        check_destination(png, inputs + [out], overwrite=overwrite, what="png")
        if same_or_inside(png, out):
            raise OutputError(f"png {os.fspath(png)} is the output {os.fspath(out)} or inside it; "
                              "give the PNG a path of its own")


class _Job:
    """What ``predict`` writes and how (the writer's options)."""

    def __init__(self, out: Any, blend: str, png: Any, overwrite: bool, resume: bool, inputs: list,
                 identity: dict, part: tuple[int, int] | None, chunks: Any) -> None:
        self.out, self.blend, self.png, self.overwrite, self.resume = out, blend, png, overwrite, resume
        self.inputs, self.identity, self.part, self.chunks = inputs, identity, part, chunks

    def writer(self, vshape: tuple, pred: Any) -> PredictionWriter:
        if self.png is not None and pred.ndim != 3:
            raise SamplingError(f"png= needs a 2-D output; the model returns blocks of "
                                f"{tuple(pred.shape[1:])}")
        shape = vshape[1:] if pred.ndim == 3 else vshape
        dst = self.out if self.part is None else part_path(self.out, *self.part)
        chunks = None if self.chunks is None else tuple(self.chunks)[-len(shape):]
        identity = dict(self.identity, part=None if self.part is None else list(self.part))
        return PredictionWriter(dst, shape, pred.shape[1:], blend=self.blend, chunks=chunks,
                                overwrite=self.overwrite, resume=self.resume, inputs=self.inputs,
                                identity=identity, part=self.part,
                                exact=self.identity.get("exact", True))


def _check_part(part: Any) -> tuple[int, int] | None:
    if part is None:
        return None
    try:
        k, n = (int(v) for v in part)
    except (TypeError, ValueError):
        raise ArgumentError(f"part must be (k, n), got {part!r}", cli={"part": "--part/--parts"}) from None
    if n < 1 or not 0 <= k < n:
        raise ArgumentError(f"part k must be in 0..n-1 with n >= 1, got part={k} of {n}",
                            cli={"part=": "--part ", " of ": " of --parts "})
    return k, n


def part_path(output: str | os.PathLike, k: int, n: int) -> Path:
    """Where part ``k`` of ``n`` of ``output`` is published: ``.NAME.part-K-of-N`` beside it."""
    p = Path(os.path.abspath(os.fspath(output)))
    return p.parent / f".{p.name}.part-{k}-of-{n}"


def _normalization(normalization: Any, meta: dict) -> dict | None:
    """The normalisation predict applies: given, else the model's; None is the [0, 1] scaling."""
    from ..io.normalize import normalization_spec

    saved = meta.get("normalization")
    saved = normalization_spec(saved) if saved is not None else None
    if normalization is None:
        return saved
    spec = normalization_spec(normalization)
    if saved is not None and saved["scheme"] != spec["scheme"]:
        raise ArgumentError(
            f"the model was saved with normalization={saved['scheme']!r}, not {spec['scheme']!r}: "
            "a model sees blocks scaled as in training; leave normalization out to use the model's",
            cli={"normalization=": "--normalization "})
    if spec["statistics"] is None and saved is not None:
        spec["statistics"] = saved["statistics"]  # the training statistics travel with the model
    return spec


def _grid_stream(source: Any, block: Any, overlap: Any, batch_size: int, masks: Any,
                 mask_coverage: float, client: Any, identity: dict, cache_dir: Any,
                 storage_options: dict | None) -> tuple[Any, tuple]:
    """The grid stream over predict's source, and the source's shape; errors in predict's words."""
    import torch

    from ..io.open import resolve_volume
    from ..loaders.stream import DaskVesuviusStream
    from ..sampling.samplers import GridSampler

    if isinstance(source, (str, os.PathLike)) and "://" in os.fspath(source):
        # opened once, fetched concurrently
        source = resolve_volume(source, cache_dir=cache_dir, storage_options=storage_options)
    vshape = resolve_volume(source).shape
    block = default_block(vshape, block)
    for axis, b, n in zip("zyx", block, vshape):
        if b > n:
            raise SamplingError(
                f"{_source_name(source)}: block={','.join(map(str, block))} is larger than the "
                f"volume {tuple(vshape)} along {axis}; choose a block that fits")
    if overlap is None:
        overlap = (0, block[1] // 4, block[2] // 4)
    identity["block"], identity["overlap"] = list(block), [int(o) for o in overlap]
    norm = identity.get("normalization")
    try:
        grid = GridSampler(overlap=overlap, mask_coverage=mask_coverage)  # every position once
        stream = DaskVesuviusStream([source], *block, sampler=grid, batch_size=batch_size,
                                    return_coords=True, dtype=torch.float32, masks=masks, client=client,
                                    normalization="none" if norm is None else norm)
    except VesuviusDaskError as err:
        raise _in_predict_words(err) from None
    if norm is not None and norm["scheme"] in ("global_zscore", "ct"):
        identity["normalization"] = dict(norm, statistics=stream.normalization["statistics"])
    return stream, tuple(vshape)


def _part_batches(stream: Any, writer: PredictionWriter, batch_size: int) -> list[int]:
    """The plan's batches with a block touching an output chunk this part owns (vectorised)."""
    k, n = writer.part  # type: ignore[misc]
    coords = stream.epoch_coords(0)[:, 1:]
    starts = coords[:, 1:] if len(writer.shape) == 2 else coords
    chunks, block, grid = (np.asarray(v) for v in (writer.chunks, writer.block, writer.grid))
    first, last = starts // chunks, (starts + block - 1) // chunks
    needed = np.zeros(len(starts), dtype=bool)
    for offset in np.ndindex(*(last - first).max(axis=0) + 1):
        cid = first + np.asarray(offset)
        inside = (cid <= last).all(axis=1)
        lin = np.ravel_multi_index(tuple(np.minimum(cid, grid - 1).T), tuple(grid))
        needed |= inside & (lin * n // int(np.prod(grid)) == k)
    return np.unique(np.nonzero(needed)[0] // batch_size).tolist()


def _scaled(blocks: Any, scale: float | None) -> Any:
    """``blocks / scale``, bit for bit; 8- and 16-bit volumes' batches in place, with numpy.

    (torch's two-thread kernels stall on a busy machine: 20x numpy's time here. Both
    divide float32 by float32 with correct rounding: checked for every 8- and 16-bit value.)
    """
    if scale is None or scale == 1.0:  # (x / 1.0 is x)
        return blocks
    import torch

    if scale <= 65535 and blocks.dtype == torch.float32 and blocks.device.type == "cpu":
        values = blocks.numpy()  # the stream's batch, ours to change
        np.divide(values, scale, out=values)
        return blocks
    return blocks / scale


def _run_model(model: Any, blocks: Any, scale: float | None) -> Any:
    pred = model(_scaled(blocks, scale).unsqueeze(1))
    return pred[:, 0] if pred.ndim in (4, 5) and pred.shape[1] == 1 else pred


@contextlib.contextmanager
def _model_threads() -> Any:
    """torch's intra-op threads while ``predict`` runs the model: the cores the write threads leave.

    On a small machine torch's default (one per core) competes with the readers and the
    write threads, and its kernels stall waiting for a busy core; the user's setting
    comes back on exit.
    """
    import torch

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = max(1, min(before, cores - ENCODE_CORES))
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _first_prediction(model: Any, stream: Any, scale: float | None) -> Any:
    """The model's output for the plan's first batch (its shape sizes the writer)."""
    from torch.utils.data import DataLoader

    stream.batch_subset = [0]
    try:
        blocks, _ = next(iter(DataLoader(stream, batch_size=None, num_workers=0)))
    except StopIteration:
        raise SamplingError("no block to predict (is the mask empty?)") from None
    finally:
        stream.batch_subset = None
    return _run_model(model, blocks, scale)


def _predict(model: Any, source: Any, job: _Job, block: Any, overlap: Any, batch_size: int,
             masks: Any, mask_coverage: float, num_workers: int, client: Any, quiet: bool,
             checkpoint_blocks: int, cache_dir: Any = None, storage_options: dict | None = None) -> Any:
    import torch
    from torch.utils.data import DataLoader

    stream, vshape = _grid_stream(source, block, overlap, batch_size, masks, mask_coverage, client,
                                  job.identity, cache_dir, storage_options)
    stream.set_epoch(0)  # a grid has one order: no epoch to advance, no warning in workers
    vol_dtype = stream.volumes[0].dtype
    scale = None if job.identity["normalization"] is not None else (
        float(np.iinfo(vol_dtype).max) if vol_dtype.kind in "ui" else 1.0)
    every = max(1, int(checkpoint_blocks) // int(batch_size))
    writer: PredictionWriter | None = None
    subset: list[int] | None = None
    total = stream.samples_per_epoch
    from tqdm import tqdm

    tty = sys.stderr.isatty()  # in a log, a line every 30 s rather than a redrawn bar
    bar = tqdm(total=total, unit="blocks", desc="predict", disable=quiet, file=sys.stderr,
               mininterval=0.5 if tty else 30.0, dynamic_ncols=tty)
    batch = 0
    # batch k is added on this thread while the model runs on batch k+1 (one thread: in order)
    adder = WritePool(1, in_flight=4, name="add")
    try:
        with torch.no_grad(), _model_threads():
            if job.part is not None:  # the part's batches need the output's shape: one probe
                writer = job.writer(vshape, _first_prediction(model, stream, scale))
                writer.expect(stream.epoch_coords(0))
                subset = _part_batches(stream, writer, batch_size)
                total = len(subset) * batch_size
                batch = int(writer.progress["batches"]) if writer.progress else 0
                stream.batch_subset = subset[batch:]
                bar.reset(total=total)
            while True:
                loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
                restart = False
                for blocks, coords in loader:
                    pred = _run_model(model, blocks, scale)
                    if writer is None:
                        writer = job.writer(vshape, pred)
                        writer.expect(stream.epoch_coords(0))
                        if writer.progress:  # resumed: start after the last checkpoint
                            batch = stream.start_batch = int(writer.progress["batches"])
                            restart = True
                            break
                    adder.submit(writer.add, pred, coords)
                    batch += 1
                    if batch % every == 0:
                        adder.wait()  # a checkpoint holds every batch before it
                        writer.checkpoint({"batches": batch})
                    bar.update(min(batch * batch_size, total) - bar.n)
                if not restart:
                    break
            adder.wait()
        adder.close()
        bar.close()
        if writer is None:
            raise SamplingError("no block to predict (is the mask empty?)")
        attrs = {"predictions": stream.samples_per_epoch, "normalization": job.identity["normalization"]}
        if job.part is not None:
            attrs.update(part=list(job.part), shape=list(writer.shape),
                         job=dict(_join_identity(job.identity), chunks=list(writer.chunks)))
        return writer.finalize(png=job.png, attrs=attrs)
    except BaseException as err:
        adder.close(cancel=True)  # no add runs into an aborted writer
        bar.close()
        if writer is not None:
            writer.abort(error=err)
        raise


def _join_identity(identity: dict) -> dict:
    """What every part of one job shares: its identity without the part and the checkpoint interval.

    (Checkpoints do not change the output: see :class:`PredictionWriter`.)
    """
    return {k: v for k, v in identity.items() if k not in ("part", "checkpoint_blocks")}


def _part_attrs(output: Any, k: int, n: int) -> dict:
    from .outputs import is_our_output

    path = part_path(output, k, n)
    partial = path.parent / f".{path.name}.partial"
    if not path.exists():
        state = "is still running or was interrupted (resume it)" if partial.exists() else "has not run"
        raise OutputError(f"{os.fspath(output)}: part {k} of {n} {state}: {path} does not exist; "
                          f"run predict with part=({k}, {n}) first",
                          cli={f"part=({k}, {n})": f"--parts {n} --part {k}"})
    if not is_our_output(path):
        raise OutputError(f"{path} is not a part written by vesuvius-dask predict")
    import zarr

    attrs = dict(zarr.open_array(path, mode="r").attrs["vesuvius_dask"])
    if attrs.get("part") != [k, n]:
        raise OutputError(f"{path} is part {attrs.get('part')}, not part [{k}, {n}]")
    return attrs


def _check_parts(output: Any, n: int, model: Any, source: Any) -> list[dict]:
    """The attributes of every part, checked: all there, of one job, model and source unchanged."""
    attrs = [_part_attrs(output, k, n) for k in range(n)]
    jobs = [a.get("job") or {} for a in attrs]
    for k, job in enumerate(jobs):
        if job != jobs[0]:
            diff = sorted(key for key in set(job) | set(jobs[0]) if job.get(key) != jobs[0].get(key))
            raise OutputError(f"{os.fspath(output)}: part {k} is from another job than part 0 "
                              f"(they differ in {', '.join(diff)}); run every part with the same options")
    now = {"model": None if model is None else _model_identity(model),
           "source_stamp": None if source is None else _content(source)}
    for key, value in now.items():
        if value is not None and value != jobs[0].get(key):
            raise OutputError(f"{os.fspath(output)}: the {key.split('_')[0]} changed since the parts ran")
    return attrs


def predict_join(output: str | os.PathLike, parts: int, *, png: str | os.PathLike | None = None,
                 overwrite: bool = False, model: Any = None, source: Any = None) -> da.Array:
    """Check that every part of a split ``predict`` is complete, then publish ``output``.

    Parameters
    ----------
    output : str or os.PathLike
        The output every part was run with.
    parts : int
        ``n`` of ``part=(k, n)``.
    png : str or os.PathLike, optional
        Also save the (2-D) output as a PNG.
    overwrite : bool
        Replace an existing output of ours.
    model, source : optional
        When given, refuse the parts if the model file or the source changed since.

    Returns
    -------
    dask.array.Array
        The output, equal to a single run's, voxel for voxel. The part folders are
        removed once it is published.

    Raises
    ------
    OutputError
        A part is missing, still running, interrupted, or from another job.
    """
    import dask.array as da
    import zarr

    from .outputs import OutputJob, critical, remove_path

    n = _check_part((0, parts))[1]  # type: ignore[index]
    attrs = _check_parts(output, n, model, source)
    jobs = [a["job"] for a in attrs]
    paths = [part_path(output, k, n) for k in range(n)]
    first = zarr.open_array(paths[0], mode="r")
    identity = dict(jobs[0], joined=n)
    job = OutputJob(output, [p for p in (source, model) if isinstance(p, (str, os.PathLike))], identity,
                    overwrite=overwrite, what="predict --join")
    try:
        out = zarr.create_array(job.data, shape=first.shape, chunks=first.chunks, dtype="float32",
                                fill_value=first.fill_value, zarr_format=first.metadata.zarr_format,
                                compressors=first.compressors or None)
        out.attrs["vesuvius_dask"] = {k: v for k, v in attrs[0].items() if k not in ("part", "job", "shape")}
        grid = tuple(-(-s // c) for s, c in zip(first.shape, first.chunks))
        sources = [zarr.open_array(p, mode="r") for p in paths]
        for cid in np.ndindex(*grid):
            region = tuple(slice(c * i, min(c * (i + 1), s))
                           for c, i, s in zip(first.chunks, cid, first.shape))
            out[region] = sources[chunk_owner(cid, grid, n)][region]
        extra = []
        if png is not None:
            write_preview(np.asarray(out[...]), job.partial / "preview.png")
            extra = [(job.partial / "preview.png", Path(png))]
        job.publish(extra=extra)
    except BaseException:
        job.abandon(keep=False)
        raise
    with critical():
        for p in paths:
            remove_path(p)
    return da.from_zarr(zarr.open(Path(output), mode="r"))
