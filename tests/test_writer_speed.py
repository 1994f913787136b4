"""The vectorised PredictionWriter against a plain reference accumulator.

The writer adds each batch per output chunk (numpy slices) and, after ``expect``, writes
each chunk as soon as its last block is added; a reference written here adds block after
block into one whole-output array. Both add each voxel's terms in the same order, so the
outputs are equal to the bit, whatever the shapes, the memory budget and the plan.
With ``exact=False`` a plan that is a full grid is weighted up front by ``w / Σ w``
(``PlanWeights``): equal to the reference up to float32 rounding, and exactly the
prediction where one block covers a voxel.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vesuvius_dask.errors import OutputError, SamplingError
from vesuvius_dask.writers.predict import PredictionWriter, blend_window


def coords(starts):
    """``[z, y, x]`` as the writer takes them (2-D outputs use ``y, x``)."""
    a = np.asarray(starts, dtype=np.int64).reshape(len(starts), -1)
    return np.concatenate([np.zeros((len(a), 1), np.int64), a], axis=1) if a.shape[1] == 2 else a


def reference(shape, block, starts, preds, blend, fill=0.0):
    """Σ w·p / Σ w, block after block, over the whole output in one array."""
    s = np.zeros(shape, np.float32)
    w = np.zeros(shape, np.float32)
    win = blend_window(block, blend)
    for p, start in zip(preds, starts):
        region = tuple(slice(a, a + b) for a, b in zip(start, block))
        s[region] += p * win
        w[region] += win
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(w > 0, s / np.where(w > 0, w, 1), fill).astype(np.float32)


@st.composite
def layouts(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(3, 23)) for _ in range(ndim))
    block = tuple(draw(st.integers(1, n)) for n in shape)
    chunks = tuple(draw(st.integers(1, n)) for n in shape)
    n = draw(st.integers(1, 14))
    starts = [tuple(draw(st.integers(0, s - b)) for s, b in zip(shape, block)) for _ in range(n)]
    batch = draw(st.integers(1, 5))
    memory = draw(st.sampled_from([0, 10**9]))  # every chunk pushed out, or none
    plan = draw(st.booleans())
    blend = draw(st.sampled_from(["hann", "mean"]))
    return shape, block, chunks, starts, batch, memory, plan, blend


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layouts())
def test_equal_to_reference(tmp_path_factory, layout):
    shape, block, chunks, starts, batch, memory, plan, blend = layout
    rng = np.random.default_rng(len(starts))
    preds = rng.random((len(starts), *block), dtype=np.float32)
    out = tmp_path_factory.mktemp("w") / "out.zarr"
    writer = PredictionWriter(out, shape, block, chunks=chunks, blend=blend, memory_bytes=memory,
                              fill_value=-1.0)
    if plan:
        writer.expect(coords(starts))
        assert not writer.plan_weights  # exact by default, full grid or not
    for i in range(0, len(starts), batch):
        writer.add(preds[i:i + batch], coords(starts[i:i + batch]))
    got = np.asarray(writer.finalize())
    want = reference(shape, block, starts, preds, blend, fill=-1.0)
    assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()


def assert_rounding_close(got, want, scale=1.0):
    """Equal up to float32 rounding of sums of a few terms of size ``scale``."""
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * scale)


@st.composite
def grids(draw):
    """A full grid plan: every combination of per-axis starts (the last flush with the end), m times."""
    ndim = draw(st.sampled_from([2, 3]))
    shape, block, axes = [], [], []
    for _ in range(ndim):
        b = draw(st.integers(1, 9))
        n = draw(st.integers(b, 30))
        step = draw(st.integers(1, b))
        starts = list(range(0, n - b + 1, step))
        if starts[-1] != n - b:
            starts.append(n - b)
        shape.append(n)
        block.append(b)
        axes.append(starts)
    chunks = tuple(draw(st.integers(1, n)) for n in shape)
    m = draw(st.integers(1, 3))
    starts = [tuple(c) for c in itertools.product(*axes)] * m
    order = draw(st.permutations(range(len(starts)))) if draw(st.booleans()) else range(len(starts))
    return (tuple(shape), tuple(block), chunks, [starts[i] for i in order], draw(st.integers(1, 7)),
            draw(st.sampled_from([0, 10**9])), draw(st.sampled_from(["hann", "mean"])))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grids(), st.booleans())
def test_full_grid_plans_weight_up_front(tmp_path_factory, layout, torch_alone):
    """With torch's fused additions (one intra-op thread, as predict on a small machine) or numpy's."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1 if torch_alone else max(2, before))
    try:
        check_full_grid(tmp_path_factory, layout)
    finally:
        torch.set_num_threads(before)


