"""Segments over HTTP: TIFF layers by byte range (or whole), masks and labels by URL."""

import os

import numpy as np
import pytest
import tifffile

from vesuvius_dask import DaskVesuviusStream, VolumeError, open_segment
from vesuvius_dask.errors import VolumeNotFoundError
from vesuvius_dask.io.remote_tiff import RemoteTiffStack
from vesuvius_dask.testing import write_segment
from vesuvius_dask.testing.server import SlowServer

SEG_ID = "20230101000000"
SHAPE = (6, 120, 150)


def legacy_segment(root, shape=SHAPE, compression=None, seed=3):
    """A volpkg ``paths/<id>/``: ``layers/NN.tif``, ``<id>_mask.png``, ``<id>_inklabels.png``."""
    folder = root / "paths" / SEG_ID
    arrays = write_segment(folder, shape, seed=seed, compression=compression)
    os.rename(folder / "surface_volume", folder / "layers")
    os.rename(folder / "mask.png", folder / f"{SEG_ID}_mask.png")
    os.rename(folder / "inklabels.png", folder / f"{SEG_ID}_inklabels.png")
    return arrays


@pytest.fixture
def served(tmp_path):
    arrays = legacy_segment(tmp_path)
    with SlowServer(tmp_path) as server:
        yield server, arrays, tmp_path


def stack_of(seg) -> RemoteTiffStack:
    return next(v for v in seg.volume.dask.values() if isinstance(v, RemoteTiffStack))


def test_legacy_layout_reads_by_range_and_equals_numpy(served):
    server, arrays, root = served
    seg = open_segment(server.url(f"paths/{SEG_ID}/"))
    assert seg.volume.shape == SHAPE and seg.volume.dtype == arrays["volume"].dtype
    stack = stack_of(seg)
    assert all(layer.strips is not None for layer in stack.layers)  # every layer by range
    local = tifffile.TiffFile(root / "paths" / SEG_ID / "layers" / "00.tif").pages[0]
    assert local.compression == 1 and len(local.dataoffsets) == len(stack.layers[0].strips)
    vol = arrays["volume"]
    for z, y, x in [(0, 0, 0), (2, 37, 81), (4, 100, 130)]:
        np.testing.assert_array_equal(seg.volume[z:z + 2, y:y + 20, x:x + 20].compute(),
                                      vol[z:z + 2, y:y + 20, x:x + 20])
    np.testing.assert_array_equal(stack[3, 5:9, 7:11], vol[3, 5:9, 7:11])
    np.testing.assert_array_equal(stack[1:5:2, 10:40:3, ::7], vol[1:5:2, 10:40:3, ::7])
    np.testing.assert_array_equal(seg.mask.compute() != 0, arrays["mask"] != 0)
    np.testing.assert_array_equal(seg.labels.compute() != 0, arrays["labels"] != 0)
    assert seg.ir is None and "mask" in repr(seg)


def test_small_block_of_a_large_layer_transfers_its_rows(tmp_path):
    data = np.random.default_rng(0).integers(0, 65535, (2, 1024, 1024), dtype=np.uint16)
    folder = tmp_path / SEG_ID / "layers"
    folder.mkdir(parents=True)
    for z in range(2):
        tifffile.imwrite(folder / f"{z:02d}.tif", data[z], rowsperstrip=10)  # 103 strips
    with SlowServer(tmp_path) as server:
        seg = open_segment(server.url(SEG_ID))
        stack = stack_of(seg)
        assert len(stack.layers[0].strips) == 103
        server.bytes_sent = 0
        np.testing.assert_array_equal(stack[1, 505:515, 100:200], data[1, 505:515, 100:200])
        assert server.bytes_sent == 10 * 1024 * 2  # rows 505:515 across two strips, nothing more
        server.bytes_sent = 0
        np.testing.assert_array_equal(seg.volume[0:1, 500:510, 100:200].compute(),
                                      data[0:1, 500:510, 100:200])
        assert 10 * 1024 * 2 <= server.bytes_sent <= 64 * 1024 * 2  # at most its chunk's 64 rows of 1024
        server.ranges = False  # a server that ignores Range: still right
        np.testing.assert_array_equal(stack[0:2, 1000:1024, 3:900], data[0:2, 1000:1024, 3:900])


