"""A rendered surface is a volume like any other.

Opened with ``volume=``, described, converted, predicted on, streamed, and rendered over
HTTP reading only the chunks of the surface's slab.

Every render is checked against :func:`tests.test_surfaces.reference_render` (scipy's
``map_coordinates``) or against numpy computations on it.
"""

import re

import numpy as np
import pytest
import zarr
from vesuvius_dask.cli.main import main

from vesuvius_dask import VolumeError, convert_zarr, open_segment, open_volume
from vesuvius_dask.errors import VolumeNotFoundError
from vesuvius_dask.surfaces.render import render_surface
from vesuvius_dask.surfaces.tifxyz import surface_from_arrays
from vesuvius_dask.testing.data import (
    synthetic_sheet,
    write_label_zarr,
    write_segment,
    write_surface_segments,
    write_tifxyz,
)
from vesuvius_dask.testing.server import SlowServer

from .test_surfaces import reference_render


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    t = write_surface_segments(tmp_path_factory.mktemp("render-volume"), rendered=None)
    want, good = reference_render(t["volume"], t["x"], t["y"], t["z"], (0.25, 0.25))
    t["want"], t["good"] = want, good
    return t


def _close(got, want):
    """uint8 renders: float64 sums in another order may round a half the other way."""
    diff = np.abs(got.astype(int) - want.astype(int))
    assert got.shape == want.shape and diff.max() <= 1 and (diff == 0).mean() > 0.995


# -- open_segment(volume=) and what it says ----------------------------------------------------------


def test_open_segment_with_volume_renders_lazily(trees):
    plain = open_segment(trees["open_data"])
    assert plain.volume is None and "missing volume, ir, validation_mask" in plain.describe()
    seg = open_segment(trees["open_data"], volume=trees["scroll"])
    assert seg.volume.chunksize == (65, 56, 64) and seg.volume.dtype == np.uint8
    _close(seg.volume.compute(), trees["want"])
    line = seg.describe()
    assert "\n" not in line and f"rendered lazily from {trees['scroll']}" in line
    assert "missing ir, validation_mask" in line and "missing volume" not in line
    assert "supervision_mask.zarr" in repr(seg) and "missing ir, validation_mask" in repr(seg)
    # the tifxyz folder itself, and the legacy tree (which has rendered layers: they win)
    _close(open_segment(trees["tifxyz"], volume=trees["scroll"]).volume.compute(), trees["want"])
    legacy = open_segment(trees["legacy"], volume=trees["scroll"])
    np.testing.assert_array_equal(legacy.volume.compute(), trees["layers"])
    assert "(layers)" in legacy.describe()


def test_open_segment_volume_at_a_coarser_level(tmp_path, trees):
    lvl1 = np.ascontiguousarray(trees["volume"][::2, ::2, ::2])  # every axis halved
    group = zarr.open_group(tmp_path / "scroll.ome.zarr", mode="w", zarr_format=2)
    for i, data in enumerate((trees["volume"], lvl1)):
        group.create_array(str(i), data=data, chunks=(16, 16, 16))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
                                   "datasets": [{"path": str(i), "coordinateTransformations": [
                                       {"type": "scale", "scale": [2.0 ** i] * 3}]} for i in (0, 1)]}]
    seg = open_segment(trees["open_data"], volume=tmp_path / "scroll.ome.zarr", level=1)
    assert "level 1" in seg.describe() and seg.volume.shape == (65, 56, 64)  # full resolution kept
    want, _ = reference_render(lvl1, trees["x"], trees["y"], trees["z"], (0.25, 0.25), level=1)
    _close(seg.volume.compute(), want)


