"""Nothing we write costs a user a file: aliases, foreign outputs, links, signals, changed sources."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from vesuvius_dask import (
    ModelError,
    OutputError,
    OutputExistsError,
    PredictionWriter,
    ResumeError,
    convert_tiffs,
    convert_zarr,
    predict,
)
from vesuvius_dask.testing import write_segment
from vesuvius_dask.writers.outputs import OutputJob, check_output, is_our_output, source_stamp

from .conftest import write_zarr
from .test_outputs import digest, run_cli, write_stack

BIN = Path(sys.executable).parent / "vesuvius-dask"


@pytest.fixture()
def work(tmp_path, rng_volume):
    write_stack(tmp_path / "tifs", rng_volume[:6, :40, :50])
    write_zarr(tmp_path / "vol.zarr", rng_volume[:6, :40, :50], chunks=(3, 20, 25))
    write_segment(tmp_path / "seg", (6, 40, 50), seed=2)
    return tmp_path


def snapshot(folder: Path) -> dict:
    """Every path below ``folder`` with its bytes (links as their target text)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


# ----------------------------------------------------------------------------- identity by file
def _can_bind_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_bind_mount(), reason="needs root and unshare -m (bind mounts)")
@pytest.mark.parametrize("target", ["alias/vol.zarr", "alias", "alias/vol.zarr/c/out.zarr"])
def test_an_output_through_a_bind_mount_of_the_input_is_refused(work, target):
    """The same folder under another name (a bind mount) is the same input."""
    if not BIN.exists():
        pytest.skip("console script not installed")
    (work / "alias").mkdir()
    before = snapshot(work / "vol.zarr")
    script = (f"mount --bind {work} {work / 'alias'} && "
              f"{BIN} convert {work / 'vol.zarr'} {work / target} --overwrite --quiet")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "inputs are never overwritten" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert snapshot(work / "vol.zarr") == before


def test_a_hard_link_of_the_input_is_the_input(work):
    os.link(work / "tifs" / "00.tif", work / "same.tif")
    with pytest.raises(OutputError, match="is the input"):
        check_output(work / "same.tif", [work / "tifs" / "00.tif"])


def test_a_folder_reached_through_a_link_contains_the_input(work):
    (work / "outer").symlink_to(work)
    with pytest.raises(OutputError, match="lies inside"):
        check_output(work / "outer" / "vol.zarr" / "x.zarr", [work / "vol.zarr"])
    with pytest.raises(OutputError, match="contains the input"):
        check_output(work / "outer", [work / "vol.zarr"])


