"""A loopback S3 server (moto's server mode), with latency, request counts and faults.

For tests: moto's own WSGI application (what ``moto.server.ThreadedMotoServer``
serves) behind a small middleware that counts the requests it answers (per
object key, and the most answered at once), sleeps ``delay`` seconds per chunk
GET, and answers chunk GETs with S3's throttling or error responses when told
to (``fault``: ``"slowdown"``, 503 with the error code ``SlowDown``, as S3 says
it; ``"429"``, ``Too Many Requests``; ``"500"``, ``InternalError``).
``throttle(key, n)`` refuses the next ``n`` GETs of one key with ``SlowDown``.
``stop()`` takes the server down, cutting the connections a client keeps alive.

Nothing here is used by the library itself. Needs ``moto[server]`` (the ``test`` extra).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .server import is_metadata

__all__ = ["S3Server"]

_ERRORS = {
    "slowdown": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
    "429": ("429 Too Many Requests", "TooManyRequests", "Please reduce your request rate."),
    "500": ("500 Internal Server Error", "InternalError", "We encountered an internal error."),
}


def _error(start_response: Any, fault: str, retry_after: float | None) -> list[bytes]:
    status, code, message = _ERRORS[fault]
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>vd</RequestId></Error>").encode()
    headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
    if retry_after is not None:
        headers.append(("Retry-After", f"{retry_after:g}"))
    start_response(status, headers)
    return [body]


class S3Server:
    """moto's S3 on 127.0.0.1 (a free port), counting and faulting chunk GETs.

    Attributes
    ----------
    endpoint : str
        ``http://127.0.0.1:<port>``, the ``endpoint_url`` to give s3fs or boto3.
    counts : collections.Counter
        GET requests per path (``/bucket/key``).
    peak : int
        Most chunk GETs answered at once.
    ranges : dict
        The ``Range`` header of the last GET of each path (None: no range asked for).
    sent : collections.Counter
        Body bytes sent per path, summed over its GETs.
    signed : collections.Counter
        Requests that carried an ``Authorization`` header (``True``) and that did not (``False``).
    signed_chunks : collections.Counter
        The same, of chunk GETs.
    """

    def __init__(self, delay: float = 0.0) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        self.delay = float(delay)
        self.fault: str | None = None
        self.retry_after: float | None = None
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.sent: Counter = Counter()
        self.signed: Counter = Counter()
        self.signed_chunks: Counter = Counter()
        self.ranges: dict = {}
        self.in_flight = 0
        self.peak = 0
        self.refusals: Counter = Counter()
        self._throttled: Counter = Counter()
        self._connections: set = set()
        self._app = DomainDispatcherApplication(create_backend_app)
        owner = self

        class _Handler(MotoRequestHandler):
            def setup(self) -> None:
                super().setup()
                with owner.lock:
                    owner._connections.add(self.connection)

            def finish(self) -> None:
                with owner.lock:
                    owner._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def log_request(self, *args: Any) -> None:
                pass

        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True, request_handler=_Handler)
        self._server.daemon_threads = True  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="moto-s3")
        self._thread.start()

    # -- the middleware ----------------------------------------------------------------------
    def _wsgi(self, environ: dict, start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "")
        chunk = method == "GET" and path.strip("/").count("/") >= 1 and not is_metadata(path)
        with self.lock:
            self.signed["HTTP_AUTHORIZATION" in environ] += 1
            if method == "GET":
                self.counts[path] += 1
                self.ranges[path] = environ.get("HTTP_RANGE")
            if chunk:
                self.signed_chunks["HTTP_AUTHORIZATION" in environ] += 1
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
        try:
            if chunk:
                if self.delay:
                    time.sleep(self.delay)  # latency of a far server, not synchronisation
                fault = self.fault
                with self.lock:
                    if self._throttled[path] > 0:
                        self._throttled[path] -= 1
                        fault = "slowdown"
                    if fault is not None:
                        self.refusals[path] += 1
                if fault is not None:
                    return _error(start_response, fault, self.retry_after)
            body = b"".join(self._app(environ, start_response))
            if method == "GET":
                with self.lock:
                    self.sent[path] += len(body)
            return [body]
        finally:
            if chunk:
                with self.lock:
                    self.in_flight -= 1

    # -- control -----------------------------------------------------------------------------
    def client(self) -> Any:
        """A boto3 S3 client of this server (test credentials)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def put_folder(self, bucket: str, prefix: str, folder: str | Path) -> int:
        """Upload every file under ``folder`` as ``prefix/<relative path>``; the number of objects."""
        s3 = self.client()
        n = 0
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(folder).as_posix()}",
                              Body=f.read_bytes())
                n += 1
        return n

    def options(self, **extra: Any) -> dict:
        """``storage_options`` for s3fs: this endpoint and test credentials, plus ``extra``."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing", **extra}

    def set_fault(self, fault: str | None, retry_after: float | None = None) -> None:
        """Answer every chunk GET with ``fault`` from now on (None: serve them again)."""
        if fault is not None and fault not in _ERRORS:
            raise ValueError(f"unknown fault {fault!r}; one of {sorted(_ERRORS)}")
        self.fault, self.retry_after = fault, retry_after

    def throttle(self, path: str, n: int) -> None:
        """Answer the next ``n`` GETs of ``path`` (``/bucket/key``) with ``SlowDown``."""
        with self.lock:
            self._throttled[path] = n

    def reset(self) -> None:
        """Zero the counters."""
        with self.lock:
            self.counts.clear()
            self.sent.clear()
            self.signed.clear()
            self.signed_chunks.clear()
            self.ranges.clear()
            self.refusals.clear()
            self.peak = self.in_flight

    def chunk_requests(self, prefix: str = "") -> Counter:
        """GETs per chunk path (metadata left out), of paths starting with ``prefix``."""
        with self.lock:
            return Counter({p: n for p, n in self.counts.items()
                            if p.startswith(prefix) and not is_metadata(p)
                            and p.strip("/").count("/") >= 1})

    def stop(self) -> None:
        """Take the server down: kept-alive connections are cut and the port refuses new ones."""
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            open_now = list(self._connections)
        for conn in open_now:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
