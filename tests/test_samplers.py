"""Samplers and read options as objects: the same plans as the keywords, checked at construction."""

import dataclasses
import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vesuvius_dask
from vesuvius_dask import DaskVesuviusStream, PredictionWriter, predict
from vesuvius_dask.engine.batches import DEFAULT_CACHE_BYTES
from vesuvius_dask.errors import InvalidTypeError, SamplingError
from vesuvius_dask.io.labels import load_mask
from vesuvius_dask.loaders.options import ReadOptions
from vesuvius_dask.loaders.stream import DEFAULT_READ_BATCH
from vesuvius_dask.sampling.plan import BlockPlan
from vesuvius_dask.sampling.samplers import (
    PLAN_DEFAULTS,
    BalancedSampler,
    GridSampler,
    LocalitySampler,
    ProportionalSampler,
    RandomSampler,
    Sampler,
    UniformSampler,
)

_RNG = np.random.default_rng(7)
VOLS = [_RNG.integers(0, 65535, size=(12, 40, 50), dtype=np.uint16),
        _RNG.integers(0, 65535, size=(9, 33, 60), dtype=np.uint16)]
BLOCK = (4, 8, 8)
MASK = np.zeros((40, 50), np.uint8)
MASK[5:35, 10:45] = 1
MASK[20:25, 20:30] = 0
LABELS = [(_RNG.random((40, 50)) < 0.02).astype(np.uint8), (_RNG.random((33, 60)) < 0.02).astype(np.uint8)]


def _reference(stream, n, kw, masks=None, labels=False):
    """The plan the keywords made before samplers: BlockPlan with the keywords themselves."""
    masks_2d = None if masks is None else [None if m is None else load_mask(m, f"masks[{i}]", v)
                                           for i, (m, v) in enumerate(zip(masks, stream.volumes))]
    labels_2d = [lv.data[0] for lv in stream.label_volumes] if labels else None
    return BlockPlan(stream.volumes, stream.block, n, masks=masks_2d, labels_2d=labels_2d,
                     read_batch=stream.read_batch, **kw)


def _same_plans(n, kw, sampler, **data):
    by_sampler = DaskVesuviusStream(VOLS, *BLOCK, sampler=sampler, **data)
    by_keywords = DaskVesuviusStream(VOLS, *BLOCK, n, **kw, **data)
    reference = _reference(by_sampler, n, kw, data.get("masks"), "labels" in data)
    assert by_sampler.sampler == by_keywords.sampler
    for epoch in (0, 1):
        expected = reference.epoch_coords(epoch)
        np.testing.assert_array_equal(by_sampler.epoch_coords(epoch), expected)
        np.testing.assert_array_equal(by_keywords.epoch_coords(epoch), expected)


def _pair(kind, n, seed, stride, shuffle, locality, mix, overlap):
    """(keywords, sampler) describing the same sampling."""
    if kind == "grid":
        return dict(sampling_method="grid", overlap=overlap), GridSampler(n, overlap=overlap)
    common = dict(seed=seed, stride=stride)
    if kind == "locality":
        return (dict(locality=locality, locality_mix=mix, **common),
                LocalitySampler(n, locality=locality, locality_mix=mix, **common))
    if kind == "proportional":
        return (dict(sampling_method="proportional", shuffle=shuffle, **common),
                ProportionalSampler(n, shuffle=shuffle, **common))
    return dict(shuffle=shuffle, **common), UniformSampler(n, shuffle=shuffle, **common)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["uniform", "proportional", "locality", "grid"]),
       n=st.integers(1, 300), seed=st.integers(0, 2**40), stride=st.sampled_from([None, 2, (1, 3, 2)]),
       shuffle=st.booleans(), locality=st.integers(1, 20), mix=st.integers(1, 4),
       overlap=st.sampled_from([0, (1, 2, 3), (3, 7, 7)]), masked=st.booleans())
def test_sampler_objects_plan_as_the_keywords(kind, n, seed, stride, shuffle, locality, mix, overlap,
                                              masked):
    if kind == "grid" and n > 60:
        n = None  # every position (a grid has a few hundred)
    kw, sampler = _pair(kind, n, seed, stride, shuffle, locality, mix, overlap)
    data = {}
    if masked:
        kw["mask_coverage"] = 0.5
        sampler = dataclasses.replace(sampler, mask_coverage=0.5)
        data = dict(masks=[MASK, None])
    _same_plans(n, kw, sampler, **data)


