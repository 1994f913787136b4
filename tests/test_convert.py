import os

import numpy as np
import pytest
import tifffile
import zarr
from vesuvius_dask.cli.main import main

import vesuvius_dask.io.tiff as tiff_mod
import vesuvius_dask.writers.convert as convert_mod
from vesuvius_dask import ConversionError, convert_tiffs, open_volume
from vesuvius_dask.testing import write_tiff_stack


def write_stack(folder, data, width=2, order_seed=0, compression=None, prefix=""):
    """Created in shuffled order: listing order is not z order."""
    return write_tiff_stack(folder, data, width=width, order_seed=order_seed, compression=compression,
                            prefix=prefix)


@pytest.fixture(scope="module")
def stack_data():
    return np.random.default_rng(3).integers(0, 65535, size=(12, 70, 90), dtype=np.uint16)


@pytest.fixture()
def stack(tmp_path, stack_data):
    return write_stack(tmp_path / "layers", stack_data)


def test_convert_every_voxel(stack, stack_data, tmp_path):
    out = convert_tiffs(stack, tmp_path / "out.zarr", chunks=(4, 32, 32))
    np.testing.assert_array_equal(out.compute(), stack_data)
    plain = zarr.open(tmp_path / "out.zarr", mode="r")
    assert plain.metadata.zarr_format == 3 and plain.chunks == (4, 32, 32)
    np.testing.assert_array_equal(plain[:], stack_data)
    prov = plain.attrs["vesuvius_dask"]
    assert prov["roi"] == {"z": [0, 12], "y": [0, 70], "x": [0, 90]} and "vesuvius-dask" in prov["tool"]


def test_natural_order_beyond_width(tmp_path, stack_data):
    # 0.tif ... 11.tif without zero padding: "10" sorts before "2" in listing order
    src = write_stack(tmp_path / "nat", stack_data, width=1)
    out = convert_tiffs(src, tmp_path / "o.zarr", chunks=(4, 32, 32))
    np.testing.assert_array_equal(out.compute(), stack_data)


@pytest.mark.parametrize("roi", [
    dict(z=(2, 9)), dict(y=(5, 61), x=(17, 90)), dict(z=(11, 12), y=(0, 1), x=(89, 90)),
])
def test_roi_equals_numpy_slice(stack, stack_data, tmp_path, roi):
    out = convert_tiffs(stack, tmp_path / "roi.zarr", chunks=(4, 32, 32), **roi)
    sl = tuple(slice(*roi.get(a, (None, None))) for a in "zyx")
    np.testing.assert_array_equal(out.compute(), stack_data[sl])


@pytest.mark.parametrize("kwargs", [
    dict(zarr_format=2), dict(zarr_format=3, compressor="zstd"),
    dict(zarr_format=3, shards=(8, 64, 64)), dict(compressor="none"), dict(compressor="blosc-zstd"),
])
def test_formats_open_everywhere(stack, stack_data, tmp_path, kwargs):
    out = convert_tiffs(stack, tmp_path / "f.zarr", chunks=(4, 32, 32), **kwargs)
    np.testing.assert_array_equal(out.compute(), stack_data)
    plain = zarr.open(tmp_path / "f.zarr", mode="r")
    assert plain.metadata.zarr_format == kwargs.get("zarr_format", 3)
    if "shards" in kwargs:
        assert plain.shards == (8, 64, 64) and plain.chunks == (4, 32, 32)
    np.testing.assert_array_equal(open_volume(tmp_path / "f.zarr").compute(), stack_data)


