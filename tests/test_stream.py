import os
import pickle
import tracemalloc

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream, SamplingError, open_volume
from vesuvius_dask.errors import InvalidTypeError

BLOCK = (4, 32, 32)


def _source(files):
    """numpy copies of the volumes, to check blocks against plain slicing."""
    out = []
    for f in files:
        out.append(np.asarray(f) if isinstance(f, np.ndarray) else open_volume(f).compute())
    return out


def _check_blocks(items, sources, block=BLOCK):
    z, y, x = block
    seen = []
    for blk, coords in items:
        blk = blk.numpy()
        coords = coords.numpy().reshape(-1, 4)
        blk = blk.reshape((-1,) + tuple(block))
        for b, (v, sz, sy, sx) in zip(blk, coords):
            np.testing.assert_array_equal(b, sources[v][sz:sz + z, sy:sy + y, sx:sx + x])
            seen.append((int(v), int(sz), int(sy), int(sx)))
    return seen


@pytest.fixture()
def mixed_files(zarr_v3, zarr_v2, rng_volume):
    ram = np.ascontiguousarray(rng_volume[:, :100, :120] // 3)
    return [str(zarr_v3), zarr_v2, ram]


@pytest.mark.parametrize("batch_size", [None, 16])
@pytest.mark.parametrize("method", ["uniform", "proportional"])
def test_blocks_equal_numpy_slices(mixed_files, batch_size, method):
    stream = DaskVesuviusStream(mixed_files, *BLOCK, samples_per_epoch=300, seed=1,
                                sampling_method=method, batch_size=batch_size, return_coords=True)
    items = list(stream)
    assert len(items) == len(stream)
    seen = _check_blocks(items, _source(mixed_files))
    assert len(seen) == 300 and len(set(seen)) == 300
    assert {v for v, *_ in seen} == {0, 1, 2}


def test_generic_dask_volume(rng_volume):
    lazy = da.from_array(rng_volume, chunks=(3, 40, 50)).astype(np.float64) * 2  # generic dask
    stream = DaskVesuviusStream([lazy], *BLOCK, samples_per_epoch=200, seed=2,
                                batch_size=50, return_coords=True, dtype=np.float64)
    seen = _check_blocks(stream, [rng_volume.astype(np.float64) * 2])
    assert len(set(seen)) == 200


def test_single_block_shapes_and_dtype(zarr_v3):
    stream = DaskVesuviusStream([zarr_v3], 2, 8, 16, samples_per_epoch=5, seed=0)
    blocks = list(stream)
    assert len(blocks) == 5
    assert all(b.shape == (2, 8, 16) and b.dtype == torch.uint16 for b in blocks)


def test_original_keyword_names_work(zarr_v3):
    stream = DaskVesuviusStream(files=[str(zarr_v3)], z_size=4, y_size=16, x_size=16,
                                samples_per_epoch=10, sampling_method="proportional", shuffle=True)
    assert len(list(stream)) == 10


def test_cache_and_prefetch_off_and_on_agree(mixed_files):
    kw = dict(samples_per_epoch=256, seed=9, batch_size=32, return_coords=True)
    a = list(DaskVesuviusStream(mixed_files, *BLOCK, cache_bytes=0, prefetch=0, **kw))
    b = list(DaskVesuviusStream(mixed_files, *BLOCK, cache_bytes=2**30, prefetch=4, **kw))
    for (x1, c1), (x2, c2) in zip(a, b):
        assert torch.equal(c1, c2) and torch.equal(x1, x2)


def test_each_touched_chunk_read_once_per_batch(zarr_v3):
    stream = DaskVesuviusStream([zarr_v3], *BLOCK, samples_per_epoch=64, seed=4,
                                batch_size=64, return_coords=True, cache_bytes=0, prefetch=0)
    (batch, coords), = list(stream)
    bounds = stream.volumes[0].bounds
    touched = set()
    for _, z, y, x in coords.tolist():
        for cz in range(np.searchsorted(bounds[0], z, "right") - 1,
                        np.searchsorted(bounds[0], z + BLOCK[0] - 1, "right")):
            for cy in range(np.searchsorted(bounds[1], y, "right") - 1,
                            np.searchsorted(bounds[1], y + BLOCK[1] - 1, "right")):
                for cx in range(np.searchsorted(bounds[2], x, "right") - 1,
                                np.searchsorted(bounds[2], x + BLOCK[2] - 1, "right")):
                    touched.add((cz, cy, cx))
    assert stream.engine.stats.chunks_read == len(touched)


def test_cache_avoids_second_decode(zarr_v3):
    stream = DaskVesuviusStream([zarr_v3], *BLOCK, samples_per_epoch=512, seed=4,
                                batch_size=128, prefetch=0)
    list(stream)
    stats = stream.engine.stats
    n_chunks = np.prod([len(c) for c in stream.volumes[0].array.chunks])
    assert stats.chunks_read <= n_chunks  # whole volume fits the cache: each chunk once
    assert stats.cache_hits > 0


def test_no_duplicates_and_epochs(zarr_v3):
    stream = DaskVesuviusStream([zarr_v3], *BLOCK, samples_per_epoch=500, seed=3,
                                return_coords=True, batch_size=100)
    first = np.concatenate([c for _, c in stream])
    second = np.concatenate([c for _, c in stream])  # next iteration: next epoch
    assert len({tuple(r) for r in first.tolist()}) == 500
    assert not np.array_equal(first, second)
    stream.set_epoch(0)
    again = np.concatenate([c for _, c in stream])
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(stream.epoch_coords(0), first)


def test_seed_none_is_fixed_at_construction(zarr_v3):
    stream = DaskVesuviusStream([zarr_v3], *BLOCK, samples_per_epoch=50, return_coords=True)
    stream.set_epoch(0)
    a = np.concatenate([c[None] for _, c in stream])
    stream.set_epoch(0)
    b = np.concatenate([c[None] for _, c in stream])
    np.testing.assert_array_equal(a, b)
    other = DaskVesuviusStream([zarr_v3], *BLOCK, samples_per_epoch=50, return_coords=True)
    assert not np.array_equal(other.epoch_coords(0), stream.epoch_coords(0))


def test_exhausts_every_start(rng_volume):
    vol = rng_volume[:6, :10, :12]
    stream = DaskVesuviusStream([vol], 2, 3, 4, samples_per_epoch=5 * 8 * 9,
                                return_coords=True, seed=0)
    coords = {tuple(c.tolist()) for _, c in stream}
    assert len(coords) == 5 * 8 * 9


def _loader_coords(stream, workers, context=None, epoch=0):
    stream.set_epoch(epoch)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, timeout=120 if workers else 0,
                        multiprocessing_context=context)
    return [c for _, c in loader]


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_split_the_epoch(mixed_files, context):
    stream = DaskVesuviusStream(mixed_files, *BLOCK, samples_per_epoch=600, seed=21,
                                batch_size=32, return_coords=True)
    single = np.concatenate(_loader_coords(stream, 0))
    multi = np.concatenate(_loader_coords(stream, 2, context))
    assert multi.shape[0] == 600
    assert len({tuple(r) for r in multi.tolist()}) == 600
    assert {tuple(r) for r in multi.tolist()} == {tuple(r) for r in single.tolist()}
    other_epoch = np.concatenate(_loader_coords(stream, 2, context, epoch=1))
    assert {tuple(r) for r in other_epoch.tolist()} != {tuple(r) for r in single.tolist()}


