"""The vectorised PredictionWriter against a plain reference accumulator, bit for bit.

The writer adds each batch per output chunk (numpy slices) and, after ``expect``, writes
each chunk as soon as its last block is added; a reference written here adds block after
block into one whole-output array. Both add each voxel's terms in the same order, so the
outputs are equal to the bit, whatever the shapes, the memory budget and the plan.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vesuvius_dask.errors import SamplingError
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
    for i in range(0, len(starts), batch):
        writer.add(preds[i:i + batch], coords(starts[i:i + batch]))
    got = np.asarray(writer.finalize())
    want = reference(shape, block, starts, preds, blend, fill=-1.0)
    assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()


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


def test_plan_resume_from_checkpoint(tmp_path):
    """A kill after a checkpoint that wrote chunks early: the resumed run gives the same bits."""
    shape, block, chunks = (4, 30, 30), (4, 10, 10), (4, 10, 10)
    starts = np.array([[0, y, x] for y in range(0, 21, 5) for x in range(0, 21, 5)])
    preds = np.random.default_rng(1).random((len(starts), *block), dtype=np.float32)
    want = reference(shape, block, starts, preds, "hann")
    out = tmp_path / "o.zarr"
    w1 = PredictionWriter(out, shape, block, chunks=chunks, memory_bytes=0)
    w1.expect(starts)
    for i in range(0, 12, 4):
        w1.add(preds[i:i + 4], starts[i:i + 4])
    w1.checkpoint({"batches": 3})
    w1.add(preds[12:16], starts[12:16])  # after the checkpoint: lost with the "kill"
    w1._pool.wait()
    w1._pool.close()
    w1.job._unlock()
    w2 = PredictionWriter(out, shape, block, chunks=chunks, memory_bytes=0, resume=True)
    assert w2.progress == {"batches": 3}
    w2.expect(starts)
    for i in range(12, len(starts), 4):
        w2.add(preds[i:i + 4], starts[i:i + 4])
    got = np.asarray(w2.finalize())
    assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()
