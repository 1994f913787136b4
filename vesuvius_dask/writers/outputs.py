"""Writing outputs safely: inputs are never touched, finished work survives, killed jobs resume.

Every writer (``convert_tiffs``, ``convert_zarr``, ``predict``,
:class:`~vesuvius_dask.PredictionWriter`) goes through an :class:`OutputJob`:

* :func:`check_output` refuses an output that is, contains, or lies inside an input.
  Paths are compared by *file identity* (device and inode of the output, the input
  and every parent folder of each), so no alias of an input — a symlink, a bind
  mount, a second mount of a share, another letter case on a case-insensitive
  disk, a hard link — is ever written, replaced or removed. ``overwrite`` never
  overrides this.
* :func:`check_destination` checks everything about an output path before any work
  starts: its folder exists, it is not a symbolic link, and what is there is ours to
  replace. ``overwrite`` replaces only an output vesuvius-dask wrote (a Zarr whose
  attributes carry ``vesuvius_dask``, a PNG whose ``Software`` text says
  ``vesuvius-dask``); anything else at the destination is refused in one line.
* The output is built in ``.NAME.partial/`` beside it (``data/`` is the output to be,
  ``job.json`` says which run it belongs to, ``done.log`` lists finished units,
  ``lock`` is held by the run) and renamed into place only when complete. An
  existing output is moved into the partial folder (``old/``) during the publish and
  removed with it; a publish cut short by a kill is finished or undone by the next
  run. Nothing outside ``.NAME.partial/`` is ever removed except the output it replaces.
* Setting up, publishing and abandoning hold an exclusive lock on the output's
  folder, and a run holds ``lock`` in its partial folder for its whole life, so two
  runs on the same output never remove each other's work.
* :func:`interruptible` turns SIGINT and SIGTERM into :class:`~vesuvius_dask.errors.Interrupted`
  in the main thread. A job that has not checkpointed yet removes what it made; a job
  that has (a unit in ``done.log``, a ``state.json`` checkpoint) keeps its partial
  folder and says in one line how to resume it or remove it. With ``overwrite`` the
  old output stays intact either way.
* A run killed outright (SIGKILL, power loss) leaves ``.NAME.partial/``; ``resume=True``
  continues it when the inputs and options are the same: the job's identity covers
  the source's content (sizes and modification times of every file of a local
  source, see :func:`source_stamp`), the model and the options, so a source changed
  since is refused in one line. Units are recorded in ``done.log`` only after the
  data they wrote has been flushed to disk (``os.sync`` before each append), so a
  recorded unit is a written unit.
"""

from __future__ import annotations

import contextlib
import hashlib
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

from .. import config
from ..errors import Interrupted, OutputError, OutputExistsError, ResumeError
from ..io.paths import ZARR_MARKERS, is_url, protected_roots

__all__ = ["check_output", "check_destination", "check_job", "interruptible", "critical", "OutputJob",
           "replace_path", "remove_path", "file_stamp", "source_stamp", "is_our_output", "PNG_SOFTWARE",
           "same_or_inside"]

logger = logging.getLogger("vesuvius_dask")

_JOB_FILE = "job.json"
_DONE_FILE = "done.log"
_LOCK_FILE = "lock"
_PUBLISH_FILE = "publish.json"
#: The ``Software`` text of the PNG previews we write (how ``overwrite`` recognises one).
PNG_SOFTWARE = "vesuvius-dask"
#: Seconds between flushes of the done-log (each flush first syncs written data): the default
#: of config ``vesuvius-dask.journal-interval`` (env ``DASK_VESUVIUS_DASK__JOURNAL_INTERVAL``).
JOURNAL_INTERVAL = config.default("journal-interval")


def _journal_interval() -> float:
    return float(config.get("journal-interval"))


# ---------------------------------------------------------------------- inputs are sacred
def file_stamp(path: str | os.PathLike) -> str:
    """``realpath|size|mtime_ns`` of an input file: what a resumed run must find unchanged."""
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def source_stamp(path: str | os.PathLike) -> str | None:
    """A digest of a local input's content stamps: every file's name, size, modification and change time.

    For a folder (a Zarr, an OME-Zarr, a segment, a folder of TIFF layers) every
    file below it counts, symbolic links followed (a segment's ``layers`` is often a
    link to the real folder; a folder reached twice counts once); for a file, the
    file. A changed voxel means a rewritten chunk file, which changes its size or
    modification time, and its change time even when the modification time is set
    back (``touch -r``), so a resumed job can tell that its source changed since the
    interrupted run. URLs (None) have no local stamp: their metadata is compared
    instead.
    """
    if is_url(path):
        return None
    root = os.path.realpath(os.fspath(path))
    h = hashlib.sha256()

    def stamp(rel: str, st: os.stat_result) -> None:
        h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}\n".encode())

    if os.path.isfile(root):
        stamp("", os.stat(root))
        return h.hexdigest()
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, names in os.walk(root, followlinks=True):
        with contextlib.suppress(OSError):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:  # a link back up the tree: once is enough
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(names):
            with contextlib.suppress(OSError):  # a file removed while walking: no stamp
                stamp(f"{rel}/{name}", os.stat(os.path.join(dirpath, name)))
    return h.hexdigest()


