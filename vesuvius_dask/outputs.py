"""Writing outputs safely: inputs are never touched, interrupted jobs leave nothing, killed jobs resume.

Every writer (``convert_tiffs``, ``predict``, :class:`~vesuvius_dask.PredictionWriter`)
goes through an :class:`OutputJob`:

* :func:`check_output` refuses an output that resolves (symlinks, relative paths,
  trailing slashes) to an input, to a folder containing an input, or to a path inside
  an input's Zarr or segment folder. ``overwrite`` never overrides this.
* The output is built in ``.NAME.partial/`` beside it (``data/`` is the output to be,
  ``job.json`` says which run it belongs to, ``done.log`` lists finished units) and
  renamed into place only when complete; an existing output is replaced only then
  (and restored if the rename fails).
* :func:`interruptible` turns SIGINT and SIGTERM into :class:`~vesuvius_dask.errors.Interrupted`
  in the main thread; the writer stops its threads, then removes what it made.
* A run killed outright (SIGKILL, power loss) leaves ``.NAME.partial/``; ``resume=True``
  continues it when the inputs and options are the same. Units are recorded in
  ``done.log`` only after the data they wrote has been flushed to disk (``os.sync``
  before each append), so a recorded unit is a written unit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import Interrupted, OutputError, OutputExistsError, ResumeError
from .paths import protected_roots

__all__ = ["check_output", "interruptible", "critical", "OutputJob", "replace_path", "remove_path",
           "file_stamp"]

logger = logging.getLogger("vesuvius_dask")

_JOB_FILE = "job.json"
_DONE_FILE = "done.log"
_LOCK_FILE = "lock"
#: Seconds between flushes of the done-log (each flush first syncs written data); dask
#: config ``vesuvius-dask.journal-interval`` (env ``DASK_VESUVIUS_DASK__JOURNAL_INTERVAL``).
JOURNAL_INTERVAL = 2.0


def _journal_interval() -> float:
    import dask

    return float(dask.config.get("vesuvius-dask.journal-interval", JOURNAL_INTERVAL))


# ---------------------------------------------------------------------- inputs are sacred
def file_stamp(path: str | os.PathLike) -> str:
    """``realpath|size|mtime_ns`` of an input file: what a resumed run must find unchanged."""
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: str | os.PathLike, inputs: Iterable[Any]) -> None:
    """Refuse an output that would overwrite, contain or sit inside one of ``inputs``.

    Parameters
    ----------
    out : str or os.PathLike
        The output path (it need not exist).
    inputs : iterable
        The job's inputs; paths are checked, anything else (arrays, models in
        memory, URLs) is skipped.

    Raises
    ------
    OutputError
        Naming both paths.
    """
    target = _resolved(out)
    for source in inputs:
        path = source if isinstance(source, (str, os.PathLike)) else getattr(source, "path", None)
        if not isinstance(path, (str, os.PathLike)):
            continue
        for root in protected_roots(path):
            if target == root:
                why = "is the input"
            elif _inside(root, target):
                why = "contains the input"
            elif root.is_dir() and _inside(target, root):
                why = "lies inside the input's folder"
            else:
                continue
            shown = os.fspath(path)
            extra = f" ({root})" if str(root) not in (shown, os.path.abspath(shown)) else ""
            raise OutputError(
                f"output {os.fspath(out)} {why} {shown}{extra}; inputs are never overwritten "
                "or written into: choose an output path outside it")


# ---------------------------------------------------------------------- signals
class _SignalState:
    depth = 0          # nested interruptible() blocks
    critical = 0       # nested critical() blocks
    pending: list[int] = []
    fired = False
    lock = threading.Lock()


def _handler(signum: int, frame: Any) -> None:
    if _SignalState.critical or _SignalState.fired:
        _SignalState.pending.append(signum)  # raised after the critical section (or dropped)
        return
    _SignalState.fired = True
    raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name}")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread while inside.

    Outside the main thread (where signals cannot be handled) this does nothing. A
    second signal while the first is being handled is held back, so cleanup runs to
    its end. The previous handlers come back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer = _SignalState.depth == 0
    old = {}
    if outer:
        _SignalState.pending, _SignalState.fired = [], False
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup and background jobs keep ignoring
                old[sig] = signal.signal(sig, _handler)
    _SignalState.depth += 1
    try:
        yield
    finally:
        _SignalState.depth -= 1
        if outer:
            for sig, h in old.items():
                signal.signal(sig, h)
            _SignalState.pending = []


@contextlib.contextmanager
def critical(finishing: bool = False) -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while inside (renames that must not stop half-way).

    A signal that arrived meanwhile is raised on exit, unless one was already
    being handled. With ``finishing`` (the last step of a job, after which there is
    nothing left to stop) it is dropped instead, with a logged note.
    """
    _SignalState.critical += 1
    try:
        yield
    finally:
        _SignalState.critical -= 1
        if finishing and not _SignalState.critical and _SignalState.pending and not _SignalState.fired:
            name = signal.Signals(_SignalState.pending[0]).name
            _SignalState.pending = []
            logger.warning("%s arrived while the finished output was being moved into place; "
                           "the job completed", name)
        if not _SignalState.critical and _SignalState.pending and not _SignalState.fired \
                and _SignalState.depth:
            signum = _SignalState.pending.pop(0)
            _SignalState.fired = True
            raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name}")


