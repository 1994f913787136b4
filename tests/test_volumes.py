import pickle

import dask.array as da
import numpy as np
import pytest
import zarr

from vesuvius_dask import VolumeError, VolumeNotFoundError, open_volume
from vesuvius_dask.errors import InvalidTypeError, VesuviusDaskError
from vesuvius_dask.io.open import resolve_volume

from .conftest import EXAMPLE, write_zarr


@pytest.mark.parametrize("fixture", ["zarr_v2", "zarr_v3"])
def test_zarr_path_is_chunk_aligned_and_exact(request, fixture, rng_volume):
    path = request.getfixturevalue(fixture)
    stored = zarr.open(path, mode="r").chunks
    vol = open_volume(path)
    assert isinstance(vol, da.Array)
    assert vol.shape == rng_volume.shape and vol.dtype == rng_volume.dtype
    # one dask chunk per stored chunk
    assert all(c == s for axis, s in zip(vol.chunks, stored) for c in axis[:-1])
    np.testing.assert_array_equal(vol[2:9, 10:100, 33:150].compute(), rng_volume[2:9, 10:100, 33:150])
    assert open_volume(str(path)).name == vol.name  # deterministic, tokenized names


def test_zarr_array_object(zarr_v3, rng_volume):
    arr = zarr.open(zarr_v3, mode="r")
    vol = open_volume(arr)
    np.testing.assert_array_equal(vol.compute(), rng_volume)


@pytest.mark.parametrize("fixture,levels", [("ome_v2", 3), ("ome_v3", 2)])
def test_ome_zarr_levels(request, fixture, levels, rng_volume):
    path = request.getfixturevalue(fixture)
    np.testing.assert_array_equal(open_volume(path).compute(), rng_volume)
    np.testing.assert_array_equal(open_volume(path, level=1).compute(), rng_volume[:, ::2, ::2])
    with pytest.raises(VolumeError, match=rf"level {levels} does not exist.*0\.\.{levels - 1}") as err:
        open_volume(path, level=levels)
    assert str(path) in str(err.value)


def test_group_without_multiscales(tmp_path):
    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    g.create_array("raw", shape=(4, 4, 4), dtype="u2")
    with pytest.raises(VolumeError, match=r"not an OME-Zarr multiscale.*\['raw'\]") as err:
        open_volume(tmp_path / "g.zarr")
    assert "g.zarr" in str(err.value)


def test_level_on_plain_array(zarr_v3):
    with pytest.raises(VolumeError, match="single Zarr array"):
        open_volume(zarr_v3, level=2)


def test_numpy_wrapped_without_copy(rng_volume):
    record = resolve_volume(rng_volume)
    assert record.data is rng_volume
    vol = open_volume(rng_volume)
    # the default RAM chunking (4, 512, 512), clipped to the (13, 150, 170) shape
    assert vol.chunks == ((4, 4, 4, 1), (150,), (170,))
    np.testing.assert_array_equal(vol[3:5].compute(), rng_volume[3:5])
    vol2 = open_volume(rng_volume, chunks=(13, 50, 50))
    assert vol2.chunks[1] == (50, 50, 50)


def test_memmap_pickles_by_reference(tmp_path, rng_volume):
    path = tmp_path / "vol.raw"
    mm = np.memmap(path, dtype=rng_volume.dtype, mode="w+", shape=rng_volume.shape)
    mm[:] = rng_volume
    mm.flush()
    ro = np.memmap(path, dtype=rng_volume.dtype, mode="r", shape=rng_volume.shape)
    record = resolve_volume(ro)
    blob = pickle.dumps(record)
    assert len(blob) < rng_volume.nbytes / 10  # the data did not travel
    back = pickle.loads(blob)
    assert isinstance(back.data, np.memmap)
    np.testing.assert_array_equal(back.array.compute(), rng_volume)


def test_dask_passthrough(rng_volume):
    d = da.from_array(rng_volume, chunks=(3, 40, 40)) + 1
    assert open_volume(d) is d
    assert open_volume(d, chunks=(13, 150, 170)).chunks == ((13,), (150,), (170,))


def test_misaligned_chunks_warn(zarr_v3):
    with pytest.warns(UserWarning, match="not multiples of the stored chunks"):
        open_volume(zarr_v3, chunks=(4, 50, 64))
    open_volume(zarr_v3, chunks=(8, 128, 128))  # multiples: no warning needed


