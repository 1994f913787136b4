"""How hard to press one server: a request window per host, shared by the machine's processes.

A server that rate-limits answers ``429 Too Many Requests`` or ``503`` (S3: ``SlowDown``)
when too many requests arrive. Retrying such answers like errors ends a run; firing
a fixed number of requests per process (8 DataLoader workers x 8 ranks x 32) is what
provokes them. :class:`HostWindow` instead keeps a *window* of requests in flight to
one host, for every process of the machine together, and adapts it the way TCP
adapts its congestion window (AIMD):

* it starts at ``initial-concurrency`` and doubles every round of answered
  requests (slow start) until the first refusal, then grows by one request per
  window of answered requests (additive increase), never above
  ``host-concurrency`` (the documented ceiling);
* a refusal halves it (multiplicative decrease, at most once per ``cooldown``:
  the requests already in flight when the server started refusing are answered
  by the same refusal, and count once), and a ``Retry-After`` pauses every request
  of the machine to that host until the time it names;
* the machine has at most ``window`` requests in flight to the host, counted
  exactly across processes (DataLoader workers and local ranks alike), and no
  process more than its share (``window / processes``, rounded up) while others
  wait; a process that waits for another's request to end looks again every few
  milliseconds.

The window lives in a small file per host in ``share-dir`` (``/dev/shm`` when
there is one): a header (window, threshold, pause, last decrease, last change)
updated under a byte-range lock, and one slot per process holding its count of
requests in flight, each slot held by an open-file-description lock
(``F_OFD_SETLK``) that the kernel drops when its process dies — a killed process's
requests stop counting at once. A window nobody changed for 30 s starts afresh.
Where that lock does not exist (macOS) or the folder cannot be used
(not ours, not writable), each process keeps its own window (one warning).

Nothing here ends a run: :mod:`~vesuvius_dask.remote.fetch` waits as told and gives
up only when a server has refused for longer than ``throttle-budget`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import stat
import struct
import tempfile
import threading
import time
import warnings
from typing import Any

__all__ = ["HostWindow", "host_window", "parse_retry_after", "share_dir"]

_HEADER = struct.Struct("<4sddddd")  # magic, window, threshold, paused until, last decrease, last change
_STALE = 30.0  # seconds without a change after which a window starts afresh
_MAGIC = b"VDW1"
_LOCK_AT = 4096  # the byte locked while the header is read and written
_SLOTS_AT = 8192  # one slot per process: 8 bytes, 1 + its requests in flight (0: free); first byte locked
_SLOTS = 1024
_WAITING = 1 << 32  # the flag in a slot: this process has a request waiting for room
_POLL = 0.005
#: What a refusal leaves of the window (TCP's 0.5; CUBIC's 0.7 was measured too, in
#: benchmarks/remote.py --only-rate-limited: no better use of the allowance, 2-3x the refusals).
DECREASE = 0.5  # seconds between two looks at the other processes' counts while waiting
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def share_dir(configured: str | None = None) -> str:
    """The folder of the per-host window files: ``configured``, else ``/dev/shm`` or the temp folder."""
    if configured:
        return os.path.expanduser(str(configured))
    shm = os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
    base = "/dev/shm" if shm else tempfile.gettempdir()
    return os.path.join(base, f"vesuvius-dask-{os.geteuid() if hasattr(os, 'geteuid') else 'user'}")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta seconds or an HTTP date); None if bad."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class _Shared:
    """The window file of one host, opened by this process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode) or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()):
            os.close(self.fd)
            raise OSError(f"{path} is not a file of this user")
        self.slot: int | None = None

    def _lock(self, kind: int, start: int, wait: bool = True) -> bool:
        import fcntl

        data = struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0)
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, data)
        except OSError:
            if wait:
                raise
            return False
        return True

    @contextlib.contextmanager
    def locked(self) -> Any:
        import fcntl

        self._lock(fcntl.F_WRLCK, _LOCK_AT)
        try:
            yield
        finally:
            self._lock(fcntl.F_UNLCK, _LOCK_AT)

    def read(self) -> tuple[float, ...] | None:
        raw = os.pread(self.fd, _HEADER.size, 0)
        if len(raw) < _HEADER.size:
            return None
        magic, *values = _HEADER.unpack(raw)
        if magic != _MAGIC or not all(math.isfinite(v) for v in values):
            return None
        return tuple(values)  # type: ignore[return-value]

    def write(self, values: tuple[float, ...]) -> None:
        os.pwrite(self.fd, _HEADER.pack(_MAGIC, *values), 0)

    def join(self) -> None:
        """Take a free slot (its lock is this process's membership; the kernel drops it on death)."""
        import fcntl

        for i in range(_SLOTS):
            if self._lock(fcntl.F_WRLCK, _SLOTS_AT + i * 8, wait=False):
                self.slot = i
                os.pwrite(self.fd, struct.pack("<q", 1), _SLOTS_AT + i * 8)
                return
        # more processes than slots: this one reads uncounted (and counts the others)

    def set_count(self, n: int, waiting: bool = False) -> None:
        if self.slot is not None:
            value = 1 + n + (_WAITING if waiting else 0)
            os.pwrite(self.fd, struct.pack("<q", value), _SLOTS_AT + self.slot * 8)

    def others(self) -> tuple[int, int, bool]:
        """(processes, requests in flight, whether any waits for room) of the host's other live members."""
        raw = os.pread(self.fd, _SLOTS * 8, _SLOTS_AT)
        counts = struct.unpack(f"<{len(raw) // 8}q", raw[: len(raw) // 8 * 8])
        members = requests = 0
        waiting = False
        for i, n in enumerate(counts):
            if n > 0 and i != self.slot and self._held(i):  # a dead process's slot is not held
                members += 1
                requests += (n & (_WAITING - 1)) - 1
                waiting = waiting or bool(n & _WAITING)
        return members, requests, waiting

    def _held(self, i: int) -> bool:
        import fcntl

        probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _SLOTS_AT + i * 8, 1, 0)
        got = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, probe)
        return struct.unpack("hhqqi4x", got)[0] != fcntl.F_UNLCK

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class HostWindow:
    """The requests in flight to one host: acquire a slot, report answers (see the module notes).

    Parameters
    ----------
    host : str
        ``scheme://host:port`` (or a bucket) the requests go to.
    ceiling : int
        Most requests in flight to the host from the machine (``host-concurrency``).
    initial : int
        The window a host starts with (``initial-concurrency``).
    cooldown : float, optional
        Seconds after a decrease during which refusals do not decrease it again
        (default: 1.5 x the smoothed time a request takes, at least 20 ms — the
        refusals of requests already in flight when it shrank count once).
    folder : str, optional
        Where the shared file goes (default :func:`share_dir`); ``""``: this process only.
    """

    def __init__(self, host: str, ceiling: int, initial: int, cooldown: float | None = None,
                 folder: str | None = None) -> None:
        self.host = host
        self.ceiling = max(1, int(ceiling))
        self.initial = max(1, min(int(initial), self.ceiling))
        self.cooldown = cooldown
        self.srtt: float | None = None  # smoothed seconds per answered request (this process)
        self.in_use = 0
        self.refusals = 0
        self.last_success = 0.0
        self.refusing_since: float | None = None  # the first refusal since the last answer
        self._state = self._fresh()
        self._gate: Any = None  # asyncio.Lock and Event, made on the loop that first uses them
        self._freed: Any = None
        self._waiting = False
        self._shared: _Shared | None = None
        if folder != "":
            self._shared = self._open(folder)
            if self._shared is not None:
                self._shared.join()

    def _open(self, folder: str | None) -> _Shared | None:
        import fcntl

        if not hasattr(fcntl, "F_OFD_SETLK"):
            return None
        where = share_dir(folder)
        name = hashlib.sha256(self.host.encode()).hexdigest()[:20] + ".window"
        try:
            os.makedirs(where, mode=0o700, exist_ok=True)
            st = os.lstat(where)
            if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()):
                raise OSError("not a folder of this user")
            shared = _Shared(os.path.join(where, name))
            with shared.locked():
                got = shared.read()
                if got is None or time.monotonic() - got[4] > _STALE:
                    shared.write(tuple(self._state))
            return shared
        except OSError as err:
            warnings.warn(f"vesuvius-dask: cannot share the request window of {self.host} with other "
                          f"processes through {where} ({err}); this process keeps its own",
                          RuntimeWarning, stacklevel=3)
            return None

    # -- the shared numbers ------------------------------------------------------------
    def _fresh(self) -> list[float]:
        """A window as a new host gets it: (window, threshold, paused until, last decrease, last change)."""
        return [float(self.initial), float(self.ceiling), 0.0, -1e9, time.monotonic()]

    def _read(self) -> list[float]:
        if self._shared is not None:
            got = self._shared.read()
            if got is not None:
                self._state = list(got)
        if time.monotonic() - self._state[4] > _STALE:  # nobody read from the host for a while
            self._state = self._fresh()
        return self._state

    def _update(self, change: Any) -> list[float]:
        """Apply ``change(state) -> state`` to the shared numbers, under the file's lock."""
        if self._shared is None:
            self._state = list(change(list(self._read())))
            self._state[4] = time.monotonic()
            return self._state
        with self._shared.locked():
            state = self._read()
            self._state = list(change(list(state)))
            self._state[4] = time.monotonic()
            self._shared.write(tuple(self._state))
        return self._state

    @property
    def window(self) -> float:
        return self._read()[0]

    def paused_for(self) -> float:
        """Seconds until the host's ``Retry-After`` pause ends (0: not paused)."""
        return max(0.0, self._read()[2] - time.monotonic())

    def processes(self) -> int:
        """Live processes of the machine reading the host (at least 1: this one)."""
        return 1 if self._shared is None else 1 + self._shared.others()[0]

    def _try_start(self) -> bool:
        """Count one more request in flight if the window (and this process's share) allows it."""
        if self._shared is None:
            ok = self.in_use < max(1, int(self._read()[0]))
            self.in_use += ok
            return ok
        with self._shared.locked():
            window = max(1, int(self._read()[0]))
            members, theirs, waiting = self._shared.others()
            share = -(-window // (members + 1))
            ok = self.in_use + theirs < window and (self.in_use < share or not waiting)
            if ok:
                self.in_use += 1
            self._shared.set_count(self.in_use, waiting=self._waiting and not ok)
        return ok

    # -- slots ---------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Wait for the host's pause to end and for room in the window (requests queue in order)."""
        if self._gate is None:
            self._gate, self._freed = asyncio.Lock(), asyncio.Event()
        async with self._gate:  # one request at a time looks; the others queue behind it
            try:
                while True:
                    pause = self.paused_for()
                    if pause > 0:
                        await asyncio.sleep(pause * (1 + 0.1 * _jitter()))
                        continue
                    if self._try_start():
                        return
                    self._waiting = True
                    self._freed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):  # a request of ours ends, or look again
                        await asyncio.wait_for(self._freed.wait(), _POLL if self._shared is not None else 0.5)
            finally:
                if self._waiting and self._shared is not None:  # also when cancelled while waiting
                    self._shared.set_count(self.in_use, waiting=False)
                self._waiting = False

    def release(self) -> None:
        self.in_use -= 1
        if self._shared is not None:
            self._shared.set_count(self.in_use, waiting=self._waiting)
        if self._freed is not None:
            self._freed.set()

    @contextlib.asynccontextmanager
    async def slot(self) -> Any:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    # -- answers -------------------------------------------------------------------------
    def answered(self, took: float | None = None) -> None:
        """A request was answered (in ``took`` s): the window grows (doubling per round, else +1)."""
        self.last_success = time.monotonic()
        if took is not None:
            self.srtt = took if self.srtt is None else 0.875 * self.srtt + 0.125 * took
        if not self._waiting:  # no request of ours waits for room: no evidence the window can grow
            if self.last_success - self._state[4] > _STALE / 4:
                self._update(lambda s: s)  # still reading: the window is kept, not started afresh
            return

        def grow(s: list[float]) -> list[float]:
            w, threshold = s[0], s[1]
            s[0] = min(float(self.ceiling), w + (1.0 if w < threshold else 1.0 / max(w, 1.0)))
            return s

        self._update(grow)
        if self._freed is not None:
            self._freed.set()

    def refusing_for(self) -> float:
        """Seconds the host has refused this process's requests with no answer in between (0: now)."""
        now = time.monotonic()
        if self.refusing_since is None or self.last_success > self.refusing_since:
            self.refusing_since = now
        return now - self.refusing_since

    def refused(self, retry_after: float | None, started: float | None = None) -> None:
        """The server refused a request (429, 503, SlowDown): shrink the window, pause for ``retry_after``.

        ``started``: when the refused request was sent (``time.monotonic``, the
        same clock in every process). A request sent before the window last
        shrank was sent at the old size: its refusal does not shrink it again
        (once per round trip, as TCP does).
        """
        self.refusals += 1
        now = time.monotonic()
        cooldown = self.cooldown if self.cooldown is not None else (
            0.0 if started is not None else max(0.02, 1.5 * (self.srtt or 0.0)))

        def shrink(s: list[float]) -> list[float]:
            if now - s[3] >= cooldown and (started is None or started > s[3]):
                s[0] = max(1.0, s[0] * DECREASE)
                s[1] = s[0]
                s[3] = now
            if retry_after:
                s[2] = max(s[2], now + retry_after)
            return s

        self._update(shrink)