@pytest.mark.parametrize("volumes", ["uniform", "proportional"])
@pytest.mark.parametrize("locality", [None, 4])
def test_balanced_sampler_plans_as_the_keywords(volumes, locality):
    kw = dict(positive_fraction=0.4, positive_coverage=0.01, seed=3, sampling_method=volumes,
              locality=locality, stride=(1, 2, 2))
    sampler = BalancedSampler(120, positive_fraction=0.4, positive_coverage=0.01, seed=3, volumes=volumes,
                              locality=locality, stride=(1, 2, 2))
    assert Sampler.from_options(120, **kw) == sampler
    _same_plans(120, kw, sampler, labels=LABELS, masks=[MASK, None])


def test_grid_without_a_count_is_every_position():
    kw = dict(sampling_method="grid", overlap=(1, 2, 2))
    _same_plans(None, kw, GridSampler(overlap=(1, 2, 2)))
    stream = DaskVesuviusStream(VOLS, *BLOCK, sampler=GridSampler(overlap=(1, 2, 2)))
    assert stream.samples_per_epoch == sum(stream.starts_per_volume) and stream.sampling_method == "grid"


def test_from_options_picks_the_sampler():
    assert Sampler.from_options(5) == UniformSampler(5)
    assert Sampler.from_options(5, locality=3) == LocalitySampler(5, locality=3)
    assert Sampler.from_options(5, sampling_method="proportional", locality=3) == \
        ProportionalSampler(5, locality=3)
    assert Sampler.from_options(None, sampling_method="grid", seed=3, shuffle=False) == GridSampler()
    for sampler in (UniformSampler(5, seed=1, stride=2), BalancedSampler(5, positive_fraction=0.5),
                    LocalitySampler(9, locality=3, locality_mix=2), GridSampler(overlap=(0, 2, 2)),
                    ProportionalSampler(7, shuffle=False, mask_coverage=0.25)):
        options = sampler.plan_options()
        assert set(options) == set(PLAN_DEFAULTS) | {"samples_per_epoch"}
        n = options.pop("samples_per_epoch")
        assert Sampler.from_options(n, **options).plan_options() == sampler.plan_options()
    with pytest.raises(InvalidTypeError, match="unknown sampling option 'strides'"):
        Sampler.from_options(5, strides=2)
    with pytest.raises(SamplingError, match="stride does not apply to sampling_method='grid'"):
        Sampler.from_options(None, sampling_method="grid", stride=2)
    with pytest.raises(SamplingError, match="overlap applies to sampling_method='grid' only"):
        Sampler.from_options(5, overlap=2)


def test_stream_exposes_the_sampler_with_its_seed():
    stream = DaskVesuviusStream(VOLS, *BLOCK, sampler=UniformSampler(50, stride=2))
    assert stream.sampler == UniformSampler(50, stride=2, seed=stream.seed)
    again = DaskVesuviusStream(VOLS, *BLOCK, sampler=stream.sampler)
    np.testing.assert_array_equal(again.epoch_coords(3), stream.epoch_coords(3))
    # the count may come from the stream (its positional argument) or the sampler, once
    assert DaskVesuviusStream(VOLS, *BLOCK, 40, sampler=LocalitySampler(locality=2, seed=0)).sampler == \
        LocalitySampler(40, locality=2, seed=0)
    assert DaskVesuviusStream(VOLS, *BLOCK, 40, sampler=UniformSampler(40, seed=0)).samples_per_epoch == 40
    keywords = DaskVesuviusStream(VOLS, *BLOCK, 30, seed=4, locality=2)
    assert keywords.sampler == LocalitySampler(30, seed=4, locality=2)


