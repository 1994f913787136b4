"""Reading planned batches: in this process (with read-ahead) or on a dask.distributed cluster.

:class:`BatchReader` turns an iterator of ``(volume_index, starts)`` batches into
``(blocks, labels, volume_index, starts)`` arrays, in plan order. Locally each batch
is one graph of the chunk-aware :class:`~vesuvius_dask.engine.batches.BatchEngine`, written
straight into shared memory inside DataLoader workers; the next batches are read in
a background thread while the consumer is busy. With a client, each batch is one
task that runs the same engine on a worker, ``prefetch`` tasks in flight.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .. import config
from ..engine.batches import BatchEngine, read_together
from ..io.volume import Volume, memmap_ref
from .batch_buffers import pool_allowed, shared_tensor, shm_pool

__all__ = ["BatchReader", "Batch"]

#: Seconds a consumer spends on one batch above which the reader reads ahead: the default
#: of config ``vesuvius-dask.reader.busy-consumer``, read once per epoch.
BUSY_CONSUMER = config.default("reader.busy-consumer")
#: Batches whose remote chunks may be on their way before the batch is read: the default
#: of config ``vesuvius-dask.remote.ahead-batches``, read once per epoch.
REMOTE_AHEAD = config.default("remote.ahead-batches")

#: ``(blocks, labels or None, volume_index, starts)``.
Batch = tuple[Any, Any, np.ndarray, np.ndarray]
#: ``(engine, volume_index, starts, out)``: what :func:`~vesuvius_dask.engine.batches.read_together` takes.
_Request = tuple[Any, np.ndarray, np.ndarray, Any]


def _needs_scatter(vol: Volume) -> bool:
    """In-RAM numpy data cannot be re-opened by workers by name: it must be sent."""
    data = vol.data
    if data is None or not isinstance(data, np.ndarray):
        return False
    return not (isinstance(data, np.memmap) and memmap_ref(data, vol.array.chunks) is not None)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class BatchReader:
    """Read batches of blocks (and labels) with the engines, locally or on a cluster.

    Parameters
    ----------
    engine : BatchEngine
        Reads the blocks.
    label_engine : BatchEngine, optional
        Reads the labels at the same starts (z set to 0 for 2-D labels).
    label_2d : bool
        Whether the labels are 2-D maps.
    prefetch : int, optional
        Batches read ahead (None: 2 in the main process or on a cluster, 0 in a
        DataLoader worker).
    client : distributed.Client or str, optional
        Read on this cluster.
    retries : int
        dask retries per task on a cluster.
    shared : bool
        In a DataLoader worker, write batches into shared memory (for batches that
        travel whole; single blocks are collated by the DataLoader instead).
    """

    def __init__(self, engine: BatchEngine, label_engine: BatchEngine | None, label_2d: bool, *,
                 prefetch: int | None = None, client: Any = None, retries: int = 2,
                 shared: bool = True) -> None:
        self.engine, self.label_engine, self.label_2d = engine, label_engine, label_2d
        self.prefetch = prefetch
        self.shared = shared
        self._client_pid = os.getpid()
        self.retries = int(retries)
        self._client_obj: Any = None
        self._scattered: dict[Any, Any] = {}
        self.scheduler_address: str | None = None
        if client is not None:
            if isinstance(client, str):
                from ..engine.cluster import get_client

                self.scheduler_address = client
                get_client(client)  # fail now, within the timeout, if it is unreachable
            else:
                self._client_obj = client
                self.scheduler_address = client.scheduler.address

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_client_obj"] = None  # a Client does not travel; copies connect by address
        state["_scattered"] = {}
        return state

    def _label_starts(self, starts: np.ndarray) -> np.ndarray:
        lstarts = starts.copy()
        if self.label_2d:
            lstarts[:, 0] = 0
        return lstarts

    def run(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[Batch]:
        """Read every batch, in order."""
        if self.scheduler_address is not None:
            return self._on_cluster(batches, 2 if self.prefetch is None else self.prefetch)
        prefetch = self.prefetch
        if prefetch is None:
            prefetch = 0 if get_worker_info() is not None else 2
        if self.engine.remote or (self.label_engine is not None and self.label_engine.remote):
            batches = self._fetch_ahead(batches)
        if prefetch == 0:
            return (self.read(lab, st) for lab, st in batches)
        return self._ahead(batches, prefetch)

    # ------------------------------------------------------------------ local
    def _requests(self, vols: np.ndarray, starts: np.ndarray) -> list[_Request]:
        requests: list[_Request] = [(self.engine, vols, starts, None)]
        if self.label_engine is not None:
            requests.append((self.label_engine, vols, self._label_starts(starts), None))
        return requests

    def _fetch_ahead(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Pass batches on, having started fetching their remote chunks beforehand.

        Batches are taken from the plan ahead of their reading (up to config
        ``vesuvius-dask.remote.ahead-batches``) while fewer than 4 x the volumes'
        ``concurrency`` fetches are under way, so requests for the next batches are in
        flight while this one waits for its slowest chunk, is cut and consumed: the server's
        slots never run dry between batches, whatever the batch size. (With 2 x the
        server saw requests in waves, with 100 ms gaps; epoch times were within noise.)
        """
        engines = [e for e in (self.engine, self.label_engine) if e is not None and e.remote]
        want = max(v.remote.settings.concurrency for e in engines for v in e.volumes
                   if v.remote is not None)
        most = int(config.get("remote.ahead-batches"))
        window: deque = deque()
        more = True
        try:
            while True:
                pending = max(e.pending_fetches() for e in engines)
                while more and (not window or (len(window) < most and pending < 4 * want)):
                    nxt = next(batches, None)
                    if nxt is None:
                        more = False
                        break
                    window.append(nxt)
                    for eng, v, st, _ in self._requests(*nxt):
                        if eng.remote:
                            pending = max(pending, eng.prefetch(v, st))
                if not window:
                    return
                yield window.popleft()
        finally:  # an epoch (or a loop stopped early) ends with what it fetched in cache_dir
            for e in engines:
                e.flush_fetches()

    def read(self, vols: np.ndarray, starts: np.ndarray) -> Batch:
        """Read one batch in this process."""
        requests = self._requests(vols, starts)
        tensors = None
        if self.shared and get_worker_info() is not None:
            # In a DataLoader worker, write the batch straight into shared memory, so
            # handing it to the main process costs no copy (as default_collate does).
            # Persistent workers reuse buffers the main process has released (see
            # ShmBatchPool); the batch is yielded as an alias, so the pool can tell.
            take = shm_pool().take if pool_allowed() else shared_tensor
            tensors = [take((vols.size,) + eng.block, _torch_dtype(eng.dtype))
                       for eng, *_ in requests]
            requests = [(eng, v, st, t.numpy()) for (eng, v, st, _), t in zip(requests, tensors)]
        arrays = read_together(requests)
        del requests
        items = [t.view(t.shape) for t in tensors] if tensors is not None else arrays
        return items[0], (items[1] if len(items) > 1 else None), vols, starts

    def _ahead(self, batches: Iterator[tuple[np.ndarray, np.ndarray]], prefetch: int) -> Iterator[Batch]:
        """Read ahead in a background thread only while the consumer spends time between batches.

        A training step releases the GIL; a consumer that asks again at once gets the
        next batch read inline (a thread would only add GIL hand-offs there).
        Futures are collected in submission order.
        """
        pool: ThreadPoolExecutor | None = None  # made on first read-ahead
        busy = float(config.get("reader.busy-consumer"))
        pending: deque = deque()
        lock = threading.Lock()

        def read_next() -> Any:
            with lock:
                nxt = next(batches, None)
            return None if nxt is None else self.read(*nxt)

        ahead = False
        try:
            while True:
                result = pending.popleft().result() if pending else read_next()
                if result is None:
                    return
                if ahead:
                    if pool is None:
                        pool = ThreadPoolExecutor(1, thread_name_prefix="vesuvius-dask-prefetch")
                    while len(pending) < prefetch:
                        pending.append(pool.submit(read_next))
                t_yield = time.perf_counter()
                yield result
                ahead = time.perf_counter() - t_yield > busy
        finally:
            for fut in pending:
                fut.cancel()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ cluster
    def _client(self) -> Any:
        from ..engine.cluster import get_client

        if self._client_obj is not None and self._client_pid == os.getpid():
            return self._client_obj
        return get_client(self.scheduler_address)

    def _on_cluster(self, batches: Iterator[tuple[np.ndarray, np.ndarray]], prefetch: int) -> Iterator[Batch]:
        """Read each batch on the cluster, ``prefetch`` batches in flight, in plan order.

        One task per batch runs the chunk-aware engine on a worker (its decoded-chunk
        cache stays there between batches); only block starts and the engine's few KB
        of references travel, and the batch comes back.
        """
        from ..engine.batches import cluster_read

        client = self._client()
        engines = self._cluster_engines(client)
        pending: deque = deque()
        # A future's data is transferred only when asked for: fetch each one in a
        # background thread as soon as it is submitted, so the transfer overlaps too.
        fetcher = ThreadPoolExecutor(2, thread_name_prefix="vesuvius-dask-fetch")
        try:
            for vols, starts in batches:
                all_starts = [starts]
                if self.label_engine is not None:
                    all_starts.append(self._label_starts(starts))
                future = client.submit(cluster_read, engines, vols, all_starts, pure=False,
                                       retries=self.retries)
                pending.append((future, fetcher.submit(future.result), vols, starts))
                if len(pending) > prefetch:
                    yield self._collect(pending.popleft())
            while pending:
                yield self._collect(pending.popleft())
        finally:
            for future, *_ in pending:
                future.cancel()
            fetcher.shutdown(wait=False, cancel_futures=True)

    def _cluster_engines(self, client: Any) -> Any:
        """The engines as task arguments; scattered once if they hold in-RAM arrays."""
        engines = [self.engine] + ([self.label_engine] if self.label_engine else [])
        if not any(_needs_scatter(v) for e in engines for v in e.volumes):
            return engines  # small: travel with each task, rebuilt nowhere twice
        key = (os.getpid(), id(client))
        future = self._scattered.get(key)
        if future is None:
            future = self._scattered[key] = client.scatter(engines, broadcast=True, hash=False)
        return future

    def _collect(self, item: tuple[Any, Any, np.ndarray, np.ndarray]) -> Batch:
        _, fetched, vols, starts = item
        arrays = fetched.result()
        engines = [self.engine] + ([self.label_engine] if self.label_engine else [])
        for eng, arr in zip(engines, arrays):
            eng.stats.batches += 1
            eng.stats.blocks += arr.shape[0]
            eng.stats.bytes_delivered += arr.nbytes
        return arrays[0], (arrays[1] if len(arrays) > 1 else None), vols, starts
