import subprocess
import sys

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


def test_train_ink_example_runs():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_ink.py"), "--steps", "6",
         "--batch-size", "8", "--num-workers", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "trained on 48 blocks" in proc.stdout and "starts inside the mask" in proc.stdout


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
