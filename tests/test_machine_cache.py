"""DataLoader workers decode each stored chunk once per machine (a decoded-chunk cache in /dev/shm)."""

import os
import time
import warnings

import numpy as np
import pytest
import zarr
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream, chunkio
from vesuvius_dask.engine.machine_cache import MachineChunkCache, shared_memory_dir

pytestmark = pytest.mark.skipif(shared_memory_dir() is None, reason="no /dev/shm here")


@pytest.fixture()
def counted(tmp_path, monkeypatch):
    """Every stored-chunk read of any process (forked workers inherit the patch) is a line in a file."""
    log = tmp_path / "reads.log"
    original = zarr.storage.LocalStore.get
    original_file = chunkio.read_file

    def note(key):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, (str(key) + "\n").encode())
        os.close(fd)

    async def get(self, key, *args, **kwargs):
        if key.startswith("c/"):
            note(key)
        return await original(self, key, *args, **kwargs)

    def read_file(path, *args):  # the fast chunk path reads the file itself
        note(path)
        return original_file(path, *args)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    monkeypatch.setattr(chunkio, "read_file", read_file)

    def reads() -> int:
        n = len(log.read_text().split()) if log.exists() else 0
        log.unlink(missing_ok=True)
        return n
    return reads


def _volume(path, shape, chunks):
    arr = zarr.create_array(path, shape=shape, chunks=chunks, dtype="u2")
    data = np.random.default_rng(1).integers(0, 60000, shape, dtype=np.uint16)
    arr[:] = data
    return data