# ---------------------------------------------------------------------- files
def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree if it exists."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def replace_path(new: Path, dst: Path) -> None:
    """Rename ``new`` to ``dst``; an existing ``dst`` is moved aside first and removed last.

    If the final rename fails, the old ``dst`` is put back. Signals are held back
    for the duration (see :func:`critical`).
    """
    with critical():
        if not dst.exists() and not dst.is_symlink():
            os.rename(new, dst)
            return
        old = dst.parent / f".{dst.name}.old"
        remove_path(old)
        os.rename(dst, old)
        try:
            os.rename(new, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        remove_path(old)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class _Journal:
    """Append-only list of finished units; a unit is appended after its data is synced.

    Thread-safe and shareable with worker processes (each appends with ``O_APPEND``).
    """

    def __init__(self, path: Path, interval: float | None = None) -> None:
        self.path = path
        self.interval = _journal_interval() if interval is None else interval
        self._buffer: list[str] = []
        self._lock = threading.Lock()
        self._last = time.monotonic()

    def __getstate__(self) -> dict:
        return {"path": self.path, "interval": self.interval}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["interval"])  # type: ignore[misc]

    def read(self) -> set[str]:
        if not self.path.exists():
            return set()
        with open(self.path) as f:
            lines = f.read().split("\n")
        return {line for line in lines[:-1] if line}  # the last piece may be torn

    def record(self, key: str) -> None:
        with self._lock:
            self._buffer.append(key)
            due = time.monotonic() - self._last >= self.interval
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            keys, self._buffer = self._buffer, []
            self._last = time.monotonic()
        if not keys:
            return
        os.sync()  # the data of these units reaches the disk before their record does
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(k + "\n" for k in keys).encode())
            os.fsync(fd)
        finally:
            os.close(fd)


#: Names a job writes in its partial folder besides ``data/``.
_OWN_NAMES = {_JOB_FILE, _JOB_FILE + ".tmp", _DONE_FILE, _LOCK_FILE, "state.json", "state.json.tmp",
              "acc", "preview.png"}


def _only_ours(partial: Path) -> bool:
    """Whether a partial folder holds nothing but what a job writes there."""
    try:
        return all(p.name in _OWN_NAMES for p in partial.iterdir())
    except OSError:
        return False


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


