"""Fetching stored chunks of a remote Zarr array: many requests in flight, retries, a disk cache.

Latency, not bandwidth, sets the pace of reading a remote volume one chunk at a
time. :class:`RemoteChunks` fetches the stored bytes of chunks with fsspec's async
filesystem (aiohttp for HTTP) on fsspec's event loop, up to ``concurrency``
requests at once per volume and process:

* :meth:`RemoteChunks.get` blocks for one chunk; the batch engine calls it from as
  many threads as there are requests allowed in flight;
* :meth:`RemoteChunks.prefetch` starts fetches and returns at once, so the chunks
  of the next batches are on their way while this one is cut
  (:class:`~vesuvius_dask.loaders.reader.BatchReader` calls it).

A failed request — the server down, an HTTP error, a 404, nothing received for
``timeout`` seconds — is retried ``retries`` times with exponential backoff and
jitter, then raises :class:`~vesuvius_dask.errors.ChunkFetchError` naming the
volume, the chunk and its URL. A 404 means "missing chunk, read the fill value"
under Zarr's rules, but over HTTP it is also what a moved or broken server says;
``missing="error"`` (the default) treats it as a fault, ``missing="fill"`` as an
absent chunk (for sparse arrays).

With a ``cache_dir`` (:class:`~vesuvius_dask.remote.disk_cache.DiskChunkCache`) fetched
bytes are kept on disk for other processes and later runs; a chunk is fetched by
one process while the others wait for it (at most ``claim_timeout`` seconds).

What a server sends is bounded before memory is spent on it: a chunk's response
may be at most :func:`stored_bound` bytes (the decoded chunk, plus 1/16 and
64 KiB for the codec's overhead). Over HTTP a larger ``Content-Length`` is refused
before the body is read, and a body without one is read in pieces and given up
past the bound (the connection is closed, not drained). Other filesystems (s3,
gs, ...) are asked for the byte range ``[0, bound + 1)`` — a ranged GET, no extra
request — and a response that fills it is refused. Either counts as a failed
request (retried, then :class:`~vesuvius_dask.errors.ChunkFetchError` naming the
chunk, the URL, the size and the bound).

A response that does not decode is never kept: :meth:`RemoteChunks.get` with
``decode=`` decodes the bytes before they are put in ``cache_dir`` (bytes a
prefetch already wrote behind, for other processes waiting on the chunk, are
removed again), and cached bytes that do not decode are removed and fetched once
more. Errors say where the bytes came from: "fetched from <URL>" or "read from
cache_dir <file>".

Settings come from dask's config (``vesuvius-dask.remote.*``, or the environment
variables ``DASK_VESUVIUS_DASK__REMOTE__CONCURRENCY`` and so on) when a volume is
opened, and travel with it to DataLoader workers and cluster workers.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import Any

from .. import config
from ..errors import ChunkFetchError, CorruptChunkError, VolumeError
from .politeness import parse_retry_after

__all__ = ["RemoteSettings", "RemoteChunks", "RemoteStats", "AHEAD_BYTES", "stored_bound"]

#: What a started fetch gives when another process is fetching the chunk (``get`` waits for it).
_ELSEWHERE = object()

#: Threads per process that read and write ``cache_dir`` files (writes are behind the reader):
#: the default of config ``vesuvius-dask.remote.cache-threads``, read when the pool is made.
CACHE_THREADS = config.default("remote.cache-threads")

#: Decoded bytes of the chunks that read-ahead may hold fetched and not yet used: the
#: default of config ``vesuvius-dask.remote.ahead-bytes``, read when a volume is opened.
AHEAD_BYTES = config.default_bytes("remote.ahead-bytes")

#: The response bound for a chunk whose decoded size is not known: the default of config
#: ``vesuvius-dask.limits.unknown-chunk-bytes``.
UNKNOWN_CHUNK_BOUND = config.default_bytes("limits.unknown-chunk-bytes")


def stored_bound(chunk_nbytes: int | None) -> int:
    """The most bytes a stored chunk may take: its decoded bytes, plus 1/16 and 64 KiB of codec overhead.

    Parameters
    ----------
    chunk_nbytes : int or None
        Bytes of one decoded chunk (None: config ``vesuvius-dask.limits.unknown-chunk-bytes``,
        default :data:`UNKNOWN_CHUNK_BOUND`).
    """
    if chunk_nbytes is None:
        return config.get_bytes("limits.unknown-chunk-bytes")
    n = int(chunk_nbytes)
    return n + n // 16 + 64 * 2**10


class _TooLarge(OSError):
    """A response larger than a stored chunk of the array can be (a bad response)."""

    def __init__(self, bound: int, declared: int | None = None, received: int | None = None,
                 span: tuple[int, int] | None = None) -> None:
        limit = (f"the {bound} bytes a stored chunk of this array can take" if span is None
                 else f"the {bound} bytes asked for (bytes {span[0]}-{span[1] - 1})")
        if declared is not None:
            text = f"the server declared {declared} bytes (Content-Length), more than {limit} (body not read)"
        else:
            text = f"the server sent more than {limit} (stopped reading at {received} bytes)"
        super().__init__(text)


class _WrongRange(OSError):
    """A partial answer (206) for other bytes than the range asked for."""


@dataclass
class _Got:
    """A chunk's bytes and where they came from.

    ``path``: the cache_dir file they were read from (None: fresh from the server);
    ``write``: the write-behind of fresh bytes into cache_dir (a future), if any.
    """

    data: bytes | None
    path: Any = None
    write: Any = None


@dataclass(frozen=True)
class RemoteSettings:
    """How remote chunks are fetched (dask config ``vesuvius-dask.remote.<name>``).

    The defaults are those of the configuration table (``vesuvius_dask/vesuvius-dask.yaml``).

    Attributes
    ----------
    concurrency : int
        Requests in flight per volume and process (default 32).
    retries : int
        Retries of a failed request (default 4), after 0.5, 1, 2, 4 s (``backoff``
        doubling, plus up to 25% jitter).
    backoff : float
        First wait before a retry, in seconds.
    timeout : float
        Seconds without a byte from the server (connecting or reading) before a
        request counts as failed (default 5). With the defaults a server that stops
        answering ends in an error within about 35 s, one that refuses or fails
        requests within about 8 s.
    missing : {"error", "fill"}
        What a 404 on a chunk is: a fault (retried, then an error) or an absent
        chunk read as the fill value.
    connect_interval : float
        Seconds between opening two new connections (default 0.002; reused
        keep-alive connections are not paced). Requests start in waves (a batch's
        chunks at once, and they finish together), and a wave of new connections
        overflows a small server's listen queue (Python's ``http.server`` keeps 5):
        each dropped connection then waits for the kernel's 1 s SYN retransmit.
        Pacing the waves avoids that; 0 turns it off.
    host_concurrency : int
        Most requests in flight to one host from the whole machine (every process
        together; default 64): the ceiling of the adaptive window
        (:mod:`~vesuvius_dask.remote.politeness`).
    initial_concurrency : int
        The window a host starts with (default 8); it doubles per round of
        answers until the server first refuses.
    throttle_budget : float
        Seconds a server may go on refusing (429, 503, S3 ``SlowDown``) before a
        read gives up (default 180): refusals are waited out (``Retry-After``
        honoured), never counted as ``retries``.
    share_dir : str
        Folder of the per-host window files shared by the machine's processes
        (default ``""``: ``/dev/shm/vesuvius-dask-<uid>`` or the temp folder;
        ``"off"``: each process keeps its own window).
    claim_timeout : float
        Seconds a process waits for a chunk another process of the same
        ``cache_dir`` is fetching (default 60); then it fetches the chunk itself,
        with one warning (a holder that hangs, or a claim kept by a forked process).
    deadline_factor : float
        A request's whole life (connects made again, a body that trickles in, each
        read within ``timeout``) is bounded by ``timeout`` x this (default 6).
    """

    concurrency: int = config.default("remote.concurrency")
    retries: int = config.default("remote.retries")
    backoff: float = config.default("remote.backoff")
    timeout: float = config.default("remote.timeout")
    missing: str = config.default("remote.missing")
    connect_interval: float = config.default("remote.connect-interval")
    claim_timeout: float = config.default("remote.claim-timeout")
    deadline_factor: float = config.default("remote.deadline-factor")
    host_concurrency: int = config.default("remote.host-concurrency")
    initial_concurrency: int = config.default("remote.initial-concurrency")
    throttle_budget: float = config.default("remote.throttle-budget")
    share_dir: str = ""

    def __post_init__(self) -> None:
        if int(self.concurrency) < 1 or int(self.retries) < 0 or float(self.timeout) <= 0 \
                or float(self.backoff) < 0 or float(self.connect_interval) < 0 \
                or not float(self.claim_timeout) > 0 or not float(self.deadline_factor) >= 1 \
                or int(self.host_concurrency) < 1 or int(self.initial_concurrency) < 1 \
                or not float(self.throttle_budget) >= 0:
            raise VolumeError(f"vesuvius-dask.remote settings out of range: {self}")
        if self.missing not in ("error", "fill"):
            raise VolumeError(f"vesuvius-dask.remote.missing must be 'error' or 'fill', "
                              f"got {self.missing!r}")

    @classmethod
    def from_config(cls) -> RemoteSettings:
        """The settings in dask's config now (``vesuvius-dask.remote.<name>``, the table's defaults)."""
        values = {}
        for f in fields(cls):
            v = config.get(f"remote.{f.name.replace('_', '-')}")
            if v is not None:
                values[f.name] = type(f.default)(v)
        return cls(**values)


@dataclass
class RemoteStats:
    """Counters of one volume's fetches in one process."""

    requests: int = 0  # requests sent to the server (retries included)
    fetched: int = 0  # chunks fetched from the server
    retried: int = 0
    reconnects: int = 0  # connects given up early and tried again (see RemoteSettings.timeout)
    refused: int = 0  # answers that asked to slow down (429, 503, SlowDown), waited out
    cache_hits: int = 0  # chunks read from the disk cache
    in_flight: int = 0
    peak_in_flight: int = 0


