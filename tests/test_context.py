"""context=: a coarse block from a lower pyramid level, centred on each fine block, in the batch's graph."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from vesuvius_dask import DaskVesuviusStream, SamplingError
from vesuvius_dask.errors import InvalidTypeError
from vesuvius_dask.io.context import Context, context_starts

from .conftest import write_ome, write_zarr

BLOCK = (4, 16, 16)


def _pyramid(path, shapes, zarr_format=2, chunks=(4, 16, 16), scales=None, seed=0):
    """An OME-Zarr group whose levels hold unrelated random data (so any misplacement shows)."""
    rng = np.random.default_rng(seed)
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    levels, datasets = [], []
    for i, shape in enumerate(shapes):
        data = rng.integers(0, 65535, shape, dtype=np.uint16)
        write_zarr(path / str(i), data, chunks=tuple(min(c, s) for c, s in zip(chunks, shape)),
                   zarr_format=zarr_format)
        levels.append(data)
        scale = [2.0 ** i] * 3 if scales is None else scales[i]
        datasets.append({"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    ms = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"], "datasets": datasets}]
    if zarr_format == 2:
        group.attrs["multiscales"] = ms
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": ms}
    return levels


def _expected_start(start, block, factor, size, shape):
    """The coarse start by the documented rule, in floating point: nearest to centre/f - size/2."""
    out = []
    for s, b, f, c, n in zip(start, block, factor, size, shape):
        centre = (s + b / 2) / f
        first = int(np.floor(centre - c / 2 + 0.5))
        out.append(min(max(first, 0), n - c))
    return out


def _check(stream, coarse, factor, size, epochs=2):
    seen = 0
    clamped = 0
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for image, items, coords in stream:
            ctx = items["context"].numpy()
            assert ctx.shape == (image.shape[0],) + tuple(size)
            for i, (_, z, y, x) in enumerate(coords.tolist()):
                cz, cy, cx = _expected_start((z, y, x), BLOCK, factor, size, coarse.shape)
                want = coarse[cz:cz + size[0], cy:cy + size[1], cx:cx + size[2]]
                np.testing.assert_array_equal(ctx[i], want)
                centred = [int(np.floor((s + b / 2) / f - c / 2 + 0.5))
                           for s, b, f, c in zip((z, y, x), BLOCK, factor, size)]
                clamped += centred != [cz, cy, cx]
                seen += 1
    return seen, clamped


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_context_blocks_equal_slices_of_the_coarse_level(tmp_path, zarr_format):
    levels = _pyramid(tmp_path / "p.zarr", [(24, 80, 72), (12, 40, 36), (6, 20, 18)], zarr_format)
    size = (2, 8, 8)
    stream = DaskVesuviusStream([tmp_path / "p.zarr"], block=BLOCK, samples_per_epoch=96, batch_size=16,
                                seed=3, return_coords=True, context={"level": 2, "size": size})
    seen, clamped = _check(stream, levels[2], (4, 4, 4), size)
    assert seen == 192
    assert clamped > 0  # blocks near the border had their context shifted inwards


def test_every_grid_position_including_the_borders(tmp_path):
    """Every block of a tiling (corners included) gets its centred-or-clamped context."""
    levels = _pyramid(tmp_path / "p.zarr", [(16, 64, 48), (8, 32, 24)])
    size = (4, 12, 12)
    stream = DaskVesuviusStream([tmp_path / "p.zarr"], block=BLOCK, sampling_method="grid", batch_size=10,
                                return_coords=True, context=Context(level=1, size=size))
    seen, clamped = _check(stream, levels[1], (2, 2, 2), size, epochs=1)
    assert seen == 4 * 4 * 3 and clamped > 0


def test_scale_factors_come_from_the_ome_metadata(tmp_path):
    """conftest's pyramid keeps z (scale 1 on z): the context follows the metadata, not 2^level."""
    rng = np.random.default_rng(5)
    data = rng.integers(0, 65535, (12, 96, 80), dtype=np.uint16)
    write_ome(tmp_path / "o.zarr", data, chunks=(4, 32, 32), levels=3, zarr_format=3)
    coarse = data[:, ::4, ::4]
    size = (4, 8, 8)
    stream = DaskVesuviusStream([tmp_path / "o.zarr"], block=BLOCK, samples_per_epoch=40, batch_size=8,
                                seed=0, return_coords=True, context={"level": 2, "size": size})
    seen, _ = _check(stream, coarse, (1, 4, 4), size, epochs=1)
    assert seen == 40


def test_converted_pyramid_and_stream_level(tmp_path):
    """A pyramid written by convert_zarr(ome=True); the stream at level 1, context at level 2."""
    from vesuvius_dask import convert_zarr

    rng = np.random.default_rng(7)
    source = rng.integers(0, 65535, (16, 128, 128), dtype=np.uint16)
    write_zarr(tmp_path / "src.zarr", source, chunks=(8, 32, 32))
    convert_zarr(str(tmp_path / "src.zarr"), tmp_path / "out.zarr", chunks=(4, 16, 16), ome=True)
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    coarse = group["2"][:]
    assert group["1"].shape == (8, 64, 64) and coarse.shape == (4, 32, 32)
    size = (2, 8, 8)
    stream = DaskVesuviusStream([tmp_path / "out.zarr"], block=BLOCK, level=1, samples_per_epoch=30,
                                batch_size=6, seed=1, return_coords=True, context={"level": 2, "size": size})
    seen, _ = _check(stream, coarse, (2, 2, 2), size, epochs=1)
    assert seen == 30


