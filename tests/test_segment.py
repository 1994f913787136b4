import os
import pickle

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream, SamplingError, VolumeError, open_segment
from vesuvius_dask.errors import VolumeNotFoundError
from vesuvius_dask.io.segments import TiffStack
from vesuvius_dask.testing import write_segment

SHAPE = (10, 120, 150)


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg") / "20230101000000"
    arrays = write_segment(root, SHAPE, seed=2)
    return root, arrays


def test_open_segment_tiff_folder_lazily(segment):
    root, arrays = segment
    seg = open_segment(root)
    assert isinstance(seg.record.data, TiffStack)  # memory-mapped, no conversion
    assert seg.volume.shape == SHAPE
    np.testing.assert_array_equal(seg.volume[3:7, 10:90, 20:140].compute(),
                                  arrays["volume"][3:7, 10:90, 20:140])
    np.testing.assert_array_equal(seg.mask.compute() != 0, arrays["mask"] != 0)
    np.testing.assert_array_equal(seg.labels.compute() != 0, arrays["labels"] != 0)
    assert seg.ir is None and "mask" in repr(seg)
    back = pickle.loads(pickle.dumps(seg.record))
    np.testing.assert_array_equal(back.data[2:4, 5:9, 7:11], arrays["volume"][2:4, 5:9, 7:11])


