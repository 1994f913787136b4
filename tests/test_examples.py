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
