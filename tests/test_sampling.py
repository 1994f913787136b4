import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vesuvius_dask.errors import SamplingError
from vesuvius_dask.sampling.starts import EpochPlan, FeistelPermutation, StartGrid


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), k1=st.integers(0, 2**32), k2=st.integers(0, 100))
def test_feistel_is_a_bijection(n, k1, k2):
    perm = FeistelPermutation(n, [k1, k2])
    values = perm(np.arange(n))
    assert values.min() >= 0 and values.max() < n
    assert np.unique(values).size == n


def test_feistel_large_domain_is_lazy_and_distinct():
    n = 65 * 8000 * 8000
    perm = FeistelPermutation(n, [7])
    idx = np.arange(0, 200_000)
    values = perm(idx)
    assert values.max() < n and np.unique(values).size == idx.size
    # the same index always maps to the same value; different keys differ
    np.testing.assert_array_equal(perm(idx[:10]), values[:10])
    assert not np.array_equal(FeistelPermutation(n, [8])(idx[:10]), values[:10])


def test_feistel_looks_shuffled():
    values = FeistelPermutation(10_000, [1])(np.arange(10_000))
    # not the identity and little correlation with the input order
    assert abs(np.corrcoef(np.arange(10_000), values)[0, 1]) < 0.05


@settings(max_examples=50, deadline=None)
@given(shape=st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(1, 30)),
       data=st.data())
def test_start_grid_bounds(shape, data):
    block = tuple(data.draw(st.integers(1, s)) for s in shape)
    stride = tuple(data.draw(st.integers(1, 7)) for _ in shape)
    grid = StartGrid(shape, block, stride)
    starts = grid.unravel(np.arange(grid.n))
    assert np.unique(starts, axis=0).shape[0] == grid.n
    for a in range(3):
        assert starts[:, a].min() == 0
        assert starts[:, a].max() + block[a] <= shape[a]
        assert np.all(starts[:, a] % stride[a] == 0)
        # maximal: one more stride would fall outside
        assert starts[:, a].max() + stride[a] + block[a] > shape[a]
    np.testing.assert_array_equal(grid.ravel(starts), np.arange(grid.n))


def test_start_grid_block_too_large():
    with pytest.raises(SamplingError,
                       match=r"vol7: block y_size=20 is larger than the volume's y axis \(10\)"):
        StartGrid((5, 10, 10), (1, 20, 1), (1, 1, 1), name="vol7")


def _collect(plan, batch):
    labels, ranks = [], []
    for _, lab, rnk in plan.batches(batch):
        labels.append(lab)
        ranks.append(rnk)
    return np.concatenate(labels), np.concatenate(ranks)


@pytest.mark.parametrize("method", ["uniform", "proportional"])
def test_plan_draws_each_start_once(method):
    n_starts = [7, 300, 40]
    plan = EpochPlan(n_starts, sum(n_starts), method, seed=3, epoch=0)
    labels, ranks = _collect(plan, 16)
    assert labels.size == sum(n_starts)
    for v, n in enumerate(n_starts):
        assert sorted(ranks[labels == v].tolist()) == list(range(n))


@pytest.mark.parametrize("method", ["uniform", "proportional"])
def test_plan_does_not_depend_on_batch_size(method):
    plan = EpochPlan([1000, 170_000], 100_000, method, seed=11, epoch=2)
    a = _collect(plan, 7)
    b = _collect(plan, 4096)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_plan_select_splits_batches():
    plan = EpochPlan([500, 500], 1000, "uniform", seed=1, epoch=0)
    full = list(plan.batches(64))
    even = list(plan.batches(64, select=lambda b: b % 2 == 0))
    assert [b for b, _, _ in even] == [b for b, _, _ in full if b % 2 == 0]


def test_plan_epochs_differ_and_repeat():
    a = _collect(EpochPlan([100, 100], 150, "uniform", 5, 0), 32)[0]
    b = _collect(EpochPlan([100, 100], 150, "uniform", 5, 0), 32)[0]
    c = _collect(EpochPlan([100, 100], 150, "uniform", 5, 1), 32)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_too_many_samples():
    with pytest.raises(SamplingError, match="more than the 30 block starts"):
        EpochPlan([10, 20], 31, "uniform", 0, 0)


def test_unknown_method():
    with pytest.raises(SamplingError, match="unknown sampling_method 'random'"):
        EpochPlan([10], 5, "random", 0, 0)


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 16), st.integers(1, 40), st.integers(1, 40)),
       chunks=st.tuples(st.integers(1, 8), st.integers(1, 16), st.integers(1, 16)),
       run=st.integers(1, 20), mix=st.integers(1, 5), masked=st.booleans(), data=st.data())
def test_locality_permutation_is_a_bijection(shape, chunks, run, mix, masked, data):
    # of all starts, or (masked) of the valid starts, as valid-start indices
    from vesuvius_dask.sampling.starts import LocalityPermutation, MaskedStartGrid

    block = tuple(data.draw(st.integers(1, s)) for s in shape)
    stride = tuple(data.draw(st.integers(1, 4)) for _ in shape)
    grid = StartGrid(shape, block, stride)
    if masked:
        rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
        mask = rng.random(shape[1:]) < data.draw(st.floats(0.05, 1.0))
        grid = MaskedStartGrid(grid, mask, data.draw(st.floats(0.01, 1.0)))
        if grid.n == 0:
            return
    bounds = [np.array(list(range(0, s, c)) + [s]) for s, c in zip(shape, chunks)]
    perm = LocalityPermutation(grid, bounds, run, mix, [1, 2])
    values = perm(np.arange(grid.n))
    assert np.unique(values).size == grid.n and values.min() == 0 and values.max() == grid.n - 1


def test_locality_runs_stay_in_one_chunk():
    from vesuvius_dask.sampling.starts import LocalityPermutation

    shape, chunks = (16, 256, 256), (4, 64, 64)
    grid = StartGrid(shape, (1, 1, 1), (1, 1, 1))
    bounds = [np.array(list(range(0, s, c)) + [s]) for s, c in zip(shape, chunks)]
    perm = LocalityPermutation(grid, bounds, run=32, mix=4, key=[3])
    starts = grid.unravel(perm(np.arange(4 * 32)))
    cells = {tuple(c) for c in (starts // np.array(chunks)).tolist()}
    assert len(cells) <= 4 * 2  # 4 interleaved runs, each in one cell (or straddling two)


@pytest.mark.slow
def test_masked_locality_runs_stay_in_one_chunk_and_inside_the_mask():
    from vesuvius_dask.sampling.starts import LocalityPermutation, MaskedStartGrid

    shape, chunks = (16, 256, 256), (4, 64, 64)
    yy, xx = np.mgrid[:256, :256]
    mask = (yy - 128) ** 2 + (xx - 100) ** 2 < 90 ** 2
    grid = MaskedStartGrid(StartGrid(shape, (1, 8, 8), (1, 1, 1)), mask, 1.0)
    bounds = [np.array(list(range(0, s, c)) + [s]) for s, c in zip(shape, chunks)]
    perm = LocalityPermutation(grid, bounds, run=32, mix=4, key=[3])
    starts = grid.unravel(perm(np.arange(grid.n)))
    assert all(mask[y:y + 8, x:x + 8].all() for _, y, x in starts[:2000].tolist())
    cells = {tuple(c) for c in (starts[:4 * 32] // np.array(chunks)).tolist()}
    assert len(cells) <= 4 * 2