def test_stream_over_the_url_equals_numpy(served):
    server, arrays, _ = served
    seg = open_segment(server.url(f"paths/{SEG_ID}"))
    stream = DaskVesuviusStream([seg], 2, 16, 16, samples_per_epoch=30, batch_size=10,
                                labels="segment", return_coords=True, seed=2)
    n = 0
    for blocks, labels, coords in stream:
        for b, lab, (_, z, y, x) in zip(blocks.numpy(), labels.numpy(), coords.tolist()):
            np.testing.assert_array_equal(b, arrays["volume"][z:z + 2, y:y + 16, x:x + 16])
            np.testing.assert_array_equal(lab != 0, arrays["labels"][y:y + 16, x:x + 16] != 0)
            n += 1
    assert n == 30


def test_compressed_layers_are_fetched_whole_through_cache_dir(tmp_path):
    arrays = legacy_segment(tmp_path / "srv", compression="zlib")
    with SlowServer(tmp_path / "srv") as server:
        url = server.url(f"paths/{SEG_ID}")
        seg = open_segment(url, cache_dir=tmp_path / "cache")
        assert all(layer.strips is None for layer in stack_of(seg).layers)
        np.testing.assert_array_equal(seg.volume[1:4, 10:30, 20:50].compute(),
                                      arrays["volume"][1:4, 10:30, 20:50])
        again = open_segment(url, cache_dir=tmp_path / "cache")
        server.reset()
        np.testing.assert_array_equal(again.volume[1:4, 50:90, 0:150].compute(),
                                      arrays["volume"][1:4, 50:90, 0:150])
        assert not server.chunk_requests()  # the three layers came from cache_dir
        server.ranges = False
        np.testing.assert_array_equal(open_segment(url).volume[5, 7:9, 9:11].compute(),
                                      arrays["volume"][5, 7:9, 9:11])


def test_fragment_layout_and_a_server_that_ignores_range(tmp_path):
    arrays = write_segment(tmp_path / "frag", SHAPE, seed=5)
    with SlowServer(tmp_path) as server:
        server.ranges = False
        seg = open_segment(server.url("frag"))  # surface_volume/, mask.png, inklabels.png
        np.testing.assert_array_equal(seg.volume.compute(), arrays["volume"])
        np.testing.assert_array_equal(seg.mask.compute() != 0, arrays["mask"] != 0)


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_and_truncated_layers_are_one_line_naming_the_url(served):
    server, _, root = served
    layers = root / "paths" / SEG_ID / "layers"
    url = server.url(f"paths/{SEG_ID}")
    with pytest.raises(VolumeNotFoundError) as err:
        open_segment(server.url("nowhere"))
    assert server.url("nowhere/layers/00.tif") in one_line(err)
    os.rename(layers / "03.tif", root / "03.tif")
    with pytest.raises(VolumeNotFoundError) as err:
        open_segment(url)
    assert f"{url}/layers/03.tif: missing" in one_line(err) and "05.tif exist" in one_line(err)
    os.rename(root / "03.tif", layers / "03.tif")
    whole = (layers / "02.tif").read_bytes()
    (layers / "02.tif").write_bytes(whole[:12])
    with pytest.raises(VolumeError) as err:
        open_segment(url)
    assert f"{url}/layers/02.tif: unreadable TIFF header" in one_line(err)
    (layers / "02.tif").write_bytes(whole[:len(whole) * 3 // 4])  # header whole, data cut short
    seg = open_segment(url)
    np.testing.assert_array_equal(seg.volume[2, :10].compute().shape, (10, 150))
    with pytest.raises(VolumeError) as err:
        seg.volume[2, 100:120].compute()
    assert f"{url}/layers/02.tif: rows 100:120 should be 6000 bytes" in one_line(err)
