"""tifxyz surfaces, their normals and lazy renders, checked against an independent reference.

The reference (:func:`reference_render`) is built here from scipy alone: bilinear
upsampling of the grid and its normals with ``map_coordinates(order=1, mode="nearest")``
at grid positions ``(r * sy, c * sx)``, then the volume sampled with
``map_coordinates(order=1, mode="constant", cval=0)`` at ``(p + (k - L//2) step n) 2**-level``.
"""

import json
import pickle

import dask.array as da
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import map_coordinates

from vesuvius_dask import VolumeError, open_segment, open_volume
from vesuvius_dask.errors import ArgumentError, VolumeNotFoundError
from vesuvius_dask.io.label_zarrs import find_label_zarrs, label_zarr_levels, open_label_zarr
from vesuvius_dask.surfaces.render import render_segment, render_surface
from vesuvius_dask.surfaces.tifxyz import open_surface, surface_from_arrays
from vesuvius_dask.testing.data import (
    synthetic_sheet,
    write_label_zarr,
    write_surface_segments,
    write_tifxyz,
)

# -- the independent reference -------------------------------------------------------------


def _ref_normals(x, y, z, valid, flip):
    """Grid normals ty x tx (xyz components written out), undefined at borders / near invalid."""
    h, w = z.shape
    n = np.zeros((3, h, w))  # x, y, z components
    ok = np.zeros((h, w), bool)
    for j in range(1, h - 1):
        for i in range(1, w - 1):
            if not (valid[j, i] and valid[j, i - 1] and valid[j, i + 1] and valid[j - 1, i]
                    and valid[j + 1, i]):
                continue
            tx = np.array([x[j, i + 1] - x[j, i - 1], y[j, i + 1] - y[j, i - 1], z[j, i + 1] - z[j, i - 1]])
            ty = np.array([x[j + 1, i] - x[j - 1, i], y[j + 1, i] - y[j - 1, i], z[j + 1, i] - z[j - 1, i]])
            a, b = (tx, ty) if flip else (ty, tx)
            c = np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])
            if np.linalg.norm(c) > 1e-12:
                n[:, j, i], ok[j, i] = c / np.linalg.norm(c), True
    return n, ok


def reference_render(volume, x, y, z, scale, layers=65, step=1.0, level=0, flip=False):
    x, y, z = (np.asarray(a, np.float64) for a in (x, y, z))
    sx, sy = scale
    h, w = int(np.floor(z.shape[0] / sy + 1e-9)), int(np.floor(z.shape[1] / sx + 1e-9))
    valid = (z > 0) & np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    n, ok = _ref_normals(x, y, z, valid, flip)
    rr, cc = np.meshgrid(np.arange(h) * sy, np.arange(w) * sx, indexing="ij")
    up = lambda g: map_coordinates(np.where(np.isfinite(g), g, 0), [rr, cc], order=1, mode="nearest")  # noqa: E731
    px, py, pz = up(x), up(y), up(z)
    nx, ny, nz = (up(n[k] * ok) for k in range(3))
    length = np.sqrt(nx ** 2 + ny ** 2 + nz ** 2)
    good = (up(valid.astype(float)) > 1 - 1e-9) & (length > 1e-9)
    length[~good] = 1
    out = np.zeros((layers, h, w))
    for k in range(layers):
        d = (k - layers // 2) * step
        coords = [(pz + d * nz / length) / 2 ** level, (py + d * ny / length) / 2 ** level,
                  (px + d * nx / length) / 2 ** level]
        out[k] = map_coordinates(volume.astype(np.float64), coords, order=1, mode="constant", cval=0)
    out[:, ~good] = 0
    if volume.dtype.kind in "ui":
        return np.floor(out + 0.5).astype(volume.dtype), good
    return out.astype(volume.dtype), good


# -- renders against the reference ------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), scale=st.sampled_from([1.0, 0.5, 0.25]),
       step=st.sampled_from([0.5, 1.0, 1.5]), level=st.sampled_from([0, 1]),
       flip=st.booleans())
