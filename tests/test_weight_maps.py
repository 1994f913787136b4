"""WeightMapSampler and coverage filters: frequencies against the weights, the filter rule, splits."""

import json
import warnings

import dask.array as da
import numpy as np
import pytest
from scipy.stats import chisquare
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream, SamplingError, WeightMapSampler
from vesuvius_dask.sampling import Sampler
from vesuvius_dask.sampling.weights import inclusion_probabilities

BLOCK = (4, 8, 8)
STRIDE = (2, 4, 4)


@pytest.fixture(scope="module")
def volumes():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 60000, size=s, dtype=np.uint16) for s in [(8, 40, 40), (8, 24, 36)]]


def _weights(volumes, seed=5):
    rng = np.random.default_rng(seed)
    return [da.from_array(rng.gamma(0.7, size=v.shape), chunks=(4, 16, 16)) for v in volumes]


def _stream(volumes, samples=40, sampler_kw=None, **kw):
    sampler = WeightMapSampler(samples, stride=STRIDE, seed=17, **(sampler_kw or {}))
    return DaskVesuviusStream(volumes, block=BLOCK, sampler=sampler, batch_size=16, return_coords=True, **kw)


def _candidate_index(stream, coords):
    plan = stream.plan
    out = []
    for v, z, y, x in coords.tolist():
        g = plan.base[v]
        out.append(plan.offsets[v] + g.ravel(np.array([z, y, x])))
    return np.asarray(out)


def test_frequencies_follow_the_weights_chi_square(volumes):
    weights = _weights(volumes)
    stream = _stream(volumes, sampler_kw={"weights": weights})
    plan = stream.plan
    # the candidate weight is the weight at the block's centre (start + block // 2)
    w = [wi.compute() for wi in weights]
    expected_w = np.concatenate([wi[2::2, 4::4, 4::4][: g.counts[0], : g.counts[1], : g.counts[2]].ravel()
                                 for wi, g in zip(w, plan.base)])
    np.testing.assert_allclose(plan.candidate_weights, expected_w)
    pi = plan.inclusion
    assert pi.max() < 1  # no certainty candidates: frequencies proportional to the weights
    epochs = 600
    counts = np.zeros(pi.size)
    for epoch in range(epochs):
        idx = _candidate_index(stream, stream.epoch_coords(epoch))
        assert idx.size == 40 and np.unique(idx).size == 40  # exact count, no repeats
        counts += np.bincount(idx, minlength=pi.size)
    # pool candidates into 20 bins of equal expected frequency, so every expectation is large
    order = np.argsort(pi)
    bins = np.searchsorted(np.cumsum(pi[order]) / pi.sum(), np.linspace(0, 1, 21)[1:-1])
    obs = [c.sum() for c in np.split(counts[order], bins)]
    exp = [e.sum() * epochs for e in np.split(pi[order], bins)]
    assert chisquare(obs, exp).pvalue > 1e-3
    uniform = np.full(len(obs), 40 / pi.size) * [len(e) for e in np.split(pi[order], bins)] * epochs
    assert chisquare(obs, uniform * sum(obs) / uniform.sum()).pvalue < 1e-6  # the test has power


def test_heavy_candidates_are_taken_every_epoch():
    pi = inclusion_probabilities(np.array([100.0, 1, 1, 1, 1, 0]), 3)
    assert pi[0] == 1 and pi[-1] == 0 and np.allclose(pi[1:5], 0.5) and np.isclose(pi.sum(), 3)


def test_mean_weights_against_numpy(volumes):
    weights = _weights(volumes)
    stream = _stream(volumes, sampler_kw={"weights": weights, "weight_at": "mean"})
    plan = stream.plan
    for v, wi in enumerate(weights):
        wi = wi.compute()
        g = plan.base[v]
        brute = np.array([[[wi[z:z + 4, y:y + 8, x:x + 8].mean() for x in g.axis_starts(2)]
                           for y in g.axis_starts(1)] for z in g.axis_starts(0)])
        got = plan.candidate_weights[plan.offsets[v]:plan.offsets[v + 1]].reshape(g.counts)
        np.testing.assert_allclose(got, brute)


