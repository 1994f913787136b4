"""Servers that rate-limit (issue 25): 429 with and without Retry-After, concurrency caps, 503 bursts.

Every epoch must complete with every block equal to its numpy slice, and refusals
must stay a small fraction of the requests. The request window's arithmetic
(:mod:`vesuvius_dask.remote.politeness`) is checked on its own; every check counts
requests and refusals, none times them.
"""

import math

import dask
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from vesuvius_dask.errors import ChunkFetchError
from vesuvius_dask.remote.politeness import DECREASE, HostWindow, parse_retry_after
from vesuvius_dask.testing.server import SlowServer

pytest.importorskip("aiohttp", reason="Zarr over HTTP needs the 'remote' extra (fsspec[http])")

SHAPE, CHUNKS = (16, 256, 256), (4, 32, 32)  # 256 chunks


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    data = np.random.default_rng(3).integers(0, 255, SHAPE, dtype=np.uint8)
    zarr.create_array(root / "v.zarr", shape=SHAPE, chunks=CHUNKS, dtype=data.dtype)[:] = data
    return root, data


@pytest.fixture()
def windows(tmp_path):
    """Each test's request windows in its own folder (none inherited from another test's server)."""
    with dask.config.set({"vesuvius-dask.remote.share-dir": str(tmp_path / "windows")}):
        yield tmp_path / "windows"


def _epoch(url, workers, samples=256, seed=0, batch=8):
    from torch.utils.data import DataLoader

    from vesuvius_dask import DaskVesuviusStream

    stream = DaskVesuviusStream([url], block=(4, 32, 32), samples_per_epoch=samples, batch_size=batch,
                                return_coords=True, seed=seed)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, timeout=120 if workers else 0)
    return list(loader)


def _check(batches, data, samples):
    n = 0
    for blocks, coords in batches:
        for b, (_, z, y, x) in zip(blocks.numpy(), coords.tolist()):
            np.testing.assert_array_equal(b, data[z:z + 4, y:y + 32, x:x + 32])
            n += 1
    assert n == samples


def _refused_fraction(server):
    refused = sum(server.refusals.values())
    return refused / max(1, refused + len(server.answered))


@pytest.mark.slow
@pytest.mark.parametrize("workers,retry_after", [(2, None), (4, "auto")])
def test_a_token_bucket_server_slows_the_run_down_and_every_block_arrives(served, windows, workers,
                                                                          retry_after):
    with SlowServer(served[0], delay=0.01) as server:
        server.limit(rate=200, burst=10, retry_after=retry_after)
        batches = _epoch(server.url("v.zarr"), workers)
        _check(batches, served[1], 256)
        assert server.refusals[429] > 0, "the limit was never reached"
        assert _refused_fraction(server) < 0.25, (server.refusals, len(server.answered))


@pytest.mark.slow
def test_a_concurrency_cap_is_found_and_kept_by_all_workers_together(served, windows):
    with SlowServer(served[0], delay=0.02) as server:
        server.limit(max_in_flight=4, retry_after=None)
        batches = _epoch(server.url("v.zarr"), 2)
        _check(batches, served[1], 256)
        assert _refused_fraction(server) < 0.25, (server.refusals, len(server.answered))


@pytest.mark.slow
def test_the_machine_ceiling_holds_across_worker_processes(served, windows):
    with dask.config.set({"vesuvius-dask.remote.host-concurrency": 3,
                          "vesuvius-dask.remote.initial-concurrency": 3}):
        with SlowServer(served[0], delay=0.02) as server:
            batches = _epoch(server.url("v.zarr"), 2)
            _check(batches, served[1], 256)
            assert server.chunk_peak <= 3, server.chunk_peak  # two processes, one window of 3


def test_bursts_of_503_are_waited_out(served, windows):
    from vesuvius_dask.io.open import resolve_volume

    with dask.config.set({"vesuvius-dask.remote.backoff": 0.01}):
        with SlowServer(served[0]) as server:
            server.limit(burst_503=(25, 3))  # of every 25 chunk requests, 3 are refused
            vol = resolve_volume(server.url("v.zarr"))
            np.testing.assert_array_equal(vol.array[:, :128, :128].compute(), served[1][:, :128, :128])
            assert server.refusals[503] > 0
            assert vol.remote.stats.refused == server.refusals[503]
            assert vol.remote.stats.retried == 0  # refusals are not failures


def test_a_server_that_never_stops_refusing_ends_the_read_in_one_line(served, windows):
    from vesuvius_dask import open_volume

    with dask.config.set({"vesuvius-dask.remote.throttle-budget": 0.3,
                          "vesuvius-dask.remote.backoff": 0.01}):
        with SlowServer(served[0]) as server:
            server.limit(max_in_flight=0, retry_after="0")
            vol = open_volume(server.url("v.zarr"))
            with pytest.raises(ChunkFetchError) as info:
                vol[0:4, 0:32, 0:32].compute()
    text = str(info.value)
    assert "\n" not in text and "c/0/0/0" in text
    assert "refusing requests (HTTP 429" in text and "throttle-budget" in text, text


def test_a_huge_retry_after_waits_the_budget_then_ends(served, windows):
    from vesuvius_dask import open_volume

    with dask.config.set({"vesuvius-dask.remote.throttle-budget": 0.3}):
        with SlowServer(served[0]) as server:
            server.limit(max_in_flight=0, retry_after="86400")
            vol = open_volume(server.url("v.zarr"))
            with pytest.raises(ChunkFetchError, match="throttle-budget"):
                vol[0:4, 0:32, 0:32].compute()
            # the budget runs from the host's first refusal: the first wave of 8 (the initial
            # window), the pause, one more wave, then the end (not a new budget per wave)
            chunks = len(server.chunk_requests())
            assert sum(server.refusals.values()) <= 2 * chunks, (server.refusals, chunks)


