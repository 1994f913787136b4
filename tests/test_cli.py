import subprocess
import sys
from pathlib import Path

import pytest
from vesuvius_dask.cli.main import main

from .conftest import EXAMPLE

BIN = Path(sys.executable).parent / "vesuvius-dask"


def test_console_script_entry_point_resolves_to_main():
    """pyproject's [project.scripts] names an importable function: the CLI's console(), around main."""
    from importlib.metadata import entry_points

    from vesuvius_dask.cli.main import console

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "vesuvius-dask"]
    assert script.load() is console


def test_console_script_info(zarr_v2):
    if not BIN.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(BIN), "info", str(EXAMPLE), str(zarr_v2)], capture_output=True,
                         text=True, check=True).stdout
    assert "(16, 512, 512)" in out and "uint16" in out and "Zarr v3" in out and "Zarr v2" in out


def test_info_ome_levels(ome_v2, capsys):
    assert main(["info", str(ome_v2)]) == 0
    out = capsys.readouterr().out
    assert "3 levels" in out and "level 2" in out


def test_info_tiff_folder_and_segment(tmp_path, capsys):
    from vesuvius_dask.testing import write_segment

    write_segment(tmp_path / "seg", (6, 40, 50))
    assert main(["info", str(tmp_path / "seg" / "surface_volume")]) == 0
    out = capsys.readouterr().out
    assert "TIFF stack, 6 layers (00.tif .. 05.tif)" in out and "(6, 40, 50)" in out
    assert "memory-mapped" in out
    assert main(["info", str(tmp_path / "seg")]) == 0
    out = capsys.readouterr().out
    assert "segment" in out and "mask    40x50 uint8" in out and "ir      none" in out
    (tmp_path / "seg" / "surface_volume" / "03.tif").unlink()
    assert main(["info", str(tmp_path / "seg")]) == 2
    err = capsys.readouterr().err
    assert "surface_volume" in err and "3" in err and "Traceback" not in err


def test_info_missing_path_is_one_line_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.zarr")]) == 2
    err = capsys.readouterr().err
    assert "nope.zarr: no such file" in err and "Traceback" not in err


def test_stream_command(capsys):
    assert main(["stream", str(EXAMPLE), "--batches", "2", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "32 blocks" in out and "blocks/s" in out