@pytest.mark.parametrize("dims", [2, 3])
def test_coverage_filter_against_brute_force(volumes, dims):
    rng = np.random.default_rng(dims)
    labels = [(rng.random(v.shape[3 - dims:]) < 0.4).astype(np.uint8) for v in volumes]
    stream = _stream(volumes, samples=20, labels=labels, sampler_kw={"min_label_coverage": 0.42})
    plan = stream.plan
    for v, lab in enumerate(labels):
        g = plan.base[v]
        brute = np.zeros(g.counts, bool)
        for i, z in enumerate(g.axis_starts(0)):
            for j, y in enumerate(g.axis_starts(1)):
                for k, x in enumerate(g.axis_starts(2)):
                    win = lab[y:y + 8, x:x + 8] if dims == 2 else lab[z:z + 4, y:y + 8, x:x + 8]
                    brute[i, j, k] = (win != 0).mean() >= 0.42
        got = plan.candidate_weights[plan.offsets[v]:plan.offsets[v + 1]].reshape(g.counts) > 0
        np.testing.assert_array_equal(got, brute)
        assert 0 < brute.sum() < brute.size  # the rule keeps some and drops some
    for epoch in range(3):
        for v, z, y, x in stream.epoch_coords(epoch).tolist():
            win = labels[v][y:y + 8, x:x + 8] if dims == 2 else labels[v][z:z + 4, y:y + 8, x:x + 8]
            assert (win != 0).mean() >= 0.42


def test_no_background_warns_once(volumes):
    labels = [np.ones(v.shape[1:], np.uint8) for v in volumes]
    for lab in labels:
        lab[:8, :8] = 0
    stream = _stream(volumes, labels=labels, sampler_kw={"min_label_coverage": 0.9})
    with pytest.warns(RuntimeWarning, match="no background block"):
        list(stream)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(stream)  # once per plan
    quiet = _stream(volumes, samples=200, labels=labels)  # with background candidates drawn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(quiet)
    assert quiet.plan.check_background(0) > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_ranks_and_blocks(volumes, workers):
    weights = _weights(volumes)
    single = {tuple(c) for c in _stream(volumes, samples=50, sampler_kw={"weights": weights})
              .epoch_coords(1).tolist()}
    union, counts = [], []
    for rank in range(2):
        stream = _stream(volumes, samples=50, sampler_kw={"weights": weights}, rank=rank, world_size=2)
        stream.set_epoch(1)
        loader = DataLoader(stream, batch_size=None, num_workers=workers, timeout=120 if workers else 0,
                            **({"multiprocessing_context": "fork"} if workers else {}))
        got = []
        for blocks, coords in loader:
            for block, (v, z, y, x) in zip(blocks.numpy(), coords.numpy()):
                np.testing.assert_array_equal(block, volumes[v][z:z + 4, y:y + 8, x:x + 8])
            got.append(coords.numpy())
        coords = np.concatenate(got)
        counts.append(len(coords))
        union += [tuple(c) for c in coords.tolist()]
    assert counts == [25, 25] and set(union) == single


def test_positive_fraction_and_masks(volumes):
    rng = np.random.default_rng(9)
    labels = [(rng.random(v.shape[1:]) < 0.02).astype(np.uint8) for v in volumes]
    masks = [np.ones(v.shape[1:], np.uint8) for v in volumes]
    masks[0][:, 20:] = 0
    stream = _stream(volumes, samples=60, labels=labels, masks=masks,
                     sampler_kw={"weights": _weights(volumes), "positive_fraction": 0.25})
    for epoch in range(3):
        coords = stream.epoch_coords(epoch)
        positive = [labels[v][y:y + 8, x:x + 8].any() for v, _, y, x in coords.tolist()]
        assert sum(positive) == 15
        assert all(masks[v][y:y + 8, x:x + 8].all() for v, _, y, x in coords.tolist())


def test_refusals_and_state(volumes):
    with pytest.raises(SamplingError, match="locality"):
        WeightMapSampler(10, locality=4)
    with pytest.raises(SamplingError, match="weight_at"):
        WeightMapSampler(10, weight_at="max")
    bad = [np.full(v.shape, -1.0) for v in volumes]
    with pytest.raises(SamplingError, match=r"weights\[0\]: weights must be finite and >= 0"):
        _stream(volumes, sampler_kw={"weights": bad})
    with pytest.raises(SamplingError, match=r"weights\[0\]: shape"):
        _stream(volumes, sampler_kw={"weights": [np.ones((2, 2, 2))] * 2})
    sparse = [np.zeros(v.shape) for v in volumes]
    sparse[0][2, 4, 4] = 1
    with pytest.raises(SamplingError, match="only 1 candidates have a weight above 0"):
        _stream(volumes, sampler_kw={"weights": sparse})
    stream = _stream(volumes)
    state = json.loads(json.dumps(stream.sampler.state_dict()))
    assert Sampler.from_state_dict(state) == stream.sampler
    withw = _stream(volumes, sampler_kw={"weights": _weights(volumes)}).sampler.state_dict()
    assert withw["weights"][0].startswith("<array (8, 40, 40)")
