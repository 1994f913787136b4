"""Shared fixtures: small synthetic volumes on disk (Zarr v2, v3, OME-Zarr) and in RAM."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zarr

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "example_zarr" / "example.zarr"
REAL_CROP = ROOT.parent / "shared" / "data" / "example.zarr"


def write_zarr(path: Path, data: np.ndarray, chunks, zarr_format: int = 3, shards=None):
    arr = zarr.create_array(path, shape=data.shape, chunks=chunks, dtype=data.dtype,
                            zarr_format=zarr_format, shards=shards)
    arr[:] = data
    return arr


def write_ome(path: Path, data: np.ndarray, chunks, levels: int = 3, zarr_format: int = 2):
    """A minimal OME-Zarr multiscale group (v0.4 metadata for Zarr v2, v0.5 for v3)."""
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    datasets = []
    level = data
    for i in range(levels):
        write_zarr(path / str(i), level, chunks=tuple(min(c, s) for c, s in zip(chunks, level.shape)),
                   zarr_format=zarr_format)
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 2.0 ** i, 2.0 ** i]}]})
        level = level[:, ::2, ::2]
    ms = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
           "datasets": datasets}]
    if zarr_format == 2:
        group.attrs["multiscales"] = ms
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": ms}
    return group


@pytest.fixture(scope="session")
def rng_volume() -> np.ndarray:
    """A (13, 150, 170) uint16 volume with every voxel distinct enough to catch misplacement."""
    rng = np.random.default_rng(1234)
    return rng.integers(0, 65535, size=(13, 150, 170), dtype=np.uint16)


@pytest.fixture(scope="session")
def zarr_v3(tmp_path_factory, rng_volume) -> Path:
    path = tmp_path_factory.mktemp("v3") / "vol.zarr"
    write_zarr(path, rng_volume, chunks=(4, 64, 64), zarr_format=3)
    return path


@pytest.fixture(scope="session")
def zarr_v2(tmp_path_factory, rng_volume) -> Path:
    path = tmp_path_factory.mktemp("v2") / "vol.zarr"
    write_zarr(path, rng_volume, chunks=(5, 50, 40), zarr_format=2)
    return path


@pytest.fixture(scope="session")
def ome_v2(tmp_path_factory, rng_volume) -> Path:
    path = tmp_path_factory.mktemp("ome") / "vol.ome.zarr"
    write_ome(path, rng_volume, chunks=(4, 64, 64), levels=3, zarr_format=2)
    return path


@pytest.fixture(scope="session")
def ome_v3(tmp_path_factory, rng_volume) -> Path:
    path = tmp_path_factory.mktemp("ome3") / "vol.ome.zarr"
    write_ome(path, rng_volume, chunks=(4, 64, 64), levels=2, zarr_format=3)
    return path


@pytest.fixture()
def real_crop() -> Path:
    if not REAL_CROP.exists():
        pytest.skip("../shared/data/example.zarr (real scroll crop) is not present")
    return REAL_CROP


# ----------------------------------------------------------------------------- the fast lane
#: What in a test's source starts another process, a cluster, a viewer or a subprocess:
#: such tests are ``slow`` (``make test-fast`` leaves them out; ``make test`` runs them).
STARTS_PROCESSES = re.compile(
    r"subprocess\.|Popen\(|num_workers=(?!0\b)|get_context\(|\.Process\(|os\.fork\(|LocalCluster|"
    r"Client\(|make_napari_viewer|napari\.|xvfb|torchrun|mp\.spawn|ProcessPool|run_cli_process|BIN\b")


def _source(item) -> str:
    import inspect

    try:
        return inspect.getsource(item.function)
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test whose own source starts processes (see :data:`STARTS_PROCESSES`)."""
    slow = pytest.mark.slow
    for item in items:
        if "slow" not in item.keywords and STARTS_PROCESSES.search(_source(item)):
            item.add_marker(slow)