def _epoch(stream, workers):
    stream.set_epoch(0)
    kw = {"multiprocessing_context": "fork", "timeout": 120} if workers else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # more workers than this machine's 2 cores
        return list(DataLoader(stream, batch_size=None, num_workers=workers, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("big", [False, True], ids=["fits the cache", "8x the cache, locality"])
def test_four_workers_read_each_chunk_about_once(tmp_path, counted, big):
    shape, chunks = ((32, 512, 512), (4, 64, 64)) if big else ((16, 512, 512), (4, 128, 128))
    data = _volume(tmp_path / "v.zarr", shape, chunks)
    kw = dict(samples_per_epoch=2048, batch_size=64, seed=0, return_coords=True)
    if big:  # 16 MB volume, 2 MB cache: locality keeps a run's chunks together
        kw.update(cache_bytes=2 * 2**20, locality=32, locality_mix=2)
    reads = {}
    for workers in (0, 4):
        items = _epoch(DaskVesuviusStream([str(tmp_path / "v.zarr")], 4, 32, 32, **kw), workers)
        reads[workers] = counted()
        for blocks, coords in items[:3]:
            for blk, (_, z, y, x) in zip(blocks.numpy(), coords.tolist()):
                np.testing.assert_array_equal(blk, data[z:z + 4, y:y + 32, x:x + 32])
    assert reads[4] <= 1.25 * reads[0], reads
    if not big:  # without sharing, every worker decodes the chunks again
        unshared = _epoch(DaskVesuviusStream([str(tmp_path / "v.zarr")], 4, 32, 32, machine_cache=False,
                                             **kw), 4)
        assert len(unshared) == len(items) and counted() > 1.5 * reads[0]


def test_the_folder_goes_with_its_stream_and_dead_owners_are_swept(tmp_path):
    root = tmp_path / "shm"
    root.mkdir()
    dead = root / "vesuvius-dask-chunks-12-abcdef12"  # its owner.lock is not held by anyone
    dead.mkdir()
    (dead / "owner.lock").touch()
    legacy_old = root / "vesuvius-dask-chunks-999999999-abcdef13"  # no lock file, a dead pid
    legacy_old.mkdir()
    os.utime(legacy_old, (time.time() - 2 * 86400,) * 2)
    legacy_new = root / "vesuvius-dask-chunks-999999999-abcdef14"  # ... but less than a day old
    legacy_new.mkdir()
    legacy_live = root / f"vesuvius-dask-chunks-{os.getpid()}-abcdef15"  # a live pid, old
    legacy_live.mkdir()
    os.utime(legacy_live, (time.time() - 2 * 86400,) * 2)
    cache = MachineChunkCache(2**20, root=root)
    assert not dead.exists() and not legacy_old.exists()
    assert legacy_new.exists() and legacy_live.exists()
    assert cache.path.is_dir() and (cache.path / "owner.lock").exists()  # made, locked, at once
    arr, decoded = cache.get_or_load(("t", 0, 0, 0), lambda: np.arange(10, dtype=np.uint16))
    again, decoded_again = cache.get_or_load(("t", 0, 0, 0), lambda: 1 / 0)  # no second decode
    assert decoded and not decoded_again and np.array_equal(again, np.arange(10))
    assert not list(cache.path.glob("*.tmp"))  # published by rename, nothing half-written
    MachineChunkCache(2**20, root=root).close()  # another stream's sweep leaves a live owner alone
    assert cache.path.is_dir()
    cache.close()
    assert not cache.path.exists()


def test_the_machine_budget_holds(tmp_path):
    root = tmp_path / "shm"
    root.mkdir()
    cache = MachineChunkCache(64 * 1024, root=root)
    for i in range(40):
        cache.get_or_load(("t", i, 0, 0), lambda: np.zeros(4096, np.uint16))  # 8 KB each
    assert cache.nbytes() <= 64 * 1024 * 1.25
    cache.close()


# -- the owner's lock, not its PID, says whether a folder is in use -----------------------------
_OWNER = """
import os, signal, sys
from pathlib import Path
from vesuvius_dask.engine.machine_cache import MachineChunkCache

cache = MachineChunkCache(2**20, root=Path(sys.argv[1]))
cache.get_or_load(("t", 0), lambda: __import__("numpy").arange(5))
forked = []
for _ in range(2):  # DataLoader-like workers, forked after the cache is made
    pid = os.fork()
    if pid == 0:
        if not forked:  # the first exits normally (its finalizers run: they must not remove the folder)
            sys.exit(0)
        signal.pause()  # the second outlives the owner
    forked.append(pid)
os.waitpid(forked[0], 0)
print(cache.path, forked[1], flush=True)
signal.pause()
"""


def test_a_live_owner_keeps_its_folder_whatever_its_pid_looks_like(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys

    root = tmp_path / "shm"
    root.mkdir()
    real_kill = os.kill
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(root)], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        path, worker = owner.stdout.readline().split()
        worker = int(worker)
        folder = tmp_path / "shm" / os.path.basename(path)
        assert (folder / "t_0.chunk").exists()  # a forked worker that exited left it alone

        def dead(pid, sig):  # another PID namespace: every pid looks dead from here
            raise ProcessLookupError(pid)

        with monkeypatch.context() as m:
            m.setattr(os, "kill", dead)
            MachineChunkCache(2**20, root=root).close()
        assert folder.is_dir()  # its owner holds the lock
        owner.kill()  # no cleanup at all; its forked worker lives on
        owner.wait(timeout=60)
        real_kill(worker, 0)  # (alive)
        with monkeypatch.context() as m:
            m.setattr(os, "kill", dead)
            MachineChunkCache(2**20, root=root).close()
        assert not folder.exists()  # the lock went with its owner; the worker did not keep it
    finally:
        owner.kill()
        owner.wait(timeout=60)
        if worker is not None:
            real_kill(worker, signal.SIGKILL)


def test_a_folder_locked_by_another_process_survives_a_sweep(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "shm"
    root.mkdir()
    folder = root / "vesuvius-dask-chunks-999999999-0000abcd"  # a pid that does not exist here
    folder.mkdir()
    hold = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline()")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder / "owner.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        MachineChunkCache(2**20, root=root).close()
        assert folder.is_dir()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
        MachineChunkCache(2**20, root=root).close()
        assert not folder.exists()
    finally:
        holder.kill()
        holder.wait(timeout=60)


# -- a full or read-only /dev/shm: one warning, the chunk uncached, then no shared cache --------
def test_a_failed_write_warns_once_and_returns_the_chunk(tmp_path, monkeypatch):
    import errno

    from vesuvius_dask.engine import machine_cache as sc

    monkeypatch.setattr(sc, "_warned_pid", None)
    cache = MachineChunkCache(2**20, root=tmp_path)

    def full(target, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(sc, "write_atomic", full)
    with pytest.warns(RuntimeWarning) as caught:
        arr, decoded = cache.get_or_load(("t", 1), lambda: np.arange(7, dtype=np.int16))
        again, decoded_again = cache.get_or_load(("t", 2), lambda: np.ones(3))
    assert len(caught) == 1
    text = str(caught[0].message)
    assert str(tmp_path) in text and "No space left on device" in text and "t_1.chunk" in text
    assert decoded and decoded_again
    assert np.array_equal(arr, np.arange(7)) and np.array_equal(again, np.ones(3))
    assert not cache.usable and not list(cache.path.glob("*.chunk"))
    cache.close()


def test_a_missing_or_unwritable_folder_is_the_same(tmp_path, monkeypatch):
    import shutil

    from vesuvius_dask.engine import machine_cache as sc

    monkeypatch.setattr(sc, "_warned_pid", None)
    cache = MachineChunkCache(2**20, root=tmp_path)
    shutil.rmtree(cache.path)  # e.g. swept once its owner was gone
    with pytest.warns(RuntimeWarning, match="No such file or directory"):
        arr, decoded = cache.get_or_load(("t", 1), lambda: np.arange(4))
    assert decoded and np.array_equal(arr, np.arange(4)) and not cache.usable
    assert not cache.path.exists()  # not made again by a worker
    monkeypatch.setattr(sc, "_warned_pid", None)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            return  # root ignores permissions; the rest is covered above
        with pytest.warns(RuntimeWarning, match="Permission denied"):
            cache = MachineChunkCache(2**20, root=ro)  # cannot even make its folder
        assert not cache.usable
        assert cache.get_or_load(("t", 1), lambda: np.arange(4))[1]
    finally:
        ro.chmod(0o700)


def test_the_engine_reads_without_the_shared_cache_once_it_fails(tmp_path, monkeypatch):
    import errno

    from vesuvius_dask.engine import machine_cache as sc
    from vesuvius_dask.engine.batches import BatchEngine
    from vesuvius_dask.io.open import resolve_volume

    data = _volume(tmp_path / "v.zarr", (8, 128, 128), (4, 32, 32))
    engine = BatchEngine([resolve_volume(tmp_path / "v.zarr")], (4, 16, 16), cache_bytes=2**16)
    monkeypatch.setattr(sc, "_warned_pid", None)
    engine.machine, engine.machine_active = MachineChunkCache(2**20, root=tmp_path), True
    calls = []
    real = engine.machine.get_or_load
    monkeypatch.setattr(engine.machine, "get_or_load", lambda *a: calls.append(1) or real(*a))

    def full(target, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(sc, "write_atomic", full)
    rng = np.random.default_rng(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            starts = np.stack([rng.integers(0, 5, 32), rng.integers(0, 113, 32), rng.integers(0, 113, 32)], 1)
            batch = engine.read(np.zeros(32, np.int64), starts)
            for blk, (z, y, x) in zip(batch, starts.tolist()):
                np.testing.assert_array_equal(blk, data[z:z + 4, y:y + 16, x:x + 16])
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert 1 <= len(calls) <= engine.num_threads  # reads in flight when it failed, then none
    assert engine.stats.chunks_read > len(calls)
    engine.machine.close()


# -- reads from many threads: our own header, no np.load ---------------------------------------
@pytest.mark.slow
def test_many_threads_read_many_entries(tmp_path, monkeypatch):
    import threading

    cache = MachineChunkCache(2**26, root=tmp_path)
    rng = np.random.default_rng(3)
    dtypes = ["u1", "<u2", ">i4", "<f4", "<f8", "?", ">u8"]
    sources = {}
    for i in range(64):
        shape = tuple(int(s) for s in rng.integers(1, 9, int(rng.integers(1, 4))))
        sources[("e", i)] = (rng.integers(0, 200, shape) > 50 if dtypes[i % 7] == "?"
                             else rng.integers(0, 200, shape).astype(dtypes[i % 7]))
        cache.get_or_load(("e", i), lambda i=i: sources[("e", i)])
    monkeypatch.setattr(np, "load", lambda *a, **k: 1 / 0)  # never used to read
    errors, done = [], []
    start = threading.Barrier(16)

    def reader(seed):
        r = np.random.default_rng(seed)
        start.wait()
        try:
            for _ in range(250):
                key = ("e", int(r.integers(64)))
                got = cache.get(key)
                assert got is not None and got.dtype == sources[key].dtype
                np.testing.assert_array_equal(got, sources[key])
                done.append(1)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(done) == 4000
    cache.close()


def test_torn_or_foreign_files_are_misses(tmp_path):
    cache = MachineChunkCache(2**20, root=tmp_path)
    cache.get_or_load(("a",), lambda: np.arange(100, dtype="<u4"))
    good = cache._file(("a",)).read_bytes()
    for bad in (good[:-1], good + b"x", b"VDCHUNK2" + good[8:], good[:50], b""):
        cache._file(("b",)).write_bytes(bad)
        assert cache.get(("b",)) is None
    np.save(cache.path / "c.npy", np.arange(3))
    os.replace(cache.path / "c.npy", cache._file(("c",)))
    assert cache.get(("c",)) is None
    arr, decoded = cache.get_or_load(("b",), lambda: np.arange(5))  # a bad file is decoded again
    assert decoded and np.array_equal(arr, np.arange(5))
    cache.close()
