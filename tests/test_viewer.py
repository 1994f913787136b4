"""napari reader and viewer. Needs the viewer extra and a display (CI runs under xvfb-run)."""

import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from vesuvius_dask import DaskVesuviusStream
from vesuvius_dask.viewer import is_volume_path, sample_boxes
from vesuvius_dask.viewer._reader import napari_get_reader

from .conftest import EXAMPLE, write_ome


@pytest.mark.parametrize("fixture", ["zarr_v2", "zarr_v3"])
def test_reader_gives_lazy_layers(request, fixture, rng_volume):
    path = request.getfixturevalue(fixture)
    reader = napari_get_reader(str(path))
    assert reader is not None
    (data, meta, kind), = reader(str(path))
    assert kind == "image" and isinstance(data, da.Array) and data.shape == rng_volume.shape
    lo, hi = meta["contrast_limits"]
    assert 0 <= lo < hi <= 65535


def test_reader_ome_is_multiscale(ome_v2, ome_v3):
    for path in (ome_v2, ome_v3):
        (data, meta, kind), = napari_get_reader(str(path))(str(path))
        assert meta["multiscale"] and isinstance(data, list) and len(data) >= 2
        assert all(isinstance(level, da.Array) for level in data)
        assert data[1].shape[1] == data[0].shape[1] // 2


def test_reader_segment_folder(tmp_path):
    from vesuvius_dask.testing import write_segment

    write_segment(tmp_path / "seg", (6, 40, 50))
    layers = napari_get_reader(str(tmp_path / "seg"))(str(tmp_path / "seg"))
    kinds = [k for _, _, k in layers]
    assert kinds == ["image", "labels", "labels"]
    assert all(isinstance(d, da.Array) for d, _, _ in layers)


def test_reader_tiff_folder(tmp_path, rng_volume):
    import tifffile

    (tmp_path / "slices").mkdir()
    for z in range(4):
        tifffile.imwrite(tmp_path / "slices" / f"{z:02d}.tif", rng_volume[z, :40, :50])
    (data, meta, kind), = napari_get_reader(str(tmp_path / "slices"))(str(tmp_path / "slices"))
    assert kind == "image" and isinstance(data, da.Array)
    np.testing.assert_array_equal(data.compute(), rng_volume[:4, :40, :50])


def test_reader_declines_other_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "folder")) is None
    assert napari_get_reader([str(tmp_path / "a"), str(tmp_path / "b")]) is None
    assert not is_volume_path(tmp_path / "missing")


def test_sample_boxes_are_the_stream_coordinates(rng_volume):
    stream = DaskVesuviusStream([rng_volume, rng_volume[:8]], 4, 16, 24, samples_per_epoch=50,
                                seed=9)
    boxes = sample_boxes(stream, n=20)
    coords = stream.epoch_coords()[:20]
    expected = {}
    for v, z, y, x in coords.tolist():
        for zz in range(z, z + 4):
            expected.setdefault(v, []).append((zz, y - 0.5, x - 0.5, y + 16 - 0.5, x + 24 - 0.5))
    got = {v: [(r[0, 0], r[0, 1], r[0, 2], r[2, 1], r[2, 2]) for r in rects] for v, rects in boxes.items()}
    assert got == expected
    # the stream really yields those blocks first
    stream.set_epoch(stream.epoch)
    first = [tuple(c) for _, c in zip(range(20), DaskVesuviusStream(
        [rng_volume, rng_volume[:8]], 4, 16, 24, samples_per_epoch=50, seed=9, return_coords=True))]
    assert [tuple(int(v) for v in c) for _, c in first] == [tuple(r) for r in coords.tolist()]


napari = pytest.importorskip("napari")
needs_display = pytest.mark.skipif(not os.environ.get("DISPLAY"),
                                   reason="needs a display: run under xvfb-run")