def test_open_segment_volume_errors(tmp_path, trees):
    write_segment(tmp_path / "plain", (4, 32, 32))
    seg = open_segment(tmp_path / "plain", volume=trees["scroll"])  # rendered already: as it is
    assert seg.volume.shape == (4, 32, 32) and "missing surface" in seg.describe()
    with pytest.raises(VolumeNotFoundError, match="no such segment folder"):
        open_segment(tmp_path / "nowhere", volume=trees["scroll"])
    with pytest.raises(VolumeNotFoundError) as err:
        open_segment(trees["open_data"], volume=tmp_path / "missing.zarr")
    assert "missing.zarr" in str(err.value) and "\n" not in str(err.value)
    t = write_surface_segments(tmp_path / "bad", rendered=None, grid_shape=(6, 7))
    write_label_zarr(t["tifxyz"] / "20240101000000_inklabels_v2.zarr", np.zeros((20, 20), np.uint8))
    with pytest.raises(VolumeError, match=r"inklabels_v2.zarr.*image is 20x20 .* is 24x28"):
        open_segment(t["open_data"], volume=t["scroll"])


# -- vesuvius-dask info ----------------------------------------------------------------------------------


def test_info_on_tifxyz_folder_and_segment(tmp_path, trees, capsys):
    g = synthetic_sheet((10, 12), (0.25, 0.5), (30, 60, 60), seed=4, holes=7)
    folder = write_tifxyz(tmp_path / "surf", g["x"], g["y"], g["z"], (0.25, 0.5), meta={"uuid": "abc"})
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    valid = (g["z"] > 0).sum()
    assert "grid    10x12 nodes" in out and "full    20x48 pixels" in out
    assert "scale   [0.25, 0.5]" in out and "uuid    abc" in out
    assert f"valid   {valid / 120:.1%} of the grid's nodes ({valid} of 120)" in out
    ok = g["z"] > 0
    assert f"x {g['x'][ok].min():.1f}..{g['x'][ok].max():.1f}" in out  # bbox from meta.json
    assert "missing volume, mask, labels, ir, validation_mask" in out
    assert main(["info", str(trees["open_data"]), "--volume", str(trees["scroll"])]) == 0
    out = capsys.readouterr().out
    assert "render  (65, 56, 64) uint8" in out and "inklabels.zarr" in out
    assert "missing ir, validation_mask" in out
    assert main(["info", str(trees["legacy"]), "--volume", str(trees["scroll"])]) == 0
    assert "render  not needed" in capsys.readouterr().out
    assert main(["info", "--check", "--quiet", str(trees["open_data"])]) == 0
    assert "0 bad" in capsys.readouterr().out


def test_info_errors_are_one_line(tmp_path, capsys):
    g = synthetic_sheet((8, 9), (0.25, 0.25), (30, 60, 60), seed=3)
    folder = write_tifxyz(tmp_path / "s", g["x"], g["y"], g["z"], (0.25, 0.25))
    import tifffile

    tifffile.imwrite(folder / "y.tif", g["y"][:, :5])
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(folder) in err and "y.tif 8x5" in err


# -- convert, predict and the stream on a render ------------------------------------------------------


def _downsample(a):
    """Level i+1 of the OME pyramid convert writes: means of 2x2x2, odd edges replicated, rounded."""
    a = np.pad(a.astype(np.float32), [(0, s % 2) for s in a.shape], mode="edge")
    z, y, x = (s // 2 for s in a.shape)
    return np.round(a.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5))).astype(np.uint8)