def test_tilted_planes_match_reference(seed, scale, step, level, flip):
    rng = np.random.default_rng(seed)
    vol = rng.random((24, 28, 32)).astype(np.float32)  # the volume at `level`
    n0 = np.array(vol.shape) * 2 ** level  # level-0 extent
    j, i = np.mgrid[0:6, 0:7].astype(np.float64)
    origin = rng.uniform(0.1, 0.6, 3) * n0
    u, v = rng.normal(size=3), rng.normal(size=3)  # (z, y, x) steps per grid node
    u[1] += 3 / scale
    v[2] += 3 / scale
    pts = origin + j[..., None] * u + i[..., None] * v
    z, y, x = pts[..., 0], pts[..., 1], pts[..., 2]
    surf = surface_from_arrays(x, y, z, (scale, scale), flip_normals=flip)
    got = render_surface(surf, vol, layers=7, step=step, level=level, chunks=(3, 5, 6)).compute()
    want, _ = reference_render(vol, x.astype(np.float32), y.astype(np.float32), z.astype(np.float32),
                               (scale, scale), layers=7, step=step, level=level, flip=flip)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), sx=st.sampled_from([0.5, 0.25, 0.125]),
       sy=st.sampled_from([0.5, 0.25]), holes=st.integers(0, 6))
def test_curved_sheets_with_holes_match_reference(seed, sx, sy, holes):
    rng = np.random.default_rng(seed)
    shape = (30, 70, 90)
    vol = rng.integers(0, 255, size=shape, dtype=np.uint8)
    g = synthetic_sheet((9, 10), (sx, sy), shape, seed=seed % 1000, holes=holes)
    surf = surface_from_arrays(g["x"], g["y"], g["z"], (sx, sy))
    got = render_surface(surf, vol, layers=9, step=1.5, chunks=(9, 16, 16)).compute()
    want, good = reference_render(vol, g["x"], g["y"], g["z"], (sx, sy), layers=9, step=1.5)
    assert got.dtype == np.uint8 and got.shape == want.shape == (9, int(9 / sy), int(10 / sx))
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.995  # float64 sums in another order
    assert not got[:, ~good].any()  # invalid pixels (holes, borders) are 0 on every layer
    if holes == 0:
        assert good.mean() > 0.5


def test_normal_sign_and_layer_order():
    """Rows along y, columns along x: ty x tx points to -z (vesuvius); flipped, to +z (VC)."""
    vol = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None], (40, 30, 30)).copy()
    j, i = np.mgrid[0:5, 0:5].astype(np.float32)
    surf = surface_from_arrays(2 + 4 * i, 2 + 4 * j, np.full((5, 5), 20.0), (0.25, 0.25))
    out = render_surface(surf, vol, layers=65, step=0.25).compute()
    inner = out[:, 4:16, 4:16]
    np.testing.assert_allclose(inner[32], 20.0)
    np.testing.assert_allclose(inner[0], 28.0)   # p - 32 * 0.25 * (-z)
    np.testing.assert_allclose(inner[64], 12.0)
    flipped = render_surface(surf, vol, layers=65, step=0.25, flip_normals=True).compute()
    np.testing.assert_allclose(flipped[0, 4:16, 4:16], 12.0)
    # border nodes have no normal: pixels on them (row 0; rows 16.. are clamped to node 4)
    # are 0, pixels between them and an inner node take the inner node's normal
    assert not out[:, 0].any() and not out[:, 16:].any() and not out[:, :, 0].any()
    np.testing.assert_allclose(out[0, 1:16, 1:16], 28.0)


def test_pixel_grid_mapping_and_sizes():
    j, i = np.mgrid[0:3, 0:4].astype(np.float32)
    surf = surface_from_arrays(10 + 7 * i, 10 + 5 * j, 5 + 0 * i, (0.05, 0.05))
    assert surf.shape == (60, 80) and surf.grid_shape == (3, 4)
    pts, _, _ = surf.sample(np.array([[20], [30]]), np.array([[40, 50]]))
    np.testing.assert_allclose(pts[0, 0], [5, 15, 24])       # pixel (20, 40) is node (1, 2)
    np.testing.assert_allclose(pts[1, 1], [5, 17.5, 27.5])   # halfway to node (2, 3)
    full = surf.full_points(chunks=(32, 32))
    assert full.shape == (60, 80, 3)
    np.testing.assert_allclose(full[20, 40].compute(), [5, 15, 24])