@pytest.mark.parametrize("kwargs,named", [
    (dict(sampler=UniformSampler(10), locality=4), "locality=4"),
    (dict(sampler=UniformSampler(10), sampling_method="proportional"), "sampling_method='proportional'"),
    (dict(sampler=GridSampler(), stride=2), "stride=2"),
    (dict(sampler=GridSampler(), overlap=(0, 2, 2)), r"overlap=\(0, 2, 2\)"),
    (dict(sampler=UniformSampler(10), seed=0), "seed=0"),
    (dict(sampler=UniformSampler(10), stride=np.array([1, 2, 2])), "stride=array"),
    (dict(sampler=UniformSampler(10), mask_coverage=0.5), "mask_coverage=0.5"),
    (dict(sampler=UniformSampler(10), samples_per_epoch=5), "samples_per_epoch=5"),
    (dict(reading=ReadOptions(), cache_bytes=0), "cache_bytes=0"),
    (dict(reading=ReadOptions(prefetch=0), read_batch=16), "read_batch=16"),
    (dict(reading=ReadOptions(), machine_cache=False), "machine_cache=False"),
])
def test_object_and_keyword_together_is_refused_in_one_line(kwargs, named):
    with pytest.raises(InvalidTypeError, match=named) as info:
        DaskVesuviusStream(VOLS, *BLOCK, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert ("sampler" in message) or ("reading=" in message)


def test_wrong_object_types_are_refused():
    with pytest.raises(InvalidTypeError, match="sampler must be a Sampler"):
        DaskVesuviusStream(VOLS, *BLOCK, 10, sampler="uniform")
    with pytest.raises(InvalidTypeError, match="reading must be a ReadOptions"):
        DaskVesuviusStream(VOLS, *BLOCK, 10, reading={"prefetch": 0})
    with pytest.raises(SamplingError, match="samples_per_epoch is needed"):
        DaskVesuviusStream(VOLS, *BLOCK, sampler=UniformSampler(seed=0))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: UniformSampler(0), SamplingError, "samples_per_epoch must be a positive integer, got 0"),
    (lambda: UniformSampler(2.5), InvalidTypeError, "samples_per_epoch must be a positive integer"),
    (lambda: UniformSampler(seed=-1), SamplingError, "seed must be non-negative, got -1"),
    (lambda: ProportionalSampler(seed=1.5), InvalidTypeError, "seed must be a non-negative integer"),
    (lambda: UniformSampler(stride=(1, 0, 1)), SamplingError, r"stride\[y\] must be a positive integer"),
    (lambda: UniformSampler(stride=(1, 2)), InvalidTypeError, "stride must be Z,Y,X"),
    (lambda: UniformSampler(locality=0), SamplingError, "locality must be a positive integer"),
    (lambda: UniformSampler(locality_mix=0), SamplingError, "locality_mix must be a positive integer"),
    (lambda: UniformSampler(mask_coverage=0), SamplingError, r"mask_coverage must be in \(0, 1\]"),
    (lambda: GridSampler(mask_coverage=1.5), SamplingError, r"mask_coverage must be in \(0, 1\]"),
    (lambda: LocalitySampler(locality=4, shuffle=False), SamplingError, "locality needs shuffle=True"),
    (lambda: LocalitySampler(), TypeError, "locality"),
    (lambda: BalancedSampler(), TypeError, "positive_fraction"),
    (lambda: BalancedSampler(positive_fraction=1.5), SamplingError, r"positive_fraction must be in \[0, 1\]"),
    (lambda: BalancedSampler(positive_fraction=0.5, positive_coverage=0), SamplingError,
     r"positive_coverage must be in \(0, 1\]"),
    (lambda: BalancedSampler(positive_fraction=0.5, volumes="grid"), SamplingError, "volumes must be"),
    (lambda: GridSampler(overlap=-1), SamplingError, r"overlap\[z\] must be 0 or more"),
    (lambda: GridSampler(overlap=(1, 2)), InvalidTypeError, "overlap must be Z,Y,X"),
    (lambda: GridSampler(stride=2), TypeError, "stride"),  # a grid has no stride, seed or shuffle
    (lambda: GridSampler(seed=0), TypeError, "seed"),
    (lambda: Sampler(), InvalidTypeError, "Sampler is a base class"),
    (lambda: RandomSampler(5), InvalidTypeError, "RandomSampler is a base class"),
    (lambda: ReadOptions(prefetch=-1), SamplingError, "prefetch must be None or a non-negative integer"),
    (lambda: ReadOptions(cache_bytes=-1), SamplingError, "cache_bytes must be 0 or more"),
    (lambda: ReadOptions(read_batch=0), SamplingError, "read_batch must be a positive integer"),
    (lambda: ReadOptions(num_threads=0), SamplingError, "num_threads must be a positive integer"),
    (lambda: ReadOptions(retries=-1), SamplingError, "retries must be 0 or more"),
])
def test_bad_fields_fail_at_construction_naming_the_field(make, exc, match):
    with pytest.raises(exc, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_samplers_are_frozen_values():
    sampler = UniformSampler(10, seed=1, stride=np.array([1, 2, 2]))
    assert sampler.stride == (1, 2, 2) and hash(sampler) == hash(UniformSampler(10, seed=1, stride=(1, 2, 2)))
    with pytest.raises(AttributeError):
        sampler.seed = 2
    assert GridSampler(overlap=3).overlap == (3, 3, 3)


def test_samplers_and_read_options_pickle():
    for obj in (UniformSampler(10, seed=1, stride=2), ProportionalSampler(3), LocalitySampler(locality=2),
                BalancedSampler(8, positive_fraction=0.25, volumes="proportional"),
                GridSampler(overlap=(0, 4, 4), mask_coverage=1e-9), ReadOptions(cache_bytes=0, prefetch=1),
                ReadOptions(client="tcp://127.0.0.1:8786")):
        assert pickle.loads(pickle.dumps(obj)) == obj
    # a Client does not travel: copies get its scheduler's address and connect by it
    client = SimpleNamespace(scheduler=SimpleNamespace(address="tcp://10.0.0.1:8786"))
    assert pickle.loads(pickle.dumps(ReadOptions(client=client))).client == "tcp://10.0.0.1:8786"
    stream = DaskVesuviusStream(VOLS, *BLOCK, sampler=LocalitySampler(64, locality=4, seed=5),
                                reading=ReadOptions(prefetch=0))
    copy = pickle.loads(pickle.dumps(stream))
    assert copy.sampler == stream.sampler and copy.reading == stream.reading
    np.testing.assert_array_equal(copy.epoch_coords(2), stream.epoch_coords(2))


def test_read_options_reach_the_engines():
    stream = DaskVesuviusStream(VOLS, *BLOCK, 48, seed=0, return_coords=True,
                                reading=ReadOptions(cache_bytes=0, prefetch=0, read_batch=16, num_threads=2))
    assert stream.reading == ReadOptions(cache_bytes=0, prefetch=0, read_batch=16, num_threads=2)
    assert stream.read_batch == 16 and stream.engine.cache.max_bytes == 0 and stream.engine.num_threads == 2
    assert stream.engine.machine is None and stream.reader.prefetch == 0
    keywords = DaskVesuviusStream(VOLS, *BLOCK, 48, seed=0, return_coords=True, cache_bytes=0, prefetch=0,
                                  read_batch=16, num_threads=2)
    assert keywords.reading == stream.reading
    got = [(b.numpy(), c.numpy()) for b, c in stream]
    want = [(b.numpy(), c.numpy()) for b, c in keywords]
    for (b1, c1), (b2, c2) in zip(got, want, strict=True):
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(b1, b2)
    default = DaskVesuviusStream(VOLS, *BLOCK, 8, seed=0)
    assert default.reading == ReadOptions(cache_bytes=DEFAULT_CACHE_BYTES, read_batch=DEFAULT_READ_BATCH)


def test_predict_builds_its_grid_from_a_grid_sampler(tmp_path, monkeypatch):
    vol = VOLS[0]
    mask = MASK

    def model(x):  # (B, 1, z, y, x) -> (B, y, x)
        return x[:, 0].mean(dim=1) * 2 + 1

    built = []
    real = DaskVesuviusStream.__init__

    def spy(self, *args, **kwargs):
        built.append(kwargs.get("sampler"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(DaskVesuviusStream, "__init__", spy)
    out = predict(model, vol, tmp_path / "new.zarr", block=(6, 16, 16), overlap=(0, 4, 4), batch_size=5,
                  masks=mask).compute()
    monkeypatch.undo()
    assert built == [GridSampler(overlap=(0, 4, 4), mask_coverage=1e-9)]
    # the output of the keyword grid predict used before
    stream = DaskVesuviusStream([vol], 6, 16, 16, None, sampling_method="grid", overlap=(0, 4, 4),
                                batch_size=5, return_coords=True, dtype=torch.float32, masks=[mask],
                                mask_coverage=1e-9)
    writer = PredictionWriter(tmp_path / "old.zarr", vol.shape[1:], (16, 16), blend="hann")
    for blocks, coords in stream:
        writer.add(model((blocks / 65535.0).unsqueeze(1)), coords)
    np.testing.assert_array_equal(out, writer.finalize().compute())


def test_samplers_are_exported_lazily_and_torch_free():
    assert vesuvius_dask.GridSampler is GridSampler and vesuvius_dask.ReadOptions is ReadOptions
    assert {"UniformSampler", "BalancedSampler", "ReadOptions"} <= set(vesuvius_dask.__all__)
    code = ("import sys, vesuvius_dask, vesuvius_dask.sampling.samplers, vesuvius_dask.loaders.options; "
            "vesuvius_dask.UniformSampler(10, seed=0); vesuvius_dask.ReadOptions(prefetch=0); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_block_shape_by_its_api_wide_name():
    import numpy as np

    from vesuvius_dask import DaskVesuviusStream, InvalidTypeError

    vol = np.arange(8 * 32 * 32, dtype=np.uint16).reshape(8, 32, 32)
    by_name = DaskVesuviusStream([vol], block=(4, 16, 16), samples_per_epoch=7, seed=3)
    by_sizes = DaskVesuviusStream([vol], 4, 16, 16, 7, seed=3)
    assert by_name.block == (4, 16, 16)
    np.testing.assert_array_equal(by_name.epoch_coords(0), by_sizes.epoch_coords(0))
    with pytest.raises(InvalidTypeError, match="once"):
        DaskVesuviusStream([vol], 4, 16, 16, block=4)
    with pytest.raises(InvalidTypeError, match="missing"):
        DaskVesuviusStream([vol], samples_per_epoch=3)
