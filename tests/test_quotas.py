"""QuotaSampler: exact per-batch group counts over epochs, workers and ranks; hierarchical weights."""

import json
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream, QuotaSampler, SamplingError
from vesuvius_dask.sampling import Sampler
from vesuvius_dask.sampling.quotas import apportion

SHAPES = [(8, 40, 40), (8, 64, 64), (8, 30, 50), (8, 100, 90)]
GROUPS = {"a": [0, 1], "b": [2, 3]}
QUOTAS = {"a": 20, "b": 12}


@pytest.fixture(scope="module")
def volumes():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 60000, size=s, dtype=np.uint16) for s in SHAPES]


def _stream(volumes, samples=320, **kw):
    sampler = QuotaSampler(samples, quotas=QUOTAS, groups=GROUPS, seed=11, **kw.pop("sampler_kw", {}))
    return DaskVesuviusStream(volumes, 4, 16, 16, sampler=sampler, batch_size=32, return_coords=True, **kw)


def _group_counts(coords):
    vols = coords[:, 0]
    return np.isin(vols, GROUPS["a"]).sum(), np.isin(vols, GROUPS["b"]).sum()


def test_quotas_exact_in_every_batch_over_epochs(volumes):
    stream = _stream(volumes, samples=640)
    for epoch in range(6):
        coords = stream.epoch_coords(epoch)
        assert len({tuple(c) for c in coords.tolist()}) == 640  # without replacement
        for batch in coords.reshape(-1, 32, 4):
            assert _group_counts(batch) == (20, 12)
        # hierarchical "equal": every volume of a group gets the same count per epoch
        per_volume = Counter(coords[:, 0].tolist())
        assert per_volume[0] == per_volume[1] == 200 and per_volume[2] == per_volume[3] == 120
    assert not np.array_equal(stream.epoch_coords(0), stream.epoch_coords(1))


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_and_blocks(volumes, workers):
    stream = _stream(volumes)
    stream.set_epoch(3)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, timeout=120 if workers else 0,
                        **({"multiprocessing_context": "fork"} if workers else {}))
    seen = []
    for blocks, coords in loader:
        coords = coords.numpy()
        assert _group_counts(coords) == (20, 12)
        for block, (v, z, y, x) in zip(blocks.numpy(), coords):
            np.testing.assert_array_equal(block, volumes[v][z:z + 4, y:y + 16, x:x + 16])
        seen.append(coords)
    got = np.concatenate(seen)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, stream.epoch_coords(3).tolist()))


def test_ranks_get_whole_batches_with_quotas(volumes):
    single = _stream(volumes).epoch_coords(0)  # 10 batches
    union, counts = [], []
    for rank in range(3):
        stream = _stream(volumes, rank=rank, world_size=3)
        got = [c.numpy() for _, c in stream]
        counts.append(len(got))
        assert len(got) == len(stream)
        for c in got:
            assert _group_counts(c) == (20, 12)
        union += [tuple(c) for c in np.concatenate(got).tolist()]
    assert counts == [4, 4, 4]  # 10 batches padded to 12: equal batches per rank
    assert set(union) == {tuple(c) for c in single.tolist()}
    assert len(union) - len(single) == 2 * 32  # the two padding batches repeat the first ones


def test_volume_weights_size_and_given(volumes):
    size = _stream(volumes, samples=640, sampler_kw={"volume_weights": "size"})
    starts = size.starts_per_volume
    counts = Counter(size.epoch_coords(0)[:, 0].tolist())
    assert counts[0] + counts[1] == 400 and counts[1] > counts[0]
    assert abs(counts[1] / 400 - starts[1] / (starts[0] + starts[1])) < 0.01
    given = _stream(volumes, samples=640, sampler_kw={"volume_weights": [1, 3, 1, 0]})
    counts = Counter(given.epoch_coords(0)[:, 0].tolist())
    assert (counts[0], counts[1], counts[2], counts[3]) == (100, 300, 240, 0)


def test_apportion_caps_small_volumes():
    assert apportion(10, [1, 1, 1], [2, 100, 100]).tolist() == [2, 4, 4]
    assert apportion(7, [1, 1], [100, 100]).tolist() == [4, 3]
    with pytest.raises(SamplingError, match="cannot draw 10"):
        apportion(10, [1, 1], [2, 3])


def test_masks_locality_and_coverage_filter_combine(volumes):
    masks = [np.zeros(s[1:], np.uint8) for s in SHAPES]
    for m in masks:
        m[: m.shape[0] // 2 + 10] = 1
    stream = _stream(volumes, masks=masks, sampler_kw={"locality": 8, "locality_mix": 2})
    coords = stream.epoch_coords(0)
    for v, _, y, x in coords.tolist():
        assert masks[v][y:y + 16, x:x + 16].all()
    for batch in coords.reshape(-1, 32, 4):
        assert _group_counts(batch) == (20, 12)
    labels = [np.zeros(s[1:], np.uint8) for s in SHAPES]
    for lab in labels:
        lab[:, : lab.shape[1] // 2] = 1
    filtered = _stream(volumes, labels=labels, sampler_kw={"min_label_coverage": 0.5})
    for v, _, y, x in filtered.epoch_coords(0).tolist():
        assert (labels[v][y:y + 16, x:x + 16] != 0).mean() >= 0.5


def test_refusals(volumes):
    with pytest.raises(SamplingError, match="batch_size=32"):
        DaskVesuviusStream(volumes, 4, 16, 16, sampler=QuotaSampler(320, quotas=QUOTAS, groups=GROUPS),
                           batch_size=16)
    with pytest.raises(SamplingError, match="not a multiple"):
        QuotaSampler(330, quotas=QUOTAS, groups=GROUPS)
    with pytest.raises(SamplingError, match="same groups"):
        QuotaSampler(320, quotas=QUOTAS, groups={"a": [0]})
    with pytest.raises(SamplingError, match="group 'a' needs 24000"):
        _stream(volumes, samples=32 * 1200)
    with pytest.raises(SamplingError, match="one quota per volume"):
        DaskVesuviusStream(volumes, 4, 16, 16, sampler=QuotaSampler(320, quotas=QUOTAS), batch_size=32)
    with pytest.raises(Exception, match="positive_fraction"):
        DaskVesuviusStream(volumes, 4, 16, 16, sampler=QuotaSampler(320, quotas=QUOTAS, groups=GROUPS),
                           batch_size=32, positive_fraction=0.5)


def test_state_dict_round_trip_and_resume(volumes):
    stream = _stream(volumes)
    state = json.loads(json.dumps(stream.sampler.state_dict()))
    assert Sampler.from_state_dict(state) == stream.sampler
    stream.sampler.load_state_dict(state)
    it = iter(stream)
    next(it), next(it)
    saved = json.loads(json.dumps(stream.state_dict()))
    rest = [c.numpy() for _, c in it]
    again = _stream(volumes)
    again.load_state_dict(saved)
    np.testing.assert_array_equal(np.concatenate([c.numpy() for _, c in again]), np.concatenate(rest))