@needs_display
def test_viewer_shows_volume_and_boxes(real_crop_or_example):
    from vesuvius_dask.viewer import show

    path = real_crop_or_example
    stream = DaskVesuviusStream([str(path)], 4, 64, 64, samples_per_epoch=30, seed=0)
    viewer = show([str(path)], stream, samples=30)
    try:
        image = viewer.layers[0]
        assert isinstance(image.data, da.Array)  # lazy, never computed
        outlines = [layer for layer in viewer.layers if layer.name.startswith("samples")]
        assert len(outlines) == 1
        drawn = np.asarray(outlines[0].data)
        starts = stream.epoch_coords()[:30, 1:]
        thickness = -(-max(drawn.shape[1:]) // 400)
        np.testing.assert_array_equal(drawn, _naive_outlines(drawn.shape, starts, (4, 64, 64), thickness))
        shot = viewer.screenshot(canvas_only=True)
        assert shot.ndim == 3 and shot[..., :3].std() > 5  # not a blank canvas
    finally:
        viewer.close()


def _naive_outlines(shape, starts, block, thickness):
    out = np.zeros(shape, np.uint8)
    bz, by, bx = block
    for z, y, x in starts.tolist():
        box = np.zeros((by, bx), np.uint8)
        box[:thickness], box[-thickness:], box[:, :thickness], box[:, -thickness:] = 1, 1, 1, 1
        out[z:z + bz, y:y + by, x:x + bx] |= box
    return out


@pytest.mark.parametrize("n,thickness", [(1, 1), (40, 1), (300, 3)])
def test_outlines_equal_boxes_drawn_one_by_one(rng_volume, n, thickness):
    from vesuvius_dask.viewer import _outline_slice

    rng = np.random.default_rng(n)
    shape, block = (9, 70, 90), (3, 12, 17)
    starts = np.column_stack([rng.integers(0, shape[i] - block[i] + 1, n) for i in range(3)])
    got = np.concatenate([_outline_slice(np.zeros((1,) + shape[1:], np.uint8), starts, block, thickness,
                                         block_info={0: {"array-location": [(z, z + 1), (0, 70), (0, 90)]}})
                          for z in range(shape[0])])
    np.testing.assert_array_equal(got, _naive_outlines(shape, starts, block, thickness))


@pytest.mark.slow
def test_a_million_samples_draw_one_slice(rng_volume):
    from vesuvius_dask.viewer import sample_outlines

    stream = DaskVesuviusStream([rng_volume] * 5, 4, 16, 16, samples_per_epoch=1_000_000, seed=1)
    outline = sample_outlines(stream, None)[0]
    assert outline.shape == rng_volume.shape and outline.numblocks == (13, 1, 1)  # one task a slice
    assert outline[5].compute().mean() > 0.5  # the boxes cover the slice


@pytest.fixture()
def real_crop_or_example():
    from .conftest import REAL_CROP

    return REAL_CROP if REAL_CROP.exists() else EXAMPLE


@needs_display
def test_big_pyramid_reads_few_chunks(tmp_path, monkeypatch):
    from vesuvius_dask.viewer import show

    # A 64x4096x4096 uint16 pyramid: 2.1 GB logical at level 0. Only the levels napari
    # can show at first are written in full; the fine levels stay sparse on disk.
    path = tmp_path / "big.ome.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=3)
    shapes = [(64 // 2 ** k, 4096 // 2 ** k, 4096 // 2 ** k) for k in range(5)]
    datasets = []
    for k, shape in enumerate(shapes):
        arr = group.create_array(str(k), shape=shape, chunks=(4, 512, 512), dtype="u2", fill_value=0)
        if k >= 2:
            arr[:] = np.random.default_rng(k).integers(0, 65535, shape, dtype=np.uint16)
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [2.0 ** k] * 3}]})
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": a, "type": "space"} for a in "zyx"], "datasets": datasets}]}
    reads = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        if "/c/" in key:
            reads.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    from vesuvius_dask import chunkio

    original_file = chunkio.read_file

    def counting_file(file, *args):  # the fast chunk path reads chunk files itself
        rel = str(Path(file).relative_to(path))
        if "/c/" in rel:
            reads.append(rel)
        return original_file(file, *args)

    monkeypatch.setattr(chunkio, "read_file", counting_file)
    viewer = show([str(path)])
    try:
        shot = viewer.screenshot(canvas_only=True)
    finally:
        viewer.close()
    level0 = [k for k in reads if k.startswith("0/")]
    assert shot[..., :3].std() > 5
    # napari itself probes two level-0 chunks when a multiscale layer is added; the
    # rest of the 2 GB level is never read
    assert len(level0) <= 2, level0
    assert 0 < len(reads) <= 24, reads  # a few chunks: contrast sample + a coarse level's plane


def test_reader_accepts_ome_and_declines_plain_groups(tmp_path):
    write_ome(tmp_path / "o.zarr", np.zeros((4, 8, 8), np.uint16), chunks=(2, 4, 4), levels=2)
    assert is_volume_path(tmp_path / "o.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")  # a group without multiscales metadata
    assert not is_volume_path(tmp_path / "plain.zarr")


@needs_display
def test_napari_opens_path_through_the_plugin(zarr_v3):
    import npe2

    assert npe2.PluginManager.instance().get_manifest("vesuvius-dask") is not None
    viewer = napari.Viewer(show=True)
    try:
        layers = viewer.open(str(zarr_v3), plugin="vesuvius-dask")
        assert len(layers) == 1 and isinstance(layers[0].data, da.Array)
    finally:
        viewer.close()


def test_view_samples_need_no_torch_and_match_the_stream(rng_volume):
    """The viewer plans with BlockPlan (torch-free): the same blocks as the stream."""
    import subprocess
    import sys

    from vesuvius_dask.io.open import resolve_volume
    from vesuvius_dask.sampling.plan import BlockPlan

    stream = DaskVesuviusStream([rng_volume], 4, 16, 16, samples_per_epoch=40, seed=3)
    plan = BlockPlan([resolve_volume(rng_volume)], (4, 16, 16), 40, seed=3)
    np.testing.assert_array_equal(plan.epoch_coords(0), stream.epoch_coords(0))
    code = ("import sys; sys.modules['torch'] = None\n"
            "from vesuvius_dask.sampling.plan import BlockPlan\n"
            "from vesuvius_dask.io.open import resolve_volume\n"
            "import numpy as np\nfrom vesuvius_dask.viewer import sample_outlines\n"
            "p = BlockPlan([resolve_volume(np.zeros((8, 64, 64), np.uint16))], (4, 16, 16), 10, seed=1)\n"
            "print(int(sample_outlines(p, None)[0].sum().compute()) > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr
