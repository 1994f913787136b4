"""Fetching stored chunks over HTTP(S) and S3, and keeping them on disk.

Requests in flight, politeness, faults; the on-disk chunk cache (``cache_dir``)
and the cache-folder files that both chunk caches share.
"""

# the names of the former module vesuvius_dask.remote
from .fetch import AHEAD_BYTES, RemoteChunks, RemoteSettings, RemoteStats, stored_bound

__all__ = [
    "RemoteSettings",
    "RemoteChunks",
    "RemoteStats",
    "AHEAD_BYTES",
    "stored_bound",
]
