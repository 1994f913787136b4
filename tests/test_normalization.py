"""Normalisation schemes: the official formulas, volume statistics, the stream option, predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vesuvius_dask import ArgumentError, DaskVesuviusStream, InvalidTypeError, predict
from vesuvius_dask.io.normalize import SCHEMES, normalization_spec, normalize, volume_statistics
from vesuvius_dask.io.open import resolve_volume
from vesuvius_dask.writers.predict import model_metadata

EPS = 1e-8


def reference(x: np.ndarray, scheme: str, vol: dict | None = None) -> np.ndarray:
    """The formulas of DATA-FORMATS.md, item by item, in float64."""
    out = []
    for item in x.astype(np.float64):
        if scheme == "none":
            r = item
        elif scheme == "instance_zscore":
            r = (item - item.mean()) / max(item.std(), EPS)
        elif scheme == "instance_minmax":
            r = (item - item.min()) / max(item.max() - item.min(), EPS)
        elif scheme == "percentile_minmax":
            p1, p99 = np.percentile(item, [1, 99])
            r = (np.clip(item, p1, p99) - p1) / (p99 - p1) if p99 - p1 > EPS else np.zeros_like(item)
        elif scheme == "global_zscore":
            r = (item - vol["mean"]) / max(vol["std"], EPS)
        else:  # ct
            r = (np.clip(item, vol["p0.5"], vol["p99.5"]) - vol["mean"]) / max(vol["std"], EPS)
        out.append(r)
    return np.stack(out)


@settings(max_examples=150, deadline=None)
@given(x=arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 7)),
                elements=st.floats(-1e4, 1e4)),
       scheme=st.sampled_from(SCHEMES), mean=st.floats(-100, 100), std=st.floats(0, 50))
def test_schemes_match_the_numpy_formulas(x, scheme, mean, std):
    vol = {"mean": mean, "std": std, "p0.5": -500.0, "p99.5": 700.0}
    stats = {k: np.full(x.shape[0], v) for k, v in vol.items()}
    got = normalize(x.copy(), scheme, stats)
    np.testing.assert_allclose(got, reference(x, scheme, vol), rtol=1e-6, atol=1e-6 * (1 + np.abs(x).max()))


def test_float32_batches_in_place_and_per_volume_statistics():
    x = np.random.default_rng(0).normal(100, 20, (3, 4, 8, 8)).astype(np.float32)
    stats = {"mean": np.array([100.0, 0.0, 50.0]), "std": np.array([20.0, 1.0, 1e-12]),
             "p0.5": np.array([0, 0, 0.0]), "p99.5": np.array([1e9, 1e9, 1e9])}
    out = normalize(x.copy(), "global_zscore", stats)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], (x[0] - 100) / 20, rtol=1e-5)
    np.testing.assert_allclose(out[2], (x[2] - 50) / EPS, rtol=1e-5)  # std floored at eps
    same = x.copy()
    assert normalize(same, "instance_minmax") is same  # in place


def test_volume_statistics_exact_when_every_chunk_is_sampled_and_bounded_otherwise(tmp_path):
    from .conftest import write_zarr

    data = np.random.default_rng(1).integers(0, 65535, (8, 64, 64), dtype=np.uint16)
    vol = resolve_volume(write_zarr(tmp_path / "v.zarr", data, chunks=(4, 32, 32)))
    exact = volume_statistics(vol, sample_chunks=100)
    assert exact["chunks"] == exact["chunks_total"] == 8
    np.testing.assert_allclose([exact["mean"], exact["std"]], [data.mean(), data.std()], rtol=1e-12)
    for q in (0.5, 1, 99, 99.5):  # the histogram gives numpy's (linear) percentiles
        assert exact[f"p{q:g}"] == pytest.approx(np.percentile(data, q), rel=1e-12)
    some = volume_statistics(vol, sample_chunks=3)
    assert some["chunks"] == 3 and some["voxels"] == 3 * 4 * 32 * 32
    floats = resolve_volume(data.astype(np.float32))
    assert volume_statistics(floats, 100)["p99"] == pytest.approx(np.percentile(data, 99), rel=1e-6)


def test_stream_option_and_the_dict_to_save(rng_volume):
    s = DaskVesuviusStream([rng_volume], 4, 16, 16, samples_per_epoch=64, batch_size=16, seed=0,
                           return_coords=True, normalization="ct")
    assert s.dtype == np.float32
    spec = s.normalization
    assert spec["scheme"] == "ct" and spec["statistics"]["chunks"] == spec["statistics"]["chunks_total"]
    blocks, coords = next(iter(s))
    raw = np.stack([rng_volume[z:z + 4, y:y + 16, x:x + 16] for _, z, y, x in coords.numpy()])
    np.testing.assert_allclose(blocks.numpy(), reference(raw, "ct", spec["statistics"]), rtol=1e-4, atol=1e-5)
    fixed = DaskVesuviusStream([rng_volume], 4, 16, 16, samples_per_epoch=64, batch_size=16, seed=0,
                               normalization={"scheme": "global_zscore",
                                              "statistics": {"mean": 1.0, "std": 2.0, "p0.5": 0, "p99.5": 9}})
    assert fixed.normalization["statistics"]["mean"] == 1.0
    plain = DaskVesuviusStream([rng_volume], 4, 16, 16, samples_per_epoch=64, batch_size=16)
    assert plain.normalization["scheme"] == "none" and plain._normalizer is None  # nothing on the hot path
    with pytest.raises(ArgumentError, match=r"^unknown normalization 'zscore'; expected one of none, "):
        normalization_spec("zscore")
    with pytest.raises(InvalidTypeError, match="normalization gives floating-point blocks"):
        DaskVesuviusStream([rng_volume], 4, 16, 16, samples_per_epoch=8, normalization="ct",
                           dtype=torch.int32)


def test_predict_applies_the_scheme_saved_with_the_model(tmp_path, zarr_v3, rng_volume):
    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0]

    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(Identity()), str(path), _extra_files=model_metadata("instance_minmax"))
    kw = dict(block=(13, 150, 170), overlap=(0, 0, 0), batch_size=1)
    out = predict(str(path), str(zarr_v3), tmp_path / "a.zarr", **kw).compute()
    np.testing.assert_allclose(out, reference(rng_volume[None], "instance_minmax")[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ArgumentError, match=r"^the model was saved with normalization='instance_minmax', "
                                            r"not 'ct'"):
        predict(str(path), str(zarr_v3), tmp_path / "b.zarr", normalization="ct", **kw)
    legacy = predict(lambda x: x[:, 0], str(zarr_v3), tmp_path / "c.zarr", **kw).compute()
    np.testing.assert_allclose(legacy, rng_volume / 65535, rtol=1e-6)  # the default is unchanged
