"""DataLoader workers decode each stored chunk once per machine (a decoded-chunk cache in /dev/shm)."""

import os
import warnings

import numpy as np
import pytest
import zarr
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream, chunkio
from vesuvius_dask.shared_cache import SharedChunkCache, shared_memory_dir

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

    def read_file(path):  # the fast chunk path reads the file itself
        note(path)
        return original_file(path)

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
        unshared = _epoch(DaskVesuviusStream([str(tmp_path / "v.zarr")], 4, 32, 32, shared_cache=False,
                                             **kw), 4)
        assert len(unshared) == len(items) and counted() > 1.5 * reads[0]


def test_the_folder_goes_with_its_stream_and_dead_owners_are_swept(tmp_path):
    root = tmp_path / "shm"
    root.mkdir()
    stale = root / "vesuvius-dask-chunks-999999999-abcdef12"  # a pid that cannot exist
    stale.mkdir()
    cache = SharedChunkCache(2**20, root=root)
    assert not stale.exists()
    arr, decoded = cache.get_or_load(("t", 0, 0, 0), lambda: np.arange(10, dtype=np.uint16))
    again, decoded_again = cache.get_or_load(("t", 0, 0, 0), lambda: 1 / 0)  # no second decode
    assert decoded and not decoded_again and np.array_equal(again, np.arange(10))
    assert not list(cache.path.glob("*.tmp"))  # published by rename, nothing half-written
    cache.close()
    assert not cache.path.exists()


def test_the_machine_budget_holds(tmp_path):
    root = tmp_path / "shm"
    root.mkdir()
    cache = SharedChunkCache(64 * 1024, root=root)
    for i in range(40):
        cache.get_or_load(("t", i, 0, 0), lambda: np.zeros(4096, np.uint16))  # 8 KB each
    assert cache.nbytes() <= 64 * 1024 * 1.25
    cache.close()