def _jitter() -> float:
    import random

    return random.random()


#: This process's windows: (pid, host, settings) -> HostWindow.
_WINDOWS: dict = {}
_WINDOWS_LOCK = threading.Lock()


def host_window(host: str, ceiling: int, initial: int, folder: str | None = None) -> HostWindow:
    """The :class:`HostWindow` of ``host`` in this process (made on first use; a child makes its own).

    One per event loop too: its queue of waiting requests belongs to the loop that uses it.
    """
    try:
        loop = id(asyncio.get_running_loop())
    except RuntimeError:
        loop = 0
    key = (os.getpid(), loop, host, ceiling, initial, folder)
    with _WINDOWS_LOCK:
        window = _WINDOWS.get(key)
        if window is None:
            window = _WINDOWS[key] = HostWindow(host, ceiling, initial, folder=folder)
        return window


def _after_fork() -> None:
    """A forked child drops its parent's windows (their slot locks stay the parent's)."""
    global _WINDOWS_LOCK
    _WINDOWS_LOCK = threading.Lock()
    for window in list(_WINDOWS.values()):
        if window._shared is not None:  # noqa: SLF001 - this module's own class
            window._shared.close()  # noqa: SLF001
    _WINDOWS.clear()


os.register_at_fork(after_in_child=_after_fork)
