"""targets=: several aligned label volumes by name, each with its own dtype, in the batch's graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream, SamplingError
from vesuvius_dask.errors import InvalidTypeError

from .conftest import write_zarr

BLOCK = (4, 16, 16)


@pytest.fixture(scope="module")
def two_volumes(tmp_path_factory):
    """Two volumes (one Zarr, one in RAM), each with ink (2-D), supervision (3-D) and distance (float32).

    Supervision of the first is a Zarr path; values are random so that any misplacement shows.
    """
    root = tmp_path_factory.mktemp("targets")
    rng = np.random.default_rng(11)
    shapes = [(12, 64, 80), (10, 48, 48)]
    vols = [rng.integers(0, 65535, s, dtype=np.uint16) for s in shapes]
    write_zarr(root / "v0.zarr", vols[0], chunks=(4, 32, 32))
    ink = [(rng.random(s[1:]) > 0.5).astype(np.uint8) for s in shapes]
    sup = [rng.integers(0, 3, s, dtype=np.uint8) for s in shapes]
    write_zarr(root / "sup0.zarr", sup[0], chunks=(4, 32, 32))
    dist = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    files = [str(root / "v0.zarr"), vols[1]]
    targets = {"ink": ink, "supervision": [str(root / "sup0.zarr"), sup[1]], "distance": dist}
    return files, targets, {"image": vols, "ink": ink, "supervision": sup, "distance": dist}


def _check_batch(image, items, coords, ref):
    assert list(items) == ["ink", "supervision", "distance"]
    assert items["ink"].dtype == torch.uint8 and items["supervision"].dtype == torch.uint8
    assert items["distance"].dtype == torch.float32
    assert items["ink"].shape == (image.shape[0], 16, 16)
    for i, (v, z, y, x) in enumerate(coords.tolist()):
        block = np.s_[z:z + 4, y:y + 16, x:x + 16]
        np.testing.assert_array_equal(image[i].numpy(), ref["image"][v][block])
        np.testing.assert_array_equal(items["ink"][i].numpy(), ref["ink"][v][y:y + 16, x:x + 16])
        np.testing.assert_array_equal(items["supervision"][i].numpy(), ref["supervision"][v][block])
        np.testing.assert_array_equal(items["distance"][i].numpy(), ref["distance"][v][block])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dict_targets_equal_slices_of_each_label(two_volumes, num_workers):
    files, targets, ref = two_volumes
    stream = DaskVesuviusStream(files, block=BLOCK, samples_per_epoch=120, batch_size=16, seed=4,
                                return_coords=True, targets=targets)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, timeout=120 if num_workers else 0)
    seen = set()
    for image, items, coords in loader:
        _check_batch(image, items, coords, ref)
        seen.update(map(tuple, coords.tolist()))
    assert len(seen) == 120  # every block of the epoch, once, whatever the worker count
    assert {v for v, *_ in seen} == {0, 1}


def test_single_blocks_and_transform_get_the_dict(two_volumes):
    files, targets, ref = two_volumes
    got = []

    def transform(block, items):
        got.append(sorted(items))
        return block, {k: v for k, v in items.items() if k != "distance"}

    stream = DaskVesuviusStream(files, block=BLOCK, samples_per_epoch=10, seed=0, return_coords=True,
                                targets=targets, transform=transform)
    for _, items, coords in stream:
        v, z, y, x = coords.tolist()
        assert sorted(items) == ["ink", "supervision"]
        np.testing.assert_array_equal(items["ink"].numpy(), ref["ink"][v][y:y + 16, x:x + 16])
        want = ref["supervision"][v][z:z + 4, y:y + 16, x:x + 16]
        np.testing.assert_array_equal(items["supervision"].numpy(), want)
    assert got == [["distance", "ink", "supervision"]] * 10


def test_one_volume_takes_bare_targets_and_labels_still_work(rng_volume):
    ink = (rng_volume[0] > 30000).astype(np.uint8)
    kwargs = dict(block=BLOCK, samples_per_epoch=16, batch_size=8, seed=2, return_coords=True)
    with_targets = list(DaskVesuviusStream([rng_volume], **kwargs, targets={"ink": ink}))
    with_labels = list(DaskVesuviusStream([rng_volume], **kwargs, labels=[ink]))
    for (b1, t, c1), (b2, lab, c2) in zip(with_targets, with_labels):
        assert torch.equal(c1, c2) and torch.equal(b1, b2)
        assert torch.equal(t["ink"], lab)  # labels= is the single-target case, yielded bare


def test_bad_targets_are_one_clear_error(rng_volume):
    kwargs = dict(block=BLOCK, samples_per_epoch=4, batch_size=2)
    with pytest.raises(InvalidTypeError, match="not both"):
        DaskVesuviusStream([rng_volume], **kwargs, labels=[rng_volume], targets={"a": rng_volume})
    with pytest.raises(InvalidTypeError, match="not a usable name"):
        DaskVesuviusStream([rng_volume], **kwargs, targets={"context": rng_volume})
    with pytest.raises(InvalidTypeError, match="non-empty dict"):
        DaskVesuviusStream([rng_volume], **kwargs, targets=[rng_volume])
    with pytest.raises(SamplingError, match=r"targets\['dist'\]\[0\]: shape \(13, 150, 10\)"):
        DaskVesuviusStream([rng_volume], **kwargs, targets={"dist": rng_volume[..., :10]})
    with pytest.raises(SamplingError, match=r"targets\['ink'\] has 1 entries for 2 volumes"):
        DaskVesuviusStream([rng_volume, rng_volume], **kwargs, targets={"ink": [rng_volume]})
