"""Inputs are sacred, interrupts keep only checkpointed work, killed jobs resume, bad bytes are named."""

import hashlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from vesuvius_dask.cli.main import main

from vesuvius_dask import (
    CorruptChunkError,
    DaskVesuviusStream,
    OutputError,
    OutputExistsError,
    PredictionWriter,
    ResumeError,
    VesuviusDaskError,
    convert_tiffs,
    predict,
)
from vesuvius_dask.testing import write_segment, write_tiff_stack

from .conftest import write_zarr

BIN = Path(sys.executable).parent / "vesuvius-dask"


def digest(path: Path) -> str:
    """Names and bytes of every file under ``path``."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def write_stack(folder: Path, data: np.ndarray) -> Path:
    return write_tiff_stack(folder, data)


@pytest.fixture()
def work(tmp_path, rng_volume):
    write_stack(tmp_path / "tifs", rng_volume[:6, :40, :50])
    write_segment(tmp_path / "seg", (6, 40, 50), seed=2)
    write_zarr(tmp_path / "vol.zarr", rng_volume[:6, :40, :50], chunks=(3, 20, 25))
    model = tmp_path / "model.pt"
    import torch

    torch.jit.script(torch.nn.Identity()).save(str(model))
    return tmp_path


def run_cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


REFUSED = [
    ["convert", "tifs", "tifs", "--overwrite"],
    ["convert", "tifs", "tifs/", "--overwrite"],
    ["convert", "tifs", "tifs/out.zarr"],
    ["convert", "tifs", ".", "--overwrite"],
    ["convert", "seg/surface_volume", "seg", "--overwrite"],
    ["convert", "seg", "seg", "--overwrite"],
    ["convert", "seg", "seg/volume.zarr"],
    ["convert", "seg/surface_volume", "seg/surface_volume/../../seg/x.zarr"],
    ["convert", "seg", "link_to_seg", "--overwrite"],
    ["predict", "model.pt", "vol.zarr", "vol.zarr", "--overwrite", "--block", "3,20,20"],
    ["predict", "model.pt", "seg", "seg", "--overwrite", "--block", "3,20,20"],
    ["predict", "model.pt", "seg", "seg/inklabels.png", "--overwrite", "--block", "3,20,20"],
    ["predict", "model.pt", "seg", "p.zarr", "--png", "seg/inklabels.png", "--block", "3,20,20"],
    ["predict", "model.pt", "vol.zarr", "model.pt", "--overwrite", "--block", "3,20,20"],
]


@pytest.mark.parametrize("args", REFUSED, ids=[" ".join(a) for a in REFUSED])
def test_outputs_on_inputs_are_refused(work, args, capsys, monkeypatch):
    monkeypatch.chdir(work)
    (work / "link_to_seg").symlink_to(work / "seg")
    before = {p: digest(work / p) for p in ("tifs", "seg", "vol.zarr", "model.pt")}
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    named = args[args.index("--png") + 1] if "--png" in args else args[2 if args[0] == "convert" else 3]
    assert "inputs are never overwritten" in err and f"output {named} " in err
    assert {p: digest(work / p) for p in before} == before
    leftovers = {p.name for p in work.iterdir()} - set(before) - {"link_to_seg"}
    assert not leftovers, leftovers


def test_python_errors_speak_python(work):
    with pytest.raises(OutputError, match="is the input") as info:
        convert_tiffs(work / "tifs", work / "tifs", overwrite=True)
    assert isinstance(info.value, VesuviusDaskError)
    convert_tiffs(work / "tifs", work / "out.zarr", chunks=(3, 20, 25))
    with pytest.raises(OutputExistsError, match="overwrite=True") as info:
        convert_tiffs(work / "tifs", work / "out.zarr")
    assert isinstance(info.value, FileExistsError) and "--overwrite" not in str(info.value)
    assert "--overwrite" in info.value.cli_message()


def test_a_plain_folder_of_volumes_stays_writable(tmp_path, rng_volume):
    """data/a.zarr is an input; data/b.zarr beside it is a fine output."""
    write_zarr(tmp_path / "a.zarr", rng_volume[:4, :32, :32], chunks=(4, 16, 16))
    out = predict(lambda x: x[:, 0], tmp_path / "a.zarr", tmp_path / "b.zarr", block=(4, 16, 16),
                  overlap=(0, 0, 0))
    np.testing.assert_allclose(out.compute(), rng_volume[:4, :32, :32] / 65535, rtol=1e-6)


# ----------------------------------------------------------------------------- signals
def _big_stack(folder: Path, n: int = 48, size: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 65535, size=(n, size, size), dtype=np.uint16)
    write_stack(folder, data)
    return data


def _wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _chunks_written(partial: Path) -> int:
    data = partial / "data" / "c"
    return sum(1 for _ in data.rglob("*")) if data.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("moment", [0, 40, 120])
def test_signal_leaves_the_old_output_and_only_checkpointed_work(tmp_path, sig, code, moment):
    if not BIN.exists():
        pytest.skip("console script not installed")
    _big_stack(tmp_path / "tifs")
    old = np.full((2, 8, 8), 7, np.uint16)  # an earlier output of ours (--overwrite replaces only those)
    convert_tiffs(tmp_path / "tifs", tmp_path / "out.zarr", z=(0, 2), y=(0, 8), x=(0, 8))
    zarr.open(tmp_path / "out.zarr", mode="r+")[:] = old
    before = digest(tmp_path / "out.zarr")
    proc = subprocess.Popen([str(BIN), "convert", str(tmp_path / "tifs"), str(tmp_path / "out.zarr"),
                             "--overwrite", "--chunks", "4,128,128", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / ".out.zarr.partial"
    assert _wait_for(lambda: (partial.exists() and _chunks_written(partial) >= moment)
                     or proc.poll() is not None)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # finished before the signal landed: the new output is whole
        pytest.skip("conversion finished before the signal")
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert digest(tmp_path / "out.zarr") == before
    if "kept" in err:  # it had checkpointed: the finished part stays, and the line says how to resume
        assert "--resume" in err and (partial / "done.log").stat().st_size > 0
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.zarr.partial", "out.zarr", "tifs"]
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr", "tifs"]


# ----------------------------------------------------------------------------- resume
def test_convert_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    if not BIN.exists():
        pytest.skip("console script not installed")
    data = _big_stack(tmp_path / "tifs", n=32, size=768)
    args = [str(BIN), "convert", str(tmp_path / "tifs"), str(tmp_path / "out.zarr"),
            "--chunks", "4,128,128", "--shards", "4,256,256", "--quiet"]
    env = dict(os.environ, DASK_VESUVIUS_DASK__JOURNAL_INTERVAL="0")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = tmp_path / ".out.zarr.partial" / "done.log"
    assert _wait_for(lambda: (done.exists() and done.stat().st_size > 200) or proc.poll() is not None)
    proc.kill()
    proc.wait()
    if not done.exists():
        pytest.skip("conversion finished before the kill")
    recorded = len(done.read_text().split())
    # a plain rerun says what it found and what to do
    plain = subprocess.run(args, capture_output=True, text=True)
    assert plain.returncode == 2 and "--resume" in plain.stderr and "interrupted run" in plain.stderr
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({recorded}" in resumed.stderr or "resuming" in resumed.stderr
    np.testing.assert_array_equal(zarr.open(tmp_path / "out.zarr", mode="r")[:], data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr", "tifs"]
    convert_tiffs(tmp_path / "tifs", tmp_path / "ref.zarr", chunks=(4, 128, 128), shards=(4, 256, 256))
    for rel in ("c/0/0/0", "c/3/1/2", "c/7/2/2"):
        assert (tmp_path / "out.zarr" / rel).read_bytes() == (tmp_path / "ref.zarr" / rel).read_bytes()


def test_resume_refuses_other_inputs_or_options(tmp_path, rng_volume, caplog):
    write_stack(tmp_path / "tifs", rng_volume[:6, :40, :50])
    partial = tmp_path / ".out.zarr.partial"
    partial.mkdir()
    (partial / "job.json").write_text(json.dumps({"identity": {"chunks": [1, 2, 3]}}))
    with pytest.raises(ResumeError, match="chunks"):
        convert_tiffs(tmp_path / "tifs", tmp_path / "out.zarr", resume=True)
    assert partial.exists()  # refused: nothing was touched
    out = convert_tiffs(tmp_path / "tifs", tmp_path / "out.zarr", overwrite=True)  # starts again
    np.testing.assert_array_equal(out.compute(), rng_volume[:6, :40, :50])
    assert not partial.exists()
    with caplog.at_level("WARNING", logger="vesuvius_dask"):
        convert_tiffs(tmp_path / "tifs", tmp_path / "o2.zarr", resume=True)
    assert "nothing to resume" in caplog.text


def test_foreign_leftovers_are_named_not_deleted(tmp_path, rng_volume):
    write_stack(tmp_path / "tifs", rng_volume[:6, :40, :50])
    stray = tmp_path / ".out.zarr.partial"
    stray.mkdir()
    (stray / "precious.txt").write_text("not ours")
    with pytest.raises(OutputExistsError, match="remove it"):
        convert_tiffs(tmp_path / "tifs", tmp_path / "out.zarr", overwrite=True)
    assert (stray / "precious.txt").read_text() == "not ours"


def _slow_identity(x):
    time.sleep(0.01)
    return x[:, 0]


def _predict_child(src, out, block, batch_size, every):
    predict(_slow_identity, src, out, block=block, overlap=(0, 4, 4), batch_size=batch_size,
            checkpoint_blocks=every, blend="hann")


@pytest.mark.parametrize("stop_after", [1, 3, 6])
def test_predict_resume_after_sigkill_is_bit_identical(tmp_path, rng_volume, stop_after):
    src = tmp_path / "vol.zarr"
    write_zarr(src, rng_volume[:8, :96, :112], chunks=(4, 32, 32))
    kw = dict(block=(4, 16, 16), batch_size=4, every=8)
    ref = predict(lambda x: x[:, 0], src, tmp_path / "ref.zarr", block=kw["block"], overlap=(0, 4, 4),
                  batch_size=4, checkpoint_blocks=8).compute()
    child = mp.get_context("fork").Process(target=_predict_child, args=(src, tmp_path / "out.zarr",
                                                                       kw["block"], 4, 8))
    child.start()
    state = tmp_path / ".out.zarr.partial" / "state.json"

    def checkpoints():
        try:
            return json.loads(state.read_text())["progress"]["batches"] // 2
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    assert _wait_for(lambda: checkpoints() >= stop_after or not child.is_alive())
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    if not state.exists():
        pytest.skip("prediction finished before the kill")
    with pytest.raises(OutputExistsError, match="resume=True"):
        predict(_slow_identity, src, tmp_path / "out.zarr", block=kw["block"], overlap=(0, 4, 4),
                batch_size=4, checkpoint_blocks=8)
    with pytest.raises(ResumeError, match="model"):
        predict(lambda x: x[:, 0], src, tmp_path / "out.zarr", block=kw["block"], overlap=(0, 4, 4),
                batch_size=4, checkpoint_blocks=8, resume=True)
    out = predict(_slow_identity, src, tmp_path / "out.zarr", block=kw["block"], overlap=(0, 4, 4),
                  batch_size=4, checkpoint_blocks=8, resume=True).compute()
    np.testing.assert_array_equal(out, ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr", "ref.zarr", "vol.zarr"]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), stop=st.integers(0, 30), every=st.integers(1, 6),
       budget=st.integers(1, 6))
@pytest.mark.slow
def test_writer_resumed_at_any_checkpoint_equals_one_pass(tmp_path_factory, seed, stop, every, budget):
    """Kill (drop the writer unflushed) after any batch; resume from the last checkpoint."""
    tmp = tmp_path_factory.mktemp("w")
    rng = np.random.default_rng(seed)
    shape, block = (6, 40, 44), (3, 10, 12)
    batches = [(rng.normal(size=(5,) + block).astype(np.float32),
                np.column_stack([np.zeros(5, int)] + [rng.integers(0, shape[i] - block[i] + 1, 5)
                                                       for i in range(3)])) for _ in range(12)]
    kw = dict(chunks=(3, 16, 16), memory_bytes=budget * 2 * 4 * 3 * 16 * 16)

    def run(path, start, writer):
        for i, (p, c) in enumerate(batches[start:], start):
            writer.add(p, c)
            if (i + 1) % every == 0:
                writer.checkpoint({"batches": i + 1})
        return writer.finalize().compute()

    ref = run(tmp / "ref.zarr", 0, PredictionWriter(tmp / "ref.zarr", shape, block, **kw))
    first = PredictionWriter(tmp / "out.zarr", shape, block, **kw)
    for i, (p, c) in enumerate(batches[:min(stop, len(batches))]):
        first.add(p, c)
        if (i + 1) % every == 0:
            first.checkpoint({"batches": i + 1})
    first.job._unlock()  # what a kill does to the lock
    again = PredictionWriter(tmp / "out.zarr", shape, block, resume=True, **kw)
    start = again.progress["batches"] if again.progress else 0
    np.testing.assert_array_equal(run(tmp / "out.zarr", start, again), ref)


# ----------------------------------------------------------------------------- bad bytes
@pytest.fixture()
def corrupt(tmp_path, rng_volume):
    path = tmp_path / "c.zarr"
    arr = zarr.create_array(path, shape=(8, 64, 64), chunks=(4, 32, 32), dtype="u2",
                            compressors=zarr.codecs.ZstdCodec())
    arr[:] = rng_volume[:8, :64, :64]
    raw = bytearray((path / "c/1/0/1").read_bytes())
    raw[8:40] = b"\xff" * 32
    (path / "c/1/0/1").write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_chunk_is_named(corrupt, workers):
    from torch.utils.data import DataLoader

    stream = DaskVesuviusStream([str(corrupt)], 4, 16, 16, samples_per_epoch=128, batch_size=16)
    with pytest.raises(CorruptChunkError) as info:
        for _ in DataLoader(stream, batch_size=None, num_workers=workers, timeout=120 if workers else 0):
            pass
    text = str(info.value)
    assert str(corrupt) in text and "(1, 0, 1)" in text and "c/1/0/1" in text


def test_corrupt_chunk_named_by_open_volume(corrupt):
    from vesuvius_dask import open_volume

    with pytest.raises(CorruptChunkError, match=r"chunk \(1, 0, 1\) \(key 'c/1/0/1'"):
        open_volume(corrupt).compute()


def test_info_check_lists_bad_chunks(corrupt, capsys):
    code, out, err = run_cli(["info", "--check", "--quiet", corrupt], capsys)
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 2 and "c/1/0/1" in lines[0] and lines[1].endswith("8 chunks checked, 1 bad")
    good = corrupt.parent / "good.zarr"
    write_zarr(good, np.zeros((4, 8, 8), np.uint16), chunks=(2, 4, 4))
    assert run_cli(["info", "--check", "--quiet", good], capsys)[0] == 0
