"""Reading planned batches.

One dask graph per batch, the decoded-chunk caches (per process, and per machine
in ``/dev/shm``), dask.distributed clusters.
"""

# the names of the former module vesuvius_dask.engine
from .batches import (
    DEFAULT_CACHE_BYTES,
    BatchEngine,
    ChunkCache,
    EngineStats,
    cluster_read,
    plan_pieces,
    read_together,
)

__all__ = [
    "BatchEngine",
    "ChunkCache",
    "EngineStats",
    "plan_pieces",
    "read_together",
    "cluster_read",
    "DEFAULT_CACHE_BYTES",
]