def test_dataloader_single_blocks_with_batching(mixed_files):
    stream = DaskVesuviusStream(mixed_files, *BLOCK, samples_per_epoch=200, seed=5,
                                return_coords=True, read_batch=16)
    stream.set_epoch(0)
    loader = DataLoader(stream, batch_size=8, num_workers=2, timeout=120)
    items = [(b, c) for b, c in loader]
    assert sum(b.shape[0] for b, _ in items) == 200
    seen = _check_blocks(items, _source(mixed_files))
    assert len(set(seen)) == 200


def test_fork_after_threaded_compute_does_not_hang(zarr_v3):
    # The user looks at a volume first (dask's threaded scheduler runs in the parent) ...
    vol = open_volume(zarr_v3)
    with dask.config.set(scheduler="threads"):
        vol.mean().compute()
    # ... then trains with forked workers: DataLoader's timeout turns a hang into an error.
    stream = DaskVesuviusStream([zarr_v3], *BLOCK, samples_per_epoch=128, seed=1,
                                batch_size=32, return_coords=True)
    coords = _loader_coords(stream, 2, "fork")
    assert sum(c.shape[0] for c in coords) == 128


def test_pickles(mixed_files):
    stream = DaskVesuviusStream(mixed_files, *BLOCK, samples_per_epoch=64, seed=8,
                                batch_size=16, return_coords=True)
    list(stream)  # warm caches and pools; they must not travel
    clone = pickle.loads(pickle.dumps(stream))
    stream.set_epoch(3)
    clone.set_epoch(3)
    for (a, ca), (b, cb) in zip(stream, clone):
        assert torch.equal(a, b) and torch.equal(ca, cb)


