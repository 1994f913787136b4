"""Property tests where the arithmetic is.

Piece planning and cutting, masked start counts and the prediction writer's round
trip, each checked against plain numpy.
"""

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vesuvius_dask.engine.batches import BatchEngine
from vesuvius_dask.io.open import resolve_volume
from vesuvius_dask.sampling.starts import MaskedStartGrid, StartGrid
from vesuvius_dask.writers.predict import PredictionWriter


@st.composite
def chunk_grids(draw, shape):
    """Irregular chunking: random cut points along each axis."""
    chunks = []
    for n in shape:
        cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=4)))) if n > 1 else []
        edges = [0] + cuts + [n]
        chunks.append(tuple(b - a for a, b in zip(edges, edges[1:])))
    return tuple(chunks)


@st.composite
def volumes_and_blocks(draw):
    shape = tuple(draw(st.integers(1, n)) for n in (9, 30, 30))
    block = tuple(draw(st.integers(1, s)) for s in shape)
    k = draw(st.integers(1, 12))
    starts = np.array([[draw(st.integers(0, s - b)) for s, b in zip(shape, block)] for _ in range(k)])
    return shape, block, starts, draw(chunk_grids(shape))


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=volumes_and_blocks(), seed=st.integers(0, 2**16))
def test_engine_blocks_equal_numpy_slices_on_any_chunk_grid(case, seed):
    """plan_pieces + cutting, through a dask-backed and a numpy-backed volume."""
    shape, block, starts, chunks = case
    data = np.random.default_rng(seed).integers(0, 60000, shape, dtype=np.uint16)
    lazy = resolve_volume(da.from_array(data, chunks=chunks), name="dask")  # chunk by chunk
    ram = resolve_volume(data, chunks=chunks)                                  # one in-RAM source
    for vol in (lazy, ram):
        got = BatchEngine([vol], block, cache_bytes=0).read(np.zeros(len(starts), int), starts)
        for blk, (z, y, x) in zip(got, starts.tolist()):
            np.testing.assert_array_equal(blk, data[z:z + block[0], y:y + block[1], x:x + block[2]])


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(case=volumes_and_blocks(), seed=st.integers(0, 2**16), fmt=st.sampled_from([2, 3]))
def test_engine_blocks_equal_numpy_slices_from_zarr(tmp_path_factory, case, seed, fmt):
    """The stored-chunk path (_ReadCut) on regular Zarr grids of every chunk size."""
    shape, block, starts, chunks = case
    data = np.random.default_rng(seed).integers(0, 60000, shape, dtype=np.uint16)
    regular = tuple(max(c) for c in chunks)
    arr = zarr.create_array(tmp_path_factory.mktemp("z") / "v.zarr", shape=shape, chunks=regular,
                            dtype=data.dtype, zarr_format=fmt)
    arr[:] = data
    engine = BatchEngine([resolve_volume(arr)], block, cache_bytes=10**6)
    for _ in range(2):  # cold, then from the decoded-chunk cache
        got = engine.read(np.zeros(len(starts), int), starts)
        for blk, (z, y, x) in zip(got, starts.tolist()):
            np.testing.assert_array_equal(blk, data[z:z + block[0], y:y + block[1], x:x + block[2]])


@settings(max_examples=80, deadline=None)
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 24), st.integers(1, 24)),
       data=st.data(), coverage=st.sampled_from([1e-9, 0.25, 0.5, 0.999, 1.0]))
def test_masked_start_counts_equal_brute_force(shape, data, coverage):
    block = tuple(data.draw(st.integers(1, s)) for s in shape)
    stride = tuple(data.draw(st.integers(1, 4)) for _ in range(3))
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=shape[1] * shape[2],
                                       max_size=shape[1] * shape[2]))).reshape(shape[1:])
    grid = StartGrid(shape, block, stride)
    valid = [(z, y, x) for z, y, x in grid.unravel(np.arange(grid.n)).tolist()
             if mask[y:y + block[1], x:x + block[2]].mean() >= coverage - 1e-12
             and mask[y:y + block[1], x:x + block[2]].any()]
    if not valid:
        return  # an empty masked grid is an error elsewhere
    masked = MaskedStartGrid(grid, mask.astype(np.uint8), coverage)
    assert masked.n == len(valid)
    assert [tuple(s) for s in masked.unravel(np.arange(masked.n)).tolist()] == valid


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(data=st.data(), blend=st.sampled_from(["mean", "hann"]), two_d=st.booleans())
def test_prediction_writer_round_trip(tmp_path_factory, data, blend, two_d):
    """Any adds, chunks and memory budget: the output is sum(w*p)/sum(w) computed in numpy."""
    ndim = 2 if two_d else 3
    shape = tuple(data.draw(st.integers(2, 20)) for _ in range(ndim))
    block = tuple(data.draw(st.integers(1, s)) for s in shape)
    chunks = tuple(data.draw(st.integers(1, s)) for s in shape)
    budget = data.draw(st.integers(1, 4)) * 2 * 4 * int(np.prod(chunks))
    n = data.draw(st.integers(1, 12))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    starts = np.array([[rng.integers(0, s - b + 1) for s, b in zip(shape, block)] for _ in range(n)])
    preds = rng.normal(size=(n,) + block).astype(np.float32)
    path = tmp_path_factory.mktemp("w") / "out.zarr"
    writer = PredictionWriter(path, shape, block, chunks=chunks, blend=blend, memory_bytes=budget)
    coords = starts if ndim == 3 else np.column_stack([np.zeros(n, int), starts])
    writer.add(preds, coords)
    out = writer.finalize().compute()
    w = writer.weights
    num = np.zeros(shape, np.float64)
    den = np.zeros(shape, np.float64)
    for p, s in zip(preds, starts.tolist()):
        sl = tuple(slice(a, a + b) for a, b in zip(s, block))
        num[sl] += p * w
        den[sl] += w
    expected = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
