"""Measure how fast a stream delivers blocks (used by ``vesuvius-dask stream`` and the demo)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

__all__ = ["stream_throughput"]


def stream_throughput(
    paths: Sequence[Any],
    *,
    block: tuple[int, int, int] = (4, 64, 64),
    batch_size: int = 128,
    batches: int = 8,
    num_workers: int = 0,
    seed: int = 0,
    sampling_method: str = "uniform",
    client: str | None = None,
    cache_dir: Any = None,
) -> str:
    """Stream ``batches`` batches and return a one-paragraph throughput report.

    The rate is timed from the moment every DataLoader worker has delivered its first
    batch, so that starting workers (seconds, with ``spawn``) does not pass for
    reading speed; the start-up and those first batches are reported apart. With no
    more batches than workers there is nothing else to time, and the whole is.

    Parameters
    ----------
    paths : sequence
        Volumes (anything :func:`vesuvius_dask.open_volume` accepts).
    block : tuple of int
        Block shape.
    batch_size : int
        Blocks per batch.
    batches : int
        Batches to read.
    num_workers : int
        DataLoader workers (0: in the main process).
    seed : int
        Stream seed.
    sampling_method : str
        ``"uniform"`` or ``"proportional"``.
    client : str, optional
        A dask.distributed scheduler address: the reads run on that cluster.
    cache_dir : str, optional
        Folder keeping the chunks of URL volumes (see :func:`~vesuvius_dask.open_volume`).

    Returns
    -------
    str
    """
    from torch.utils.data import DataLoader

    from .stream import DaskVesuviusStream

    stream = DaskVesuviusStream(
        list(paths), *block, samples_per_epoch=batch_size * batches, batch_size=batch_size,
        seed=seed, sampling_method=sampling_method, client=client, cache_dir=cache_dir,
    )
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                        multiprocessing_context="spawn" if num_workers else None)
    stream.set_epoch(0)
    warm = max(1, num_workers)  # each worker's first batch carries its start-up
    t0 = time.perf_counter()
    first = None  # when every worker had delivered a batch
    n = nbytes = n_first = bytes_first = seen = 0
    for batch in loader:
        n += batch.shape[0]
        nbytes += batch.numel() * batch.element_size()
        seen += 1
        if seen == warm:
            first, n_first, bytes_first = time.perf_counter(), n, nbytes
    end = time.perf_counter()
    if first is None or n == n_first:  # nothing arrived after start-up: time it all
        steady, blocks, nb = end - t0, n, nbytes
        timed = f"{n} blocks of {block} ({stream.dtype}) in {steady:.3f} s, start-up included"
    else:
        steady, blocks, nb = end - first, n - n_first, nbytes - bytes_first
        timed = (f"{n} blocks of {block} ({stream.dtype}); after start-up {blocks} in {steady:.3f} s "
                 f"(start-up and each worker's first batch: {first - t0:.3f} s)")
    return (
        f"{timed}: {blocks / steady:,.0f} blocks/s, {nb / steady / 1e6:,.1f} MB/s "
        f"(batch {batch_size}, workers {num_workers}, {len(stream.volumes)} volume(s), "
        f"{'scheduler ' + client if client else 'local threads'})"
    )