def test_single_blocks_and_explicit_coarse_files(tmp_path):
    """Arrays as files with context files= (factor 2^level); single-block items carry the context too."""
    rng = np.random.default_rng(2)
    fine = rng.integers(0, 65535, (16, 64, 64), dtype=np.uint16)
    coarse = rng.integers(0, 65535, (8, 32, 32), dtype=np.uint16)
    size = (2, 8, 8)
    stream = DaskVesuviusStream([fine], block=BLOCK, samples_per_epoch=12, seed=0, return_coords=True,
                                context={"level": 1, "size": size, "files": [coarse]})
    n = 0
    for block, items, coords in stream:
        _, z, y, x = coords.tolist()
        np.testing.assert_array_equal(block.numpy(), fine[z:z + 4, y:y + 16, x:x + 16])
        cz, cy, cx = _expected_start((z, y, x), BLOCK, (2, 2, 2), size, coarse.shape)
        np.testing.assert_array_equal(items["context"].numpy(), coarse[cz:cz + 2, cy:cy + 8, cx:cx + 8])
        n += 1
    assert n == 12


def test_one_graph_per_batch(tmp_path, monkeypatch):
    """Blocks and context are read by one read_together call (one dask graph) per batch."""
    import vesuvius_dask.loaders.reader as reader_mod

    _pyramid(tmp_path / "p.zarr", [(16, 64, 64), (8, 32, 32)])
    calls = []
    real = reader_mod.read_together

    def spy(requests):
        calls.append(len(requests))
        return real(requests)

    monkeypatch.setattr(reader_mod, "read_together", spy)
    stream = DaskVesuviusStream([tmp_path / "p.zarr"], block=BLOCK, samples_per_epoch=40, batch_size=8,
                                seed=0, prefetch=0, targets={"sheet": np.ones((16, 64, 64), np.uint8)},
                                context={"level": 1, "size": (2, 8, 8)})
    batches = list(stream)
    assert len(batches) == 5 and calls == [2] * 5  # the blocks' engine and the bundle, together
    assert sorted(batches[0][1]) == ["context", "sheet"]


def test_context_is_normalised_like_the_blocks(tmp_path):
    _pyramid(tmp_path / "p.zarr", [(16, 64, 64), (8, 32, 32)])
    stream = DaskVesuviusStream([tmp_path / "p.zarr"], block=BLOCK, samples_per_epoch=16, batch_size=8,
                                seed=0, normalization="instance_zscore",
                                context={"level": 1, "size": (4, 16, 16)})
    for _, items in stream:
        ctx = items["context"].double().numpy().reshape(8, -1)
        np.testing.assert_allclose(ctx.mean(axis=1), 0, atol=1e-4)
        np.testing.assert_allclose(ctx.std(axis=1), 1, atol=1e-3)


def test_context_starts_rule():
    # centre (0 + 16/2)/4 = 2, minus 4/2: start 0; a block at 60 of a 64-voxel axis is clamped to 16 - 4
    got = context_starts(np.array([[0, 0, 60]]), (16, 16, 4), (4, 4, 4), (4, 4, 4), (16, 16, 16))
    assert got.tolist() == [[0, 0, 12]]
    # halves go up: centre (1 + 1)/2 = 1, minus 1/2 -> 0.5 -> 1
    assert context_starts(np.array([[1, 1, 1]]), (2, 2, 2), 2, (1, 1, 1), (9, 9, 9)).tolist() == [[1, 1, 1]]


def test_bad_context_is_one_clear_error(tmp_path, rng_volume):
    _pyramid(tmp_path / "p.zarr", [(16, 64, 64), (8, 32, 32)])
    path = tmp_path / "p.zarr"
    kwargs = dict(block=BLOCK, samples_per_epoch=4, batch_size=2)
    with pytest.raises(SamplingError, match="OME-Zarr multiscale paths"):
        DaskVesuviusStream([rng_volume], **kwargs, context={"level": 1, "size": 4})
    with pytest.raises(SamplingError, match="larger than level 1"):
        DaskVesuviusStream([path], **kwargs, context={"level": 1, "size": (16, 8, 8)})
    with pytest.raises(SamplingError, match="coarser than the stream's level 1"):
        DaskVesuviusStream([path], **kwargs, level=1, context={"level": 1, "size": 4})
    with pytest.raises(InvalidTypeError, match="keys 'level' and 'size'"):
        DaskVesuviusStream([path], **kwargs, context={"levels": 1, "size": 4})
    with pytest.raises(InvalidTypeError, match="targets="):
        DaskVesuviusStream([path], **kwargs, labels=[np.zeros((64, 64), np.uint8)],
                           context={"level": 1, "size": 4})
    with pytest.raises(SamplingError, match="not the level-0 shape"):
        DaskVesuviusStream([np.zeros((16, 64, 64), np.uint16)], **kwargs,
                           context={"level": 1, "size": 4, "files": [np.zeros((8, 8, 8), np.uint16)]})