def check_full_grid(tmp_path_factory, layout):
    """A full grid plan (any order, repeated, any chunks and budget) is weighted up front.

    The weights sum to one, the output is the reference up to rounding, and a voxel one
    block covers is that block's value.
    """
    shape, block, chunks, starts, batch, memory, blend = layout
    rng = np.random.default_rng(len(starts))
    preds = rng.standard_normal((len(starts), *block), dtype=np.float32)
    out = tmp_path_factory.mktemp("g") / "out.zarr"
    writer = PredictionWriter(out, shape, block, chunks=chunks, blend=blend, memory_bytes=memory,
                              exact=False)
    writer.expect(coords(starts))
    assert writer.plan_weights
    ones = np.zeros(shape, np.float64)  # Σ of the normalised weights: 1 everywhere
    cover = np.zeros(shape, np.int64)
    for start in starts:
        region = tuple(slice(a, a + b) for a, b in zip(start, block))
        ones[region] += writer._plan.weights(start)
        cover[region] += 1
    np.testing.assert_allclose(ones, 1.0, rtol=1e-6)
    for i in range(0, len(starts), batch):
        writer.add(preds[i:i + batch], coords(starts[i:i + batch]))
    got = np.asarray(writer.finalize())
    want = reference(shape, block, starts, preds, blend)
    assert_rounding_close(got, want, scale=float(np.abs(preds).max()))
    single = np.zeros(shape, np.float32)
    for p, start in zip(preds, starts):
        single[tuple(slice(a, a + b) for a, b in zip(start, block))] = p
    assert (got[cover == 1] == single[cover == 1]).all()


def test_plans_that_are_not_full_grids_keep_the_exact_sums(tmp_path):
    shape, block = (10, 10), (4, 4)
    full = [(y, x) for y in (0, 3, 6) for x in (0, 3, 6)]
    cases = {"a block missing": full[:-1], "a gap": [(y, x) for y in (0, 6) for x in (0, 3, 6)],
             "uneven repeats": full + full[:1],
             "not reaching the end": [(y, x) for y in (0, 3) for x in (0, 3, 6)]}
    for name, starts in cases.items():
        writer = PredictionWriter(tmp_path / f"{len(name)}.zarr", shape, block, chunks=(5, 5), exact=False)
        writer.expect(coords(starts))
        assert not writer.plan_weights, name
        writer.abort(keep=False)


def test_a_full_grid_plan_refuses_other_blocks_and_an_early_finalize(tmp_path):
    shape, block = (10, 10), (4, 4)
    starts = [(y, x) for y in (0, 3, 6) for x in (0, 3, 6)]
    writer = PredictionWriter(tmp_path / "o.zarr", shape, block, chunks=(5, 5), exact=False)
    writer.expect(coords(starts))
    with pytest.raises(SamplingError, match=r"block at \(1, 3\) is not in the plan"):
        writer.add(np.ones((1, *block), np.float32), coords([(1, 3)]))
    writer.add(np.ones((4, *block), np.float32), coords(starts[:4]))
    with pytest.raises(SamplingError, match=r"4 output chunk\(s\) wait for blocks of the plan .*5 of its 9"):
        writer.finalize()
    writer.add(np.ones((5, *block), np.float32), coords(starts[4:]))
    np.testing.assert_allclose(np.asarray(writer.finalize()), 1.0, rtol=1e-6)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plan_writes_chunks_early_and_refuses_extra_blocks(tmp_path, zarr_format):
    shape, block, chunks = (12, 12), (4, 4), (6, 6)
    starts = np.array([[0, 0], [0, 4], [4, 0], [8, 8]])
    writer = PredictionWriter(tmp_path / "o.zarr", shape, block, chunks=chunks)
    writer.expect(coords(starts), zarr_format=zarr_format)
    writer.add(np.ones((3, *block), np.float32), coords(starts[:3]))
    writer._pool.wait()
    early = zarr.open_array(writer.job.data, mode="r")
    assert early.metadata.zarr_format == zarr_format
    assert (np.asarray(early[:6, :6])[:4, :4] == 1).all()  # chunk (0, 0) complete: written already
    with pytest.raises(SamplingError, match="already complete"):
        writer.add(np.ones((1, *block), np.float32), [[0, 0, 0]])
    writer.add(np.full((1, *block), 2, np.float32), coords(starts[3:]))
    got = np.asarray(writer.finalize(zarr_format=zarr_format))
    assert (got[8:, 8:] == 2).all() and got[6, 6] == 0