class OutputJob:
    """One output under construction in ``.NAME.partial/`` beside it.

    Parameters
    ----------
    dst : str or os.PathLike
        The output path.
    inputs : sequence
        The job's inputs (see :func:`check_output`).
    identity : dict
        JSON-serialisable description of the inputs and options; a resumed run must
        match it exactly.
    overwrite : bool
        Replace an existing ``dst`` once the new output is complete; also discard an
        interrupted run's leftovers.
    resume : bool
        Continue an interrupted run with the same identity; with none to continue,
        start afresh (and log that).
    what : str
        Name used in messages (``"convert"``, ``"predict"``).

    Attributes
    ----------
    data : Path
        Where to build the output.
    resumed : bool
        Whether an interrupted run is being continued.
    """

    def __init__(self, dst: str | os.PathLike, inputs: Sequence[Any], identity: dict, *,
                 overwrite: bool = False, resume: bool = False, what: str = "job") -> None:
        self.dst = Path(os.path.abspath(os.fspath(dst))).resolve(strict=False)
        self.shown = os.fspath(dst)
        self.what = what
        check_output(dst, inputs)
        if not self.dst.parent.is_dir():
            raise OutputError(f"output {self.shown}: its folder {self.dst.parent} does not exist")
        self.partial = self.dst.parent / f".{self.dst.name}.partial"
        self.data = self.partial / "data"
        self.identity = json.loads(json.dumps(identity))
        self.resumed = False
        self._lock_fd: int | None = None
        self._recover_publish()
        if (self.dst.exists() or self.dst.is_symlink()) and not overwrite:
            raise OutputExistsError(
                f"{self.shown}: already exists; pass overwrite=True to replace it",
                cli={"overwrite=True": "--overwrite"})
        if self.partial.exists():
            self._leftovers(overwrite, resume)
        elif resume:
            logger.warning("%s %s: nothing to resume (no interrupted run's %s); starting a fresh run",
                           what, self.shown, self.partial.name)
        if not self.resumed:
            try:
                self.partial.mkdir()
                self._lock()
                write_json_atomic(self.partial / _JOB_FILE, {"identity": self.identity,
                                                            "pid": os.getpid(), "what": what})
            except BaseException:  # a signal (or a full disk) while starting: leave nothing
                with critical():
                    self._unlock()
                    remove_path(self.partial)
                raise
        self.journal = _Journal(self.partial / _DONE_FILE)

    # -- leftovers ------------------------------------------------------------
    def _recover_publish(self) -> None:
        """Finish or undo a publish that a kill cut short (see :func:`replace_path`)."""
        old = self.dst.parent / f".{self.dst.name}.old"
        if old.exists() and not self.dst.exists():
            os.rename(old, self.dst)  # the user's previous output comes back
            logger.warning("%s: restored the previous output from %s (a replace was cut short)",
                           self.shown, old.name)
        elif old.exists():
            remove_path(old)
        if self.partial.is_dir() and not self.data.exists() and self.dst.exists() \
                and _only_ours(self.partial):
            remove_path(self.partial)  # a publish that was cut short after the output moved

    def _leftovers(self, overwrite: bool, resume: bool) -> None:
        try:
            with open(self.partial / _JOB_FILE) as f:
                job = json.load(f)
            old_identity = job["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            raise OutputExistsError(
                f"{self.shown}: {self.partial} is in the way and is not an interrupted run of "
                f"vesuvius-dask that can be resumed; remove it and run again") from None
        self._lock()
        done = self._progress_text()
        if resume:
            diffs = _differences(old_identity, self.identity)
            if diffs:
                self._unlock()
                raise ResumeError(
                    f"{self.shown}: cannot resume the interrupted run in {self.partial.name}: its "
                    f"inputs or options differ ({'; '.join(diffs)}); pass overwrite=True to "
                    "start again", cli={"overwrite=True": "--overwrite"})
            self.resumed = True
            logger.info("%s %s: resuming an interrupted run (%s)", self.what, self.shown, done)
            return
        if overwrite:
            logger.warning("%s %s: discarding an interrupted run's leftovers %s (%s)",
                           self.what, self.shown, self.partial.name, done)
            self._unlock()
            remove_path(self.partial)
            return
        self._unlock()
        raise OutputExistsError(
            f"{self.shown}: an interrupted run left {self.partial} ({done}); "
            "pass resume=True to continue it, or overwrite=True to start again",
            cli={"resume=True": "--resume", "overwrite=True": "--overwrite"})

    def _progress_text(self) -> str:
        """How far the interrupted run got, in words."""
        state = self.load_state("state.json")
        if isinstance(state, dict) and isinstance(state.get("progress"), dict):
            return "checkpoint after " + ", ".join(f"{v} {k}" for k, v in state["progress"].items())
        if state is not None or (self.partial / "acc").exists():
            return "no checkpoint yet"
        return f"{len(_Journal(self.partial / _DONE_FILE).read())} output chunks written"

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        fd = os.open(self.partial / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputExistsError(
                f"{self.shown}: another run is writing it right now ({self.partial} is locked)") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- progress -----------------------------------------------------------------
    def done(self) -> set[str]:
        """Units recorded as written (by this run or the one it resumes)."""
        return self.journal.read() | set(self.journal._buffer)

    def record(self, key: str) -> None:
        """Record a unit as written; call only after its data was written."""
        self.journal.record(key)

    def save_state(self, name: str, value: Any) -> None:
        """Store a JSON checkpoint in the partial folder (atomically)."""
        write_json_atomic(self.partial / name, value)

    def load_state(self, name: str) -> Any:
        """A checkpoint saved by :meth:`save_state` (None when there is none)."""
        try:
            with open(self.partial / name) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # -- endings -----------------------------------------------------------------
    def publish(self, extra: Sequence[tuple[Path, Path]] = ()) -> None:
        """Move the finished output into place (replacing the old one) and clean up.

        Parameters
        ----------
        extra : sequence of (built, destination)
            Side outputs (a PNG preview) built in the partial folder, moved first.
        """
        with critical(finishing=True):
            for built, target in extra:
                replace_path(built, target)
            replace_path(self.data, self.dst)
            self._unlock()
            remove_path(self.partial)

    def abandon(self, keep: bool | None = None) -> None:
        """Stop after an error or signal: remove the partial output, or keep it for resume.

        Parameters
        ----------
        keep : bool, optional
            Keep the partial folder (default: only when this run resumed one, so a
            resumed run interrupted again loses nothing).
        """
        with critical():
            keep = self.resumed if keep is None else keep
            if keep:
                with contextlib.suppress(OSError):
                    self.journal.flush()
                self._unlock()
                return
            self._unlock()
            remove_path(self.partial)
