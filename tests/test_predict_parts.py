"""predict split across machines: parts (one killed and resumed), the join, equal to a single run."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from vesuvius_dask.cli.main import main

from vesuvius_dask import OutputError, predict
from vesuvius_dask.writers.predict import PredictionWriter, chunk_owner, part_path, predict_join

from .conftest import write_zarr


class ConvZ(torch.nn.Module):
    """A fixed 3x3x3 convolution, then the mean over z: neighbours matter, blocks differ at borders."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x)).mean(dim=2)


OPTS = ["--block", "6,24,24", "--overlap", "0,8,8", "--batch-size", "4", "--chunks", "1,20,20",
        "--quiet"]
KW = dict(block=(6, 24, 24), overlap=(0, 8, 8), batch_size=4, chunks=(20, 20), quiet=True)


@pytest.fixture()
def job(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 65535, (6, 70, 90), dtype=np.uint16)
    src = tmp_path / "src.zarr"
    write_zarr(src, data, chunks=(6, 32, 32))
    model = tmp_path / "convz.pt"
    torch.jit.script(ConvZ()).save(str(model))
    return src, model, data


def _kill_part(src, model, out, k, n):
    """Run part k of n in a new process that SIGKILLs itself at its 4th model call (after a checkpoint)."""
    code = f"""
import os, signal
import vesuvius_dask.writers.predict as P
calls = [0]
run = P._run_model
def dying(*a):
    calls[0] += 1
    if calls[0] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return run(*a)
P._run_model = dying
P.predict({str(model)!r}, {str(src)!r}, {str(out)!r}, part=({k}, {n}), checkpoint_blocks=8,
          block=(6, 24, 24), overlap=(0, 8, 8), batch_size=4, chunks=(20, 20), quiet=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], timeout=300)
    assert proc.returncode == -9  # killed, not finished


def test_three_parts_one_killed_and_resumed_equal_a_single_run(tmp_path, job):
    src, model, _ = job
    single = tmp_path / "single.zarr"
    assert main(["predict", str(model), str(src), str(single), *OPTS]) == 0
    out = tmp_path / "out.zarr"
    for k in (0, 2):
        assert main(["predict", str(model), str(src), str(out), "--parts", "3", "--part", str(k),
                     *OPTS]) == 0
        assert part_path(out, k, 3).is_dir() and not out.exists()
    _kill_part(src, model, out, 1, 3)
    partial = part_path(out, 1, 3).parent / f".{part_path(out, 1, 3).name}.partial"
    assert partial.is_dir() and not part_path(out, 1, 3).exists()
    with pytest.raises(OutputError, match=r"part 1 of 3 is still running or was interrupted"):
        predict_join(out, 3)
    predict(str(model), str(src), out, part=(1, 3), resume=True, checkpoint_blocks=8, **KW)
    assert main(["predict", str(model), str(src), str(out), "--parts", "3", "--join", "--quiet"]) == 0
    joined, expected = zarr.open_array(out, mode="r"), zarr.open_array(single, mode="r")
    np.testing.assert_array_equal(joined[:], expected[:])  # bit for bit
    assert dict(joined.attrs) == dict(expected.attrs)
    assert not any(part_path(out, k, 3).exists() for k in range(3))  # parts removed once published


def test_parts_3d_output_with_overlap_across_borders(tmp_path, job):
    src, _, data = job

    def identity(x):
        return x[:, 0] * 2.0

    single = predict(identity, str(src), tmp_path / "s.zarr", **{**KW, "chunks": (3, 20, 20)}).compute()
    for k in range(2):
        predict(identity, str(src), tmp_path / "o.zarr", part=(k, 2), **{**KW, "chunks": (3, 20, 20)})
    joined = predict_join(tmp_path / "o.zarr", 2).compute()
    np.testing.assert_array_equal(joined, single)
    np.testing.assert_allclose(joined, data / 65535 * 2, rtol=1e-5)


def test_chunks_are_split_into_runs_and_parts_predict_only_theirs(tmp_path):
    grid = (2, 3, 4)
    owners = [chunk_owner(c, grid, 5) for c in np.ndindex(*grid)]
    assert owners == sorted(owners) and set(owners) == set(range(5))  # contiguous runs, all parts
    w = PredictionWriter(tmp_path / "w.zarr", (40, 40), (20, 20), chunks=(20, 20), part=(0, 2))
    w.add(np.ones((1, 20, 20)), np.array([[0, 0, 10, 10]]))  # touches all four chunks
    assert set(w._buffers.keys()) == {(0, 0), (0, 1)}  # part 0 of 2 owns the first row
    w.abort()


def test_join_refuses_missing_and_mismatched_parts(tmp_path, job):
    src, model, _ = job
    out = tmp_path / "o.zarr"
    predict(str(model), str(src), out, part=(0, 2), **KW)
    with pytest.raises(OutputError, match=r"^.*o\.zarr: part 1 of 2 has not run: .* run predict with "
                                          r"part=\(1, 2\) first$"):
        predict_join(out, 2)
    predict(str(model), str(src), out, part=(1, 2), **{**KW, "overlap": (0, 4, 4)})
    with pytest.raises(OutputError, match=r"part 1 is from another job than part 0 \(they differ in "
                                          r"overlap\)"):
        predict_join(out, 2)
    os.utime(src / "zarr.json")  # the source changed since the parts ran
    with pytest.raises(OutputError):
        predict_join(out, 2, model=str(model), source=str(src))
    assert main(["predict", str(model), str(src), str(out), "--parts", "2", "--quiet"]) == 2
    assert main(["predict", str(model), str(src), str(out), "--parts", "2", "--part", "2",
                 "--quiet"]) == 2


def test_cli_no_exact_is_close_to_exact_and_its_parts_join_bit_for_bit(tmp_path, job):
    src, model, _ = job
    exact, fast, parts = tmp_path / "exact.zarr", tmp_path / "fast.zarr", tmp_path / "parts.zarr"
    assert main(["predict", str(model), str(src), str(exact), *OPTS]) == 0
    assert main(["predict", str(model), str(src), str(fast), *OPTS, "--no-exact"]) == 0
    a, b = zarr.open_array(exact, mode="r")[:], zarr.open_array(fast, mode="r")[:]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)  # float32 rounding apart
    assert (a != b).any()  # the flag reached the writer: weights up front round differently somewhere
    for k in range(2):
        assert main(["predict", str(model), str(src), str(parts), "--parts", "2", "--part", str(k),
                     *OPTS, "--no-exact"]) == 0
    assert main(["predict", str(model), str(src), str(parts), "--parts", "2", "--join", "--quiet"]) == 0
    joined = zarr.open_array(parts, mode="r")[:]
    assert joined.view(np.uint32).tobytes() == b.view(np.uint32).tobytes()