def test_open_segment_prefers_zarr(tmp_path, segment):
    _, arrays = segment
    root = tmp_path / "seg"
    write_segment(root, SHAPE, seed=2)
    z = zarr.create_array(root / "volume.zarr", shape=SHAPE, chunks=(4, 64, 64), dtype="u2")
    z[:] = arrays["volume"] // 2
    seg = open_segment(root)
    assert seg.record.zarr is not None
    np.testing.assert_array_equal(seg.volume.compute(), arrays["volume"] // 2)


def test_compressed_layers_read_only_the_strips_needed(tmp_path, monkeypatch):
    import tifffile

    arrays = write_segment(tmp_path / "c", (6, 64, 80), seed=1, compression="zlib")
    seg = open_segment(tmp_path / "c")
    assert not seg.record.data.memmap  # region reads through tifffile's Zarr interface
    np.testing.assert_array_equal(seg.volume.compute(), arrays["volume"])
    # a block read opens its layers as Zarr stores (strips decoded on demand), never
    # reads a whole layer
    whole = []
    monkeypatch.setattr(tifffile, "imread", lambda *a, **k: whole.append(k) or
                        tifffile.TiffFile(a[0]).aszarr())
    fresh = open_segment(tmp_path / "c")
    np.testing.assert_array_equal(fresh.record.data[1:4, 10:30, 20:50],
                                  arrays["volume"][1:4, 10:30, 20:50])
    assert len(whole) == 3 and all(k.get("aszarr") for k in whole)
    stream = DaskVesuviusStream([fresh], 2, 16, 16, samples_per_epoch=30, batch_size=10,
                                return_coords=True, seed=2)
    for blocks, coords in stream:
        for b, (_, z, y, x) in zip(blocks.numpy(), coords.tolist()):
            np.testing.assert_array_equal(b, arrays["volume"][z:z + 2, y:y + 16, x:x + 16])


def test_segment_errors(tmp_path, segment):
    with pytest.raises(VolumeNotFoundError, match="nope: no such segment folder"):
        open_segment(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeNotFoundError, match="no volume found"):
        open_segment(tmp_path / "empty")
    root = tmp_path / "bad"
    write_segment(root, SHAPE, seed=2)
    Image.fromarray(np.zeros((100, 150), np.uint8)).save(root / "inklabels.png")
    with pytest.raises(VolumeError, match=r"inklabels.png: image is 100x150 .* volume .* is 120x150"):
        open_segment(root)
    (root / "inklabels.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(VolumeError, match="inklabels.png: corrupt or unreadable image"):
        open_segment(root)


@pytest.mark.slow
def test_large_png_past_pillow_guard(tmp_path):
    import PIL.Image

    h, w = 10_000, 9_500  # 95 Mpx: above Pillow's default MAX_IMAGE_PIXELS (~89 Mpx)
    assert h * w > PIL.Image.MAX_IMAGE_PIXELS
    img = np.zeros((h, w), np.uint8)
    img[::97, ::89] = 255
    PIL.Image.fromarray(img).save(tmp_path / "mask.png")
    from vesuvius_dask.io.segments import read_image

    arr = read_image(tmp_path / "mask.png")
    assert arr.shape == (h, w)
    assert int((arr.compute() != 0).sum()) == int((img != 0).sum())


def _brute_valid(mask, block, stride, coverage, nz):
    _, by, bx = block
    _, sy, sx = stride
    out = []
    for iz in range(nz):
        for y in range(0, mask.shape[0] - by + 1, sy):
            for x in range(0, mask.shape[1] - bx + 1, sx):
                window = mask[y:y + by, x:x + bx] != 0
                if window.sum() >= max(1, np.ceil(coverage * by * bx - 1e-9)):
                    out.append((iz * stride[0], y, x))
    return out


@pytest.mark.parametrize("coverage", [1.0, 0.5, 0.05])
def test_mask_rule_matches_brute_force(segment, coverage):
    root, arrays = segment
    seg = open_segment(root)
    block, stride = (4, 16, 16), (2, 3, 5)
    stream = DaskVesuviusStream([seg], *block, samples_per_epoch=10, masks="segment",
                                mask_coverage=coverage, stride=stride, seed=0)
    nz = (SHAPE[0] - 4) // 2 + 1
    expected = _brute_valid(arrays["mask"], block, stride, coverage, nz)
    assert stream.starts_per_volume == [len(expected)]
    all_starts = stream.grids[0].unravel(np.arange(len(expected)))
    assert [tuple(r) for r in all_starts.tolist()] == expected


@pytest.mark.slow
def test_labels_and_masks_match_numpy(segment):
    root, arrays = segment
    seg = open_segment(root)
    stream = DaskVesuviusStream([seg], 4, 16, 16, samples_per_epoch=300, seed=4, batch_size=32,
                                labels="segment", masks="segment", mask_coverage=0.75,
                                return_coords=True)
    valid = set(_brute_valid(arrays["mask"], (4, 16, 16), (1, 1, 1), 0.75, SHAPE[0] - 3))
    seen = set()
    for blocks, labels, coords in stream:
        assert labels.shape == (blocks.shape[0], 16, 16)
        for b, lab, (_, z, y, x) in zip(blocks, labels, coords.tolist()):
            np.testing.assert_array_equal(b.numpy(), arrays["volume"][z:z + 4, y:y + 16, x:x + 16])
            np.testing.assert_array_equal(lab.numpy() != 0, arrays["labels"][y:y + 16, x:x + 16] != 0)
            assert (z, y, x) in valid
            seen.add((z, y, x))
    assert len(seen) == 300


def test_3d_labels_and_single_blocks(rng_volume):
    lab3 = (rng_volume % 7).astype(np.uint8)
    stream = DaskVesuviusStream([rng_volume], 4, 8, 8, samples_per_epoch=50, seed=1,
                                labels=[lab3], return_coords=True)
    for block, label, (_, z, y, x) in stream:
        assert label.shape == (4, 8, 8)
        np.testing.assert_array_equal(label.numpy(), lab3[z:z + 4, y:y + 8, x:x + 8])
        np.testing.assert_array_equal(block.numpy(), rng_volume[z:z + 4, y:y + 8, x:x + 8])


def test_transform_gets_block_and_label(rng_volume):
    lab = np.arange(rng_volume.shape[1] * rng_volume.shape[2], dtype=np.int32).reshape(rng_volume.shape[1:])
    stream = DaskVesuviusStream([rng_volume], 4, 8, 8, samples_per_epoch=6, seed=1, labels=[lab],
                                dtype=torch.float32, return_coords=True,
                                transform=lambda b, lb: (b.flip(-1), lb.flip(-1) * 2))
    for block, label, (_, z, y, x) in stream:
        src = rng_volume[z:z + 4, y:y + 8, x:x + 8].astype(np.float32)
        np.testing.assert_array_equal(block.numpy(), src[..., ::-1])  # flipped, not just passed
        np.testing.assert_array_equal(label.numpy(), lab[y:y + 8, x:x + 8][:, ::-1] * 2)


def test_masks_with_workers_seed_no_duplicates(segment, tmp_path):
    root, arrays = segment
    seg = open_segment(root)
    ram = arrays["volume"][:, :100, :100].copy()
    ram_mask = np.zeros((100, 100), np.uint8)
    ram_mask[20:80, 30:90] = 1
    kw = dict(samples_per_epoch=400, seed=11, batch_size=20, return_coords=True,
              labels=[seg.labels, ram_mask], masks=[seg.mask, ram_mask], mask_coverage=1.0,
              sampling_method="proportional")
    stream = DaskVesuviusStream([seg, ram], 4, 16, 16, **kw)
    stream.set_epoch(0)
    single = {tuple(r) for _, _, c in DataLoader(stream, batch_size=None) for r in c.tolist()}
    stream.set_epoch(0)
    multi = [tuple(r) for _, _, c in DataLoader(stream, batch_size=None, num_workers=2, timeout=120)
             for r in c.tolist()]
    assert len(multi) == 400 and set(multi) == single
    for v, _z, y, x in multi:
        if v == 1:
            assert ram_mask[y:y + 16, x:x + 16].all()


def test_mask_errors(rng_volume):
    with pytest.raises(SamplingError, match=r"masks\[0\]: shape \(5, 5\) does not match"):
        DaskVesuviusStream([rng_volume], 4, 8, 8, samples_per_epoch=4, masks=[np.ones((5, 5))])
    with pytest.raises(SamplingError, match="mask_coverage must be in"):
        DaskVesuviusStream([rng_volume], 4, 8, 8, samples_per_epoch=4,
                           masks=[np.ones(rng_volume.shape[1:])], mask_coverage=0)
    empty = np.zeros(rng_volume.shape[1:], np.uint8)
    with pytest.raises(SamplingError, match="more than the 0 block starts"):
        DaskVesuviusStream([rng_volume], 4, 8, 8, samples_per_epoch=4, masks=[empty])
    with pytest.raises(TypeError, match="needs Segment objects"):
        DaskVesuviusStream([rng_volume], 4, 8, 8, samples_per_epoch=4, masks="segment")
    with pytest.raises(SamplingError, match="masks has 2 entries for 1 volumes"):
        DaskVesuviusStream([rng_volume], 4, 8, 8, samples_per_epoch=4, masks=[None, None])


@pytest.mark.slow
def test_sparse_mask_on_huge_lazy_volume_reads_only_its_chunks():
    """Construction and the first batch of a 65x8000x8000 lazy volume compute only the chunks read.

    Work is counted, not timed: a counter in the volume's own chunk function.
    """
    import dask.array as da

    shape = (65, 8000, 8000)
    calls = []

    def chunk(block_info=None):
        calls.append(block_info[None]["chunk-location"])
        return np.zeros(block_info[None]["chunk-shape"], np.uint16)

    lazy = da.map_blocks(chunk, dtype=np.uint16, chunks=da.core.normalize_chunks((4, 512, 512), shape))
    mask = np.zeros(shape[1:], np.uint8)
    mask[3000:3800, 3000:3800] = 1  # 1% of the area
    stream = DaskVesuviusStream([lazy], 4, 64, 64, samples_per_epoch=1000, seed=0, masks=[mask],
                                batch_size=50, return_coords=True, prefetch=0)
    assert calls == []  # nothing computed to build the plan
    _, coords = next(iter(stream))
    assert stream.starts_per_volume == [62 * 737 * 737]
    c = coords.numpy()
    assert np.all((c[:, 2] >= 3000) & (c[:, 2] + 64 <= 3800))
    # only chunks the 50 blocks touch: in the mask's chunk rows/cols, a few z slabs
    assert 0 < len(calls) <= 50 * 8
    assert all(5 <= cy <= 7 and 5 <= cx <= 7 for _, cy, cx in calls), calls


def test_scroll_segment_layout(tmp_path):
    # Scroll segments (volpkg paths/<id>/) keep their layers in layers/ and name the
    # images after the segment id.
    root = tmp_path / "20230205180739"
    arrays = write_segment(root, (6, 64, 80), seed=3)
    (root / "surface_volume").rename(root / "layers")
    (root / "mask.png").rename(root / "20230205180739_mask.png")
    (root / "inklabels.png").rename(root / "20230205180739_inklabels.png")
    seg = open_segment(root)
    np.testing.assert_array_equal(seg.volume.compute(), arrays["volume"])
    np.testing.assert_array_equal(seg.mask.compute() > 0, arrays["mask"] > 0)
    np.testing.assert_array_equal(seg.labels.compute() > 0, arrays["labels"] > 0)
    from vesuvius_dask.viewer import is_volume_path

    assert is_volume_path(root)


def test_tiff_stack_keeps_few_layers_mapped(tmp_path, monkeypatch):
    # Each mapped layer holds a file descriptor; a whole scroll has thousands of layers.
    import tifffile

    from vesuvius_dask.io.segments import TiffStack

    vol = np.arange(40 * 8 * 9, dtype=np.uint16).reshape(40, 8, 9)
    for z in range(40):
        tifffile.imwrite(tmp_path / f"{z:03d}.tif", vol[z])
    monkeypatch.setattr(TiffStack, "max_open", 8)
    stack = TiffStack([str(tmp_path / f"{z:03d}.tif") for z in range(40)], vol.shape, vol.dtype)
    before = len(os.listdir("/proc/self/fd"))
    np.testing.assert_array_equal(stack[0:40, 2:7, 1:8], vol[:, 2:7, 1:8])
    np.testing.assert_array_equal(stack[3], vol[3])
    assert len(stack._maps) == 8
    assert len(os.listdir("/proc/self/fd")) - before <= 8