def test_convert_render_to_ome_zarr(tmp_path, trees):
    seg = open_segment(trees["open_data"], volume=trees["scroll"])
    full = seg.volume.compute()
    out = convert_zarr(seg, tmp_path / "render.zarr", ome=True, chunks=(32, 16, 16), zarr_format=2)
    np.testing.assert_array_equal(out.compute(), full)
    group = zarr.open_group(tmp_path / "render.zarr", mode="r")
    np.testing.assert_array_equal(group["1"][:], _downsample(full))
    np.testing.assert_array_equal(group["2"][:], _downsample(_downsample(full)))
    assert "rendered lazily" in group.attrs["vesuvius_dask"]["source"]
    # a region, through the command line (--volume)
    assert main(["convert", str(trees["open_data"]), str(tmp_path / "crop.zarr"), "--volume",
                 str(trees["scroll"]), "--y-start", "5", "--y-end", "40", "--chunks", "65,16,16",
                 "--quiet"]) == 0
    np.testing.assert_array_equal(open_volume(tmp_path / "crop.zarr").compute(), full[:, 5:40])
    # convert_zarr takes the render as a dask array too
    arr = render_surface(seg.tifxyz, trees["scroll"], layers=5)
    out = convert_zarr(arr, tmp_path / "five.zarr", chunks=(5, 32, 32))
    np.testing.assert_array_equal(out.compute(), full[30:35])


def test_convert_refuses_output_inside_the_segment(trees):
    from vesuvius_dask import OutputError

    seg = open_segment(trees["open_data"], volume=trees["scroll"])
    with pytest.raises(OutputError):
        convert_zarr(seg, trees["open_data"] / "inside.zarr")
    assert not (trees["open_data"] / "inside.zarr").exists()


def test_predict_on_a_render(tmp_path, trees):
    torch = pytest.importorskip("torch")

    class ZMean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=2)  # (B, 1, z, y, x) -> (B, 1, y, x)

    torch.jit.script(ZMean()).save(str(tmp_path / "zmean.pt"))
    full = open_segment(trees["open_data"], volume=trees["scroll"]).volume.compute()
    assert main(["predict", str(tmp_path / "zmean.pt"), str(trees["open_data"]), str(tmp_path / "p.zarr"),
                 "--volume", str(trees["scroll"]), "--block", "65,24,24", "--overlap", "0,6,6",
                 "--quiet"]) == 0
    pred = zarr.open_array(tmp_path / "p.zarr", mode="r")[:]
    np.testing.assert_allclose(pred, full.astype(np.float32).mean(axis=0) / 255, rtol=1e-5, atol=1e-6)


def test_stream_with_segment_masks_and_labels_on_a_render(trees):
    torch = pytest.importorskip("torch")
    from vesuvius_dask import DaskVesuviusStream

    seg = open_segment(trees["open_data"], volume=trees["scroll"])
    full = seg.volume.compute()
    stream = DaskVesuviusStream([seg], 16, 12, 12, samples_per_epoch=16, batch_size=4, seed=2,
                                labels="segment", masks="segment", return_coords=True,
                                dtype=torch.float32)
    n = 0
    for blocks, labels, coords in stream:
        for b, lab, (_, z, y, x) in zip(blocks.numpy(), labels.numpy(), coords.tolist()):
            np.testing.assert_array_equal(b, full[z:z + 16, y:y + 12, x:x + 12])
            np.testing.assert_array_equal(lab, trees["ink"][y:y + 12, x:x + 12])
            assert trees["mask"][y:y + 12, x:x + 12].all()  # masks="segment": on supervision only
            n += 1
    assert n == 16


# -- over loopback HTTP: only the chunks of the surface's slab ------------------------------------------