def test_uniform_vs_proportional_frequencies(rng_volume):
    small = rng_volume[:4, :20, :20]      # 1 * 5 * 5 = 25 starts of 4x16x16
    large = rng_volume[:4, :, :]          # 1 * 135 * 155 = 20925 starts
    n = 4000
    counts = {}
    for method in ("uniform", "proportional"):
        s = DaskVesuviusStream([small, large], 4, 16, 16, samples_per_epoch=n, seed=123,
                               sampling_method=method)
        coords = s.epoch_coords(0)
        counts[method] = np.bincount(coords[:, 0], minlength=2)
    # uniform: the small volume is picked half the time until its 25 starts run out
    assert counts["uniform"][0] == 25
    # proportional: expected share 25/20950 -> ~4.8 of 4000; a 5-sigma band
    expected = n * 25 / (25 + 20925)
    assert abs(counts["proportional"][0] - expected) < 5 * np.sqrt(expected) + 1

    big_a = rng_volume[:, :60, :60]
    big_b = rng_volume[:, :, :]
    s = DaskVesuviusStream([big_a, big_b], 4, 16, 16, samples_per_epoch=n, seed=7)
    share = np.bincount(s.epoch_coords(0)[:, 0], minlength=2) / n
    assert abs(share[0] - 0.5) < 5 * np.sqrt(0.25 / n)
    s = DaskVesuviusStream([big_a, big_b], 4, 16, 16, samples_per_epoch=n, seed=7,
                           sampling_method="proportional")
    share = np.bincount(s.epoch_coords(0)[:, 0], minlength=2) / n
    p = s.starts_per_volume[0] / sum(s.starts_per_volume)
    assert abs(share[0] - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_stride_grid(rng_volume):
    stream = DaskVesuviusStream([rng_volume], 4, 32, 32, samples_per_epoch=3 * 4 * 5,
                                stride=(4, 32, 32), return_coords=True, seed=0)
    coords = np.stack([c for _, c in stream])
    assert coords.shape[0] == 60
    assert np.all(coords[:, 1] % 4 == 0) and np.all(coords[:, 2:] % 32 == 0)
    # non-overlapping tiles: every voxel covered at most once
    cover = np.zeros(rng_volume.shape, np.int32)
    for _, z, y, x in coords:
        cover[z:z + 4, y:y + 32, x:x + 32] += 1
    assert cover.max() == 1
    with pytest.raises(SamplingError, match="more than the 60 block starts"):
        DaskVesuviusStream([rng_volume], 4, 32, 32, samples_per_epoch=61, stride=(4, 32, 32))


def test_shuffle_false_is_raster_order(rng_volume):
    stream = DaskVesuviusStream([rng_volume], 4, 32, 32, samples_per_epoch=20, shuffle=False,
                                return_coords=True, seed=0)
    coords = np.stack([c for _, c in stream])[:, 1:]
    expected = stream.grids[0].unravel(np.arange(20))
    np.testing.assert_array_equal(coords, expected)


def test_dtype_handling(rng_volume):
    kw = dict(samples_per_epoch=4, seed=0, return_coords=True)
    b, c = next(iter(DaskVesuviusStream([rng_volume], *BLOCK, **kw)))
    assert b.dtype == torch.uint16
    b, c = next(iter(DaskVesuviusStream([rng_volume], *BLOCK, dtype=torch.float32, **kw)))
    _, z, y, x = c.tolist()
    assert b.dtype == torch.float32
    np.testing.assert_array_equal(b.numpy(), rng_volume[z:z + 4, y:y + 32, x:x + 32].astype(np.float32))
    b, _ = next(iter(DaskVesuviusStream([rng_volume], *BLOCK, dtype=np.int32, **kw)))
    assert b.dtype == torch.int32
    floats = rng_volume.astype(np.float32) / 65535  # 0..1 floats must never become zeros
    b, _ = next(iter(DaskVesuviusStream([floats], *BLOCK, **kw)))
    assert b.dtype == torch.float32 and 0 < b.max() <= 1
    with pytest.raises(SamplingError, match="dtype float32, which dtype=torch.int64 cannot hold"):
        DaskVesuviusStream([floats], *BLOCK, dtype=torch.int64, **kw)
    with pytest.raises(SamplingError, match="uint16, which dtype=torch.int16"):
        DaskVesuviusStream([rng_volume], *BLOCK, dtype=torch.int16, **kw)
    with pytest.raises(SamplingError, match="float16"):
        DaskVesuviusStream([rng_volume], *BLOCK, dtype=torch.float16, **kw)


def test_transform_and_coords(rng_volume):
    stream = DaskVesuviusStream([rng_volume], *BLOCK, samples_per_epoch=8, seed=0,
                                batch_size=4, dtype=torch.float32,
                                transform=lambda t: t * 0 + 1, return_coords=True)
    for b, c in stream:
        assert torch.all(b == 1) and c.shape == (4, 4) and c.dtype == torch.int64


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(z_size=20), SamplingError, r"files\[0\].*z_size=20 is larger than the volume's z axis \(13\)"),
    (dict(y_size=0), SamplingError, "y_size must be a positive integer, got 0"),
    (dict(x_size=-3), SamplingError, "x_size must be a positive integer"),
    (dict(x_size=2.5), InvalidTypeError, "x_size must be a positive integer"),
    (dict(sampling_method="random"), SamplingError, "unknown sampling_method 'random'"),
    (dict(samples_per_epoch=10**9), SamplingError, r"more than the \d+ block starts available"),
    (dict(samples_per_epoch=0), SamplingError, "samples_per_epoch must be a positive"),
    (dict(stride=(1, 0, 1)), SamplingError, r"stride\[y\] must be a positive"),
    (dict(batch_size=0), SamplingError, "batch_size must be a positive"),
    (dict(transform=3), InvalidTypeError, "transform must be callable"),
    (dict(seed=-1), SamplingError, "seed must be non-negative"),
])
def test_bad_input(rng_volume, kwargs, exc, match):
    args = dict(files=[rng_volume], z_size=4, y_size=8, x_size=8, samples_per_epoch=10)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        DaskVesuviusStream(**args)


def test_empty_files():
    with pytest.raises(SamplingError, match="files is empty"):
        DaskVesuviusStream([], 4, 8, 8, samples_per_epoch=1)


def test_bad_volume_is_named(rng_volume, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        DaskVesuviusStream([rng_volume, tmp_path / "missing.zarr"], 4, 8, 8, samples_per_epoch=1)


@pytest.mark.slow
def test_huge_lazy_volume_first_batch_reads_little():
    calls = []

    def fill(block, block_info=None):
        calls.append(block_info[None]["chunk-location"])
        return np.full(block.shape, 7, dtype=np.uint16)

    shape = (65, 8000, 8000)  # 8.3 GB if ever materialised
    lazy = da.zeros(shape, dtype=np.uint16, chunks=(4, 512, 512)).map_blocks(fill, dtype=np.uint16)
    tracemalloc.start()
    stream = DaskVesuviusStream([lazy], 4, 64, 64, samples_per_epoch=10**6, seed=0,
                                batch_size=64, prefetch=0)
    batch = next(iter(stream))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert batch.shape == (64, 4, 64, 64) and torch.all(batch == 7)
    assert len(calls) <= 64 * 8  # only chunks the blocks touch, never the 4352 of the volume
    assert peak < 400 * 2**20


def test_real_crop_blocks(real_crop):
    src = zarr.open(real_crop, mode="r")[:]
    stream = DaskVesuviusStream([str(real_crop)], 4, 64, 64, samples_per_epoch=256, seed=0,
                                batch_size=128, return_coords=True)
    seen = _check_blocks(stream, [src], block=(4, 64, 64))
    assert len(set(seen)) == 256


def _chunked_volume(path, seed):
    """A 16x256x256 random volume in 4x64x64 chunks (256 of them), and its data."""
    data = np.random.default_rng(seed).integers(0, 65535, size=(16, 256, 256), dtype=np.uint16)
    zarr.create_array(path, shape=data.shape, chunks=(4, 64, 64), dtype=data.dtype)[:] = data
    return data


@pytest.mark.slow
def test_locality_keeps_correctness_and_cuts_reads(tmp_path):
    data = _chunked_volume(tmp_path / "big.zarr", 5)
    kw = dict(samples_per_epoch=2048, seed=3, batch_size=64, return_coords=True, prefetch=0,
              cache_bytes=40 * 4 * 64 * 64 * 2)  # 40 chunks: far less than the 256 of the volume
    plain = DaskVesuviusStream([str(tmp_path / "big.zarr")], 4, 16, 16, **kw)
    local = DaskVesuviusStream([str(tmp_path / "big.zarr")], 4, 16, 16, locality=64,
                               locality_mix=4, **kw)
    seen = _check_blocks(list(local), [data], block=(4, 16, 16))
    assert len(set(seen)) == 2048
    list(plain)
    assert local.engine.stats.chunks_read * 3 < plain.engine.stats.chunks_read
    # workers split the same plan with locality on
    multi = np.concatenate(_loader_coords(local, 2, "fork"))
    assert {tuple(r) for r in multi.tolist()} == set(seen)
    with pytest.raises(SamplingError, match="locality needs shuffle=True"):
        DaskVesuviusStream([data], 4, 16, 16, samples_per_epoch=4, shuffle=False, locality=8)


@pytest.mark.parametrize("batch_size", [None, 16])
def test_recycled_outputs_never_overwrite_held_blocks(rng_volume, batch_size):
    # The engine reuses batch arrays nobody references any more; blocks (or views of
    # them) the consumer still holds must keep their values whatever is read after.
    stream = DaskVesuviusStream([rng_volume], 4, 16, 16, samples_per_epoch=400, seed=3,
                                batch_size=batch_size, read_batch=16, return_coords=True)
    kept = []
    for i, (block, coords) in enumerate(stream):
        if i % 3 == 0:
            kept.append((block, coords))  # others are dropped at once: their arrays recycle
    assert len(stream.engine._outputs) <= 4
    for block, coords in kept:
        block, coords = block.reshape(-1, 4, 16, 16), coords.reshape(-1, 4)
        for b, (_, z, y, x) in zip(block, coords.tolist()):
            np.testing.assert_array_equal(b.numpy(), rng_volume[z:z + 4, y:y + 16, x:x + 16])


def _segment(t):
    """The shared-memory segment a received batch lives in (file_system strategy)."""
    return t.untyped_storage()._share_filename_cpu_()[1]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_reuse_released_batches_only(mixed_files, context):
    # Persistent workers, from their second epoch, reuse the shared memory of batches
    # the main process has released, and never that of batches it still holds (or
    # holds views of).
    from vesuvius_dask.loaders.batch_buffers import ShmBatchPool as _ShmBatchPool

    if not _ShmBatchPool._check_layout():
        pytest.skip("torch's shared-memory layout differs here: the pool is off")
    stream = DaskVesuviusStream(mixed_files, *BLOCK, samples_per_epoch=640, seed=4,
                                batch_size=16, return_coords=True)
    loader = DataLoader(stream, batch_size=None, num_workers=2, timeout=120,
                        multiprocessing_context=context, persistent_workers=True)
    stream.set_epoch(0)
    first = list(loader)  # first epoch: a fresh (file-descriptor) segment per batch
    assert len(first) == 40
    del first
    stream.set_epoch(1)
    kept, segments = [], []
    for i, (blocks, coords) in enumerate(loader):
        segments.append(_segment(blocks))
        if i % 3 == 0:
            kept.append((blocks, coords))
        elif i % 3 == 1:
            kept.append((blocks[::2], coords[::2]))  # a view keeps the batch busy too
    assert len(segments) == 40
    assert len(set(segments)) < 30  # released batches were reused ...
    seen = _check_blocks(kept, _source(mixed_files))  # ... held ones never overwritten
    assert len(seen) == 14 * 16 + 13 * 8


def _shm_files(pids):
    """Named shared-memory segments made by these processes (torch_<pid>_...)."""
    return {f for f in os.listdir("/dev/shm") if f.split("_")[:2] in [["torch", str(p)] for p in pids]}


def _run_and_stop(loader, pids, n=3):
    it = iter(loader)
    pids.update(w.pid for w in it._workers)
    for i, _ in enumerate(it):
        if i == n:
            break


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")
def test_early_stops_leave_no_shared_memory_behind(mixed_files):
    # Epochs that stop early drop queued batches unread. With one-epoch workers no
    # named (file_system) segment is made at all; with persistent ones the queue is
    # drained at the next epoch, so /dev/shm does not grow from epoch to epoch.
    stream = DaskVesuviusStream(mixed_files, *BLOCK, samples_per_epoch=640, seed=4,
                                batch_size=16, transform=lambda b: b.to(torch.float32))
    pids: set = set()
    for epoch in range(3):
        stream.set_epoch(epoch)
        _run_and_stop(DataLoader(stream, batch_size=None, num_workers=2, timeout=120), pids)
    assert len(pids) == 6 and _shm_files(pids) == set()
    loader = DataLoader(stream, batch_size=None, num_workers=2, timeout=120,
                        persistent_workers=True)
    pids = set()
    counts = []
    for epoch in range(24):
        stream.set_epoch(epoch)
        _run_and_stop(loader, pids)
        counts.append(len(_shm_files(pids)))
    # each worker: its pool, plus at most prefetch_factor batches (2 tensors each:
    # the raw batch and the transform's output) in the queue; a leak of the queued
    # batches at every early stop would pass this bound within the 24 epochs
    from vesuvius_dask.loaders.batch_buffers import SHM_POOL_BUFFERS as _SHM_POOL_BUFFERS

    assert len(pids) == 2 and max(counts) <= 2 * (_SHM_POOL_BUFFERS + 2 * 2), counts


def test_dataloader_without_reusable_shared_memory(mixed_files, monkeypatch):
    # Where torch's segment layout is not the expected one, every batch gets a fresh
    # segment (the pool is off) and the blocks are still right.
    from vesuvius_dask import shm as stream_mod

    monkeypatch.setattr(stream_mod.ShmBatchPool, "_check_layout", staticmethod(lambda: False))
    stream = DaskVesuviusStream(mixed_files, *BLOCK, samples_per_epoch=160, seed=4,
                                batch_size=16, return_coords=True)
    stream.set_epoch(0)
    loader = DataLoader(stream, batch_size=None, num_workers=2, timeout=120,
                        multiprocessing_context="fork")
    items = list(loader)
    seen = _check_blocks(items, _source(mixed_files))
    assert len(set(seen)) == 160


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_set_epoch_reaches_persistent_workers(mixed_files, context):
    stream = DaskVesuviusStream(mixed_files, *BLOCK, samples_per_epoch=96, seed=2,
                                batch_size=16, return_coords=True)
    expected = {e: {tuple(r) for r in stream.epoch_coords(e).tolist()} for e in (0, 1, 5)}
    loader = DataLoader(stream, batch_size=None, num_workers=2, timeout=120,
                        persistent_workers=True, multiprocessing_context=context)

    def epoch_set():
        return {tuple(r) for c in (c for _, c in loader) for r in c.tolist()}

    stream.set_epoch(0)
    assert epoch_set() == expected[0]
    assert epoch_set() == expected[1]  # no set_epoch: the workers advance by one
    stream.set_epoch(5)                # a jump (e.g. resuming) ...
    assert epoch_set() == expected[5]
    stream.set_epoch(5)                # ... and a repeat reach the running workers
    assert epoch_set() == expected[5]
    assert expected[0] != expected[5]


def test_dataloader_transform_outputs_are_pooled_and_kept_intact(mixed_files):
    # A transform that returns new tensors: the worker copies them into its reused
    # shared memory; batches the main process holds are never overwritten.
    from vesuvius_dask.loaders.batch_buffers import ShmBatchPool as _ShmBatchPool

    if not _ShmBatchPool._check_layout():
        pytest.skip("torch's shared-memory layout differs here: the pool is off")
    stream = DaskVesuviusStream(mixed_files, *BLOCK, samples_per_epoch=480, seed=6,
                                batch_size=16, return_coords=True,
                                transform=lambda b: b.to(torch.float32) * 2 + 1)
    loader = DataLoader(stream, batch_size=None, num_workers=2, timeout=120,
                        persistent_workers=True)
    list(loader)  # the pool starts with a persistent worker's second epoch
    kept, segments = [], []
    for i, (blocks, coords) in enumerate(loader):
        assert blocks.dtype == torch.float32 and blocks.is_shared()
        segments.append(_segment(blocks))
        if i % 2 == 0:
            kept.append((blocks, coords))
    assert len(set(segments)) < len(segments)
    sources = _source(mixed_files)
    z, y, x = BLOCK
    for blocks, coords in kept:
        for b, (v, sz, sy, sx) in zip(blocks.numpy(), coords.tolist()):
            expected = sources[v][sz:sz + z, sy:sy + y, sx:sx + x].astype(np.float32) * 2 + 1
            np.testing.assert_array_equal(b, expected)


@pytest.mark.slow
def test_locality_with_a_mask(tmp_path):
    data = _chunked_volume(tmp_path / "seg.zarr", 8)
    yy, xx = np.mgrid[:256, :256]
    mask = ((yy - 120) ** 2 + (xx - 140) ** 2 < 100 ** 2).astype(np.uint8)
    kw = dict(samples_per_epoch=1536, seed=4, batch_size=64, return_coords=True, prefetch=0,
              masks=[mask], mask_coverage=0.5, cache_bytes=24 * 4 * 64 * 64 * 2)
    plain = DaskVesuviusStream([str(tmp_path / "seg.zarr")], 4, 16, 16, **kw)
    local = DaskVesuviusStream([str(tmp_path / "seg.zarr")], 4, 16, 16, locality=48,
                               locality_mix=4, **kw)
    assert local.starts_per_volume == plain.starts_per_volume
    seen = _check_blocks(list(local), [data], block=(4, 16, 16))
    assert len(set(seen)) == 1536
    assert all(mask[y:y + 16, x:x + 16].mean() >= 0.5 for _, _, y, x in seen)
    list(plain)
    assert local.engine.stats.chunks_read * 2 < plain.engine.stats.chunks_read
    multi = np.concatenate(_loader_coords(local, 2, "fork"))
    assert {tuple(r) for r in multi.tolist()} == set(seen)
    # every valid start, each exactly once, when the epoch asks for all of them
    full = DaskVesuviusStream([str(tmp_path / "seg.zarr")], 4, 16, 16, locality=48,
                              **{**kw, "samples_per_epoch": local.starts_per_volume[0]})
    coords = full.epoch_coords(0)
    assert len({tuple(r) for r in coords.tolist()}) == local.starts_per_volume[0]


def test_set_epoch_warning_once_per_stream(zarr_v3):
    """Fresh workers without set_epoch warn once, not once per worker and epoch."""
    code = (
        "import warnings\n"
        "from torch.utils.data import DataLoader\n"
        "from vesuvius_dask import DaskVesuviusStream\n"
        f"s = DaskVesuviusStream([{str(zarr_v3)!r}], 4, 16, 16, samples_per_epoch=64, batch_size=8)\n"
        "for epoch in range(2):\n"
        "    for _ in DataLoader(s, batch_size=None, num_workers=2, timeout=120):\n"
        "        pass\n")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("call stream.set_epoch(epoch)") == 1, proc.stderr