def _file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``path`` names (links followed), None if nothing is there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _lineage(path: str | os.PathLike) -> list[tuple[int, int]]:
    """File identities of ``path`` (if it exists) and of every folder above it, up to ``/``.

    Parents are taken by name from the absolute path *and* from the resolved path,
    so a folder reached through a link counts under both of its names.
    """
    ids: list[tuple[int, int]] = []
    for start in (Path(os.path.abspath(os.fspath(path))), Path(os.path.realpath(os.fspath(path)))):
        for p in (start, *start.parents):
            fid = _file_id(p)
            if fid is not None and fid not in ids:
                ids.append(fid)
    return ids


def check_output(out: str | os.PathLike, inputs: Iterable[Any]) -> None:
    """Refuse an output that would be, contain or sit inside one of ``inputs``.

    Compared by file identity (device and inode), so aliases of an input — links,
    bind mounts, a share mounted twice, another letter case — are caught too.

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
    target_id = _file_id(out)
    above = _lineage(Path(os.path.abspath(os.fspath(out))).parent)  # the folders the output goes in
    for source in inputs:
        path = source if isinstance(source, (str, os.PathLike)) else getattr(source, "path", None)
        if not isinstance(path, (str, os.PathLike)):
            continue
        for root in protected_roots(path):
            root_id = _file_id(root)
            if root_id is None:
                continue
            if target_id == root_id:
                why = "is the input"
            elif target_id is not None and target_id in _lineage(root):
                why = "contains the input"
            elif root_id in above:
                why = "lies inside the input's folder"
            else:
                continue
            shown = os.fspath(path)
            extra = f" ({root})" if str(root) not in (shown, os.path.abspath(shown)) else ""
            raise OutputError(
                f"output {os.fspath(out)} {why} {shown}{extra}; inputs are never overwritten "
                "or written into: choose an output path outside it")


def same_or_inside(path: str | os.PathLike, other: str | os.PathLike) -> bool:
    """Whether ``path`` is ``other`` or lies inside it (folders resolved; neither need exist)."""
    a, b = _destination(path), _destination(other)
    return a == b or b in a.parents


def _zarr_attributes(path: Path) -> dict:
    """The attributes of a Zarr node (v3 ``zarr.json`` or v2 ``.zattrs``), {} if none can be read."""
    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        with contextlib.suppress(OSError, ValueError):
            with open(path / name) as f:
                meta = json.load(f)
            attrs = meta.get(key, {}) if key else meta
            if isinstance(attrs, dict):
                return attrs
    return {}


def is_our_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an output vesuvius-dask wrote (and so ``overwrite`` may replace it).

    A Zarr array or group whose attributes carry ``vesuvius_dask`` (every Zarr that
    ``convert`` and ``predict`` write has them), or a PNG whose ``Software`` text is
    :data:`PNG_SOFTWARE`. Symbolic links are never ours.
    """
    p = Path(path)
    if p.is_symlink():
        return False
    if p.is_dir():
        return any((p / m).is_file() for m in ZARR_MARKERS) and "vesuvius_dask" in _zarr_attributes(p)
    if p.is_file():
        with contextlib.suppress(Exception):
            from PIL import Image

            with Image.open(p) as img:
                return img.format == "PNG" and str(img.info.get("Software", "")).startswith(PNG_SOFTWARE)
    return False