@pytest.mark.parametrize("exact", [True, False])
def test_plan_resume_from_checkpoint(tmp_path, exact):
    """A kill after a checkpoint that wrote chunks early: the resumed run equals an uninterrupted one."""
    shape, block, chunks = (4, 30, 30), (4, 10, 10), (4, 10, 10)
    starts = np.array([[0, y, x] for y in range(0, 21, 5) for x in range(0, 21, 5)])
    preds = np.random.default_rng(1).random((len(starts), *block), dtype=np.float32)
    whole = PredictionWriter(tmp_path / "whole.zarr", shape, block, chunks=chunks, exact=exact)
    whole.expect(starts)
    for i in range(0, len(starts), 4):
        whole.add(preds[i:i + 4], starts[i:i + 4])
    want = np.asarray(whole.finalize())
    ref = reference(shape, block, starts, preds, "hann")
    if exact:
        assert want.view(np.uint32).tobytes() == ref.view(np.uint32).tobytes()
    else:
        assert_rounding_close(want, ref)
    out = tmp_path / "o.zarr"
    w1 = PredictionWriter(out, shape, block, chunks=chunks, memory_bytes=0, exact=exact)
    w1.expect(starts)
    for i in range(0, 12, 4):
        w1.add(preds[i:i + 4], starts[i:i + 4])
    w1.checkpoint({"batches": 3})
    w1.add(preds[12:16], starts[12:16])  # after the checkpoint: lost with the "kill"
    w1._pool.wait()
    w1._pool.close()
    w1.job._unlock()
    w2 = PredictionWriter(out, shape, block, chunks=chunks, memory_bytes=0, resume=True, exact=exact)
    assert w2.progress == {"batches": 3}
    w2.expect(starts)
    assert w2.plan_weights is not exact
    for i in range(12, len(starts), 4):
        w2.add(preds[i:i + 4], starts[i:i + 4])
    got = np.asarray(w2.finalize())
    assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()


def test_a_checkpoint_of_the_exact_sums_resumes_with_them(tmp_path):
    """A checkpoint holding Σw·p and Σw resumes adding both: the bits of the reference.

    (An earlier release's checkpoint, or adds before expect(): never mixed with plan weights.)
    """
    shape, block, chunks = (4, 30, 30), (4, 10, 10), (4, 10, 10)
    starts = np.array([[0, y, x] for y in range(0, 21, 5) for x in range(0, 21, 5)])
    preds = np.random.default_rng(2).random((len(starts), *block), dtype=np.float32)
    want = reference(shape, block, starts, preds, "hann")
    out = tmp_path / "o.zarr"
    w1 = PredictionWriter(out, shape, block, chunks=chunks, memory_bytes=0, exact=False)
    w1.add(preds[:8], starts[:8])  # before expect(): the exact sums
    w1.expect(starts)
    assert not w1.plan_weights
    w1.checkpoint({"batches": 2})
    w1._pool.wait()
    w1._pool.close()
    w1.job._unlock()
    w2 = PredictionWriter(out, shape, block, chunks=chunks, memory_bytes=0, resume=True, exact=False)
    w2.expect(starts)
    assert not w2.plan_weights
    w2.add(preds[8:], starts[8:])
    got = np.asarray(w2.finalize())
    assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()


def grid_writer(tmp_path, name="o.zarr", **kw):
    shape, block = (10, 10), (4, 4)
    starts = [(y, x) for y in (0, 3, 6) for x in (0, 3, 6)]
    writer = PredictionWriter(tmp_path / name, shape, block, chunks=(5, 5), exact=False, **kw)
    return writer, starts, block


