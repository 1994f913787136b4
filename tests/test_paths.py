"""One answer to "what is this path": every entry point agrees on every kind of path."""

import os
import shutil

import numpy as np
import pytest
import tifffile

from vesuvius_dask import DaskVesuviusStream, open_volume
from vesuvius_dask.io.info import check, describe
from vesuvius_dask.io.paths import PathKind, path_kind, protected_roots
from vesuvius_dask.testing import write_segment
from vesuvius_dask.viewer import is_volume_path, read_layers
from vesuvius_dask.viewer._reader import napari_get_reader

from .conftest import write_ome, write_zarr

KINDS = {
    "v2.zarr": PathKind.ZARR, "v3.zarr": PathKind.ZARR, "o2.ome.zarr": PathKind.ZARR,
    "o3.ome.zarr": PathKind.ZARR, "tifs": PathKind.TIFF_FOLDER, "multi.tif": PathKind.TIFF_FILE,
    "seg_sv": PathKind.SEGMENT, "seg_layers": PathKind.SEGMENT, "seg_zarr": PathKind.SEGMENT,
    "seg_ome": PathKind.SEGMENT,
}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    d = np.random.default_rng(0).integers(0, 60000, (8, 64, 80), dtype=np.uint16)
    write_zarr(root / "v2.zarr", d, (4, 32, 32), zarr_format=2)
    write_zarr(root / "v3.zarr", d, (4, 32, 32), zarr_format=3)
    write_ome(root / "o2.ome.zarr", d, (4, 32, 32), levels=2, zarr_format=2)
    write_ome(root / "o3.ome.zarr", d, (4, 32, 32), levels=2, zarr_format=3)
    (root / "tifs").mkdir()
    for i in range(8):
        tifffile.imwrite(root / "tifs" / f"{i:02d}.tif", d[i])
    tifffile.imwrite(root / "multi.tif", d)
    write_segment(root / "seg_sv", (8, 64, 80))
    write_segment(root / "seg_layers", (8, 64, 80))
    os.rename(root / "seg_layers" / "surface_volume", root / "seg_layers" / "layers")
    write_segment(root / "seg_zarr", (8, 64, 80))
    shutil.rmtree(root / "seg_zarr" / "surface_volume")
    write_zarr(root / "seg_zarr" / "vol.zarr", d, (4, 32, 32))
    write_segment(root / "seg_ome", (8, 64, 80))
    shutil.rmtree(root / "seg_ome" / "surface_volume")
    write_ome(root / "seg_ome" / "vol.ome.zarr", d, (4, 32, 32), levels=2, zarr_format=3)
    return root, d


@pytest.mark.parametrize("name", list(KINDS))
def test_every_entry_point_agrees(kinds, name):
    root, data = kinds
    path = str(root / name)
    assert path_kind(path) == KINDS[name]
    vol = open_volume(path)
    if not name.startswith("seg"):
        np.testing.assert_array_equal(vol.compute(), data)
    assert vol.shape == data.shape
    blocks, coords = next(iter(DaskVesuviusStream([path], 4, 16, 16, samples_per_epoch=4, batch_size=4,
                                                  return_coords=True)))
    for blk, (_, z, y, x) in zip(blocks.numpy(), coords.tolist()):
        np.testing.assert_array_equal(blk, vol[z:z + 4, y:y + 16, x:x + 16].compute())
    text = describe(path)
    assert ("segment" in text) == name.startswith("seg") and "(8, 64, 80)" in text
    n, bad = check(path)
    assert n > 0 and bad == []
    layers = read_layers(path)
    assert len(layers) == (3 if name.startswith("seg") else 1)
    assert is_volume_path(path)  # multi-page TIFFs too: napari opens what every entry point opens
    assert napari_get_reader(path) is not None


def test_missing_and_other_paths(tmp_path):
    assert path_kind(tmp_path / "nope.zarr") == PathKind.MISSING
    (tmp_path / "notes.txt").write_text("x")
    assert path_kind(tmp_path / "notes.txt") == PathKind.OTHER
    assert path_kind("https://host/a.zarr") == PathKind.URL


def test_protected_roots_cover_the_segment(kinds):
    root, _ = kinds
    seg = (root / "seg_sv").resolve()
    assert seg in protected_roots(root / "seg_sv" / "surface_volume")
    assert seg in protected_roots(root / "seg_sv" / "surface_volume" / "00.tif")
    assert seg in protected_roots(root / "seg_sv" / "mask.png")
    level = protected_roots(root / "seg_ome" / "vol.ome.zarr" / "0")
    assert (root / "seg_ome" / "vol.ome.zarr").resolve() in level and (root / "seg_ome").resolve() in level
    assert protected_roots(root / "v3.zarr") == [(root / "v3.zarr").resolve()]  # a plain folder stays free


def test_a_single_page_tiff_stays_napari_own(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "one.tif", np.zeros((16, 16), np.uint8))
    assert not is_volume_path(tmp_path / "one.tif")
    assert is_volume_path("https://host/a.zarr")