@dataclass
class _Local:
    """What one process owns: the filesystem, its loop, the semaphore, started fetches."""

    pid: int
    fs: Any
    loop: Any
    connections: Any = None  # _Connections, for HTTP
    writes: set = field(default_factory=set)  # cache writes under way (see flush)
    lock: threading.Lock = field(default_factory=threading.Lock)
    semaphore: Any = None
    started: dict = field(default_factory=dict)
    failure: tuple[float, BaseException] | None = None  # (when, error) of the last fetch given up


class RemoteChunks:
    """The stored chunks of one remote Zarr array, fetched concurrently (see the module notes).

    Parameters
    ----------
    protocol : str
        fsspec protocol (``http``, ``https``, ``s3``, ...).
    base : str
        The array's path in the filesystem (for HTTP, its URL).
    name : str
        How errors name the volume.
    storage_options : dict, optional
        fsspec options.
    settings : RemoteSettings, optional
        Default: :meth:`RemoteSettings.from_config`.
    cache : DiskChunkCache, optional
        Where fetched bytes are kept.
    chunk_nbytes : int, optional
        Bytes of one decoded chunk: bounds the fetched chunks read-ahead holds
        (config ``vesuvius-dask.remote.ahead-bytes`` of them, read here) and the
        bytes one response may bring (:func:`stored_bound`).
    max_stored_bytes : int, optional
        The bound on one response instead (default ``stored_bound(chunk_nbytes)``).
    """

    def __init__(self, protocol: str, base: str, name: str, storage_options: dict | None = None,
                 settings: RemoteSettings | None = None, cache: Any = None,
                 chunk_nbytes: int | None = None, max_stored_bytes: int | None = None) -> None:
        self.chunk_nbytes = chunk_nbytes
        self.ahead_bytes = config.get_bytes("remote.ahead-bytes")
        self.max_stored = (int(max_stored_bytes) if max_stored_bytes is not None
                           else stored_bound(chunk_nbytes))
        self.protocol = protocol
        self.base = base.rstrip("/")
        self.name = name
        self.storage_options = dict(storage_options or {})
        self.settings = settings or RemoteSettings.from_config()
        self.cache = cache
        self.stats = RemoteStats()
        self._local: _Local | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_local=None, stats=RemoteStats())
        return state

    def with_cache(self, cache: Any) -> RemoteChunks:
        """A copy fetching through ``cache``."""
        return RemoteChunks(self.protocol, self.base, self.name, self.storage_options,
                            self.settings, cache, self.chunk_nbytes, self.max_stored)

    def ahead_limit(self) -> int:
        """Started fetches kept until taken: ``ahead_bytes`` of chunks, 2 to 8 x ``concurrency``."""
        c = self.settings.concurrency
        fit = self.ahead_bytes // max(1, self.chunk_nbytes or self.ahead_bytes)
        return int(min(8 * c, max(2 * c, fit)))

    def url(self, key: str) -> str:
        path = f"{self.base}/{key}"
        return path if "://" in path else f"{self.protocol}://{path}"

    # -- per process ---------------------------------------------------------------------
    def _here(self) -> _Local:
        local = self._local
        if local is None or local.pid != os.getpid():
            # fsspec's instances, loop and HTTP sessions do not survive fork: this
            # process's own, shared by every volume with the same options
            fs, loop, connections = _filesystem(self.protocol, self.storage_options, self.settings)
            local = self._local = _Local(os.getpid(), fs, loop, connections)
            self.stats = RemoteStats()
        return local

    # -- fetching --------------------------------------------------------------------------
    async def _request(self, local: _Local, path: str, span: tuple[int, int] | None = None) -> bytes:
        """One GET of at most :attr:`max_stored` bytes; over HTTP, a connect that stalls is made again.

        A connection the server's full listen queue dropped would otherwise wait
        for the kernel's 1 s SYN retransmit: connects get 4x the slowest recent
        connect (at least 0.25 s), doubling on each miss, ``timeout`` in all.
        Elsewhere than HTTP, the byte range ``[0, bound + 1)`` is asked for.
        """
        fs = local.fs
        bound = self.max_stored if span is None else span[1] - span[0]
        start, end = (0, bound + 1) if span is None else span
        overall = self.settings.timeout * self.settings.deadline_factor
        conns = local.connections
        if conns is None:
            if getattr(fs, "async_impl", False):
                data = await asyncio.wait_for(fs._cat_file(path, start=start, end=end), timeout=overall)
            else:
                data = await asyncio.wait_for(asyncio.to_thread(fs.cat_file, path, start=start, end=end),
                                              timeout=overall)
            if len(data) > bound:
                raise _TooLarge(bound, received=len(data))
            return data
        import aiohttp

        budget = self.settings.timeout
        wait = conns.connect_timeout(budget)
        while True:
            limits = aiohttp.ClientTimeout(total=None, sock_connect=wait, sock_read=self.settings.timeout)
            try:
                # the HTTP client's own timeouts see a stalled socket; this bounds everything else
                return await asyncio.wait_for(_http_get(fs, path, limits, bound, span), timeout=overall)
            except aiohttp.ConnectionTimeoutError:
                budget -= wait
                if budget <= 0:
                    raise
                self.stats.reconnects += 1
                wait = min(2 * wait, budget)

    def host(self) -> str:
        """Where the requests go, as the request window knows it: ``scheme://host:port``, or the bucket."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url(""))
        endpoint = (self.storage_options.get("endpoint_url")
                    or (self.storage_options.get("client_kwargs") or {}).get("endpoint_url") or "")
        return f"{parts.scheme}://{parts.netloc}" + (f"@{endpoint}" if endpoint else "")

    def _window(self) -> Any:
        from .politeness import host_window

        s = self.settings
        folder = None if s.share_dir == "" else ("" if s.share_dir == "off" else s.share_dir)
        return host_window(self.host(), s.host_concurrency, s.initial_concurrency, folder)

    async def _fetch(self, key: str, index: Any, span: tuple[int, int] | None = None) -> bytes | None:
        """One chunk's bytes from the server (None: absent and ``missing='fill'``).

        Each attempt takes a slot of the host's request window
        (:mod:`~vesuvius_dask.remote.politeness`). A refusal (429, 503, S3
        ``SlowDown``) is waited out — ``Retry-After`` honoured, else a backoff —
        for up to ``throttle_budget`` seconds of refusals with no answer from the
        host in between; it never counts as a retry. Any other failure is retried
        ``retries`` times; the volume's slot (``concurrency``) is kept through
        them, so a failing server ends in an error after the backoff between
        attempts, and fetches that were waiting meanwhile then fail at once with
        that error instead of each retrying in turn (fetches started later try
        afresh).
        """
        local = self._here()
        if local.semaphore is None:
            local.semaphore = asyncio.Semaphore(self.settings.concurrency)
        url = self.url(key)
        path = url if self.protocol in ("http", "https") else f"{self.base}/{key}"
        s = self.settings
        window = self._window()
        queued = time.monotonic()
        async with local.semaphore:
            t0 = time.monotonic()
            failures = refusals = attempts = 0
            refused_at = 0.0
            while True:
                if local.failure is not None and local.failure[0] >= queued:
                    raise ChunkFetchError(str(local.failure[1])) from local.failure[1]
                attempts += 1
                try:
                    return await self._attempt(local, window, path, span)
                except FileNotFoundError as err:
                    if s.missing == "fill":
                        return None
                    last: BaseException = err
                    reason = "not found (HTTP 404)"
                except Exception as err:  # timeouts, OSError, aiohttp's ClientError and kin
                    refusal = _refusal(err)
                    if refusal is None:
                        last, reason = err, _reason(err, s.timeout)
                    else:
                        sent = getattr(err, "vd_sent", None)
                        wait = self._refused(window, refusal, refusals, refused_at, sent)
                        refused_at = time.monotonic()
                        if wait is not None:
                            refusals += 1
                            await asyncio.sleep(wait)
                            continue
                        last, reason = err, (f"the server went on refusing requests ({refusal.text}) "
                                             f"for {s.throttle_budget:g} s "
                                             "(vesuvius-dask.remote.throttle-budget)")
                        break
                if failures >= s.retries:
                    break
                failures += 1
                self.stats.retried += 1
                await asyncio.sleep(s.backoff * 2 ** (failures - 1) * (1 + 0.25 * random.random()))
            hint = (" (if this array leaves chunks out by design, set vesuvius-dask.remote.missing "
                    "to 'fill')" if isinstance(last, FileNotFoundError) else "")
            where = f"chunk {tuple(index)} " if index is not None else "chunk "
            tried = f"{attempts} attempts over {time.monotonic() - t0:.1f} s"
            error = ChunkFetchError(f"{self.name}: {where}could not be fetched from {url}: {reason}, "
                                    f"{tried}{hint}")
            local.failure = (time.monotonic(), error)
            raise error from last

    async def _attempt(self, local: _Local, window: Any, path: str, span: tuple[int, int] | None) -> bytes:
        """One request, in a slot of the host's window; an answer widens the window."""
        async with window.slot():
            self.stats.requests += 1
            self.stats.in_flight += 1
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
            t0 = time.monotonic()
            try:
                data = await self._request(local, path, span)
            except Exception as err:
                try:  # when it was sent: a refusal of a request sent at an older window counts once
                    err.vd_sent = t0  # type: ignore[attr-defined]
                except AttributeError:
                    pass
                raise
            finally:
                self.stats.in_flight -= 1
            window.answered(time.monotonic() - t0)
        self.stats.fetched += 1
        return bytes(data)

    def _refused(self, window: Any, refusal: _Refusal, refusals: int, refused_at: float,
                 sent: float | None = None) -> float | None:
        """Seconds to wait after a refusal (the window told), or None once the budget is spent.

        The budget runs from the host's first refusal since its last answer (in
        this process): a request is not given up while others get through, and
        refusals arriving in waves do not each start a budget of their own.

        A ``Retry-After`` is cut to what is left of the budget; one of 0, negative
        or in the past is read as none (the backoff applies: it is no licence to
        hammer). The refused request waits that long. If it is refused again and
        no request to the host was answered meanwhile, the server is refusing
        everything (a quota, an outage): then every request of the machine to the
        host pauses until the time it names. A server that shapes a rate (a token
        bucket answers some requests and refuses others) is not paused for as a
        whole: its other requests go on, at the smaller window.
        """
        budget = float(self.settings.throttle_budget)
        spent = window.refusing_for()
        if spent >= budget:
            return None
        left = budget - spent
        pause = refusal.retry_after if refusal.retry_after and refusal.retry_after > 0 else None
        pause = None if pause is None else min(pause, left)
        everything = refusals > 0 and window.last_success < refused_at
        window.refused(pause if everything else None, sent)
        self.stats.refused += 1
        if pause is not None:
            return 0.0 if everything else pause  # 0: the window's pause holds every request until then
        # a few round trips first (the window has shrunk meanwhile), doubling up to 30 s
        first = min(self.settings.backoff, max(0.05, 4 * (window.srtt or 0.0)))
        backoff = first * 2 ** min(refusals, 10) * (1 + 0.25 * random.random())
        return min(backoff, 30.0, left)

    async def _prefetched(self, key: str, index: Any) -> Any:
        """A started fetch (a :class:`_Got`): from the disk cache, else from the server.

        The look-up and the claim (system calls that a loaded disk can make slow)
        run on the cache's threads, never on the event loop every request shares;
        so do reading a hit's file and writing a fetched chunk (behind: other
        processes waiting for it read it from there). A
        chunk another process is fetching is left to it (:data:`_ELSEWHERE`:
        :meth:`get` then waits for that process).
        """
        if self.cache is None:
            return _Got(await self._fetch(key, index))
        from .cache_files import release

        loop = asyncio.get_running_loop()
        io = self._cache_io()  # file system calls off the loop: a slow disk must not stall every request
        if await loop.run_in_executor(io, self.cache.has, key):  # a hit needs no claim: files appear whole
            found = await loop.run_in_executor(io, self._cached, key)
            if found is not _ELSEWHERE:
                return found
        claim_fd = await loop.run_in_executor(io, self.cache.try_claim, key)
        if claim_fd is None:
            return _ELSEWHERE
        if await loop.run_in_executor(io, self.cache.has, key):  # put by the holder before us
            release(claim_fd)
            return await loop.run_in_executor(io, self._cached, key)
        try:
            data = await self._fetch(key, index)
        except BaseException:
            release(claim_fd)
            raise
        return _Got(data, write=self._write_behind(key, data, claim_fd))

    def _write_behind(self, key: str, data: bytes | None, claim_fd: int) -> Future:
        """Write a fetched chunk to the cache while its bytes go on to the reader: the write's future.

        The claim is given back once the file is in place, so another process
        waiting for the chunk reads it from the cache; :meth:`flush` waits for it.
        """
        from .cache_files import release

        local = self._here()

        def write() -> None:
            try:
                self.cache.put(key, data)
            finally:
                release(claim_fd)

        def done(fut: Any) -> None:
            with local.lock:
                local.writes.discard(fut)

        fut = self._cache_io().submit(write)
        with local.lock:
            local.writes.add(fut)
        fut.add_done_callback(done)
        return fut

    def flush(self) -> None:
        """Wait until the chunks fetched so far in this process are in the disk cache."""
        from concurrent.futures import wait

        local = self._local
        if local is None or local.pid != os.getpid():
            return
        with local.lock:
            pending = list(local.writes)
        wait(pending)

    def _cache_io(self) -> Any:
        """The threads of this process that read hits and write fetched chunks to the cache."""
        return _process_pool("cache", "remote.cache-threads")

    def _cached(self, key: str) -> Any:
        """A cached chunk (a :class:`_Got`; data None: absent on the server), or :data:`_ELSEWHERE`."""
        from .disk_cache import MISSING

        hit = self.cache.get(key)
        if hit is None:  # it failed its check: get() fetches it
            return _ELSEWHERE
        self.stats.cache_hits += 1
        return _Got(None if hit == MISSING else hit, path=self.cache.file(key))

    def get_ranges(self, requests: list[tuple[str, int, int]]) -> list[bytes]:
        """Byte ranges ``[start, end)`` of files under the array's base, fetched together.

        For layouts read in part (uncompressed TIFF strips, shard indexes and
        inner chunks): the same request window, refusals, retries, bounds (a
        response longer than its range is refused) and named faults as chunks;
        not kept in ``cache_dir``. A server that ignores ``Range`` and sends the
        whole file is read only up to ``end``.
        """
        local = self._here()

        async def many() -> list:
            return await asyncio.gather(*(self._fetch(key, None, (int(a), int(b))) for key, a, b in requests))

        return asyncio.run_coroutine_threadsafe(many(), local.loop).result()

    def _fetch_now(self, key: str, index: Any) -> bytes | None:
        local = self._here()
        return asyncio.run_coroutine_threadsafe(self._fetch(key, index), local.loop).result()

    def get(self, key: str, index: Any = None, decode: Any = None) -> Any:
        """The stored bytes of chunk ``key`` (None: absent, read as the fill value), or them decoded.

        Parameters
        ----------
        key : str
            The chunk's store key, relative to the array (``c/0/1/2``).
        index : tuple of int, optional
            The chunk's index, for messages.
        decode : callable, optional
            ``decode(bytes or None) -> chunk``: then the chunk is returned, and
            bytes are kept in ``cache_dir`` only once they decoded. Bytes fresh
            from the server that do not decode are not kept (a copy written
            behind for other processes is removed); cached bytes that do not
            decode are removed and the chunk is fetched once more.

        Raises
        ------
        ChunkFetchError
            Every attempt failed.
        CorruptChunkError
            ``decode`` failed on the bytes from the server (the message names the
            URL), or on cached bytes that could not be fetched again (the message
            names the ``cache_dir`` file).
        """
        local = self._here()
        with local.lock:
            started: Future | None = local.started.pop(key, None)
        if started is not None:
            got = started.result()
            if got is not _ELSEWHERE:
                return self._decoded(key, index, got, decode)
        if self.cache is None:
            return self._decoded(key, index, _Got(self._fetch_now(key, index)), decode)
        return self._through_cache(key, index, decode)

    def _decoded(self, key: str, index: Any, got: _Got, decode: Any) -> Any:
        """``decode(got.data)`` (``got.data`` without ``decode``); what does not decode is not kept."""
        if decode is None:
            return got.data
        try:
            return decode(got.data)
        except Exception as err:
            if got.path is not None:  # read from cache_dir: out with it, and from the server once more
                return self._refetch(key, index, decode, got, err)
            if got.write is not None:  # written behind before it was decoded: taken back
                from concurrent.futures import wait

                wait([got.write])
                self.cache.remove(key, got.data)
            kept = "; nothing of it was kept in cache_dir" if self.cache is not None else ""
            raise self._undecodable(key, index, err, f"fetched from {self.url(key)}", kept) from err

    def _through_cache(self, key: str, index: Any, decode: Any) -> Any:
        """A chunk from the disk cache, else fetched (under its claim) and then put there."""
        from .cache_files import release
        from .disk_cache import MISSING

        cache = self.cache
        hit = cache.get(key)
        if hit is None:
            fd = cache.claim(key, timeout=self.settings.claim_timeout)  # None: timed out, go on
            try:
                hit = cache.get(key)  # put by the process we waited for
                if hit is None:
                    return self._fetch_and_keep(key, index, decode)
            finally:
                release(fd)
        self.stats.cache_hits += 1
        return self._decoded(key, index, _Got(None if hit == MISSING else hit, path=cache.file(key)), decode)

    def _fetch_and_keep(self, key: str, index: Any, decode: Any) -> Any:
        """Fetch a chunk, decode it (with ``decode``), and only then put it in the cache."""
        data = self._fetch_now(key, index)
        out = self._decoded(key, index, _Got(data), decode)
        self.cache.put(key, data)
        return out

    def _refetch(self, key: str, index: Any, decode: Any, got: _Got, err: Exception) -> Any:
        """Cached bytes did not decode: remove them and fetch the chunk again, once."""
        from .cache_files import release

        self.cache.remove(key, got.data)
        bad = f"the copy read from cache_dir {got.path} cannot be decoded ({type(err).__name__}: {err})"
        fd = self.cache.claim(key, timeout=self.settings.claim_timeout)
        try:
            return self._fetch_and_keep(key, index, decode)
        except ChunkFetchError as fetch_err:
            raise self._undecodable(key, index, err, f"read from cache_dir {got.path}", note=(
                f"; it was removed, and fetching it again failed: {fetch_err}")) from fetch_err
        except CorruptChunkError as again:
            raise CorruptChunkError(f"{again}; {bad} and was removed") from again
        finally:
            release(fd)

    def _undecodable(self, key: str, index: Any, err: Exception, source: str, note: str = "") -> Exception:
        where = f"chunk {tuple(index)}" if index is not None else f"chunk {key!r}"
        return CorruptChunkError(f"{self.name}: {where} ({source}) cannot be decoded: "
                                 f"{type(err).__name__}: {err}{note}")

    def prefetch(self, keys: list[tuple[str, Any]], limit: int | None = None) -> int:
        """Start getting chunks (``(key, index)`` pairs) not already on their way.

        From the disk cache when it has them, else from the server.

        Returns how many are under way (:meth:`pending`).

        At most ``limit`` (default :meth:`ahead_limit`) started fetches are kept
        until :meth:`get` takes them (a bound on the memory they hold); a chunk
        another process is fetching is left to it.
        """
        local = self._here()
        limit = self.ahead_limit() if limit is None else limit
        for key, index in keys:
            if self.cache is not None and self.cache.has(key):
                continue  # a hit: the reading thread takes it from the file (get)
            with local.lock:
                if len(local.started) >= limit:
                    break
                if key in local.started:
                    continue
                local.started[key] = asyncio.run_coroutine_threadsafe(self._prefetched(key, index),
                                                                      local.loop)
        return self.pending()

    def pending(self) -> int:
        """Fetches started by :meth:`prefetch` that are still under way (not yet answered).

        Read-ahead keeps this above ``concurrency`` so the server always has work;
        answered fetches waiting to be taken are bounded by ``prefetch``'s ``limit``.
        """
        local = self._local
        if local is None or local.pid != os.getpid():
            return 0
        with local.lock:
            return sum(not f.done() for f in local.started.values())

    def __repr__(self) -> str:
        return f"RemoteChunks({self.url('')!r}, {self.settings}, cache={self.cache})"