def test_a_full_grid_plan_refuses_a_block_added_twice(tmp_path):
    """Adding one block twice and another never would pass every chunk's count: refused at the second add."""
    writer, starts, block = grid_writer(tmp_path)
    writer.expect(coords(starts))
    writer.add(np.ones((1, *block), np.float32), coords(starts[:1]))
    with pytest.raises(SamplingError, match=r"block at \(0, 0\) was added more often than the plan"):
        writer.add(np.ones((1, *block), np.float32), coords(starts[:1]))
    with pytest.raises(SamplingError, match="added more often"):  # twice in one batch
        writer.add(np.ones((2, *block), np.float32), coords([starts[1], starts[1]]))


def test_a_full_grid_plan_refuses_another_plan_and_finalize_of_untouched_chunks(tmp_path):
    writer, starts, block = grid_writer(tmp_path)
    writer.expect(coords(starts))
    writer.expect(coords(starts))  # the same plan again: fine
    writer.add(np.ones((1, *block), np.float32), coords(starts[:1]))
    with pytest.raises(SamplingError, match="another plan"):
        writer.expect(coords([(y, x) for y in (0, 6) for x in (0, 6)]))
    with pytest.raises(SamplingError, match=r"4 output chunk\(s\) wait"):  # 3 never touched
        writer.finalize()
    writer.abort(keep=False)


def test_flipped_and_read_only_predictions(tmp_path):
    writer, starts, block = grid_writer(tmp_path)
    writer.expect(coords(starts))
    preds = np.random.default_rng(0).random((len(starts), *block), dtype=np.float32)
    flipped = np.flip(preds, 2)
    flipped.flags.writeable = False
    writer.add(flipped, coords(starts))
    got = np.asarray(writer.finalize())
    assert_rounding_close(got, reference((10, 10), block, starts, np.flip(preds, 2).copy(), "hann"))


def test_a_plan_weighted_checkpoint_resumes_only_with_its_plan(tmp_path):
    """Resumed without expect(), or with another plan: refused (its sums have no weight totals)."""
    writer, starts, block = grid_writer(tmp_path, memory_bytes=0)
    writer.expect(coords(starts))
    preds = np.random.default_rng(3).random((len(starts), *block), dtype=np.float32)
    writer.add(preds[:4], coords(starts[:4]))
    writer.checkpoint({"batches": 1})
    writer._pool.wait()
    writer._pool.close()
    writer.job._unlock()
    again, _, _ = grid_writer(tmp_path, memory_bytes=0, resume=True)
    with pytest.raises(SamplingError, match="call expect"):
        again.add(preds[4:], coords(starts[4:]))
    with pytest.raises(SamplingError, match="call expect"):
        again.finalize()
    with pytest.raises(SamplingError, match="another plan"):
        again.expect(coords(starts[:4]))
    again.expect(coords(starts))
    with pytest.raises(SamplingError, match="added more often"):  # the checkpoint counted these
        again.add(preds[:1], coords(starts[:1]))
    again.add(preds[4:], coords(starts[4:]))
    assert_rounding_close(np.asarray(again.finalize()), reference((10, 10), block, starts, preds, "hann"))


def test_predict_exact_false_is_close_and_joins_parts_bit_for_bit(tmp_path):
    from vesuvius_dask.writers.predict import predict, predict_join

    vol = np.random.default_rng(0).integers(0, 65535, (12, 40, 40), dtype=np.uint16)

    def model(x):  # (B, 1, z, y, x) -> (B, z, y, x)
        return x[:, 0] * 2 - 1

    opts = dict(block=(6, 16, 16), overlap=(2, 4, 4), batch_size=5, chunks=(6, 20, 20))
    exact = np.asarray(predict(model, vol, tmp_path / "a.zarr", **opts))
    fast = np.asarray(predict(model, vol, tmp_path / "b.zarr", exact=False, **opts))
    assert_rounding_close(fast, exact, scale=1.0)
    for k in range(3):
        predict(model, vol, tmp_path / "c.zarr", exact=False, part=(k, 3), **opts)
    joined = np.asarray(predict_join(tmp_path / "c.zarr", 3))
    assert joined.view(np.uint32).tobytes() == fast.view(np.uint32).tobytes()
    predict(model, vol, tmp_path / "d.zarr", exact=False, part=(0, 2), **opts)
    predict(model, vol, tmp_path / "d.zarr", part=(1, 2), **opts)
    with pytest.raises(OutputError, match="differ in exact"):  # parts of another kind are not joined
        predict_join(tmp_path / "d.zarr", 2)
