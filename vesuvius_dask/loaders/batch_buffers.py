"""Shared-memory batch buffers for DataLoader workers, reused once every process let go.

A worker writes each batch straight into a torch shared-memory segment, so handing
it to the main process costs no copy. :class:`ShmBatchPool` reuses segments in
persistent workers (see :func:`pool_allowed`); :func:`into_pool` moves a
transform's new tensors into pool buffers. This module leans on torch internals
(checked at start-up; any surprise turns the pool off) and is the only one that does.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .. import config

__all__ = ["shared_tensor", "ShmBatchPool", "shm_pool", "pool_allowed", "into_pool",
           "count_worker_iteration", "SHM_POOL_BUFFERS", "SHM_POOL_BYTES"]


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (no copy, unlike ``share_memory_``)."""
    numel = int(np.prod(shape))
    proto = torch.empty(0, dtype=dtype)
    try:
        storage = proto._typed_storage()._new_shared(numel)
        return proto.new(storage).view(shape)
    except (AttributeError, RuntimeError, TypeError):  # private API moved: copy once
        return torch.empty(shape, dtype=dtype).share_memory_()


#: Batch buffers a DataLoader worker keeps for reuse, and their total byte budget
#: (never more than 1/8 of the free space in /dev/shm at the worker's start): the defaults
#: of config ``vesuvius-dask.shm-pool.buffers`` and ``vesuvius-dask.shm-pool.bytes``,
#: read when a worker makes its pool.
SHM_POOL_BUFFERS = config.default("shm-pool.buffers")
SHM_POOL_BYTES = config.default_bytes("shm-pool.bytes")
#: torch's refcounted shared-memory segments keep their cross-process reference count
#: in an int this many bytes before the data (at the start of the mapping).
_SHM_HEADER = 64


def _storage_uses(t: torch.Tensor) -> int:
    """Tensors (and storage objects) in this process holding ``t``'s storage."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _shm_refcount(t: torch.Tensor) -> int:
    """Processes (and messages in transit) holding ``t``'s shared-memory segment."""
    import ctypes

    return ctypes.c_int.from_address(t.untyped_storage().data_ptr() - _SHM_HEADER).value


def _mapping_start(address: int) -> tuple[int, str] | None:
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= address < hi:
                return lo, (fields[5] if len(fields) > 5 else "")
    return None


class ShmBatchPool:
    """Shared-memory batch buffers of one DataLoader worker, reused once free everywhere.

    A batch handed to the main process travels as a reference to a shared-memory
    segment, so the worker must not reuse it while any process still holds it. A
    fresh segment per batch is always safe but slow: the worker then writes every
    batch into pages the kernel must first zero and map (about 1.5 ms per 4 MB here,
    more than cutting the blocks). This pool reuses a segment only when

    * no tensor in this process refers to it any more (the yielded alias has been
      pickled and dropped by the DataLoader's queue, which happens only after the
      reference below was taken), and
    * torch's cross-process reference count of the segment is back to one (ours):
      the main process, and anything it passed the batch on to, has released it.

    The count exists only for torch's ``file_system`` sharing strategy, which the
    worker therefore switches to (a per-process setting; the main process keeps its
    own). Where the segment layout is not the one checked at start-up (another
    platform or torch version) the pool is off and every batch gets a fresh segment.
    Only persistent workers use a pool (see :func:`pool_allowed`), and it lets go
    of its buffers when the worker exits.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.buffers: list[tuple[torch.Tensor, int]] = []  # (buffer, own storage uses)
        self.max_buffers = int(config.get("shm-pool.buffers"))
        self.max_bytes = config.get_bytes("shm-pool.bytes")
        try:  # a small /dev/shm (64 MB in Docker by default) is shared by all workers
            st = os.statvfs("/dev/shm")
            self.max_bytes = min(self.max_bytes, st.f_bavail * st.f_frsize // 8)
        except OSError:
            pass
        self.enabled = self._check_layout()
        if self.enabled:  # the reference count exists only for this strategy
            import torch.multiprocessing

            torch.multiprocessing.set_sharing_strategy("file_system")

    @staticmethod
    def _check_layout() -> bool:
        try:
            import torch.multiprocessing as tmp

            if "file_system" not in tmp.get_all_sharing_strategies():
                return False
            probe = ShmBatchPool._allocate((4096,), torch.uint8)
            start = _mapping_start(probe.data_ptr())
            if start is None or start[0] != probe.data_ptr() - _SHM_HEADER or "torch" not in start[1]:
                return False
            storage = probe.untyped_storage()
            before = _shm_refcount(probe)
            storage._shared_incref()
            during = _shm_refcount(probe)
            storage._shared_decref()
            return (before, during, _shm_refcount(probe)) == (1, 2, 1)
        except Exception:  # noqa: BLE001 - any surprise: fall back to fresh segments
            return False

    @staticmethod
    def _allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        storage = torch.UntypedStorage._new_using_filename_cpu(max(nbytes, 1))
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def release(self) -> None:
        """Let go of every buffer (a segment is unlinked once its last holder lets go).

        Runs when the worker process exits. DataLoader workers end with
        ``os._exit``, which frees nothing, and a ``file_system`` segment the worker
        still held would stay in ``/dev/shm`` until the main process exits.
        """
        self.buffers.clear()

    def _free(self, buf: torch.Tensor, uses: int) -> bool:
        return _storage_uses(buf) == uses and _shm_refcount(buf) == 1

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A shared-memory tensor of ``shape`` nobody else holds (contents undefined).

        The pool tracks the most recently used buffers; a batch the consumer keeps
        just ages out of it (the pool forgets it, the consumer's copy stays valid).
        """
        if not self.enabled:
            return shared_tensor(shape, dtype)
        shape = tuple(int(v) for v in shape)
        for i, (buf, uses) in enumerate(self.buffers):
            if tuple(buf.shape) == shape and buf.dtype == dtype and self._free(buf, uses):
                self.buffers.append(self.buffers.pop(i))  # most recently used last
                return buf
        buf = self._allocate(shape, dtype)
        self.buffers.append((buf, _storage_uses(buf)))
        while len(self.buffers) > 1 and (
                len(self.buffers) > self.max_buffers
                or sum(b.untyped_storage().nbytes() for b, _ in self.buffers) > self.max_bytes):
            self.buffers.pop(0)
        return buf