@pytest.mark.parametrize("header", ["0", "-5", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_a_retry_after_of_now_is_no_licence_to_hammer(served, windows, header):
    from vesuvius_dask import open_volume

    with dask.config.set({"vesuvius-dask.remote.throttle-budget": 0.5}):
        with SlowServer(served[0]) as server:
            server.limit(max_in_flight=0, retry_after=header)
            vol = open_volume(server.url("v.zarr"))
            with pytest.raises(ChunkFetchError, match="throttle-budget"):
                vol[0:4, 0:32, 0:32].compute()
            # the backoff applies (first wait >= 50 ms, doubling): a handful of tries per chunk
            # in 0.5 s (thousands without it)
            chunks = len(server.chunk_requests())
            assert sum(server.refusals.values()) <= 6 * chunks, (server.refusals, chunks)


# -- the window's arithmetic -----------------------------------------------------------------
@given(st.floats(0, 1e6, allow_nan=False))
def test_retry_after_in_seconds(seconds):
    assert parse_retry_after(repr(seconds)) == pytest.approx(seconds)


@given(st.integers(0, 10**6))
def test_retry_after_as_an_http_date(delta):
    from email.utils import formatdate

    now = 1.7e9
    assert parse_retry_after(formatdate(now + delta, usegmt=True), now=now) == pytest.approx(delta, abs=1)


@pytest.mark.parametrize("bad", ["soon", "", "nan", "inf", None, "Mon, 99 Foo"])
def test_a_bad_retry_after_is_ignored(bad):
    assert parse_retry_after(bad) is None


def test_a_past_date_means_no_wait():
    assert parse_retry_after("-5") == 0.0


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.lists(st.booleans(), max_size=200))
def test_the_window_stays_between_one_and_the_ceiling(ceiling, initial, answers):
    w = HostWindow("http://h", ceiling, initial, cooldown=0.0, folder="")
    for ok in answers:
        w._waiting = True  # a request waits for room: the window is what limits (else it does not grow)
        before = w.window
        if ok:
            w.answered()
            assert before <= w.window <= ceiling
        else:
            w.refused(None)
            assert w.window == pytest.approx(max(1.0, before * DECREASE))
        assert 1 <= w.window <= ceiling


def test_slow_start_doubles_then_growth_is_additive():
    w = HostWindow("http://h", 64, 2, cooldown=0.0, folder="")
    w._waiting = True  # requests wait for room: the window is what limits
    for _ in range(2):  # one round of answers at a window of 2
        w.answered()
    assert w.window == 4
    w.refused(None)
    assert w.window == pytest.approx(4 * DECREASE)  # the threshold too: additive from here
    for _ in range(3):
        w.answered()
    assert 4 * DECREASE < w.window < 4 * DECREASE + 1.5  # three answers: + 1/w each


def test_refusals_within_the_cooldown_count_once():
    w = HostWindow("http://h", 64, 32, cooldown=60.0, folder="")
    for _ in range(10):
        w.refused(None)  # the answers of one burst of requests
    assert w.window == pytest.approx(32 * DECREASE)


def test_processes_share_one_window_through_the_file(tmp_path):
    # two windows on one file stand for two processes: each open file description holds its own slot
    a = HostWindow("http://h:1", 64, 16, cooldown=0.0, folder=str(tmp_path))
    b = HostWindow("http://h:1", 64, 16, cooldown=0.0, folder=str(tmp_path))
    a.refused(2.0)
    a.refused(None)
    assert b.window == pytest.approx(16 * DECREASE**2) and b.paused_for() > 1.0
    a._update(lambda st: [8.0, *st[1:]])  # a window of 8, for round numbers
    assert a.processes() == 2 == b.processes()
    for _ in range(4):
        assert a._try_start()  # the machine's window is 8: a takes 4 ...
    assert b._try_start()  # ... b one, and says it wants more
    b._shared.set_count(b.in_use, waiting=True)
    assert not a._try_start()  # a is at its share (4 of 8) while b waits
    for _ in range(3):
        assert b._try_start()
    assert not b._try_start() and not a._try_start()  # 8 in flight: the window is full
    a.release()
    assert b._try_start() and not a._try_start()
    a._shared.close()  # a "dies": its requests stop counting
    assert b.processes() == 1 and b._try_start() and b.in_use == 6
    other = HostWindow("http://h:2", 64, 16, cooldown=0.0, folder=str(tmp_path))
    assert other.window == 16  # another host, another window


def test_a_window_file_of_someone_else_is_not_used(tmp_path):
    import os

    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 10)
    folder = tmp_path / "w"
    folder.mkdir()
    w = HostWindow("http://h:1", 8, 8, folder=str(folder))
    name = os.path.basename(w._shared.path)
    w._shared.close()
    os.unlink(folder / name)
    os.symlink(target, folder / name)  # planted: the window file is a link
    with pytest.warns(RuntimeWarning, match="keeps its own"):
        again = HostWindow("http://h:1", 8, 8, folder=str(folder))
    assert again._shared is None and target.read_bytes() == b"x" * 10
    assert math.isclose(again.window, 8)
