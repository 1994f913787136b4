"""BatchAugment: each op against a numpy reference, image and targets alike, seeded, shapes kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vesuvius_dask.errors import ArgumentError
from vesuvius_dask.loaders import augment as augment_mod
from vesuvius_dask.loaders.augment import AugmentParams, BatchAugment


def _batch(b=6, z=10, y=12, x=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, z, y, x, generator=g)


def _labels(image):
    """Targets that are deterministic functions of the image, voxel by voxel (3-D) or along z (2-D)."""
    return {"ink": (image.sum(dim=-3) > image.shape[-3] / 2).to(torch.uint8),
            "supervision": (image > 0.5).to(torch.uint8),
            "distance": image * 2 - 1}


def _params(b, depth, *, flip=None, rot=None, shift=None, cutout=None, gain=None, bias=None):
    return AugmentParams(
        flip=torch.zeros(b, 3, dtype=torch.bool) if flip is None else torch.tensor(flip),
        rot90=torch.zeros(b, dtype=torch.long) if rot is None else torch.tensor(rot),
        depth=torch.zeros(b, dtype=torch.long) if shift is None else torch.tensor(shift),
        cutout=torch.zeros(b, depth, dtype=torch.bool) if cutout is None else torch.tensor(cutout),
        gain=torch.ones(b) if gain is None else torch.tensor(gain),
        bias=torch.zeros(b) if bias is None else torch.tensor(bias))


def test_geometric_ops_keep_labels_a_function_of_the_image():
    image = _batch()
    aug = BatchAugment(flip_axes="zyx", depth_shift=3, seed=0)
    out, targets = aug(image, _labels(image))
    assert out.shape == image.shape
    # the fill (0) maps to the labels' fill: 0 > 0.5 is 0, 0 * 2 - 1 is not the distance's fill,
    # so compare the distance only where the image was not filled
    assert torch.equal(targets["supervision"], (out > 0.5).to(torch.uint8))
    filled = (out == 0).all(dim=(-2, -1), keepdim=True).expand_as(out)
    assert torch.equal(targets["distance"][~filled], (out * 2 - 1)[~filled])
    assert filled.any() and not filled.all()  # some layers were shifted in


def test_flips_and_rotations_keep_2d_and_3d_labels_aligned():
    image = _batch(b=16)
    out, targets = BatchAugment(flip_axes="zyx", seed=1)(image, _labels(image))
    assert torch.equal(targets["ink"], _labels(out)["ink"])
    assert torch.equal(targets["supervision"], _labels(out)["supervision"])
    assert torch.allclose(targets["distance"], out * 2 - 1)
    assert not torch.equal(out, image)


def test_depth_crop_window_from_a_deeper_read():
    image = _batch(z=14)
    aug = BatchAugment(depth_crop=10, rotate90=False, p_flip=0, seed=3)
    out, targets = aug(image, _labels(image))
    assert out.shape == (6, 10, 12, 12) and targets["supervision"].shape == (6, 10, 12, 12)
    assert torch.equal(targets["supervision"], (out > 0.5).to(torch.uint8))
    offsets = set()
    for i in range(6):  # each sample is a window of its own input
        hits = [o for o in range(5) if torch.equal(out[i], image[i, o:o + 10])]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 1


def test_intensity_and_cutout_touch_the_image_only():
    image = _batch(b=8)
    geometric = BatchAugment(flip_axes="yx", depth_shift=2, seed=7)
    full = BatchAugment(flip_axes="yx", depth_shift=2, cutout_layers=3, p_cutout=1.0,
                        intensity=(0.2, 0.1), seed=7)
    g_out, g_t = geometric(image, _labels(image))
    f_out, f_t = full(image, _labels(image))
    for k in g_t:  # same seed: the same geometry, whichever ops are on
        assert torch.equal(g_t[k], f_t[k])
    assert not torch.allclose(g_out, f_out)
    cut = (f_out == 0).all(dim=(-2, -1))
    assert (cut.sum(dim=1) >= 1).all()  # p_cutout=1: every sample lost at least one layer


def test_seeded_reproducibility_and_inputs_kept():
    image = _batch()
    before = image.clone()
    kwargs = dict(flip_axes="zyx", depth_shift=2, cutout_layers=2, intensity=(0.1, 0.1))
    a1, t1 = BatchAugment(**kwargs, seed=5)(image, _labels(image))
    a2, t2 = BatchAugment(**kwargs, seed=5)(image, _labels(image))
    a3, _ = BatchAugment(**kwargs, seed=6)(image, _labels(image))
    assert torch.equal(a1, a2) and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert not torch.equal(a1, a3)
    assert torch.equal(image, before)  # inputs are never modified
    gen = torch.Generator().manual_seed(9)
    g1 = BatchAugment(**kwargs, generator=gen)(image)
    gen.manual_seed(9)
    assert torch.equal(g1, BatchAugment(**kwargs, generator=gen)(image))


def test_each_op_against_numpy():
    image = _batch(b=4, z=6, y=8, x=8)
    x = image.numpy()
    b, d = 4, 6
    aug = BatchAugment(flip_axes="zyx", depth_shift=2, fill=-1.0, cutout_layers=2, cutout_fill=9.0,
                       intensity=(0.5, 0.5))
    cut = np.zeros((b, d), bool)
    cut[1, [0, 4]] = True
    flips = [[True, False, False], [False, True, False], [False, False, True], [True, True, True]]
    p = _params(b, d, flip=flips, rot=[1, 2, 3, 0], shift=[2, -1, 0, 1], cutout=cut.tolist(),
                gain=[1.0, 2.0, 0.5, 1.5], bias=[0.0, 1.0, -1.0, 0.25])
    out, _ = aug.apply(image, None, p)
    for i in range(b):
        ref = np.full_like(x[i], -1.0)
        s = int(p.depth[i])
        src = np.arange(d) - s
        ok = (src >= 0) & (src < d)
        ref[ok] = x[i][src[ok]]                                    # depth shift with fill
        axes = [a for a, on in enumerate(p.flip[i].tolist()) if on]
        ref = np.flip(ref, axis=axes) if axes else ref             # flips
        ref = np.rot90(ref, int(p.rot90[i]), axes=(1, 2))          # quarter turns, y towards x
        ref = ref * float(p.gain[i]) + float(p.bias[i])            # intensity
        ref[cut[i]] = 9.0                                          # layer cut-out
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=1e-6, atol=1e-6)


def test_context_is_oriented_and_jittered_not_shifted():
    image = _batch(b=4, z=6, y=8, x=8)
    context = _batch(b=4, z=3, y=4, x=4, seed=1)
    aug = BatchAugment(flip_axes="yx", depth_shift=2, intensity=(0.3, 0.0))
    p = _params(4, 6, flip=[[False, True, False]] * 4, rot=[1, 0, 0, 2], shift=[2, 2, 2, 2],
                gain=[2.0, 1.0, 1.0, 1.0])
    _, t = aug.apply(image, {"context": context}, p)
    ref = np.rot90(np.flip(context[0].numpy(), axis=1), 1, axes=(1, 2)) * 2.0
    np.testing.assert_allclose(t["context"][0].numpy(), ref)


def test_shapes_channels_and_non_square_blocks():
    image = torch.rand(5, 2, 6, 8, 12)  # (B, C, Z, Y, X), y != x
    targets = {"supervision": (image[:, 0] > 0.5).to(torch.uint8)}
    aug = BatchAugment(flip_axes="zyx", depth_shift=1, seed=0)
    p = aug.sample(5, 6, square=False)
    assert set(p.rot90.tolist()) <= {0, 2}
    out, t = aug(image, targets)
    assert out.shape == image.shape and t["supervision"].shape == (5, 6, 8, 12)
    assert torch.equal(t["supervision"], (out[:, 0] > 0.5).to(torch.uint8))


def test_workers_draw_their_own_streams(monkeypatch):
    class Info:
        def __init__(self, i):
            self.id = i

    image = _batch()
    outs = []
    for wid in (0, 1):
        monkeypatch.setattr(augment_mod, "get_worker_info", lambda wid=wid: Info(wid))
        outs.append(BatchAugment(flip_axes="zyx", intensity=(0.2, 0.2), seed=3)(image))
    assert not torch.equal(outs[0], outs[1])


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(ArgumentError, match="flip_axes"):
        BatchAugment(flip_axes=("w",))
    with pytest.raises(ArgumentError, match="not both"):
        BatchAugment(depth_shift=2, depth_crop=4)
    with pytest.raises(ArgumentError, match="floating-point"):
        BatchAugment(intensity=(0.1, 0.0), seed=0)(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ArgumentError, match="at least that many layers"):
        BatchAugment(depth_crop=8, seed=0)(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ArgumentError, match="aligned with the image"):
        BatchAugment(depth_shift=1, seed=0)(torch.zeros(2, 4, 8, 8), {"s": torch.zeros(2, 3, 8, 8)})
    p = _params(1, 4, rot=[1])
    with pytest.raises(ArgumentError, match="context too must be square"):
        BatchAugment().apply(torch.zeros(1, 4, 8, 8), {"context": torch.zeros(1, 2, 4, 6)}, p)