def test_missing_path(tmp_path):
    with pytest.raises(VolumeNotFoundError, match="nope.zarr: no such file"):
        open_volume(tmp_path / "nope.zarr")
    with pytest.raises(FileNotFoundError):
        open_volume(str(tmp_path / "nope.zarr"))


def test_not_a_zarr(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="empty: cannot be opened as a Zarr"):
        open_volume(tmp_path / "empty")


def test_not_3d(tmp_path):
    write_zarr(tmp_path / "2d.zarr", np.zeros((10, 10), np.uint16), chunks=(5, 5))
    with pytest.raises(VolumeError, match=r"2d.zarr: volumes must be 3-D.*\(10, 10\)"):
        open_volume(tmp_path / "2d.zarr")
    with pytest.raises(VolumeError, match="4-D"):
        open_volume(np.zeros((2, 2, 2, 2)))


def test_unsupported_dtype(tmp_path):
    with pytest.raises(VolumeError, match="unsupported dtype bool"):
        open_volume(np.zeros((2, 2, 2), bool))
    with pytest.raises(VolumeError, match="unsupported dtype complex64"):
        open_volume(da.zeros((2, 2, 2), dtype=np.complex64))


def test_unsupported_type():
    with pytest.raises(InvalidTypeError, match="type list"):
        open_volume([[[1]]])
    with pytest.raises(TypeError):
        open_volume(42)


def test_errors_share_a_base():
    assert issubclass(VolumeNotFoundError, VesuviusDaskError)
    assert issubclass(VolumeError, ValueError)


def test_bundled_example_opens():
    vol = open_volume(EXAMPLE)
    assert vol.shape == (16, 512, 512) and vol.dtype == np.uint16
    assert vol.chunks[0][0] == 4 and vol.chunks[1][0] == 128
    size = sum(f.stat().st_size for f in EXAMPLE.rglob("*") if f.is_file())
    assert size <= 16 * 2**20


def test_real_crop(real_crop):
    vol = open_volume(real_crop)
    assert vol.shape == (11, 1000, 1000) and vol.dtype == np.uint16
    assert vol.chunks[1][0] == 512
    direct = zarr.open(real_crop, mode="r")[0:4, 100:164, 900:964]
    np.testing.assert_array_equal(vol[0:4, 100:164, 900:964].compute(), direct)


def _tiff_folder(path, volume, compression=None):
    from vesuvius_dask.testing import write_tiff_stack

    return write_tiff_stack(path, volume, width=5, compression=compression)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiff_folder_opens_lazily(tmp_path, rng_volume, compression):
    from vesuvius_dask import DaskVesuviusStream

    vol_np = rng_volume[:7, :90, :110]
    folder = _tiff_folder(tmp_path / "slices", vol_np, compression)
    vol = open_volume(folder)
    assert vol.shape == vol_np.shape and vol.dtype == vol_np.dtype
    np.testing.assert_array_equal(vol[1:6, 5:80, 7:99].compute(), vol_np[1:6, 5:80, 7:99])
    assert open_volume(str(folder), chunks=(2, 32, 32)).chunksize == (2, 32, 32)
    stream = DaskVesuviusStream([str(folder)], 2, 16, 16, samples_per_epoch=40, batch_size=8,
                                return_coords=True, seed=1)
    for blocks, coords in stream:
        for b, (_, z, y, x) in zip(blocks.numpy(), coords.tolist()):
            np.testing.assert_array_equal(b, vol_np[z:z + 2, y:y + 16, x:x + 16])


def test_multipage_tiff_and_segment_folder_paths(tmp_path, rng_volume):
    import tifffile

    from vesuvius_dask.testing import write_segment

    tifffile.imwrite(tmp_path / "stack.tif", rng_volume[:5, :40, :50], photometric="minisblack")
    np.testing.assert_array_equal(open_volume(tmp_path / "stack.tif").compute(), rng_volume[:5, :40, :50])
    arrays = write_segment(tmp_path / "seg", (6, 40, 50))
    np.testing.assert_array_equal(open_volume(tmp_path / "seg").compute(), arrays["volume"])


def test_tiff_folder_errors_name_the_file(tmp_path, rng_volume):
    folder = _tiff_folder(tmp_path / "slices", rng_volume[:5, :40, :50])
    (folder / "00002.tif").unlink()
    with pytest.raises(VolumeError, match="slices.*missing.*2"):
        open_volume(folder)
    with pytest.raises(VolumeError, match="level=1 applies to OME-Zarr"):
        open_volume(tmp_path / "slices", level=1)
