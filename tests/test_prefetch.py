"""``prefetch`` (issue 25): fetch exactly the chunks a run reads; the run then asks for nothing.

A loopback server (:class:`~vesuvius_dask.testing.server.SlowServer`) counts the chunk
paths it is asked for, across processes (DataLoader workers, a killed subprocess):
every check counts requests, never times them.
"""

import os
import signal
import subprocess
import sys
import zlib
from urllib.parse import urlparse

import dask
import numpy as np
import pytest
import zarr
from torch.utils.data import DataLoader

import vesuvius_dask as vd
from cli.main import main
from vesuvius_dask import DaskVesuviusStream
from vesuvius_dask.errors import ArgumentError, CacheDirError
from vesuvius_dask.testing.server import SlowServer, is_metadata

pytest.importorskip("aiohttp", reason="Zarr over HTTP needs the 'remote' extra (fsspec[http])")

SHAPE, CHUNKS = (16, 256, 256), (4, 32, 32)  # 4 x 8 x 8 = 256 chunks
N_CHUNKS = 256


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(root, data): ``v3.zarr`` served, ``local.zarr`` the same data on disk only."""
    root = tmp_path_factory.mktemp("served")
    data = np.random.default_rng(11).integers(0, 65535, SHAPE, dtype=np.uint16)
    zarr.create_array(root / "v3.zarr", shape=SHAPE, chunks=CHUNKS, dtype=data.dtype)[:] = data
    local = tmp_path_factory.mktemp("local") / "local.zarr"
    zarr.create_array(local, shape=SHAPE, chunks=CHUNKS, dtype=data.dtype)[:] = data
    return root, data, local


@pytest.fixture()
def server(served):
    with SlowServer(served[0]) as srv:
        yield srv


def _paths(plan):
    """The listed chunks as the server sees them (request paths)."""
    return {urlparse(u).path for u in plan.paths()}


def _run(stream, epochs, workers, data=None):
    """Read ``epochs`` epochs through a DataLoader; blocks checked against ``data``."""
    loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                        timeout=120 if workers else 0)
    n = 0
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for blocks, coords in loader:
            n += blocks.shape[0]
            if data is not None:
                b = stream.block
                for blk, (_, z, y, x) in zip(blocks.numpy(), coords.tolist()):
                    np.testing.assert_array_equal(blk, data[z:z + b[0], y:y + b[1], x:x + b[2]])
    return n


MASK = np.zeros(SHAPE[1:], dtype=np.uint8)
MASK[40:200, 16:150] = 1

CONFIGS = {
    "uniform": dict(samples_per_epoch=16, batch_size=4, seed=3),
    "locality-stride-mask": dict(samples_per_epoch=24, batch_size=6, seed=5, locality=3, stride=(1, 4, 4),
                                 masks=[MASK], mask_coverage=0.5),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_listed_chunks_are_what_the_run_reads_and_after_prefetch_it_asks_for_none(
        server, served, tmp_path, config):
    url = server.url("v3.zarr")
    options = dict(CONFIGS[config], return_coords=True)

    def stream(cache):
        return DaskVesuviusStream([url], 2, 16, 16, cache_dir=tmp_path / cache, **options)

    # the run without prefetch, 2 workers: the set of chunks it asks the server for
    run = stream("plain")
    plan = vd.prefetch(run, epochs=2, dry_run=True)
    server.reset()
    assert _run(run, 2, workers=2) == 2 * options["samples_per_epoch"]
    asked = server.chunk_requests()
    assert set(asked) == _paths(plan)
    assert max(asked.values()) == 1  # a shared cache_dir: each chunk once
    assert 0 < plan.chunks == len(asked) < N_CHUNKS  # a strict subset: the listing is not "everything"

    # prefetch into a fresh cache_dir: exactly the listed chunks, each once
    fresh = stream("fetched")
    server.reset()
    plan = vd.prefetch(fresh, epochs=2, dry_run=True)
    assert sum(server.chunk_requests().values()) == 0  # a dry run asks for no chunk
    assert plan.cached == 0 and plan.to_fetch == plan.chunks
    plan.fetch()
    fetched = server.chunk_requests()
    assert set(fetched) == set(asked) and max(fetched.values()) == 1
    assert plan.fetched == plan.chunks and plan.fetched_bytes > 0

    # a new run with the same configuration and cache_dir: no chunk asked for, 2 workers or none
    for workers in (2, 0):
        server.reset()
        again = stream("fetched")
        assert _run(again, 2, workers, data=served[1]) == 2 * options["samples_per_epoch"]
        assert sum(server.chunk_requests().values()) == 0, server.chunk_requests()

    # a second prefetch fetches nothing
    server.reset()
    second = vd.prefetch(stream("fetched"), epochs=2)
    assert second.cached == second.chunks and second.fetched == 0
    assert sum(server.chunk_requests().values()) == 0


def test_local_and_remote_volumes_mixed(server, served, tmp_path):
    cache = tmp_path / "c"
    kwargs = dict(samples_per_epoch=24, batch_size=8, seed=1, sampling_method="proportional",
                  return_coords=True)
    s = DaskVesuviusStream([served[2], server.url("v3.zarr")], 2, 16, 16, cache_dir=cache, **kwargs)
    plan = vd.prefetch(s, epochs=3)
    assert [v.kind for v in plan.volumes] == ["local", "remote"]
    lines = plan.summary().splitlines()
    assert lines[0].endswith("local, nothing to fetch") and str(served[2]) in lines[0]
    assert plan.fetched == plan.chunks > 0
    server.reset()
    again = DaskVesuviusStream([served[2], server.url("v3.zarr")], 2, 16, 16, cache_dir=cache, **kwargs)
    assert _run(again, 3, workers=0, data=served[1]) == 72
    assert sum(server.chunk_requests().values()) == 0


def test_only_local_volumes_is_one_line_and_needs_no_cache_dir(served, capsys):
    assert main(["prefetch", str(served[2]), "--batches", "2", "--epochs", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["nothing to fetch: every volume is local"]


def test_epochs_are_a_count_or_epoch_numbers(served):
    s = DaskVesuviusStream([served[2]], 2, 16, 16, samples_per_epoch=8, seed=0)
    assert vd.prefetch(s, 3).epochs == [0, 1, 2]
    assert vd.prefetch(s, range(5, 7)).epochs == [5, 6]
    for bad in (0, -1, [], ["a"], True):
        with pytest.raises(ArgumentError, match="epochs"):
            vd.prefetch(s, bad)


def test_a_url_without_cache_dir_is_refused_before_any_chunk_request(server):
    s = DaskVesuviusStream([server.url("v3.zarr")], 2, 16, 16, samples_per_epoch=8, seed=0)
    server.reset()
    with pytest.raises(ArgumentError, match=r"files\[0\].*cache_dir"):
        vd.prefetch(s, 1)
    plan = vd.prefetch(s, 1, dry_run=True)  # a dry run lists without a cache_dir: all to fetch
    assert plan.to_fetch == sum(len(e.keys) for e in plan.remote) > 0
    with pytest.raises(ArgumentError, match=r"files\[0\].*cache_dir"):
        plan.fetch()
    assert sum(server.chunk_requests().values()) == 0


def test_the_stream_asks_predict_grid_is_listed_and_prefetched(server, served, tmp_path):
    url = server.url("v3.zarr")
    grid = dict(block=(4, 32, 32), overlap=(0, 8, 8))

    def model(x):
        return x[:, 0, 0]

    plan = vd.prefetch(vd.predict_stream(url, masks=MASK, **grid), cache_dir=tmp_path / "fetched",
                       dry_run=True)
    server.reset()
    vd.predict(model, url, tmp_path / "a.zarr", masks=MASK, cache_dir=tmp_path / "plain", **grid)
    asked = server.chunk_requests()
    assert set(asked) == _paths(plan) and 0 < plan.chunks < N_CHUNKS  # the mask leaves chunks out

    server.reset()
    plan.fetch()
    assert set(server.chunk_requests()) == set(asked)
    server.reset()
    out = vd.predict(model, url, tmp_path / "b.zarr", masks=MASK, cache_dir=tmp_path / "fetched", **grid)
    assert sum(server.chunk_requests().values()) == 0
    np.testing.assert_array_equal(out.compute(), zarr.open_array(tmp_path / "a.zarr", mode="r")[:])


def test_cli_dry_run_then_fetch_then_nothing_then_stream_asks_for_none(server, tmp_path, capsys):
    url, cache = server.url("v3.zarr"), str(tmp_path / "c")
    opts = ["--batches", "3", "--batch-size", "8", "--z-size", "2", "--y-size", "16", "--x-size", "16",
            "--seed", "4", "--cache-dir", cache]
    server.reset()
    assert main(["prefetch", url, *opts, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sum(server.chunk_requests().values()) == 0
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.parent.name != "c"
                and p.name != "array.json" and not p.name.startswith(".")]  # no chunk file
    first = out.splitlines()[0]
    n = int(first.split(": ")[1].split()[0])
    assert f"{n} chunks over epoch 0, 0 already in cache_dir (0 B), {n} to fetch (at most about" in first
    assert main(["prefetch", url, *opts, "--quiet"]) == 0
    assert out in capsys.readouterr().out  # the same report, before fetching
    assert sum(server.chunk_requests().values()) == n
    server.reset()
    assert main(["prefetch", url, *opts]) == 0
    assert "fetched 0 chunks" in capsys.readouterr().out
    assert sum(server.chunk_requests().values()) == 0
    # `stream` with the same options reads epoch 0 from the cache_dir
    assert main(["stream", url, *opts]) == 0
    assert "24 blocks" in capsys.readouterr().out
    assert sum(server.chunk_requests().values()) == 0


@pytest.mark.parametrize("argv,words", [
    (["{url}"], "--cache-dir"),
    (["{url}", "{url}", "--grid", "--cache-dir", "c"], "--grid takes one source"),
    (["{url}", "--grid", "--z-size", "2"], "--z-size"),
    (["{url}", "--overlap", "0,4,4"], "--overlap applies to --grid"),
    (["{url}", "--epochs", "0"], "--epochs"),
    (["{url}", "--batches", "100000", "--cache-dir", "c"], "--batches x --batch-size"),
])
def test_cli_bad_input_is_one_line_exit_2(server, tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{url}", server.url("v3.zarr")) for a in argv]
    server.reset()
    try:
        code = main(["prefetch", *argv])
    except SystemExit as exit_:  # argparse's own checks
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert sum(server.chunk_requests().values()) == 0


def test_cli_dry_run_lists_a_url_without_cache_dir(server, capsys):
    server.reset()
    assert main(["prefetch", server.url("v3.zarr"), "--epochs", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "to fetch" in out and "no cache_dir: listed only" in out
    assert sum(server.chunk_requests().values()) == 0


def test_a_cache_dir_too_small_for_the_run_is_an_error(server, tmp_path):
    budget = 20 * 2 * int(np.prod(CHUNKS))  # about 20 chunks (random data: incompressible)
    with dask.config.set({"vesuvius-dask.remote.cache-dir-bytes": budget}):
        s = DaskVesuviusStream([server.url("v3.zarr")], 2, 16, 16, samples_per_epoch=64, seed=2,
                               cache_dir=tmp_path / "c")
        plan = vd.prefetch(s, 1, dry_run=True)
        assert plan.chunks > 40
        assert "may not fit" in plan.summary()
        with pytest.raises(CacheDirError, match="budget"):
            plan.fetch()


_KILLED_ENV = {"DASK_VESUVIUS_DASK__REMOTE__CONCURRENCY": "4"}


def test_a_killed_prefetch_resumes_and_a_second_run_fetches_nothing(served, tmp_path):
    cache = tmp_path / "c"
    opts = ["--batches", "8", "--batch-size", "8", "--z-size", "2", "--y-size", "16", "--x-size", "16",
            "--seed", "9", "--epochs", "2", "--cache-dir", str(cache), "--quiet"]
    with SlowServer(served[0], delay=0.01) as srv:
        url = srv.url("v3.zarr")
        listed = vd.prefetch(DaskVesuviusStream([url], 2, 16, 16, samples_per_epoch=64, batch_size=8,
                                                seed=9, cache_dir=cache), 2, dry_run=True)
        assert listed.chunks > 60
        seen = []
        proc = None

        def kill_at_the_40th_chunk(path):
            if not is_metadata(path):
                seen.append(path)
                if len(seen) == 40:
                    os.kill(proc.pid, signal.SIGKILL)

        srv.on_request = kill_at_the_40th_chunk
        proc = subprocess.Popen([sys.executable, "-m", "vesuvius_dask.cli", "prefetch", url, *opts],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **_KILLED_ENV})
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, err)
        srv.on_request = None
        entry = listed.remote[0]
        # what was whole in cache_dir when the process died (none, if no write had ended yet)
        kept = [k for k in entry.keys if entry.remote.cache.file(k).is_file()]
        assert len(kept) < listed.chunks
        for k in kept:  # every file with a chunk's name is a whole, checked chunk
            raw = entry.remote.cache.file(k).read_bytes()
            assert zlib.crc32(raw[16:]) == int.from_bytes(raw[4:8], "little")

        srv.reset()
        assert main(["prefetch", url, *opts]) == 0  # resumes: only what is missing
        asked = srv.chunk_requests()
        assert set(asked) == _paths(listed) - {urlparse(f"{entry.url}/{k}").path for k in kept}, (
            len(asked), len(kept), listed.chunks)
        assert max(asked.values()) == 1, asked.most_common(3)
        srv.reset()
        assert main(["prefetch", url, *opts]) == 0
        assert sum(srv.chunk_requests().values()) == 0
