"""Every subcommand over a table of bad arguments: one line on stderr, exit 2, no traceback."""

import subprocess
import sys

import pytest
import torch
from vesuvius_dask.cli.main import main

from vesuvius_dask.testing import write_segment

from .conftest import EXAMPLE

BAD = {
    "info: missing path": ["info", "{tmp}/nope.zarr"],
    "info: level beyond": ["info", str(EXAMPLE), "--level", "3"],
    "info: negative level": ["info", str(EXAMPLE), "--level", "-1"],
    "info: not a volume": ["info", "{tmp}/empty"],
    "info --check: missing": ["info", "--check", "{tmp}/nope.zarr"],
    "stream: batch size 0": ["stream", str(EXAMPLE), "--batch-size", "0"],
    "stream: negative workers": ["stream", str(EXAMPLE), "--num-workers", "-1"],
    "stream: zero block": ["stream", str(EXAMPLE), "--z-size", "0"],
    "stream: not a number": ["stream", str(EXAMPLE), "--batches", "many"],
    "stream: block deeper than the volume": ["stream", str(EXAMPLE), "--z-size", "50"],
    "stream: more blocks than starts": ["stream", "{tmp}/seg", "--z-size", "6", "--y-size", "40",
                                        "--x-size", "50", "--batch-size", "4"],
    "stream: missing path": ["stream", "{tmp}/nope.zarr"],
    "stream: unknown method": ["stream", str(EXAMPLE), "--sampling-method", "random"],
    "convert: missing source": ["convert", "{tmp}/nope", "{tmp}/o.zarr"],
    "convert: zero chunk": ["convert", "{tmp}/seg", "{tmp}/o.zarr", "--chunks", "0,1,1"],
    "convert: two numbers": ["convert", "{tmp}/seg", "{tmp}/o.zarr", "--chunks", "1,2"],
    "convert: shards not a multiple": ["convert", "{tmp}/seg", "{tmp}/o.zarr", "--chunks", "2,16,16",
                                       "--shards", "3,32,32"],
    "convert: shards on v2": ["convert", "{tmp}/seg", "{tmp}/o.zarr", "--zarr-format", "2",
                              "--shards", "4,64,64"],
    "convert: format 4": ["convert", "{tmp}/seg", "{tmp}/o.zarr", "--zarr-format", "4"],
    "convert: z beyond": ["convert", "{tmp}/seg", "{tmp}/o.zarr", "--z-start", "50"],
    "convert: old flag": ["convert", "{tmp}/seg", "{tmp}/o.zarr", "--input", "x"],
    "convert: existing output": ["convert", "{tmp}/seg", str(EXAMPLE)],
    "convert: output folder missing": ["convert", "{tmp}/seg", "{tmp}/no/such/o.zarr"],
    "predict: missing model": ["predict", "{tmp}/nope.pt", str(EXAMPLE), "{tmp}/p.zarr"],
    "predict: not a model": ["predict", "{tmp}/garbage.pt", str(EXAMPLE), "{tmp}/p.zarr"],
    "predict: zero block": ["predict", "{tmp}/model.pt", str(EXAMPLE), "{tmp}/p.zarr", "--block", "0,8,8"],
    "predict: block beyond": ["predict", "{tmp}/model.pt", str(EXAMPLE), "{tmp}/p.zarr",
                              "--block", "64,8,8"],
    "predict: overlap too big": ["predict", "{tmp}/model.pt", str(EXAMPLE), "{tmp}/p.zarr",
                                 "--block", "4,8,8", "--overlap", "0,8,0"],
    "predict: batch size 0": ["predict", "{tmp}/model.pt", str(EXAMPLE), "{tmp}/p.zarr",
                              "--batch-size", "0"],
    "predict: mask of a non-segment": ["predict", "{tmp}/model.pt", str(EXAMPLE), "{tmp}/p.zarr", "--mask"],
    "predict: missing source": ["predict", "{tmp}/model.pt", "{tmp}/nope.zarr", "{tmp}/p.zarr"],
    "predict: negative workers": ["predict", "{tmp}/model.pt", str(EXAMPLE), "{tmp}/p.zarr",
                                  "--num-workers", "-1"],
    "view: missing path": ["view", "{tmp}/missing.zarr"],
    "view: z beyond": ["view", str(EXAMPLE), "--z", "50"],
    "view: negative samples": ["view", str(EXAMPLE), "--samples", "-1"],
    "ls: unknown scroll": ["ls", "scroll99"],
    "ls: missing catalogue": ["ls", "--catalog", "{tmp}/nope.yaml"],
    "ls: catalogue not YAML": ["ls", "--catalog", "{tmp}/garbage.pt"],
    "info: unknown name": ["info", "scrol1"],
    "prefetch: zero epochs": ["prefetch", str(EXAMPLE), "--epochs", "0"],
    "prefetch: missing path": ["prefetch", "{tmp}/nope.zarr", "--epochs", "1"],
    "prefetch: grid and stream options": ["prefetch", str(EXAMPLE), "--grid", "--batch-size", "4"],
    "render: missing segment": ["render", "{tmp}/nope", str(EXAMPLE), "{tmp}/r.zarr"],
    "render: not a surface": ["render", "{tmp}/seg", str(EXAMPLE), "{tmp}/r.zarr"],
    "predict: part beyond parts": ["predict", "{tmp}/model.pt", str(EXAMPLE), "{tmp}/p.zarr",
                                   "--parts", "2", "--part", "2"],
    "predict: join with nothing to join": ["predict", "{tmp}/model.pt", str(EXAMPLE), "{tmp}/p.zarr",
                                           "--parts", "2", "--join"],
    "no command": [],
    "unknown command": ["train"],
}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_segment(root / "seg", (6, 40, 50), seed=1)
    (root / "empty").mkdir()
    (root / "garbage.pt").write_bytes(b"not a model")
    torch.jit.script(torch.nn.Identity()).save(str(root / "model.pt"))
    return root


