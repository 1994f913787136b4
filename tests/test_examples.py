import subprocess
import sys

import pytest

from .conftest import EXAMPLE, ROOT


def test_train_example_runs_with_workers():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), "--data", str(EXAMPLE),
         "--steps", "4", "--epochs", "1", "--batch-size", "8", "--num-workers", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "epoch 0: 32 blocks" in proc.stdout
    assert "blocks/s through DataLoader(num_workers=2)" in proc.stdout


def test_import_is_light():
    code = ("import sys, vesuvius_dask; "
            "bad = [m for m in ('torch', 'napari', 'distributed') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_ink_example_beats_the_baselines():
    """Its default run scores held-out papyrus well above calling everything background (or ink)."""
    import re

    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_ink.py"), "--num-workers", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "trained on 4800 blocks" in proc.stdout and "starts in the training area" in proc.stdout
    line = [s for s in proc.stdout.splitlines() if s.startswith("held-out papyrus")][0]
    f1, bg_f1, ink_f1 = (float(v) for v in re.search(
        r"ink F1 ([\d.]+) \(all-background ([\d.]+), all-ink ([\d.]+)\)", line).groups())
    balanced = float(re.search(r"balanced accuracy ([\d.]+)", line).group(1))
    assert bg_f1 == 0 and f1 > ink_f1 + 0.1 and balanced > 0.7, line
    assert "50% of blocks hold ink" in proc.stdout  # label-balanced sampling by default


def test_train_native3d_example_beats_the_baselines():
    """Native-3D: trained on training patches, scored on validation patches above all-ink."""
    import re

    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_native3d.py"), "--steps", "40"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    line = [s for s in proc.stdout.splitlines() if s.startswith("validation voxels")][0]
    f1, ink_f1 = (float(v) for v in re.search(r"ink F1 ([\d.]+) \(all-background [\d.]+, all-ink ([\d.]+)\)",
                                               line).groups())
    assert f1 > ink_f1 + 0.1, line


@pytest.mark.parametrize("script", ["make_example.py", "export_model.py", "train_ink.py", "train.py",
                                    "train_native3d.py"])
def test_examples_take_help_and_write_nothing(tmp_path, script):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_make_example_never_deletes_what_it_did_not_make(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.txt").write_text("keep")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "make_example.py"),
                           str(tmp_path / "precious")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "was not made by this script" in proc.stderr
    assert (tmp_path / "precious" / "data.txt").read_text() == "keep"
    for _ in range(2):  # its own output is replaced
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "make_example.py"), "--segment",
                               str(tmp_path / "seg")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "seg" / "inklabels.png").exists()


def test_export_then_predict(tmp_path):
    from vesuvius_dask.cli.main import main

    from vesuvius_dask.testing import write_segment

    weights = tmp_path / "inknet.pth"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_ink.py"), "--steps", "3",
         "--batch-size", "8", "--num-workers", "0", "--save", str(weights)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "export_model.py"), str(weights),
                           str(tmp_path / "inknet.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    write_segment(tmp_path / "seg", (8, 64, 80), seed=5)
    assert main(["predict", str(tmp_path / "inknet.pt"), str(tmp_path / "seg"),
                 str(tmp_path / "pred.zarr"), "--block", "8,32,32", "--overlap", "0,8,8",
                 "--png", str(tmp_path / "pred.png"), "--quiet"]) == 0
    import zarr

    pred = zarr.open(tmp_path / "pred.zarr", mode="r")[:]
    assert pred.shape == (64, 80) and 0 <= pred.min() and pred.max() <= 1


def test_train_ddp_example_under_torchrun():
    """torchrun --nproc-per-node 2 on CPU (gloo): every rank runs the same number of steps."""
    import re
    import socket
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
         str(ROOT / "examples" / "train_ddp.py"), "--data", str(EXAMPLE), "--samples", "200",
         "--batch-size", "16", "--epochs", "2", "--num-workers", "1"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    epochs = re.findall(r"rank 0: (\d+) steps, (\d+) blocks, rank 1: (\d+) steps, (\d+) blocks", proc.stdout)
    assert len(epochs) == 2
    for s0, b0, s1, b1 in epochs:
        assert s0 == s1 == "7" and b0 == b1 == "100"  # ceil(100 / 16) steps of 200 / 2 blocks each