# ----------------------------------------------------------------------------- overwrite: ours only
@pytest.mark.parametrize("kind", ["file", "notes", "plain-zarr", "link"])
def test_overwrite_replaces_only_an_output_of_ours(work, kind, capsys):
    dst = work / "dst.zarr"
    if kind == "file":
        dst.write_bytes(b"II*\x00 a tiff of someone's")
    elif kind == "notes":
        dst.mkdir()
        (dst / "notes.txt").write_text("months of work")
    elif kind == "plain-zarr":  # a Zarr, but not one vesuvius-dask wrote
        write_zarr(dst, np.ones((2, 4, 4), np.uint8), chunks=(2, 4, 4))
    else:
        write_zarr(work / "theirs.zarr", np.ones((2, 4, 4), np.uint8), chunks=(2, 4, 4))
        dst.symlink_to(work / "theirs.zarr")
    before = snapshot(work)
    code, out, err = run_cli(["convert", work / "tifs", dst, "--overwrite", "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(dst) in err
    assert snapshot(work) == before


def test_overwrite_replaces_our_own_outputs(work, rng_volume):
    convert_tiffs(work / "tifs", work / "out.zarr", chunks=(3, 20, 25))
    assert is_our_output(work / "out.zarr")
    convert_zarr(work / "vol.zarr", work / "out.zarr", z=(0, 2), overwrite=True)
    np.testing.assert_array_equal(zarr.open(work / "out.zarr", mode="r")[:], rng_volume[:2, :40, :50])
    convert_tiffs(work / "tifs", work / "ome.zarr", ome=True)
    assert is_our_output(work / "ome.zarr")
    convert_tiffs(work / "tifs", work / "ome.zarr", ome=True, overwrite=True)


def test_a_users_dot_old_folder_is_never_removed(work):
    convert_tiffs(work / "tifs", work / "out.zarr")
    old = work / ".out.zarr.old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    convert_tiffs(work / "tifs", work / "out.zarr", overwrite=True)
    assert (old / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == [".out.zarr.old", "out.zarr", "seg", "tifs", "vol.zarr"]


def test_a_publish_cut_short_is_undone_by_the_next_run(work, rng_volume):
    """A kill between moving the old output aside and moving the new one in."""
    convert_tiffs(work / "tifs", work / "out.zarr", z=(0, 2))
    before = snapshot(work / "out.zarr")
    job = OutputJob(work / "out.zarr", [work / "tifs"], {"a": 1}, overwrite=True, what="convert")
    job.data.mkdir()
    job.save_state("publish.json", {"aside": "old"})
    os.rename(work / "out.zarr", job.partial / "old")  # the first rename of a publish, then a kill
    job._unlock()
    with pytest.raises(OutputExistsError, match="already exists"):
        convert_tiffs(work / "tifs", work / "out.zarr")  # the old output is back first
    assert snapshot(work / "out.zarr") == before
    assert (job.partial / "data").is_dir() and not (job.partial / "old").exists()


# ----------------------------------------------------------------------------- png outputs
def _identity(x):
    return x[:, 0, 0]


def test_png_rules(work, capsys):
    seg = work / "seg"
    foreign = work / "photo.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(foreign)
    before = foreign.read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        predict(_identity, seg, work / "p.zarr", block=(3, 20, 20), png=foreign)
    with pytest.raises(OutputError, match="did not write"):
        predict(_identity, seg, work / "p.zarr", block=(3, 20, 20), png=foreign, overwrite=True)
    assert foreign.read_bytes() == before and not (work / "p.zarr").exists()
    predict(_identity, seg, work / "p.zarr", block=(3, 20, 20), png=work / "pred.png")
    assert is_our_output(work / "pred.png") and not is_our_output(foreign)
    predict(_identity, seg, work / "p.zarr", block=(3, 20, 20), png=work / "pred.png", overwrite=True)
    leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_every_output_path_is_checked_before_any_work(work, capsys):
    calls = []

    def model(x):
        calls.append(1)
        return x[:, 0, 0]

    with pytest.raises(OutputError, match="does not exist"):
        predict(model, work / "seg", work / "p.zarr", block=(3, 20, 20), png=work / "nodir" / "x.png")
    with pytest.raises(OutputError, match="does not exist"):
        predict(model, work / "seg", work / "nodir" / "p.zarr", block=(3, 20, 20))
    (work / "p.zarr").mkdir()
    with pytest.raises(OutputExistsError):
        predict(model, work / "seg", work / "p.zarr", block=(3, 20, 20))
    assert calls == []


def test_png_of_a_3d_output_is_refused_at_the_first_batch(work):
    calls = []

    def model(x):
        calls.append(1)
        return x[:, 0]

    with pytest.raises(Exception, match="needs a 2-D output"):
        predict(model, work / "vol.zarr", work / "p.zarr", block=(3, 20, 25), png=work / "p.png")
    assert len(calls) == 1 and not (work / "p.zarr").exists()


# ----------------------------------------------------------------------------- model files
def test_a_torch_save_checkpoint_is_answered_with_how_to_export(work, capsys):
    import torch

    torch.save(torch.nn.Conv3d(1, 1, 3).state_dict(), work / "weights.pth")
    torch.save(torch.nn.Conv3d(1, 1, 3), work / "module.pth")
    for name in ("weights.pth", "module.pth"):
        with pytest.raises(ModelError, match="export"):
            predict(work / name, work / "vol.zarr", work / "p.zarr", block=(3, 20, 25))
        code, out, err = run_cli(["predict", work / name, work / "vol.zarr", work / "p.zarr"], capsys)
        assert code == 2 and "torch.save checkpoint" in err and "constants.pkl" not in err
        assert len(err.strip().splitlines()) == 1
    (work / "junk.pt").write_bytes(b"not a model at all")
    code, out, err = run_cli(["predict", work / "junk.pt", work / "vol.zarr", work / "p.zarr"], capsys)
    assert code == 2 and "cannot load the model" in err and len(err.strip().splitlines()) == 1


def test_predict_help_says_model_files_are_code(capsys):
    code, out, err = run_cli(["predict", "--help"], capsys)
    assert code == 0 and "is code" in " ".join(out.split())


@pytest.mark.parametrize("args,flag", [
    (["--block", "100,100,100"], "--block 100,100,100"),
    (["--block", "3,20,20", "--overlap", "3,0,0"], "--overlap"),
])
def test_predict_errors_speak_its_flags(work, capsys, args, flag):
    import torch

    torch.jit.script(torch.nn.Identity()).save(str(work / "m.pt"))
    code, out, err = run_cli(["predict", work / "m.pt", work / "vol.zarr", work / "p.zarr", *args], capsys)
    assert code == 2 and flag in err and "z_size" not in err and "files[0]" not in err, err


# ----------------------------------------------------------------------------- resume identity
class Boom(RuntimeError):
    pass


def _failing_after(n):
    calls = []

    def model(x):
        calls.append(1)
        if len(calls) > n:
            raise Boom("the GPU fell over")
        return x[:, 0]
    return model


def test_a_failure_after_a_checkpoint_keeps_it_and_says_how_to_resume(work, rng_volume):
    src = work / "vol.zarr"
    kw = dict(block=(3, 10, 10), overlap=(0, 0, 0), batch_size=2, checkpoint_blocks=4)
    with pytest.raises(Boom):
        predict(_failing_after(5), src, work / "p.zarr", **kw)
    partial = work / ".p.zarr.partial"
    assert json.loads((partial / "state.json").read_text())["progress"]["batches"] == 4
    out = predict(_failing_after(10**9), src, work / "p.zarr", resume=True, **kw).compute()
    ref = predict(_failing_after(10**9), src, work / "ref.zarr", **kw).compute()
    np.testing.assert_array_equal(out, ref)
    assert not partial.exists()


def test_predict_resume_refuses_a_changed_source(work, rng_volume):
    src = work / "vol.zarr"
    kw = dict(block=(3, 10, 10), overlap=(0, 0, 0), batch_size=2, checkpoint_blocks=4)
    model = _failing_after(5)
    with pytest.raises(Boom):
        predict(model, src, work / "p.zarr", **kw)
    stamp = source_stamp(src)
    arr = zarr.open(src, mode="r+")
    arr[0, 0, 0] = arr[0, 0, 0] + 1  # one voxel: one chunk file rewritten
    assert source_stamp(src) != stamp
    with pytest.raises(ResumeError, match="source's files changed"):
        predict(_failing_after(10**9), src, work / "p.zarr", resume=True, **kw)
    assert (work / ".p.zarr.partial" / "state.json").exists()  # refused: nothing touched


def test_convert_zarr_resume_refuses_a_changed_local_source(work):
    src = work / "vol.zarr"
    job = OutputJob(work / "c.zarr", [src], {"dummy": 1}, what="convert")
    job._unlock()
    with pytest.raises(ResumeError):  # another identity entirely
        convert_zarr(src, work / "c.zarr", resume=True)
    shutil.rmtree(job.partial)
    convert_zarr(src, work / "ok.zarr", chunks=(3, 20, 25))
    # an identity from an interrupted copy of the same source, then a changed chunk
    from vesuvius_dask import convert as convert_mod

    seen = {}
    real = convert_mod._write_volume

    def grab(*args, **kwargs):
        seen["identity"] = args[5]
        raise KeyboardInterrupt

    convert_mod._write_volume = grab
    try:
        with pytest.raises(KeyboardInterrupt):
            convert_zarr(src, work / "c.zarr")
    finally:
        convert_mod._write_volume = real
    job = OutputJob(work / "c.zarr", [src], seen["identity"], what="convert")
    job._unlock()
    arr = zarr.open(src, mode="r+")
    arr[5, 39, 49] = arr[5, 39, 49] + 1
    with pytest.raises(ResumeError, match="source's files changed"):
        convert_zarr(src, work / "c.zarr", resume=True)


# ----------------------------------------------------------------------------- signals keep work
@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_after_a_checkpoint_keeps_it(tmp_path, sig, code):
    if not BIN.exists():
        pytest.skip("console script not installed")
    from .test_outputs import _big_stack, _wait_for

    data = _big_stack(tmp_path / "tifs", n=32, size=768)
    old = np.full((2, 8, 8), 7, np.uint16)
    convert_tiffs(tmp_path / "tifs", tmp_path / "out.zarr", z=(0, 2), y=(0, 8), x=(0, 8))
    zarr.open(tmp_path / "out.zarr", mode="r+")[:] = old
    before = digest(tmp_path / "out.zarr")
    args = [str(BIN), "convert", str(tmp_path / "tifs"), str(tmp_path / "out.zarr"), "--overwrite",
            "--chunks", "4,128,128", "--quiet"]
    env = dict(os.environ, DASK_VESUVIUS_DASK__JOURNAL_INTERVAL="0")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = tmp_path / ".out.zarr.partial" / "done.log"
    assert _wait_for(lambda: (done.exists() and done.stat().st_size > 100) or proc.poll() is not None)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("conversion finished before the signal")
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "kept" in err, err
    assert digest(tmp_path / "out.zarr") == before  # the old output is intact
    recorded = set(done.read_text().split())
    assert recorded
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    np.testing.assert_array_equal(zarr.open(tmp_path / "out.zarr", mode="r")[:], data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr", "tifs"]


# ----------------------------------------------------------------------------- two runs at once
def test_a_second_run_on_the_same_output_touches_nothing(work):
    first = PredictionWriter(work / "p.zarr", (6, 40, 50), (3, 10, 10))
    first.add(np.ones((1, 3, 10, 10), np.float32), np.array([[0, 0, 0, 0]]))
    first.checkpoint({"batches": 1})
    before = snapshot(first.job.partial)
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(OutputExistsError):
            PredictionWriter(work / "p.zarr", (6, 40, 50), (3, 10, 10), **kw)
    assert snapshot(first.job.partial) == before
    out = first.finalize().compute()
    assert out[0, 0, 0] == 1.0


def test_stream_throughput_leaves_out_start_up(work, capsys):
    code, out, err = run_cli(["stream", work / "vol.zarr", "--z-size", "2", "--y-size", "8",
                              "--x-size", "8", "--batch-size", "4", "--batches", "3"], capsys)
    assert code == 0, err
    assert "12 blocks" in out and "after start-up 8 in" in out


def test_a_source_behind_a_folder_link_is_stamped_through_it(tmp_path, rng_volume):
    real = write_stack(tmp_path / "real_layers", rng_volume[:4, :16, :16])
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "layers").symlink_to(real)
    (tmp_path / "seg" / "layers_again").symlink_to(tmp_path / "seg")  # a loop: walked once
    stamp = source_stamp(tmp_path / "seg")
    import tifffile

    tifffile.imwrite(real / "00.tif", np.zeros((16, 16), np.uint16))
    assert source_stamp(tmp_path / "seg") != stamp


def test_a_time_set_back_after_a_rewrite_still_changes_the_stamp(tmp_path, rng_volume):
    path = write_stack(tmp_path / "tifs", rng_volume[:2, :8, :8]) / "00.tif"
    st = path.stat()
    stamp = source_stamp(path.parent)
    path.write_bytes(path.read_bytes())  # same bytes, same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: the old time back
    assert source_stamp(path.parent) != stamp  # the change time moved


def test_a_png_at_the_output_path_is_refused(work):
    with pytest.raises(OutputError, match="path of its own"):
        predict(_identity, work / "seg", work / "p.zarr", block=(3, 20, 20), png=work / "p.zarr")


def test_a_run_writing_the_output_is_named_as_such(work):
    first = PredictionWriter(work / "p.zarr", (6, 40, 50), (3, 10, 10))
    with pytest.raises(OutputExistsError, match="another run is writing it"):
        predict(_identity, work / "seg", work / "p.zarr", block=(3, 20, 20))
    first.abort(keep=False)


@pytest.mark.slow
def test_the_script_exits_at_once_after_an_interrupt(tmp_path):
    """A read-only check waiting on a server that answers one byte a second still stops on SIGINT."""
    if not BIN.exists():
        pytest.skip("console script not installed")
    import http.server
    import threading

    write_zarr(tmp_path / "v.zarr", np.ones((4, 16, 16), np.uint16), chunks=(4, 16, 16), zarr_format=2)
    root = tmp_path

    class Trickle(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            path = root / self.path.lstrip("/")
            body = path.read_bytes() if path.is_file() else b""
            if not path.is_file():
                self.send_response(404)
                self.end_headers()
                return
            metadata = path.name in (".zarray", ".zattrs", ".zgroup")
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + (0 if metadata else 50000)))
            self.end_headers()
            self.wfile.write(body if metadata else body[:1])
            if not metadata:
                asked.set()
                stop.wait(120)  # a trickle that never completes

    stop, asked = threading.Event(), threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v.zarr"
        proc = subprocess.Popen([str(BIN), "info", url, "--check", "--quiet"], stderr=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert asked.wait(120)  # the check is waiting on a chunk now
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)  # not the minutes its retries would take
        assert proc.returncode == 130, err
        assert len(err.strip().splitlines()) == 1 and "interrupted" in err
    finally:
        stop.set()
        server.shutdown()


@pytest.mark.parametrize("where", ["_start returns", "the journal opens"])
def test_a_signal_as_the_job_starts_leaves_no_folder(tmp_path, monkeypatch, where):
    """An interrupt between the partial folder's creation and the caller holding the job.

    (CI once saw SIGTERM land there: the caller never got the job to clean up with.)
    """
    from vesuvius_dask.writers import outputs

    def interrupted(*args):
        raise KeyboardInterrupt

    if where == "the journal opens":
        monkeypatch.setattr(outputs, "_Journal", interrupted)
    else:
        start = outputs.OutputJob._start

        def start_then_signal(self):
            start(self)
            assert self.partial.is_dir()  # it was made
            raise KeyboardInterrupt

        monkeypatch.setattr(outputs.OutputJob, "_start", start_then_signal)
    remove, held = outputs.remove_path, []

    def remove_while_locked(path):  # no other run may claim the folder while it goes
        import fcntl

        fd = os.open(path / outputs._LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        remove(path)

    monkeypatch.setattr(outputs, "remove_path", remove_while_locked)
    with pytest.raises(KeyboardInterrupt):
        OutputJob(tmp_path / "out.zarr", [], {"a": 1}, what="convert")
    assert list(tmp_path.iterdir()) == []
    assert held == [True]  # removed once, by the run still holding its lock