@pytest.mark.slow
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_pyramid(stack, stack_data, tmp_path, zarr_format):
    convert_tiffs(stack, tmp_path / "p.ome.zarr", chunks=(4, 16, 16), ome=True, zarr_format=zarr_format)
    np.testing.assert_array_equal(open_volume(tmp_path / "p.ome.zarr").compute(), stack_data)
    lvl1 = open_volume(tmp_path / "p.ome.zarr", level=1)
    assert lvl1.shape == (6, 35, 45)
    expected = stack_data.astype(np.float64)
    blocks = expected.reshape(6, 2, 35, 2, 45, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(lvl1.compute(), np.round(blocks), atol=1)
    # level 2 halves odd sizes (35 -> 18, 45 -> 23): the last row and column repeat the edge
    lvl2 = open_volume(tmp_path / "p.ome.zarr", level=2).compute()
    edge = np.pad(lvl1.compute().astype(np.float64), [(0, 0), (0, 1), (0, 1)], mode="edge")
    expected2 = edge.reshape(3, 2, 18, 2, 23, 2).mean(axis=(1, 3, 5))
    assert lvl2.shape == (3, 18, 23)
    np.testing.assert_allclose(lvl2, np.round(expected2), atol=1)
    group = zarr.open_group(tmp_path / "p.ome.zarr", mode="r")
    attrs = group.attrs.asdict()
    ms = attrs["multiscales"] if zarr_format == 2 else attrs["ome"]["multiscales"]
    levels = ms[0]["datasets"]
    assert len(levels) >= 3
    last = open_volume(tmp_path / "p.ome.zarr", level=len(levels) - 1)
    assert last.shape[1] <= 16 and last.shape[2] <= 16
    assert levels[1]["coordinateTransformations"][0]["scale"] == [2.0, 2.0, 2.0]


@pytest.mark.slow
@pytest.mark.parametrize("zarr_format,version", [(2, "v04"), (3, "v05")])
def test_ome_output_passes_an_independent_validator(stack, tmp_path, zarr_format, version):
    """ome-zarr-models validates NGFF 0.4 (Zarr v2) and 0.5 (Zarr v3, dimension names) output."""
    models = pytest.importorskip(f"ome_zarr_models.{version}")
    kw = dict(shards=(8, 64, 64)) if zarr_format == 3 else {}
    convert_tiffs(stack, tmp_path / "v.ome.zarr", chunks=(4, 16, 16), ome=True, zarr_format=zarr_format,
                  **kw)
    image = models.Image.from_zarr(zarr.open_group(tmp_path / "v.ome.zarr", mode="r"))
    assert len(image.attributes.multiscales if zarr_format == 2 else image.attributes.ome.multiscales) == 1


@pytest.mark.parametrize("shards", [(4, 1024, 1024), (12, 64, 1024), (16, 96, 96)])
def test_shards_beyond_the_volume_convert_exactly(stack, stack_data, tmp_path, shards):
    out = convert_tiffs(stack, tmp_path / "s.zarr", chunks=(4, 32, 32), shards=shards)
    np.testing.assert_array_equal(out.compute(), stack_data)
    arr = zarr.open(tmp_path / "s.zarr", mode="r")
    assert all(s % c == 0 for s, c in zip(arr.shards, arr.chunks))


def test_multipage_and_glob(tmp_path, stack_data):
    tifffile.imwrite(tmp_path / "multi.tif", stack_data)
    out = convert_tiffs(tmp_path / "multi.tif", tmp_path / "m.zarr", chunks=(4, 32, 32))
    np.testing.assert_array_equal(out.compute(), stack_data)
    write_stack(tmp_path / "g", stack_data, prefix="layer_")
    (tmp_path / "g" / "notes.txt").write_text("not a layer")
    out = convert_tiffs(str(tmp_path / "g" / "layer_*.tif"), tmp_path / "g.zarr", chunks=(4, 32, 32))
    np.testing.assert_array_equal(out.compute(), stack_data)


def test_compressed_tiffs_are_read_whole(tmp_path, stack_data):
    src = write_stack(tmp_path / "c", stack_data, compression="zlib")
    assert not convert_mod.inspect_stack(convert_mod.find_layers(src)).memmappable
    out = convert_tiffs(src, tmp_path / "c.zarr", chunks=(4, 32, 32), y=(3, 50))
    np.testing.assert_array_equal(out.compute(), stack_data[:, 3:50])


def _no_output(tmp_path, name="bad.zarr"):
    leftovers = [p for p in os.listdir(tmp_path) if name in p]
    assert leftovers == []


def test_gap_in_numbering(stack, tmp_path):
    os.remove(stack / "05.tif")
    with pytest.raises(ConversionError, match=r"missing layer number\(s\) 5"):
        convert_tiffs(stack, tmp_path / "bad.zarr")
    _no_output(tmp_path)


def test_duplicate_numbers(stack, tmp_path):
    (stack / "5.tif").write_bytes((stack / "05.tif").read_bytes())
    with pytest.raises(ConversionError, match="layer number 5 appears more than once"):
        convert_tiffs(stack, tmp_path / "bad.zarr")
    _no_output(tmp_path)


def test_mismatched_shape_and_dtype(stack, stack_data, tmp_path):
    tifffile.imwrite(stack / "07.tif", stack_data[7, :60])
    with pytest.raises(ConversionError, match=r"07.tif: layer is 60x90 uint16, but .*00.tif is 70x90"):
        convert_tiffs(stack, tmp_path / "bad.zarr")
    tifffile.imwrite(stack / "07.tif", stack_data[7].astype(np.uint8))
    with pytest.raises(ConversionError, match=r"07.tif: layer is 70x90 uint8"):
        convert_tiffs(stack, tmp_path / "bad.zarr")
    _no_output(tmp_path)


def test_truncated_and_unreadable(stack, tmp_path):
    data = (stack / "09.tif").read_bytes()
    (stack / "09.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="09.tif: truncated TIFF"):
        convert_tiffs(stack, tmp_path / "bad.zarr")
    (stack / "09.tif").write_bytes(b"this is not a tiff at all")
    with pytest.raises(ConversionError, match="09.tif: unreadable TIFF"):
        convert_tiffs(stack, tmp_path / "bad.zarr")
    _no_output(tmp_path)


@pytest.mark.parametrize("kwargs,match", [
    (dict(z=(0, 13)), r"region of interest z 0..13 is outside the stack's z range 0..12"),
    (dict(y=(50, 40)), r"region of interest y 50..40"),
    (dict(x=(-1, 5)), r"region of interest x -1..5"),
    (dict(chunks=(0, 32, 32)), r"chunks\[z\] must be a positive integer, got 0"),
    (dict(shards=(6, 32, 32), chunks=(4, 32, 32)), "must be multiples of chunks"),
    (dict(compressor="lzma"), "unknown compressor 'lzma'"),
    (dict(zarr_format=2, shards=(8, 64, 64)), "shards need zarr_format=3"),
])
def test_bad_options(stack, tmp_path, kwargs, match):
    with pytest.raises(ConversionError, match=match):
        convert_tiffs(stack, tmp_path / "bad.zarr", **kwargs)
    _no_output(tmp_path)


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(ConversionError, match="nowhere: no such file"):
        convert_tiffs(tmp_path / "nowhere", tmp_path / "bad.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="contains no .tif"):
        convert_tiffs(tmp_path / "empty", tmp_path / "bad.zarr")


def test_refuses_to_overwrite_then_replaces(stack, stack_data, tmp_path):
    dst = tmp_path / "out.zarr"
    convert_tiffs(stack, dst, chunks=(4, 32, 32), z=(0, 4))
    with pytest.raises(FileExistsError, match="already exists"):
        convert_tiffs(stack, dst, chunks=(4, 32, 32))
    assert open_volume(dst).shape[0] == 4  # untouched
    convert_tiffs(stack, dst, chunks=(4, 32, 32), overwrite=True)
    np.testing.assert_array_equal(open_volume(dst).compute(), stack_data)


def test_failure_midway_leaves_no_output(stack, tmp_path, monkeypatch):
    real = tiff_mod.read_layer

    def failing(path, *args):
        if path.endswith("10.tif"):
            raise ConversionError(f"{path}: injected read failure")
        return real(path, *args)

    monkeypatch.setattr(tiff_mod, "read_layer", failing)
    with pytest.raises(ConversionError, match="10.tif: injected read failure"):
        convert_tiffs(stack, tmp_path / "bad.zarr", chunks=(4, 32, 32))
    _no_output(tmp_path)


def test_failure_midway_keeps_existing_output(stack, stack_data, tmp_path, monkeypatch):
    dst = tmp_path / "keep.zarr"
    convert_tiffs(stack, dst, chunks=(4, 32, 32))
    monkeypatch.setattr(tiff_mod, "read_layer", lambda *a: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        convert_tiffs(stack, dst, chunks=(4, 32, 32), overwrite=True)
    np.testing.assert_array_equal(open_volume(dst).compute(), stack_data)
    assert sorted(os.listdir(tmp_path)) == sorted(["layers", "keep.zarr"])


def test_cli_convert_and_errors(stack, stack_data, tmp_path, capsys):
    dst = tmp_path / "cli.zarr"
    assert main(["convert", str(stack), str(dst), "--chunks", "4,32,32", "--y-start", "10",
                 "--y-end", "40", "--zarr-format", "2", "--quiet"]) == 0
    np.testing.assert_array_equal(open_volume(dst).compute(), stack_data[:, 10:40])
    capsys.readouterr()
    assert main(["convert", str(stack), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["convert", str(stack), str(tmp_path / "x.zarr"), "--z-end", "99"]) == 2
    assert "outside the stack's z range" in capsys.readouterr().err
    assert main(["convert", str(stack), str(tmp_path / "p.zarr"), "--chunks", "4,32,32"]) == 0
    out = capsys.readouterr().out
    assert "(12, 70, 90)" in out  # the progress run ends with `info` of the output


def test_distributed_scheduler(stack, stack_data, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  protocol="tcp://", host="127.0.0.1",
                                  dashboard_address=":0") as cluster:
        out = convert_tiffs(stack, tmp_path / "d.zarr", chunks=(4, 32, 32),
                            scheduler=cluster.scheduler_address)
        np.testing.assert_array_equal(out.compute(), stack_data)


@pytest.mark.slow
def test_unreachable_scheduler(stack, tmp_path):
    pytest.importorskip("distributed")
    import dask

    from vesuvius_dask.errors import VesuviusDaskError

    with dask.config.set({"vesuvius-dask.connect-timeout": 1}):
        with pytest.raises(VesuviusDaskError, match="cannot reach the dask scheduler.*within 1 s"):
            convert_tiffs(stack, tmp_path / "u.zarr", scheduler="tcp://127.0.0.1:1")
    _no_output(tmp_path, "u.zarr")


def test_convert_a_segment_folder_uses_its_layers(tmp_path):
    from vesuvius_dask.testing import write_segment

    arrays = write_segment(tmp_path / "seg", (6, 40, 50))
    out = convert_tiffs(tmp_path / "seg", tmp_path / "seg.zarr", chunks=(2, 32, 32))
    np.testing.assert_array_equal(np.asarray(out[:]), arrays["volume"])