class _Connections:
    """aiohttp trace hooks on new connections: space them apart, and learn how long one takes.

    aiohttp awaits ``on_connection_create_start`` before it connects, so waiting
    there delays only new connections (not reused keep-alive ones). The event loop
    is one thread, so no lock.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next = 0.0
        self.slowest = 0.0  # the slowest recent connect, decaying

    async def start(self, session: Any, context: Any, params: Any) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(now, self.next)
        self.next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)
        context.vd_connect = loop.time()

    async def end(self, session: Any, context: Any, params: Any) -> None:
        took = asyncio.get_running_loop().time() - getattr(context, "vd_connect", 0.0)
        self.slowest = max(0.98 * self.slowest, took)

    def connect_timeout(self, limit: float) -> float:
        """How long a new connect may take before it is made again."""
        return min(limit, max(0.25, 4 * self.slowest))


async def _http_get(fs: Any, url: str, limits: Any, bound: int, span: tuple[int, int] | None = None) -> bytes:
    """GET ``url`` with fsspec's aiohttp session, refusing a body of more than ``bound`` bytes.

    A ``Content-Length`` above the bound is refused before the body is read; a body
    is read in pieces, given up past the bound (the connection is closed, not
    drained). Error statuses raise as fsspec's do (404: ``FileNotFoundError``).
    """
    kw = dict(fs.kwargs)
    kw["timeout"] = limits
    if span is not None:
        kw["headers"] = {**(kw.get("headers") or {}), "Range": f"bytes={span[0]}-{span[1] - 1}"}
    session = await fs.set_session()
    encode = getattr(fs, "encode_url", None)
    async with session.get(encode(url) if encode is not None else url, **kw) as r:
        if r.status in _REFUSALS:
            await _read_capped(r, 2**16)
            raise _Refusal(f"HTTP {r.status} {r.reason or ''}".rstrip(),
                           parse_retry_after(r.headers.get("Retry-After")))
        if r.status >= 400:
            body, _ = await _read_capped(r, 2**16)  # a short error page is read: the connection stays usable
            if body is None:
                r.close()
            fs._raise_not_found_for_status(r, url)
        if span is not None and r.status == 200:  # Range ignored: the whole file, read up to the range's end
            _ignored_range(url)
            body = await _read_span(r, *span)
            r.close()
            return body
        if span is not None and r.status == 206:
            _check_content_range(r, span)
        declared = r.content_length
        if declared is not None and declared > bound:
            r.close()
            raise _TooLarge(bound, declared=declared, span=span)
        body, received = await _read_capped(r, bound)
        if body is None:
            r.close()
            raise _TooLarge(bound, received=received, span=span)
        return body


def _check_content_range(r: Any, span: tuple[int, int]) -> None:
    """Refuse a 206 whose ``Content-Range`` is absent or starts elsewhere than asked (or ends past it).

    Bytes of the right length from another offset would otherwise be taken for the
    asked ones; an answer that ends early (or holds nothing: a range past the end)
    is left to the caller's length checks, which say what was expected there.
    """
    header = r.headers.get("Content-Range")
    got = _content_range(header)
    if got is None or got[0] != span[0] or got[1] >= span[1]:
        r.close()
        answered = f"Content-Range {header!r}" if header else "no Content-Range"
        raise _WrongRange(f"asked for bytes {span[0]}-{span[1] - 1}, the server answered 206 with "
                          f"{answered}")


def _content_range(header: str | None) -> tuple[int, int] | None:
    """``(first, last)`` of a ``Content-Range: bytes first-last/size`` header, else None."""
    if not header:
        return None
    unit, _, rest = header.strip().partition(" ")
    first, _, last = rest.partition("/")[0].partition("-")
    try:
        a, b = int(first), int(last)
    except ValueError:
        return None
    return (a, b) if unit.lower() == "bytes" and a >= 0 else None  # (b < a: none of them, past the end)


#: Hosts already warned of for answering range requests with whole files.
_WARNED_RANGES: set[str] = set()


def _ignored_range(url: str) -> None:
    import warnings
    from urllib.parse import urlsplit

    host = urlsplit(url).netloc
    if host not in _WARNED_RANGES:
        _WARNED_RANGES.add(host)
        warnings.warn(f"vesuvius-dask: {host} answers range requests with whole files: each partial "
                      "read downloads the object up to the range's end (only the range is kept)",
                      RuntimeWarning, stacklevel=2)


async def _read_span(r: Any, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of a whole-file body: read up to ``stop``, nothing before ``start`` kept."""
    pieces = []
    at = 0
    async for piece in r.content.iter_any():
        end = at + len(piece)
        if end > start:
            pieces.append(piece[max(0, start - at):stop - at])
        at = end
        if at >= stop:
            break
    return b"".join(pieces)


