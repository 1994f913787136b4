"""Native-3D training: patches, crops and labels projected along surface normals (issue 27).

Every check compares with an independent reference: a per-patch loop of the recipe, the
surface's full-resolution points, a per-pixel, per-offset loop of the projection, numpy
slices of the volume.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vesuvius_dask.errors import SamplingError
from vesuvius_dask.sampling.surface_patches import (
    SurfacePlan,
    SurfaceSampler,
    SurfaceSegment,
    find_patches,
)
from vesuvius_dask.surfaces.project import normal_offsets
from vesuvius_dask.surfaces.tifxyz import surface_from_arrays
from vesuvius_dask.testing.data import write_label_zarr, write_surface_segments

SID = "20240101000000"


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scroll(tmp_path_factory):
    """A synthetic scroll with one curved tifxyz segment, its label Zarrs and a validation mask."""
    root = tmp_path_factory.mktemp("native3d")
    info = write_surface_segments(root)
    val = np.zeros_like(info["mask"])
    val[:, 40:] = info["mask"][:, 40:]
    write_label_zarr(info["tifxyz"] / f"{SID}_validation_mask.zarr", val)
    info["validation"] = val
    return info


def flat_segment(volume, z, *, origin=(4, 4), size=(40, 40), ink=None, name="flat"):
    """A flat sheet at height ``z``: pixel (r, c) at (z, origin_y + r, origin_x + c), scale 1."""
    h, w = size
    j, i = np.mgrid[0:h, 0:w].astype(np.float64)
    surface = surface_from_arrays(origin[1] + i, origin[0] + j, np.full((h, w), float(z)), (1.0, 1.0),
                                  name=name)
    ink = np.zeros((h, w), np.uint8) if ink is None else ink
    return SurfaceSegment(surface, volume, ink, np.ones((h, w), np.uint8), name=name)


# ---------------------------------------------------------------------- patches
def reference_patches(sup, val, patch, overlap, coverage):
    """The recipe, patch by patch."""
    py, px = patch
    stride = max(1, int(round(py * overlap)))
    train, valid = [], []
    for y0 in range(0, sup.shape[0] - py + 1, stride):
        for x0 in range(0, sup.shape[1] - px + 1, stride):
            s, v = sup[y0:y0 + py, x0:x0 + px], val[y0:y0 + py, x0:x0 + px]
            if v.any():
                valid.append((y0, x0))
                continue
            if not s.any():
                continue
            rr, cc = np.nonzero(s | v)
            if (rr.max() - rr.min() + 1) * (cc.max() - cc.min() + 1) / (py * px) >= coverage:
                train.append((y0, x0))
    return train, valid


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 24), w=st.integers(1, 24), py=st.integers(1, 9), px=st.integers(1, 9),
       overlap=st.floats(0.05, 1.0), coverage=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       density=st.floats(0.0, 0.3))
def test_patches_match_the_recipe(h, w, py, px, overlap, coverage, seed, density):
    rng = np.random.default_rng(seed)
    sup = rng.random((h, w)) < density
    val = rng.random((h, w)) < density / 4
    train, valid = find_patches(sup, val, (py, px), overlap, coverage)
    ref_train, ref_valid = reference_patches(sup, val, (py, px), overlap, coverage)
    assert [tuple(c) for c in train.tolist()] == ref_train
    assert [tuple(c) for c in valid.tolist()] == ref_valid


def test_validation_patches_never_train(scroll):
    seg = SurfaceSegment.from_segment(scroll["open_data"], scroll["scroll"])
    plan = SurfacePlan([seg], (16, 16, 16), SurfaceSampler(overlap=0.5, seed=0))
    val_plan = SurfacePlan([seg], (16, 16, 16), SurfaceSampler(overlap=0.5, split="validation", seed=0))
    train = {tuple(p) for p in plan.patches.tolist()}
    valid = {tuple(p) for p in val_plan.patches.tolist()}
    assert train and valid and not train & valid
    for _, y0, x0 in plan.patches.tolist():
        assert not scroll["validation"][y0:y0 + 16, x0:x0 + 16].any()
        assert scroll["mask"][y0:y0 + 16, x0:x0 + 16].any()


def test_validation_labels_never_reach_training_blocks(scroll):
    """Changing every label inside the validation region changes no training block."""
    seg = SurfaceSegment.from_segment(scroll["open_data"], scroll["scroll"])
    val = scroll["validation"] > 0
    variants = []
    for fill in (0, 255):
        ink, sup = scroll["ink"].copy(), scroll["mask"].copy()
        ink[val], sup[val] = fill, fill
        variants.append(SurfaceSegment(seg.surface, scroll["scroll"], ink, sup, val.astype(np.uint8)))
    plans = [SurfacePlan([v], (16, 16, 16), SurfaceSampler(half_thickness=3, translate=4, seed=1))
             for v in variants]
    assert np.array_equal(plans[0].patches, plans[1].patches)
    for segs, starts in plans[0].batches(0):
        a, b = plans[0].targets(segs, starts), plans[1].targets(segs, starts)
        assert np.array_equal(a["inklabels"], b["inklabels"])
        assert np.array_equal(a["supervision"], b["supervision"])
    # and the validation split does see them
    vp = [SurfacePlan([v], (16, 16, 16), SurfaceSampler(half_thickness=3, split="validation", seed=1))
          for v in variants]
    segs, starts = next(vp[0].batches(0))
    got = [p.targets(segs, starts)["inklabels"] for p in vp]
    assert not np.array_equal(*got)


# ---------------------------------------------------------------------- crops
def test_crop_is_centred_on_the_patch_extent(scroll):
    seg = SurfaceSegment.from_segment(scroll["open_data"], scroll["scroll"])
    block = (12, 16, 16)
    plan = SurfacePlan([seg], block, SurfaceSampler(overlap=0.5, seed=0))
    full = seg.surface.full_points().compute()   # (H, W, 3), NaN where invalid
    shape = np.asarray(scroll["volume"].shape)
    for (_, y0, x0), start in zip(plan.patches.tolist(), plan.base_starts):
        pts = full[y0:y0 + 16, x0:x0 + 16].reshape(-1, 3)
        pts = pts[~np.isnan(pts[:, 0])]
        centre = (pts.min(axis=0) + pts.max(axis=0)) / 2
        want = np.floor(centre - (np.asarray(block) - 1) / 2 + 0.5).astype(int)
        assert np.array_equal(start, np.clip(want, 0, shape - block))
        inside = want == start
        assert np.all(np.abs(start + (np.asarray(block) - 1) / 2 - centre)[inside] <= 0.5)


def test_crop_at_the_border_is_shifted_inside():
    vol = np.zeros((20, 30, 30), np.uint8)
    seg = flat_segment(vol, 1.0, origin=(0, 0), size=(30, 30))
    plan = SurfacePlan([seg], (8, 8, 8), SurfaceSampler(overlap=1.0, half_thickness=2, translate=5, seed=0))
    for epoch in range(3):
        crops = plan.crops(epoch, np.arange(len(plan.patches)))
        assert (crops >= 0).all() and (crops + 8 <= np.array(vol.shape)).all()
    assert (plan.base_starts[:, 0] == 0).all()  # z centre 1 - 3.5 < 0: shifted inwards
    with pytest.raises(SamplingError, match="smaller than the block"):
        SurfacePlan([seg], (32, 8, 8), SurfaceSampler(seed=0))


def test_translation_is_bounded_seeded_and_new_each_epoch():
    vol = np.zeros((40, 60, 60), np.uint8)
    plan = SurfacePlan([flat_segment(vol, 20.0, size=(50, 50))], (8, 8, 8),
                       SurfaceSampler(overlap=1.0, translate=(2, 3, 3), seed=5))
    idx = np.arange(len(plan.patches))
    d0, d1 = plan.crops(0, idx) - plan.base_starts, plan.crops(1, idx) - plan.base_starts
    assert (np.abs(d0) <= [2, 3, 3]).all() and not np.array_equal(d0, d1)
    again = SurfacePlan([flat_segment(vol, 20.0, size=(50, 50))], (8, 8, 8),
                        SurfaceSampler(overlap=1.0, translate=(2, 3, 3), seed=5))
    assert np.array_equal(again.epoch_coords(3), plan.epoch_coords(3))


# ---------------------------------------------------------------------- labels
def brute_force_labels(plan, segment, start, split):
    """Every labelled pixel, every offset, one at a time (nearest voxel, halves up)."""
    f = 2 ** plan.level
    ink = np.zeros(plan.block, np.uint8)
    sup = np.zeros(plan.block, np.uint8)
    offsets = normal_offsets(plan.half_thickness)
    assert offsets[0] == -plan.half_thickness and offsets[-1] == plan.half_thickness
    assert offsets.size == 1 or np.diff(offsets).max() <= 0.5 + 1e-12
    for j in range(len(plan.segments)):
        if plan.volumes[j] is not plan.volumes[segment]:
            continue
        seg = plan.segments[j]
        i_p = np.asarray(seg.inklabels)[::f, ::f] > 0
        s_p = np.asarray(seg.supervision)[::f, ::f] > 0
        v_p = np.zeros_like(s_p) if seg.validation is None else np.asarray(seg.validation)[::f, ::f] > 0
        region = ((s_p | i_p) & ~v_p) if split == "train" else v_p
        height, width = seg.surface.shape
        for r, c in zip(*np.nonzero(region)):
            if r * f >= height or c * f >= width:
                continue
            p, n, ok = seg.surface.sample(np.array([r * f]), np.array([c * f]))
            if not ok[0]:
                continue
            for s in offsets:
                v = [math.floor((p[0][a] / f - start[a]) + s * n[0][a] + 0.5) for a in range(3)]
                if all(0 <= v[a] < plan.block[a] for a in range(3)):
                    sup[tuple(v)] = 1
                    if i_p[r, c]:
                        ink[tuple(v)] = 1
    return ink, sup


@pytest.mark.parametrize("level, half", [(0, 2.5), (1, 3.0)])
def test_projected_labels_match_a_brute_force_loop(scroll, level, half):
    f = 2 ** level
    vol = scroll["volume"][::f, ::f, ::f]
    seg = SurfaceSegment(SurfaceSegment.from_segment(scroll["open_data"], scroll["scroll"]).surface, vol,
                         scroll["ink"], scroll["mask"], scroll["validation"])
    block = (12, 16, 16) if level == 0 else (8, 8, 8)
    plan = SurfacePlan([seg], block, SurfaceSampler(level=level, half_thickness=half, translate=2, seed=3,
                                                    samples_per_epoch=6))
    checked = 0
    for segs, starts in plan.batches(0):
        got = plan.targets(segs, starts)
        for i in range(len(segs)):
            ink, sup = brute_force_labels(plan, int(segs[i]), starts[i], "train")
            assert np.array_equal(got["inklabels"][i], ink)
            assert np.array_equal(got["supervision"][i], sup)
            checked += int(sup.any())
    assert checked >= 3


@pytest.mark.parametrize("level, z, half, planes", [(0, 12.0, 2.0, [10, 11, 12, 13, 14]),
                                                    (1, 12.0, 2.0, [5, 6, 7])])
def test_flat_sheet_labels_lie_on_the_expected_planes(level, z, half, planes):
    f = 2 ** level
    vol = np.zeros((32 // f, 56 // f, 56 // f), np.uint8)
    ink = np.zeros((48, 48), np.uint8)
    ink[:, :24] = 1
    seg = flat_segment(vol, z, size=(48, 48), ink=ink)
    plan = SurfacePlan([seg], (16 // f, 16 // f, 16 // f),
                       SurfaceSampler(level=level, half_thickness=half, overlap=1.0, seed=0))
    for segs, starts in plan.batches(0):
        t = plan.targets(segs, starts)
        for i in range(len(segs)):
            zs = np.nonzero(t["supervision"][i].any(axis=(1, 2)))[0] + starts[i][0]
            assert zs.tolist() == planes
            layers = t["supervision"][i][np.array(planes) - starts[i][0]]
            assert (layers == layers[0]).all() and layers[0].any()  # the same footprint on every plane
            ink_zs = np.nonzero(t["inklabels"][i].any(axis=(1, 2)))[0] + starts[i][0]
            assert set(ink_zs.tolist()) <= set(planes)
            assert (t["inklabels"][i] <= t["supervision"][i]).all()


def test_crossing_segments_merge_by_max():
    vol = np.zeros((40, 40, 40), np.uint8)
    a = flat_segment(vol, 20.0, origin=(5, 5), size=(30, 30), ink=np.ones((30, 30), np.uint8), name="a")
    j, i = np.mgrid[0:30, 0:30].astype(np.float64)   # a vertical sheet x = 20 (rows along z)
    b_surface = surface_from_arrays(np.full((30, 30), 20.0), 5 + i, 5 + j, (1.0, 1.0), name="b")
    b = SurfaceSegment(b_surface, vol, np.zeros((30, 30), np.uint8), np.ones((30, 30), np.uint8), name="b")
    sampler = SurfaceSampler(half_thickness=1.5, overlap=1.0, seed=0)
    both, only_a, only_b = (SurfacePlan(s, (16, 16, 16), sampler) for s in ([a, b], [a], [b]))
    start = (12, 12, 12)
    out = [(np.zeros((16,) * 3, np.uint8), np.zeros((16,) * 3, np.uint8)) for _ in range(3)]
    both.project_into(0, start, *out[0])
    only_a.project_into(0, start, *out[1])
    only_b.project_into(0, start, *out[2])
    assert np.array_equal(out[0][0], np.maximum(out[1][0], out[2][0]))
    assert np.array_equal(out[0][1], np.maximum(out[1][1], out[2][1]))
    assert (out[2][1] & out[1][0]).any()           # where b is background and a is ink, ink wins
    assert not out[2][0].any() and out[1][0].any()


# ---------------------------------------------------------------------- the stream
def test_stream_blocks_are_volume_slices(scroll):
    from vesuvius_dask import DaskVesuviusStream

    seg = SurfaceSegment.from_segment(scroll["open_data"], scroll["scroll"])
    stream = DaskVesuviusStream([seg], block=(12, 16, 16), batch_size=4, return_coords=True,
                                sampler=SurfaceSampler(half_thickness=2, translate=3, seed=0))
    vol, n = scroll["volume"], 0
    for image, targets, coords in stream:
        assert set(targets) == {"inklabels", "supervision"}
        for k in range(image.shape[0]):
            s, z, y, x = coords[k].tolist()
            assert s == 0
            assert np.array_equal(image[k].numpy(), vol[z:z + 12, y:y + 16, x:x + 16])
            assert targets["supervision"][k].shape == image[k].shape
            n += 1
    assert n == stream.samples_per_epoch == len(stream.surface.patches)
    assert len(stream) == -(-n // 4)


def _epoch(stream, workers):
    import torch

    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    stream.set_epoch(2)
    items = []
    for image, targets, coords in loader:
        for k in range(image.shape[0]):
            items.append((tuple(coords[k].tolist()), int(image[k].sum()), int(targets["inklabels"][k].sum()),
                          int(targets["supervision"][k].sum())))
    return sorted(items)


def test_same_items_for_0_and_2_workers_and_ranks(scroll):
    from vesuvius_dask import DaskVesuviusStream

    seg = SurfaceSegment.from_segment(scroll["open_data"], scroll["scroll"])
    kw = dict(block=(12, 16, 16), batch_size=3, return_coords=True)
    sampler = SurfaceSampler(half_thickness=2, translate=2, seed=7)
    stream = DaskVesuviusStream([seg], sampler=sampler, **kw)
    pickle.loads(pickle.dumps(stream.surface))  # spawn-safe
    zero = _epoch(stream, 0)
    assert zero == _epoch(stream, 2)
    assert len({c for c, *_ in zero}) == len(zero) == len(stream.surface.patches)
    ranks = [DaskVesuviusStream([seg], sampler=sampler, rank=r, world_size=2, **kw) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    got = [(int(s), *c) for r in ranks for segs, starts in r.plan.batches(2, rank=r.rank, world_size=2)
           for s, c in zip(segs, starts.tolist())]
    want = stream.epoch_coords(2).tolist()
    assert {tuple(c) for c in got} == {tuple(c) for c in want}
    assert len(got) - len(want) < 2  # padding repeats fewer than world_size samples


def test_bad_arguments_are_one_line(scroll):
    from vesuvius_dask import DaskVesuviusStream

    seg = SurfaceSegment.from_segment(scroll["open_data"], scroll["scroll"])
    with pytest.raises(SamplingError, match="split must be"):
        SurfaceSampler(split="test")
    with pytest.raises(SamplingError, match="overlap must be in"):
        SurfaceSampler(overlap=0)
    with pytest.raises(SamplingError, match="leave labels= and masks= out"):
        DaskVesuviusStream([seg], block=8, sampler=SurfaceSampler(), labels="segment")
    with pytest.raises(SamplingError, match="more than the"):
        SurfacePlan([seg], (12, 16, 16), SurfaceSampler(samples_per_epoch=10_000))


def test_label_planes_of_another_size_are_refused_in_one_line():
    # a label plane of another segment (another size) would train on misaligned labels
    volume = np.zeros((16, 64, 64), np.uint8)
    good = flat_segment(volume, 8)
    for shape in ((20, 20), (50, 60)):
        wrong = SurfaceSegment(good.surface, volume, np.zeros(shape, np.uint8), np.ones(shape, np.uint8),
                               name="wrong")
        match = r"wrong: the label planes are \d+x\d+ at level 0.*40x40"
        with pytest.raises(SamplingError, match=match) as info:
            SurfacePlan([wrong], (8, 16, 16), SurfaceSampler(samples_per_epoch=1))
        assert "\n" not in str(info.value)
