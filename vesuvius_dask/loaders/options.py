"""``ReadOptions``: how the stream reads and caches its blocks, as one small object (torch-free).

The stream's reading keywords (``cache_bytes``, ``prefetch``, ``read_batch``,
``num_threads``, ``client``, ``retries``, ``machine_cache``) are a convenience that
builds the same object; ``DaskVesuviusStream(..., reading=ReadOptions(...))`` passes
it whole. Where the volumes come from (``level``, ``storage_options``,
``cache_dir``) stays with the stream's ``files``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arguments import non_negative_int, positive_int
from ..errors import SamplingError

__all__ = ["ReadOptions"]


def _optional(check: Any, name: str, value: Any) -> Any:
    return None if value is None else check(name, value)


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How blocks are read: batching, read-ahead, threads, cluster and caches.

    Checked at construction, so a bad value fails there, naming the field. Frozen,
    comparable and picklable: a ``distributed.Client`` travels as its scheduler's
    address (copies in other processes connect by address).

    Parameters
    ----------
    cache_bytes : int, optional
        Decoded-chunk cache budget per process (0 disables). ``None``: the stream's
        default (512 MiB).
    prefetch : int, optional
        Batches read ahead in a background thread; 0 reads inline. ``None``: 2 in
        the main process, 0 inside DataLoader workers (see
        :class:`~vesuvius_dask.DaskVesuviusStream`).
    read_batch : int, optional
        Blocks per dask graph when the stream yields single blocks (``batch_size``
        None). ``None``: the stream's default (128).
    num_threads : int, optional
        Threads reading chunks in parallel per process (default: CPU count; for
        remote volumes, their concurrency).
    client : distributed.Client or str, optional
        Read each batch on a dask.distributed cluster (a client, or a scheduler
        address).
    retries : int
        dask retries per task with ``client`` (default 2).
    machine_cache : bool
        Inside DataLoader workers, share decoded chunks through ``/dev/shm`` (see
        :class:`~vesuvius_dask.engine.machine_cache.MachineChunkCache`). Default True;
        off with ``cache_bytes=0``, with ``client``, and where there is no ``/dev/shm``.

    Examples
    --------
    >>> ReadOptions(cache_bytes=2**30, num_threads=4).cache_bytes
    1073741824
    """

    cache_bytes: int | None = None
    prefetch: int | None = None
    read_batch: int | None = None
    num_threads: int | None = None
    client: Any = None
    retries: int = 2
    machine_cache: bool = True

    def __post_init__(self) -> None:
        prefetch = self.prefetch
        if prefetch is not None and (isinstance(prefetch, bool) or not isinstance(
                prefetch, (int, np.integer)) or prefetch < 0):
            raise SamplingError(f"prefetch must be None or a non-negative integer, got {prefetch!r}")
        checked = {
            "cache_bytes": _optional(non_negative_int, "cache_bytes", self.cache_bytes),
            "prefetch": None if prefetch is None else int(prefetch),
            "read_batch": _optional(positive_int, "read_batch", self.read_batch),
            "num_threads": _optional(positive_int, "num_threads", self.num_threads),
            "retries": non_negative_int("retries", self.retries),
            "machine_cache": bool(self.machine_cache),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        client = state["client"]
        if client is not None and not isinstance(client, str):
            state["client"] = getattr(getattr(client, "scheduler", None), "address", client)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
