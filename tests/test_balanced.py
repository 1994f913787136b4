"""Label-balanced sampling: exact class counts, each class without replacement, any split."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream, SamplingError, open_segment
from vesuvius_dask.io.open import resolve_volume
from vesuvius_dask.sampling.plan import BlockPlan
from vesuvius_dask.testing import write_segment

BLOCK = (4, 16, 16)


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    root = tmp_path_factory.mktemp("bal") / "seg"
    parts = write_segment(root, (12, 160, 200), seed=3)
    return root, parts


def _positive(labels, y, x, coverage=1e-9):
    window = labels[y:y + BLOCK[1], x:x + BLOCK[2]] > 0
    return window.mean() >= coverage and window.any()


def _items(stream, workers):
    if workers == 0:
        return list(stream)
    stream.set_epoch(0)
    return list(DataLoader(stream, batch_size=None, num_workers=workers, timeout=120,
                           multiprocessing_context="fork"))


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.5, 0.8])
@pytest.mark.parametrize("workers", [0, 2])
def test_exact_share_no_duplicates_blocks_equal_numpy(segment, fraction, workers):
    root, parts = segment
    seg = open_segment(root)
    stream = DaskVesuviusStream([seg], *BLOCK, samples_per_epoch=600, batch_size=32, seed=5,
                                labels="segment", masks="segment", mask_coverage=0.75,
                                positive_fraction=fraction, return_coords=True)
    items = _items(stream, workers)
    coords = np.concatenate([c.numpy() for _, _, c in items])
    assert len(coords) == 600 and len({tuple(c) for c in coords.tolist()}) == 600
    positive = [_positive(parts["labels"], y, x) for _, _, y, x in coords.tolist()]
    assert sum(positive) == round(fraction * 600)  # exact, so within 0.01 of the fraction
    for blocks, labels, cs in items:
        for blk, lab, (_, z, y, x) in zip(blocks.numpy(), labels.numpy(), cs.tolist()):
            np.testing.assert_array_equal(blk, parts["volume"][z:z + 4, y:y + 16, x:x + 16])
            np.testing.assert_array_equal(lab, (parts["labels"] * 255)[y:y + 16, x:x + 16])
            assert parts["mask"][y:y + 16, x:x + 16].mean() >= 0.75
    single = DaskVesuviusStream([seg], *BLOCK, samples_per_epoch=600, batch_size=32, seed=5,
                                labels="segment", masks="segment", mask_coverage=0.75,
                                positive_fraction=fraction)
    assert {tuple(c) for c in coords.tolist()} == {tuple(c) for c in single.epoch_coords(0).tolist()}


def test_epochs_differ_and_repeat_with_locality(segment):
    root, parts = segment
    kw = dict(samples_per_epoch=300, seed=2, labels="segment", masks="segment",
              positive_fraction=0.5, locality=16, locality_mix=4)
    stream = DaskVesuviusStream([open_segment(root)], *BLOCK, **kw)
    e0, e1 = stream.epoch_coords(0), stream.epoch_coords(1)
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, DaskVesuviusStream([open_segment(root)], *BLOCK, **kw).epoch_coords(0))
    for coords in (e0, e1):
        assert len({tuple(c) for c in coords.tolist()}) == 300
        assert sum(_positive(parts["labels"], y, x) for _, _, y, x in coords.tolist()) == 150


def test_too_few_positives_gives_the_counts(segment):
    root, _ = segment
    with pytest.raises(SamplingError, match=r"asks for \d+ positive .* there are \d+ positive"):
        DaskVesuviusStream([open_segment(root)], *BLOCK, samples_per_epoch=40_000, labels="segment",
                           masks="segment", positive_fraction=0.9)
    with pytest.raises(SamplingError, match="needs 2-D labels"):
        DaskVesuviusStream([open_segment(root)], *BLOCK, samples_per_epoch=10, positive_fraction=0.5)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), fraction=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       coverage=st.sampled_from([1e-9, 0.5]))
def test_counts_are_exact_for_any_labels(data, fraction, coverage):
    shape = (data.draw(st.integers(1, 5)), data.draw(st.integers(4, 20)), data.draw(st.integers(4, 20)))
    block = (1, data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    cells = shape[1] * shape[2]
    labels = np.array(data.draw(st.lists(st.booleans(), min_size=cells, max_size=cells))).reshape(shape[1:])
    vol = resolve_volume(np.zeros(shape, np.uint16))
    starts = [(y, x) for y in range(shape[1] - block[1] + 1) for x in range(shape[2] - block[2] + 1)]
    pos = sum(1 for y, x in starts if (w := labels[y:y + block[1], x:x + block[2]]).any()
              and w.mean() >= coverage) * shape[0]
    total = len(starts) * shape[0]
    samples = data.draw(st.integers(1, total))
    want = round(fraction * samples)
    if want > pos or samples - want > total - pos:
        with pytest.raises(SamplingError):
            BlockPlan([vol], block, samples, labels_2d=[labels.astype(np.uint8)],
                      positive_fraction=fraction, positive_coverage=coverage)
        return
    plan = BlockPlan([vol], block, samples, seed=1, labels_2d=[labels.astype(np.uint8)],
                     positive_fraction=fraction, positive_coverage=coverage, read_batch=7)
    coords = plan.epoch_coords(0)
    assert len({tuple(c) for c in coords.tolist()}) == samples
    got = sum(1 for _, z, y, x in coords.tolist()
              if (w := labels[y:y + block[1], x:x + block[2]]).any() and w.mean() >= coverage)
    assert got == want