async def _read_capped(r: Any, cap: int) -> tuple[bytes | None, int]:
    """``(body, bytes received)`` of a response, body None once more than ``cap`` bytes arrived."""
    pieces = []
    received = 0
    async for piece in r.content.iter_any():
        received += len(piece)
        if received > cap:
            return None, received
        pieces.append(piece)
    return b"".join(pieces), received


#: HTTP answers that ask a client to slow down, not errors: waited out, never counted as retries.
_REFUSALS = (429, 503)

#: Error codes of S3 (and S3-like services) that mean "slow down".
_S3_REFUSALS = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                "TooManyRequests", "TooManyRequestsException", "RequestThrottled", "ServiceUnavailable"}


class _Refusal(OSError):
    """The server asked to slow down (429, 503, S3 ``SlowDown``), maybe saying for how long."""

    def __init__(self, text: str, retry_after: float | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.retry_after = retry_after


def _refusal(err: BaseException) -> _Refusal | None:
    """The refusal ``err`` is or wraps (an S3 error code or status that asks to slow down), else None."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, _Refusal):
            return err
        response = getattr(err, "response", None)  # botocore's ClientError
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            meta = response.get("ResponseMetadata") or {}
            status = meta.get("HTTPStatusCode")
            if code in _S3_REFUSALS or status in _REFUSALS:
                headers = {k.lower(): v for k, v in (meta.get("HTTPHeaders") or {}).items()}
                return _Refusal(f"{code or 'HTTP'} {status or ''}".strip(),
                                parse_retry_after(headers.get("retry-after")))
        if any(code in str(err) for code in ("SlowDown", "Please reduce your request rate")):
            return _Refusal("SlowDown")
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def _reason(err: BaseException, timeout: float) -> str:
    if isinstance(err, (_TooLarge, _WrongRange)):
        return str(err)
    if "ConnectionTimeout" in type(err).__name__:
        return f"no connection within {timeout:g} s"
    if isinstance(err, asyncio.TimeoutError) or "Timeout" in type(err).__name__:
        return f"no answer within {timeout:g} s"
    os_error = getattr(err, "os_error", None)
    if os_error is not None:  # aiohttp's ClientConnectorError
        return f"cannot connect to the server ({os_error.strerror or os_error})"
    status = getattr(err, "status", None)
    if status is not None:
        return f"HTTP {status} {getattr(err, 'message', '')}".rstrip()
    return f"{type(err).__name__}: {err}"


#: This process's filesystems and pools (``{"pid": ..., key: ...}``), made on first use.
_PROCESS: dict = {}
_PROCESS_LOCK = threading.Lock()


def _after_fork() -> None:
    """A forked child makes its own filesystems and pools (a parent thread may hold the lock)."""
    global _PROCESS_LOCK
    _PROCESS_LOCK = threading.Lock()
    _PROCESS.clear()


os.register_at_fork(after_in_child=_after_fork)


def _process_state() -> dict:
    if _PROCESS.get("pid") != os.getpid():
        _PROCESS.clear()
        _PROCESS["pid"] = os.getpid()
    return _PROCESS


def _filesystem(protocol: str, storage_options: dict, settings: RemoteSettings) -> tuple[Any, Any, Any]:
    """``(filesystem, event loop, _Connections or None)``, one per process and options.

    Volumes on the same server share its HTTP session (and so its keep-alive
    connections and the pacing of new ones), however many are opened.
    """
    import json

    key = ("fs", protocol, json.dumps(storage_options, sort_keys=True, default=repr),
           settings.timeout, settings.connect_interval)
    with _PROCESS_LOCK:
        state = _process_state()
        if key not in state:
            state[key] = _make_filesystem(protocol, storage_options, settings)
        return state[key]


def _make_filesystem(protocol: str, storage_options: dict, settings: RemoteSettings
                     ) -> tuple[Any, Any, Any]:
    import fsspec

    opts = dict(storage_options)
    connections = None
    if protocol in ("http", "https"):
        import aiohttp

        client = dict(opts.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(
            total=None, sock_connect=settings.timeout, sock_read=settings.timeout))
        connections = _Connections(settings.connect_interval)
        hooks = aiohttp.TraceConfig()
        hooks.on_connection_create_start.append(connections.start)
        hooks.on_connection_create_end.append(connections.end)
        client["trace_configs"] = [*client.get("trace_configs", []), hooks]
        opts["client_kwargs"] = client
    elif protocol in ("s3", "s3a"):
        opts = _s3_options(opts, settings)
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, **opts)
    if protocol in ("s3", "s3a") and "retries" not in storage_options:
        fs.retries = 1  # s3fs's own retries (5, on SlowDown too) would hide refusals from the window
    loop = fs.loop if getattr(fs, "async_impl", False) else _thread_loop()
    return fs, loop, connections


def _s3_options(storage_options: dict, settings: RemoteSettings) -> dict:
    """Chunk GETs over S3: as many connections as the host's window may use, no retries under ours.

    botocore keeps 10 connections per client by default (10 requests in flight at
    most) and retries a throttled or failed request 4 times with its own backoff:
    a SlowDown answer took 25 requests and 48 s to reach the fetcher. Options the
    user gave win.
    """
    opts = dict(storage_options)
    config_kwargs = dict(opts.get("config_kwargs") or {})
    config_kwargs.setdefault("max_pool_connections", max(settings.concurrency, settings.host_concurrency))
    config_kwargs.setdefault("retries", {"total_max_attempts": 1})
    config_kwargs.setdefault("connect_timeout", settings.timeout)
    config_kwargs.setdefault("read_timeout", settings.timeout)
    opts["config_kwargs"] = config_kwargs
    return opts


def _process_pool(name: str, threads_key: str) -> Any:
    """A thread pool of this process, made on first use with config ``threads_key`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    with _PROCESS_LOCK:
        state = _process_state()
        if ("pool", name) not in state:
            threads = int(config.get(threads_key))
            state[("pool", name)] = ThreadPoolExecutor(threads, thread_name_prefix=f"vesuvius-dask-{name}")
        return state[("pool", name)]


_THREAD_LOOP: list = [None, None]  # [pid, loop]


def _thread_loop() -> Any:
    """An event loop in a daemon thread, for filesystems without an async implementation."""
    if _THREAD_LOOP[0] != os.getpid():
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True, name="vesuvius-dask-io").start()
        _THREAD_LOOP[:] = [os.getpid(), loop]
    return _THREAD_LOOP[1]