@pytest.mark.parametrize("name", list(BAD))
def test_bad_arguments_are_one_line(tmp, name, capsys):
    args = [a.replace("{tmp}", str(tmp)) for a in BAD[name]]
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    assert code == 2, (name, out.out, out.err)
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    assert lines[0].startswith("vesuvius-dask"), lines[0]
    assert "=True" not in lines[0] and "samples_per_epoch" not in lines[0], lines[0]


def test_old_flag_names_the_new_one(tmp, capsys):
    with pytest.raises(SystemExit):
        main(["convert", str(tmp / "seg"), str(tmp / "o.zarr"), "--z_chunksize", "4", "--input", "x"])
    assert "--input is now the SRC argument" in capsys.readouterr().err


def test_old_converter_flags_still_work(tmp):
    import numpy as np
    import zarr

    assert main(["convert", str(tmp / "seg"), str(tmp / "old.zarr"), "--z_start", "1", "--z_end", "5",
                 "--z_chunksize", "2", "--quiet"]) == 0
    arr = zarr.open(tmp / "old.zarr", mode="r")
    assert arr.shape == (4, 40, 50) and arr.chunks[0] == 2
    from vesuvius_dask import open_volume

    np.testing.assert_array_equal(arr[:], open_volume(tmp / "seg").compute()[1:5])


@pytest.mark.parametrize("module,extra,args", [
    ("torch", "torch", ["stream", str(EXAMPLE), "--batches", "1"]),
    ("torch", "torch", ["predict", "m.pt", str(EXAMPLE), "p.zarr"]),
    ("napari", "viewer", ["view", str(EXAMPLE)]),
    ("distributed", "distributed", ["convert", "x", "y", "--scheduler", "tcp://127.0.0.1:1"]),
])
def test_missing_extra_names_the_install_command(tmp_path, module, extra, args):
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from vesuvius_dask.cli.main import main\n"
            f"raise SystemExit(main({args!r}))")
    if args[0] == "convert":
        import numpy as np

        from .test_outputs import write_stack

        write_stack(tmp_path / "x", np.zeros((2, 8, 8), np.uint16))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f'pip install "vesuvius-dask[{extra}]"' in lines[0], proc.stderr