# -- laziness: a small window reads only the chunks it needs ----------------------------------------


class CountingArray:
    """A numpy volume that records every region read from it (one per dask chunk)."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(tuple((s.start, s.stop) for s in key))
        return self.data[key]


def test_small_window_reads_only_nearby_chunks():
    rng = np.random.default_rng(1)
    data = rng.random((64, 128, 128)).astype(np.float32)
    counting = CountingArray(data)
    vol = da.from_array(counting, chunks=(8, 8, 8), asarray=False)
    counting.reads.clear()  # dask's empty probe for the array's meta
    j, i = np.mgrid[0:33, 0:33].astype(np.float32)
    surf = surface_from_arrays(4 * i, 4 * j, np.full((33, 33), 30.0), (0.25, 0.25))
    out = render_surface(surf, vol, layers=5, step=1.0, chunks=(5, 16, 16))
    assert counting.reads == []  # building the graph reads nothing
    window = out[:, 48:64, 64:80].compute()  # one output chunk: (5, 16, 16)
    np.testing.assert_allclose(window, np.stack([data[28 + k, 48:64, 64:80] for k in range(5)])[::-1],
                               rtol=1e-6)
    touched = {tuple(a // 8 for a, _ in r) for r in counting.reads}
    # samples span z 28..32, y 48..63, x 64..79, plus the upper trilinear neighbour
    # (weight 0 here, still in the box): z 28..33, y 48..64, x 64..80
    assert touched == {(z, y, x) for z in (3, 4) for y in (6, 7, 8) for x in (8, 9, 10)}
    assert len(counting.reads) == len(touched)  # each chunk read once
    total = (64 // 8) * (128 // 8) * (128 // 8)
    assert len(touched) == 18 < total // 50


# -- tifxyz folders, masks, bad input ---------------------------------------------------------------


def _sheet_folder(tmp_path, name="seg", scale=(0.25, 0.25), **kw):
    g = synthetic_sheet((8, 9), scale, (30, 60, 60), seed=3)
    return write_tifxyz(tmp_path / name, g["x"], g["y"], g["z"], scale, **kw), g


def test_open_surface_reads_lazily_and_pickles(tmp_path):
    folder, g = _sheet_folder(tmp_path, meta={"area_cm2": 1.5})
    surf = open_surface(folder)
    assert surf.grid_shape == (8, 9) and surf.shape == (32, 36) and surf.scale == (0.25, 0.25)
    assert surf.meta["area_cm2"] == 1.5 and surf.uuid == "seg" and len(surf.bbox) == 2
    np.testing.assert_array_equal(surf.points[..., 2].compute(), g["x"])
    np.testing.assert_array_equal(surf.valid.compute(), g["z"] > 0)
    vol = np.random.default_rng(0).random((30, 60, 60)).astype(np.float32)
    ref = render_surface(surf, vol, layers=3).compute()
    back = pickle.loads(pickle.dumps(surf))
    np.testing.assert_array_equal(render_surface(back, vol, layers=3).compute(), ref)
    assert "grid 8x9, full 32x36" in repr(surf)


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_mask_tif_at_grid_size_and_multiples(tmp_path, factor):
    mask = np.full((8 * factor, 9 * factor), 255, np.uint8)
    mask[4 * factor + factor - 1, 4 * factor] = 0  # one pixel of node (4, 4)'s block
    folder, g = _sheet_folder(tmp_path, mask=mask)
    surf = open_surface(folder)
    valid = surf.valid.compute()
    assert not valid[4, 4] and valid.sum() == valid.size - 1
    vol = np.random.default_rng(0).random((30, 60, 60)).astype(np.float32) + 1
    out = render_surface(surf, vol, layers=3).compute()
    assert not out[:, 13:20, 13:20].any()  # pixels around node (4, 4) (grid 3.25 .. 4.75)
    assert out[:, 24, 24].all()


def test_label_images_in_tifxyz_folder_are_not_the_grid_mask(tmp_path):
    folder, _ = _sheet_folder(tmp_path, mask=np.full((8, 9), 255, np.uint8))
    seg = open_segment(folder)
    assert seg.mask is None and seg.volume is None and seg.tifxyz == folder


def _bad(tmp_path, what):
    folder, g = _sheet_folder(tmp_path, name=what)
    meta = json.loads((folder / "meta.json").read_text())
    if what == "shapes":
        tifffile.imwrite(folder / "y.tif", g["y"][:, :5])
    elif what == "no-scale":
        del meta["scale"]
    elif what == "bad-scale":
        meta["scale"] = [0.25, -1]
    elif what == "not-float":
        tifffile.imwrite(folder / "z.tif", g["z"].astype(np.uint16))
    elif what == "mask":
        tifffile.imwrite(folder / "mask.tif", np.full((10, 9), 255, np.uint8))
    elif what == "json":
        (folder / "meta.json").write_text("{not json")
        return folder
    elif what == "missing":
        (folder / "x.tif").unlink()
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("what, error, needle", [
    ("shapes", VolumeError, "must have the same shape; got x.tif 8x9, y.tif 8x5"),
    ("no-scale", VolumeError, "meta.json: no 'scale'"),
    ("bad-scale", VolumeError, "meta.json: scale [0.25, -1] must be two positive numbers"),
    ("not-float", VolumeError, "z.tif: dtype uint16 is not float"),
    ("mask", VolumeError, "mask.tif: mask is 10x9, neither the grid's 8x9 nor an integer multiple"),
    ("json", VolumeError, "meta.json: not valid JSON"),
    ("missing", VolumeNotFoundError, "not a tifxyz surface (missing x.tif)"),
])
def test_bad_tifxyz_one_line_errors(tmp_path, what, error, needle):
    folder = _bad(tmp_path, what)
    with pytest.raises(error) as err:
        open_surface(folder)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and str(folder) in msg


def test_bad_render_arguments(tmp_path):
    surf = surface_from_arrays(*np.ones((3, 4, 4)), (1, 1))
    vol = np.zeros((4, 4, 4), np.float32)
    for kw, needle in ((dict(layers=0), "layers=0"), (dict(step=-1.0), "step=-1.0"),
                       (dict(level=-1), "level=-1"), (dict(chunks=(1, 0, 4)), "chunks=(1, 0, 4)")):
        with pytest.raises(ArgumentError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            render_surface(surf, vol, **kw)


# -- label Zarrs ----------------------------------------------------------------------------------


def test_label_zarr_levels_and_plane(tmp_path):
    plane = (np.random.default_rng(2).random((300, 200)) > 0.7).astype(np.uint8) * 255
    write_label_zarr(tmp_path / "a_inklabels.zarr", plane, levels=3)
    assert label_zarr_levels(tmp_path / "a_inklabels.zarr") == [(65, 300, 200), (65, 150, 100), (65, 75, 50)]
    for lvl in range(3):
        got = open_label_zarr(tmp_path / "a_inklabels.zarr", level=lvl)
        np.testing.assert_array_equal(got.compute(), plane[:: 2 ** lvl, :: 2 ** lvl])
    assert not open_label_zarr(tmp_path / "a_inklabels.zarr", plane=31).compute().any()
    with pytest.raises(VolumeError, match=r"level 3 does not exist; this label Zarr has levels 0\.\.2"):
        open_label_zarr(tmp_path / "a_inklabels.zarr", level=3)
    with pytest.raises(VolumeError, match=r"plane 65 does not exist"):
        open_label_zarr(tmp_path / "a_inklabels.zarr", plane=65)


def test_find_label_zarrs_prefers_newest_version(tmp_path):
    plane = np.zeros((8, 8), np.uint8)
    for name in ("s_inklabels.zarr", "s_inklabels_v2.zarr", "s_inklabels_v10.zarr",
                 "s_supervision_mask.zarr", "s_validation_mask_v1.zarr"):
        write_label_zarr(tmp_path / name, plane, levels=1)
    found = find_label_zarrs(tmp_path)
    assert {k: v.name for k, v in found.items()} == {
        "inklabels": "s_inklabels_v10.zarr", "supervision_mask": "s_supervision_mask.zarr",
        "validation_mask": "s_validation_mask_v1.zarr"}


# -- both published trees, and renders used as volumes ---------------------------------------------


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return write_surface_segments(tmp_path_factory.mktemp("trees"), rendered=None)


def test_legacy_tree(trees):
    seg = open_segment(trees["legacy"])
    np.testing.assert_array_equal(seg.volume.compute(), trees["layers"])
    np.testing.assert_array_equal(seg.mask.compute(), trees["mask"])
    np.testing.assert_array_equal(seg.labels.compute(), trees["ink"])
    assert seg.tifxyz == trees["legacy"] and seg.label_zarrs == {}
    assert open_surface(seg).shape == trees["layers"].shape[1:]
    assert open_volume(trees["legacy"]).shape == (65, 56, 64)  # x/y/z.tif are not layers


@pytest.mark.parametrize("rendered", ["zarr", "tifs"])
def test_open_data_tree_with_rendered_volume(tmp_path, rendered):
    t = write_surface_segments(tmp_path, rendered=rendered, grid_shape=(6, 7))
    for where in (t["open_data"], t["tifxyz"]):
        seg = open_segment(where)
        assert seg.path == t["open_data"] and seg.tifxyz == t["tifxyz"]
        np.testing.assert_array_equal(seg.volume.compute(), t["layers"])
        np.testing.assert_array_equal(seg.labels.compute(), t["ink"])  # plane 32 of inklabels.zarr
        np.testing.assert_array_equal(seg.mask.compute(), t["mask"])   # of supervision_mask.zarr
        assert set(seg.label_zarrs) == {"inklabels", "supervision_mask"}


def test_unrendered_segment_renders_from_the_scroll(trees):
    seg = open_segment(trees["open_data"])
    assert seg.volume is None and "no volume" in repr(seg)
    with pytest.raises(VolumeNotFoundError, match="render_segment") as err:
        open_volume(trees["open_data"])
    assert "\n" not in str(err.value)
    rendered = render_segment(seg, trees["scroll"], chunks=(65, 32, 32))
    want, _ = reference_render(trees["volume"], trees["x"], trees["y"], trees["z"], (0.25, 0.25))
    got = rendered.volume.compute()
    assert got.shape == (65, 56, 64) and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert open_volume(rendered).shape == got.shape  # usable wherever a volume is
    np.testing.assert_array_equal(open_volume(rendered.volume)[:, 5:9, 7:30].compute(), got[:, 5:9, 7:30])


def test_rendered_segment_streams_with_its_labels(trees):
    torch = pytest.importorskip("torch")
    from vesuvius_dask import DaskVesuviusStream

    seg = render_segment(trees["open_data"], trees["scroll"], chunks=(65, 32, 32))
    full = seg.volume.compute()
    stream = DaskVesuviusStream([seg], 8, 16, 16, samples_per_epoch=12, batch_size=4, seed=1,
                                labels="segment", return_coords=True, dtype=torch.float32)
    n = 0
    for blocks, labels, coords in stream:
        for b, lab, (_, z, y, x) in zip(blocks.numpy(), labels.numpy(), coords.tolist()):
            np.testing.assert_array_equal(b, full[z:z + 8, y:y + 16, x:x + 16])
            np.testing.assert_array_equal(lab, trees["ink"][y:y + 16, x:x + 16])
            n += 1
    assert n == 12


def test_render_segment_checks_label_sizes(tmp_path):
    t = write_surface_segments(tmp_path, rendered=None, grid_shape=(6, 7))
    write_label_zarr(t["tifxyz"] / "20240101000000_inklabels_v2.zarr", np.zeros((20, 20), np.uint8))
    with pytest.raises(VolumeError, match=r"inklabels_v2.zarr: image is 20x20 .* the surface .* is 24x28"):
        render_segment(t["open_data"], t["scroll"])