def _destination(dst: str | os.PathLike) -> Path:
    """The output's absolute path: its folder resolved, its own name kept (a link is not followed)."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(dst))))
    return Path(os.path.realpath(p.parent)) / p.name


def check_destination(dst: str | os.PathLike, inputs: Iterable[Any] = (), *, overwrite: bool = False,
                      what: str = "output") -> Path:
    """Check an output path before any work starts; the absolute path to write.

    Parameters
    ----------
    dst : str or os.PathLike
        The output path.
    inputs : iterable
        The job's inputs (see :func:`check_output`).
    overwrite : bool
        Whether an existing output may be replaced (only one of ours, see
        :func:`is_our_output`).
    what : str
        How messages name the output (``"output"``, ``"png"``). Leftovers of an
        interrupted run are :func:`check_job`'s to check.

    Raises
    ------
    OutputError
        The output is an input or inside one, its folder does not exist, it is a
        symbolic link, or it exists and is not an output of vesuvius-dask.
    OutputExistsError
        It exists and ``overwrite`` is false.
    """
    shown = os.fspath(dst)
    check_output(dst, inputs)
    target = _destination(dst)
    if not target.parent.is_dir():
        raise OutputError(f"{what} {shown}: its folder {target.parent} does not exist; create it first")
    if target.is_symlink():
        raise OutputError(
            f"{what} {shown} is a symbolic link (to {os.readlink(target)}); outputs are never written "
            "through or in place of links: remove the link or give another path")
    if target.exists():
        if not overwrite:
            raise OutputExistsError(f"{shown}: already exists; pass overwrite=True to replace it",
                                    cli={"overwrite=True": "--overwrite"})
        if not is_our_output(target):
            kind = "a folder" if target.is_dir() else "a file"
            raise OutputError(
                f"{what} {shown} is {kind} that vesuvius-dask did not write (not a Zarr or PNG of "
                "ours); overwrite=True replaces only its own outputs: remove it yourself or choose "
                "another path", cli={"overwrite=True": "--overwrite"})
    return target


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
    """Remove a file, link or folder tree if it exists (a link itself, never its target).

    A tree's files are unlinked by a few threads first, folder by folder (a replaced
    prediction's chunk files: the file system frees each one's blocks, mostly waiting,
    not computing). Like ``shutil.rmtree``, it works through open folder handles
    (``os.fwalk``) and never follows a link, even one swapped in while it runs.
    """
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        if hasattr(os, "fwalk"):
            _unlink_files(path)
        shutil.rmtree(path)


def _unlink_files(path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8, thread_name_prefix="vesuvius-dask-remove") as pool, \
            contextlib.suppress(OSError):
        for _, _, names, folder in os.fwalk(path):  # folder: this folder's handle, open meanwhile
            if len(names) > 1:
                list(pool.map(lambda name, fd=folder: _unlink_quietly(name, fd), names))


def _unlink_quietly(name: str, folder: int) -> None:
    with contextlib.suppress(OSError):  # (rmtree then reports what could not go)
        os.unlink(name, dir_fd=folder)


def replace_path(new: Path, dst: Path, aside: Path) -> None:
    """Rename ``new`` to ``dst``; an existing ``dst`` is first moved to ``aside``.

    ``aside`` (inside the job's partial folder) is removed with that folder. If the
    final rename fails, the old ``dst`` is put back. Signals are held back for the
    duration (see :func:`critical`).
    """
    with critical():
        if not dst.exists() and not dst.is_symlink():
            os.rename(new, dst)
            return
        os.rename(dst, aside)
        try:
            os.rename(new, dst)
        except BaseException:
            os.rename(aside, dst)
            raise


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself while inside (no file is created for it).

    Serialises the short steps in which runs look at, create, publish or remove a
    partial folder, so that one run never removes what another is making. Where
    the file system cannot lock (some network mounts), it goes on without.
    """
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


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


#: Keys of a job's identity described in words when a resume finds them changed.
_DESCRIBED = {
    "source_stamp": "the source's files changed since (sizes or modification times)",
    "mask_stamp": "the mask changed since",
    "model": "the model changed since",
    "metadata": "the source's metadata changed since",
}


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [_DESCRIBED.get(k) or f"{k}: {old.get(k)!r} then, {new.get(k)!r} now"
            for k in keys if old.get(k) != new.get(k)]


def _read_job(partial: Path) -> dict | None:
    """The ``job.json`` of a partial folder, None when it is not one a job of ours made."""
    if partial.is_symlink() or not partial.is_dir():
        return None
    try:
        with open(partial / _JOB_FILE) as f:
            job = json.load(f)
        return job if isinstance(job, dict) and isinstance(job.get("identity"), dict) else None
    except (OSError, ValueError):
        return None


def _progress_text(partial: Path) -> str:
    """How far the interrupted run in ``partial`` got, in words."""
    try:
        with open(partial / "state.json") as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = None
    if isinstance(state, dict) and isinstance(state.get("progress"), dict):
        return "checkpoint after " + ", ".join(f"{v} {k}" for k, v in state["progress"].items())
    if state is not None or (partial / "acc").exists():
        return "no checkpoint yet"
    return f"{len(_Journal(partial / _DONE_FILE).read())} output chunks written"


def _in_the_way(shown: str, partial: Path) -> OutputExistsError:
    return OutputExistsError(f"{shown}: {partial} is in the way and is not an interrupted run of "
                             "vesuvius-dask that can be resumed; remove it and run again")


def _left_by_a_run(shown: str, partial: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{shown}: an interrupted run left {partial} ({_progress_text(partial)}); "
        "pass resume=True to continue it, or overwrite=True to start again",
        cli={"resume=True": "--resume", "overwrite=True": "--overwrite"})


def _locked_by_a_run(partial: Path) -> bool:
    """Whether a live run holds the partial folder's lock (taken and dropped at once to see)."""
    try:
        import fcntl

        fd = os.open(partial / _LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def check_job(dst: str | os.PathLike, inputs: Iterable[Any] = (), *, overwrite: bool = False,
              resume: bool = False) -> None:
    """What :class:`OutputJob` would refuse, checked before any work starts; nothing is created.

    :func:`check_destination`, then the leftovers of an interrupted run: one that is
    not ours is in the way; one of ours needs ``resume`` or ``overwrite``.
    """
    target = check_destination(dst, inputs, overwrite=overwrite)
    partial = target.parent / f".{target.name}.partial"
    if not (partial.exists() or partial.is_symlink()):
        return
    if _read_job(partial) is None:
        raise _in_the_way(os.fspath(dst), partial)
    if _locked_by_a_run(partial):
        raise OutputExistsError(
            f"{os.fspath(dst)}: another run is writing it right now ({partial} is locked)")
    if not (resume or overwrite):
        raise _left_by_a_run(os.fspath(dst), partial)


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
        Replace an existing output of ours once the new output is complete; also
        discard an interrupted run's leftovers.
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
        self.shown = os.fspath(dst)
        self.what = what
        self.dst = _destination(dst)
        self.partial = self.dst.parent / f".{self.dst.name}.partial"
        self.data = self.partial / "data"
        self.identity = json.loads(json.dumps(identity))
        self.resumed = False
        self._lock_fd: int | None = None
        check_output(dst, inputs)
        if not self.dst.parent.is_dir():
            raise OutputError(f"output {self.shown}: its folder {self.dst.parent} does not exist")
        started = False
        try:
            with _folder_lock(self.dst.parent):
                leftovers = self.partial.exists() or self.partial.is_symlink()
                if leftovers:
                    self._claim_leftovers()
                    self._recover_publish()
                try:
                    check_destination(dst, inputs, overwrite=overwrite)
                    if self.partial.exists():
                        self._leftovers(overwrite, resume)
                    elif resume:
                        logger.warning("%s %s: nothing to resume (no interrupted run's %s); starting a "
                                       "fresh run", what, self.shown, self.partial.name)
                except BaseException:
                    self._unlock()
                    raise
                if not self.resumed:
                    started = True  # (set first: a signal may land as _start returns)
                    self._start()
            self.journal = _Journal(self.partial / _DONE_FILE)
        except BaseException:  # a signal before the caller holds the job: the new folder goes
            if started and self._lock_fd is not None:  # (_start failing cleaned up and unlocked)
                with critical():  # removed while locked: no other run can claim it meanwhile
                    remove_path(self.partial)
                    self._unlock()
            raise

    def _start(self) -> None:
        try:
            self.partial.mkdir(mode=0o755)
            self._lock()
            write_json_atomic(self.partial / _JOB_FILE, {"identity": self.identity,
                                                        "pid": os.getpid(), "what": self.what})
        except BaseException:  # a signal (or a full disk) while starting: leave nothing
            with critical():
                self._unlock()
                remove_path(self.partial)
            raise

    # -- leftovers ------------------------------------------------------------
    def _claim_leftovers(self) -> None:
        """Take the lock of an interrupted run's partial folder, or refuse (busy, or not ours)."""
        if _read_job(self.partial) is None:
            raise _in_the_way(self.shown, self.partial)
        self._lock()

    def _recover_publish(self) -> None:
        """Finish or undo a publish that a kill cut short (see :meth:`publish`)."""
        plan = self.load_state(_PUBLISH_FILE)
        if isinstance(plan, dict) and plan.get("aside"):
            aside = self.partial / str(plan["aside"])
            if aside.exists() and not (self.dst.exists() or self.dst.is_symlink()):
                os.rename(aside, self.dst)  # the user's previous output comes back
                logger.warning("%s: restored the previous output (a replace was cut short)", self.shown)
            if not self.data.exists() and self.dst.exists():  # the new output had moved in: done
                self._unlock()
                remove_path(self.partial)
                return
            remove_path(aside)
            (self.partial / _PUBLISH_FILE).unlink(missing_ok=True)
        # the aside of the publish before the partial folder held it (earlier releases)
        legacy = self.dst.parent / f".{self.dst.name}.old"
        if legacy.is_dir() and not self.dst.exists() and is_our_output(legacy):
            os.rename(legacy, self.dst)
            logger.warning("%s: restored the previous output from %s", self.shown, legacy.name)

    def _leftovers(self, overwrite: bool, resume: bool) -> None:
        job = _read_job(self.partial) or {}
        old_identity = job.get("identity", {})
        done = self._progress_text()
        if resume:
            diffs = _differences(old_identity, self.identity)
            if diffs:
                raise ResumeError(
                    f"{self.shown}: cannot resume the interrupted run in {self.partial.name}: "
                    f"{'; '.join(diffs)}; pass overwrite=True to start again",
                    cli={"overwrite=True": "--overwrite"})
            self.resumed = True
            logger.info("%s %s: resuming an interrupted run (%s)", self.what, self.shown, done)
            return
        if overwrite:
            logger.warning("%s %s: discarding an interrupted run's leftovers %s (%s)",
                           self.what, self.shown, self.partial.name, done)
            self._unlock()
            remove_path(self.partial)
            return
        raise _left_by_a_run(self.shown, self.partial)

    def _progress_text(self) -> str:
        return _progress_text(self.partial)

    def _lock(self) -> None:
        if self._lock_fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        fd = os.open(self.partial / _LOCK_FILE,
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
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

    def checkpointed(self) -> bool:
        """Whether finished work would be lost by removing the partial folder."""
        state = self.load_state("state.json")
        if isinstance(state, dict) and state.get("progress"):
            return True
        return bool(self.journal._buffer) or bool(self.journal.read())

    # -- endings -----------------------------------------------------------------
    def publish(self, extra: Sequence[tuple[Path, Path]] = ()) -> None:
        """Move the finished output into place (replacing the old one) and clean up.

        Parameters
        ----------
        extra : sequence of (built, destination)
            Side files (a PNG preview) built in the partial folder, each copied to a
            temporary name beside its destination and renamed over it first.
        """
        with critical(finishing=True), _folder_lock(self.dst.parent):
            for built, target in extra:
                _publish_file(Path(built), _destination(target))
            aside = "old"
            self.save_state(_PUBLISH_FILE, {"aside": aside})
            replace_path(self.data, self.dst, self.partial / aside)
            self._unlock()
            remove_path(self.partial)

    def abandon(self, keep: bool | None = None) -> str | None:
        """Stop after an error or signal: remove the partial output, or keep it for resume.

        Parameters
        ----------
        keep : bool, optional
            Keep the partial folder (default: when this run resumed one or has
            checkpointed, so that finished work is never lost).

        Returns
        -------
        str or None
            When the partial folder is kept, one sentence saying where and how to
            resume it or remove it.
        """
        with critical(), _folder_lock(self.dst.parent):
            if keep is None:
                keep = self.resumed or self.checkpointed()
            if keep:
                with contextlib.suppress(OSError):
                    self.journal.flush()
                progress = self._progress_text()
                self._unlock()
                return (f"the finished part is kept in {self.partial} ({progress}): run again with "
                        f"resume=True to continue it, or remove that folder to start again")
            self._unlock()
            remove_path(self.partial)
            return None

    def stopped(self, err: BaseException) -> None:
        """:meth:`abandon` after ``err``; a kept partial folder is added to ``err``'s message.

        So the one line the command line prints says both what stopped the job and
        how to resume it.
        """
        kept = self.abandon()
        if kept is None:
            return
        if len(err.args) == 1 and isinstance(err.args[0], str) and hasattr(err, "cli"):
            err.args = (f"{err.args[0]}; {kept}",)
            err.cli.setdefault("resume=True", "--resume")
            if isinstance(err, Interrupted):
                err.kept = True
        else:
            logger.warning("%s %s: %s", self.what, self.shown, kept)


def _publish_file(built: Path, target: Path) -> None:
    """Copy ``built`` to an exclusive temporary file beside ``target``, then rename it over ``target``."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f, open(built, "rb") as src:
            shutil.copyfileobj(src, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    """The process's umask (from ``/proc`` where it can be read without changing it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