def test_render_over_http_reads_only_the_slab(tmp_path):
    rng = np.random.default_rng(5)
    shape, chunk = (96, 96, 96), 16
    volume = rng.random(shape).astype(np.float32)
    zarr.create_array(tmp_path / "scroll.zarr", data=volume, chunks=(chunk,) * 3)
    j, i = np.mgrid[0:9, 0:10].astype(np.float64)
    x, y = 3 + 8 * i + 0.5 * j, 4 + 8 * j
    z = 40 + 0.08 * x + 0.05 * y  # a tilted plane: z 40..50 across the grid
    grids = {k: v.astype(np.float32) for k, v in (("x", x), ("y", y), ("z", z))}
    surf = surface_from_arrays(grids["x"], grids["y"], grids["z"], (0.125, 0.125))
    layers, step = 9, 1.0
    want, good = reference_render(volume, grids["x"], grids["y"], grids["z"], (0.125, 0.125),
                                  layers=layers, step=step)
    with SlowServer(tmp_path) as server:
        out = render_surface(surf, server.url("scroll.zarr"), layers=layers, step=step, chunks=(9, 24, 24))
        server.reset()
        got = out.compute()
        requests = server.chunk_requests()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the slab: every sample position (points +- 4 steps along the normals), plus the upper
    # trilinear neighbour, in stored chunks
    pts, normals, ok = surf.sample(np.arange(got.shape[1])[:, None], np.arange(got.shape[2])[None, :])
    assert np.array_equal(ok, good)
    offsets = (np.arange(layers) - layers // 2) * step
    pos = pts[ok][None] + offsets[:, None, None] * normals[ok][None]
    lo = np.floor(pos.reshape(-1, 3).min(axis=0)).astype(int) // chunk
    hi = np.minimum(np.floor(pos.reshape(-1, 3).max(axis=0)).astype(int) + 1, np.array(shape) - 1) // chunk
    slab = {(a, b, c) for a in range(lo[0], hi[0] + 1) for b in range(lo[1], hi[1] + 1)
            for c in range(lo[2], hi[2] + 1)}
    touched = {tuple(int(v) for v in re.search(r"(\d+)/(\d+)/(\d+)$", p).groups()) for p in requests}
    assert touched <= slab and len(touched) >= len(slab) // 2
    assert len(slab) < (shape[0] // chunk) * (shape[1] // chunk) * (shape[2] // chunk) // 2
    assert {z for z, _, _ in touched} == {2, 3}  # z 36..54 of 96: chunk rows 2 and 3 of 6


# -- the path without scipy gives the same render ------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_render_without_scipy_matches_reference(monkeypatch, dtype):
    import vesuvius_dask.surfaces.render as render_mod

    rng = np.random.default_rng(11)
    shape = (30, 70, 90)
    vol = (rng.random(shape) * 250).astype(dtype)
    g = synthetic_sheet((9, 10), (0.25, 0.5), shape, seed=12, holes=4)
    surf = surface_from_arrays(g["x"], g["y"], g["z"], (0.25, 0.5))
    want, good = reference_render(vol, g["x"], g["y"], g["z"], (0.25, 0.5), layers=9, step=1.5)
    with_scipy = render_surface(surf, vol, layers=9, step=1.5, chunks=(9, 8, 16)).compute()
    monkeypatch.setattr(render_mod, "MAP_COORDINATES", None)
    without = render_surface(surf, vol, layers=9, step=1.5, chunks=(9, 8, 16)).compute()
    assert with_scipy.dtype == without.dtype == dtype and good.mean() > 0.5
    for got in (with_scipy, without):
        if dtype == np.uint8:
            _close(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_render_command(tmp_path, trees, capsys):
    want = open_segment(trees["open_data"], volume=trees["scroll"]).volume.compute()
    out = tmp_path / "r.zarr"
    assert main(["render", str(trees["open_data"]), str(trees["scroll"]), str(out), "--chunks", "65,32,32",
                 "--quiet"]) == 0
    np.testing.assert_array_equal(open_volume(out).compute(), want)
    assert main(["render", str(trees["tifxyz"]), str(trees["scroll"]), str(out), "--layers", "5",
                 "--quiet"]) == 2  # the output exists: refused, one line
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "r.zarr" in err
    assert main(["render", str(trees["tifxyz"]), str(trees["scroll"]), str(out), "--layers", "5",
                 "--overwrite", "--quiet"]) == 0
    np.testing.assert_array_equal(open_volume(out).compute(), want[30:35])
    assert main(["render", str(tmp_path / "nowhere"), str(trees["scroll"]), str(tmp_path / "x.zarr")]) == 2
    assert "nowhere: no such segment folder" in capsys.readouterr().err