_SHM_POOL: ShmBatchPool | None = None
#: Epochs (iterations) started in this DataLoader worker process, by pid.
WORKER_ITERATIONS: dict[int, int] = {}


def count_worker_iteration() -> None:
    """Note that this DataLoader worker process started another epoch (see :func:`pool_allowed`)."""
    if get_worker_info() is not None:
        WORKER_ITERATIONS[os.getpid()] = WORKER_ITERATIONS.get(os.getpid(), 0) + 1


def pool_allowed() -> bool:
    """Reuse shared memory only in a DataLoader worker that has started a second epoch.

    That is, a persistent worker. A worker that lives for one epoch gets a fresh
    (file-descriptor) segment per batch, as torch does by default: when its
    DataLoader stops early, batches still in the queue are dropped unread, and a
    ``file_system`` segment dropped that way would stay in ``/dev/shm`` until the
    main process exits; one early stop per epoch would pile them up. A persistent
    worker's queue is drained by the DataLoader at the next epoch instead.
    """
    return get_worker_info() is not None and WORKER_ITERATIONS.get(os.getpid(), 0) >= 2
#: Tensors smaller than this travel as they are (a fresh segment is cheap for them).
_POOL_MIN_BYTES = 4096


def into_pool(item: Any) -> Any:
    """Tensors of a worker's item that are not in shared memory, copied into pool buffers.

    A ``transform`` that returns new tensors (``(block - m) / s``) would otherwise make
    the DataLoader copy each of them into a fresh shared-memory segment, page faults
    and all; a copy into a reused buffer costs a fraction of that. Tensors already in
    shared memory (the batch itself, views of it, in-place results) pass unchanged.
    """
    if isinstance(item, torch.Tensor):
        pool = shm_pool()
        if (not pool.enabled or item.is_shared() or item.device.type != "cpu"
                or not item.is_contiguous() or item.nbytes < _POOL_MIN_BYTES
                or type(item) is not torch.Tensor or item.requires_grad):
            return item
        buf = pool.take(tuple(item.shape), item.dtype)
        buf.copy_(item)
        return buf.view(buf.shape)  # an alias, so the pool sees it while it travels
    if isinstance(item, tuple) and not hasattr(item, "_fields"):
        return tuple(into_pool(v) for v in item)
    if isinstance(item, list):
        return [into_pool(v) for v in item]
    if isinstance(item, dict):
        return {k: into_pool(v) for k, v in item.items()}
    return item


def shm_pool() -> ShmBatchPool:
    """The pool of the calling process (a forked child starts its own)."""
    global _SHM_POOL
    if _SHM_POOL is None or _SHM_POOL.pid != os.getpid():
        from multiprocessing import util

        _SHM_POOL = ShmBatchPool()
        # multiprocessing runs these finalizers in a worker before its os._exit
        util.Finalize(_SHM_POOL, _SHM_POOL.release, exitpriority=10)
    return _SHM_POOL
