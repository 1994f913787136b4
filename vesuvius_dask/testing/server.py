"""A loopback HTTP server for a folder, with added latency, request counts and faults.

For tests and ``benchmarks/remote.py``: it serves a local Zarr the way the scroll
server does (plain GET of each key), sleeping ``delay`` seconds per request, and
counts requests per path and the most requests it was ever answering at once.
``fault`` makes chunk requests fail: ``"404"``, ``"500"``, ``"hang"`` (no answer,
to a ``GET`` or a ``HEAD``, until the fault is cleared or the server stops); ``stop()``
takes it down. ``ranges = False`` answers ``Range`` with the whole file (200);
``range_shift`` answers it with bytes that many further on (an honest ``Content-Range``),
``content_range = False`` leaves that header out.
:meth:`SlowServer.limit` makes it rate-limit as the scroll server does: a token
bucket or a concurrency cap answered with 429 (with or without ``Retry-After``),
and bursts of 503.

Nothing here is used by the library itself.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["SlowServer", "is_metadata"]

_METADATA = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}


def is_metadata(path: str) -> bool:
    """Whether a request path asks for Zarr metadata rather than a chunk."""
    return path.rstrip("/").rsplit("/", 1)[-1] in _METADATA


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers
    owner: SlowServer

    def log_message(self, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        owner = self.server.owner  # type: ignore[attr-defined]
        with owner.lock:
            owner.connections.add(self.connection)

    def finish(self) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        with owner.lock:
            owner.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        owner = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        chunk = not is_metadata(path)
        with owner.lock:
            owner.counts[path] += 1
            owner.in_flight += 1
            owner.peak = max(owner.peak, owner.in_flight)
            owner.chunks_in_flight += chunk
            owner.chunk_peak = max(owner.chunk_peak, owner.chunks_in_flight)
        if owner.on_request is not None:
            owner.on_request(path)
        counted = chunk  # a chunk request counts as in flight until its answer starts
        try:
            if chunk and owner.refuse(self):  # it stopped counting the request before answering
                counted = False
                return
            if owner.delay:
                time.sleep(owner.delay)
            fault = owner.fault if not is_metadata(path) else None
            if fault == "hang":
                owner.cleared.wait()
                fault = owner.fault
            with owner.lock:  # before the answer: a client that has it may start another at once
                owner.chunks_in_flight -= counted
                counted = False
            if fault in ("404", "500"):
                self.send_error(int(fault))
                return
            if owner.ranges and self.headers.get("Range", "").startswith("bytes=") and self._send_range():
                return
            super().do_GET()
        finally:
            with owner.lock:
                owner.in_flight -= 1
                owner.chunks_in_flight -= counted


    def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
        owner = self.server.owner  # type: ignore[attr-defined]
        if owner.fault == "hang" and not is_metadata(self.path.split("?", 1)[0]):
            owner.cleared.wait()
        super().do_HEAD()

    def _send_range(self) -> bool:
        """Answer ``Range: bytes=a-b`` with 206 and those bytes (False: not a file, or a bad range)."""
        import os

        owner = self.server.owner  # type: ignore[attr-defined]
        path = self.translate_path(self.path)
        try:
            first, _, last = self.headers["Range"][6:].partition("-")
            size = os.path.getsize(path)
            start, end = int(first), min(int(last) + 1 if last else size, size)
            if owner.range_shift:  # other bytes, as many as asked (where the file has them)
                start = max(0, min(size, start + owner.range_shift))
                end = max(start, min(size, end + owner.range_shift))
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(max(0, end - start))
        except (OSError, ValueError):
            return False
        with owner.lock:  # counted before the answer: a client that has it may look at once
            owner.bytes_sent += len(data)
        self.send_response(206)
        if owner.content_range:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return True


class _PlainHandler(_Handler):
    protocol_version = "HTTP/1.0"  # http.server's default: a new connection per request


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away (a timeout, a killed worker) is not news here


class SlowServer:
    """Serve ``root`` on 127.0.0.1 with ``delay`` seconds added to every request.

    By default it serves as production servers do: HTTP/1.1 keep-alive and a long
    listen queue. ``plain=True`` serves as Python's ``http.server`` does out of the
    box: HTTP/1.0 (a new connection for every request) and a listen queue of 5, so
    that bursts of new connections overflow it.

    Attributes
    ----------
    counts : collections.Counter
        Requests per path.
    peak : int
        Most requests answered at once.
    """

    def __init__(self, root: str | Path, delay: float = 0.0, *, plain: bool = False) -> None:
        self.delay = float(delay)
        self.fault: str | None = None
        #: Called with each request's path before it is answered (tests hook events here).
        self.on_request: Any = None
        self.cleared = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.connections: set = set()
        self.in_flight = 0
        self.peak = 0
        #: Answer ``Range`` requests with 206 (False: the whole file, as http.server does).
        self.ranges = True
        self.range_shift = 0
        self.content_range = True
        #: Bytes sent in answer to ``Range`` requests.
        self.bytes_sent = 0
        #: Chunk requests (metadata left out) being answered now, and the most at once.
        self.chunks_in_flight = 0
        self.chunk_peak = 0
        #: Refusals answered, by status; times (monotonic) of the chunk requests answered.
        self.refusals: Counter = Counter()
        self.answered: list = []
        self.limit()
        handler = functools.partial(_PlainHandler if plain else _Handler, directory=str(root))
        server_class = type("_Plain" if plain else "_KeepAlive", (_Server,),
                            {"request_queue_size": 5 if plain else 256})
        self._server = server_class(("127.0.0.1", 0), handler)
        self._server.owner = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def limit(self, *, rate: float | None = None, burst: int | None = None, max_in_flight: int | None = None,
              retry_after: str | float | None = None, burst_503: tuple[int, int] | None = None) -> None:
        """Refuse chunk requests as a rate-limiting server does (all None: serve every request).

        Parameters
        ----------
        rate, burst : float, int
            A token bucket: ``rate`` chunk requests per second, ``burst`` at once;
            a request finding it empty is answered 429.
        max_in_flight : int
            A concurrency cap: a request beyond it is answered 429.
        retry_after : str or float or "auto"
            The ``Retry-After`` header of a 429 (``"auto"``: the whole seconds until
            the bucket has a token again; None: no header).
        burst_503 : (every, length)
            Of every ``every`` chunk requests, the first ``length`` are answered 503.
        """
        with self.lock:
            self.rate, self.burst = rate, burst
            self.tokens = float(burst or 0)
            self.filled = time.monotonic()
            self.max_in_flight, self.retry_after, self.burst_503 = max_in_flight, retry_after, burst_503
            self.numbered = 0

    def refuse(self, handler: Any) -> bool:
        """Answer a refusal to ``handler`` if the limits say so (True: answered)."""
        with self.lock:
            status, header = self._decide()
            if status is None:
                self.answered.append(time.monotonic())
                return False
            self.refusals[status] += 1
            self.chunks_in_flight -= 1  # before the answer (see do_GET)
        handler.send_response(status)
        if header is not None:
            handler.send_header("Retry-After", str(header))
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return True

    def _decide(self) -> tuple[int | None, Any]:
        self.numbered += 1
        if self.burst_503 is not None:
            every, length = self.burst_503
            if (self.numbered - 1) % every < length:
                return 503, None
        if self.max_in_flight is not None and self.chunks_in_flight > self.max_in_flight:
            return 429, self._retry_header(1.0)
        if self.rate is not None:
            now = time.monotonic()
            self.tokens = min(float(self.burst or 1), self.tokens + (now - self.filled) * self.rate)
            self.filled = now
            if self.tokens < 1:
                return 429, self._retry_header((1 - self.tokens) / self.rate)
            self.tokens -= 1
        return None, None

    def _retry_header(self, wait: float) -> Any:
        if self.retry_after == "auto":
            import math

            return max(1, math.ceil(wait))
        return self.retry_after

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def set_fault(self, fault: str | None) -> None:
        """Make chunk requests fail from now on (None: serve them again)."""
        self.fault = fault
        if fault == "hang":
            self.cleared.clear()
        else:
            self.cleared.set()

    def reset(self) -> None:
        """Zero the counters."""
        with self.lock:
            self.counts.clear()
            self.peak = self.in_flight
            self.chunk_peak = self.chunks_in_flight
            self.refusals.clear()
            self.answered.clear()

    def chunk_requests(self) -> Counter:
        """Requests per chunk path (metadata left out)."""
        with self.lock:
            return Counter({p: n for p, n in self.counts.items() if not is_metadata(p)})

    def stop(self) -> None:
        """Take the server down: open connections are cut and the port refuses new ones."""
        import socket

        self.cleared.set()
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            open_now = list(self.connections)
        for conn in open_now:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> SlowServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
