"""``s3://`` volumes through s3fs, against moto's S3 server on loopback (issue 25).

:class:`~vesuvius_dask.testing.s3.S3Server` runs moto's server-mode application behind a
middleware that counts requests (per key, and the most in flight), sleeps per chunk GET and
answers S3's throttling and error responses on demand. Every check counts requests, never
times them. The bucket ``scrolls`` is public (a bucket policy lets anyone read it, as the
open-data bucket does); ``private`` is not.
"""

import errno
import json
import os
import subprocess
import sys

import dask
import numpy as np
import pytest
import zarr

pytest.importorskip("s3fs", reason="s3:// needs s3fs")
pytest.importorskip("moto.moto_server.werkzeug_app", reason="the S3 tests need moto[server]")

from torch.utils.data import DataLoader  # noqa: E402

from vesuvius_dask import DaskVesuviusStream, open_volume  # noqa: E402
from vesuvius_dask.errors import ChunkFetchError, VesuviusDaskError  # noqa: E402
from vesuvius_dask.io.open import resolve_volume  # noqa: E402
from vesuvius_dask.io.paths import OPEN_DATA_BUCKET, remote_storage_options  # noqa: E402
from vesuvius_dask.testing.s3 import S3Server  # noqa: E402

SHAPE, CHUNKS = (8, 128, 128), (4, 32, 32)  # 32 chunks
N_CHUNKS = 2 * 4 * 4
FAST = {"vesuvius-dask.remote.retries": 2, "vesuvius-dask.remote.backoff": 0.01,
        "vesuvius-dask.remote.timeout": 2.0}
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def _public(bucket):
    # AWS checks s3:GetObject for a HEAD too; moto checks "s3:HeadObject"
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]})


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(server, data, level1): v3.zarr (zstd), v2.zarr (blosc), ome.zarr (levels 0, 1) in ``scrolls``."""
    root = tmp_path_factory.mktemp("s3src")
    data = np.random.default_rng(11).integers(0, 65535, SHAPE, dtype=np.uint16)
    zarr.create_array(root / "v3.zarr", shape=SHAPE, chunks=CHUNKS, dtype=data.dtype)[:] = data
    zarr.create_array(root / "v2.zarr", shape=SHAPE, chunks=CHUNKS, dtype=data.dtype,
                      zarr_format=2)[:] = data
    level1 = data[::2, ::2, ::2].copy()
    group = zarr.open_group(root / "ome.zarr", mode="w", zarr_format=2)
    group.create_array("0", shape=SHAPE, chunks=CHUNKS, dtype=data.dtype)[:] = data
    group.create_array("1", shape=level1.shape, chunks=(4, 16, 16), dtype=data.dtype)[:] = level1
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
                                   "datasets": [{"path": str(i), "coordinateTransformations": [
                                       {"type": "scale", "scale": [2.0 ** i] * 3}]} for i in (0, 1)]}]
    server = S3Server(delay=0.05)
    client = server.client()
    for bucket in ("scrolls", "private"):
        client.create_bucket(Bucket=bucket)
    client.put_bucket_policy(Bucket="scrolls", Policy=_public("scrolls"))
    for name in ("v3.zarr", "v2.zarr", "ome.zarr"):
        server.put_folder("scrolls", name, root / name)
    server.put_folder("private", "v3.zarr", root / "v3.zarr")
    yield server, data, level1
    server.stop()


@pytest.fixture()
def no_aws(monkeypatch, tmp_path):
    """An environment without AWS credentials (nor a shared credentials file)."""
    for k in _AWS_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


def _check_blocks(blocks, coords, data, block):
    for b, (_, z, y, x) in zip(blocks, coords.tolist()):
        np.testing.assert_array_equal(b, data[z:z + block[0], y:y + block[1], x:x + block[2]])


# -- which options an s3:// URL gets ------------------------------------------------------------

def test_s3_is_anonymous_unless_credentials_are_given(no_aws, monkeypatch, tmp_path):
    url = "s3://some-bucket/x.zarr"
    assert remote_storage_options(url) == {"anon": True}
    assert remote_storage_options(url, {"endpoint_url": "http://h"}) == {"endpoint_url": "http://h",
                                                                         "anon": True}
    for given in ({"key": "k", "secret": "s"}, {"profile": "p"}, {"anon": False},
                  {"client_kwargs": {"aws_access_key_id": "k"}}):
        assert "anon" not in remote_storage_options(url, given) or given.get("anon") is False
    monkeypatch.setenv("AWS_PROFILE", "work")
    assert remote_storage_options(url) == {}
    monkeypatch.delenv("AWS_PROFILE")
    (tmp_path / "no-credentials").write_text("[default]\n")
    assert remote_storage_options(url) == {}
    # the open-data bucket is read from its region, whatever AWS_DEFAULT_REGION says
    assert remote_storage_options(f"s3://{OPEN_DATA_BUCKET}/PHerc0332/volumes/a.zarr") == {
        "client_kwargs": {"region_name": "us-east-1"}}
    assert "client_kwargs" not in remote_storage_options(f"s3://{OPEN_DATA_BUCKET}/a", {"endpoint_url": "http://h"})
    assert remote_storage_options("https://host/a.zarr") is None  # other URLs: as given
    assert remote_storage_options("https://host/a.zarr", {"x": 1}) == {"x": 1}


def test_a_public_bucket_reads_anonymously_and_a_private_one_is_refused_in_one_line(s3, no_aws):
    server, data, _ = s3
    server.reset()
    vol = open_volume("s3://scrolls/v3.zarr", storage_options={"endpoint_url": server.endpoint})
    np.testing.assert_array_equal(vol[1:7, 10:100, 33:64].compute(), data[1:7, 10:100, 33:64])
    assert server.signed[True] == 0 and server.signed[False] > 0  # no request was signed
    with pytest.raises(VesuviusDaskError) as info:
        open_volume("s3://private/v3.zarr", storage_options={"endpoint_url": server.endpoint})
    text = str(info.value)
    assert len(text.splitlines()) == 1 and "s3://private/v3.zarr" in text, text


def test_credentials_when_given_sign_every_request(s3, no_aws):
    server, data, _ = s3
    server.reset()
    vol = open_volume("s3://private/v3.zarr", storage_options=server.options())
    np.testing.assert_array_equal(vol.compute(), data)
    assert server.signed_chunks[False] == 0 and server.signed_chunks[True] > 0


# -- the same guarantees as HTTP ------------------------------------------------------------------

@pytest.mark.parametrize("name,level", [("v3.zarr", None), ("v2.zarr", None), ("ome.zarr", 1)])
def test_blocks_equal_numpy_with_many_requests_in_flight_and_each_chunk_fetched_once(s3, name, level):
    server, data, level1 = s3
    want = level1 if level == 1 else data
    stream = DaskVesuviusStream([f"s3://scrolls/{name}"], 4, 16, 16, samples_per_epoch=128, batch_size=4,
                                return_coords=True, seed=1, level=level, storage_options=server.options())
    server.reset()
    n = 0
    server.delay = 0.1  # a far server: moto's own work is small beside it
    try:
        for blocks, coords in stream:
            _check_blocks(blocks.numpy(), coords, want, (4, 16, 16))
            n += blocks.shape[0]
    finally:
        server.delay = 0.05
    assert n == 128
    counts = server.chunk_requests(f"/scrolls/{name}/")
    stored = int(np.prod([-(-s // c) for s, c in zip(want.shape, CHUNKS if level is None else (4, 16, 16))]))
    assert max(counts.values()) == 1 and 0 < len(counts) <= stored
    # more than botocore's default pool of 10 connections: the fetcher's concurrency is what counts
    assert server.peak > 10, f"at most {server.peak} requests in flight"
    assert all(r is not None and r.startswith("bytes=0-") for p, r in server.ranges.items() if p in counts)


def test_two_workers_fill_a_cache_dir_and_a_second_run_asks_for_no_chunk(s3, tmp_path):
    server, data, _ = s3
    kw = dict(samples_per_epoch=256, batch_size=16, return_coords=True, seed=2, cache_dir=tmp_path / "c",
              storage_options=server.options())
    stream = DaskVesuviusStream(["s3://scrolls/v3.zarr"], 4, 32, 32, **kw)
    stream.set_epoch(0)
    server.reset()
    n = 0
    for blocks, coords in DataLoader(stream, batch_size=None, num_workers=2, timeout=120):
        _check_blocks(blocks.numpy(), coords, data, (4, 32, 32))
        n += blocks.shape[0]
    assert n == 256
    first = server.chunk_requests("/scrolls/v3.zarr/")
    assert 0 < len(first) and sum(first.values()) <= 1.1 * len(first), first.most_common(3)
    server.reset()
    again = DaskVesuviusStream(["s3://scrolls/v3.zarr"], 4, 32, 32, **kw)
    again.set_epoch(0)
    for blocks, coords in again:  # the same epoch, in this process, from the workers' cache_dir
        _check_blocks(blocks.numpy(), coords, data, (4, 32, 32))
    assert sum(server.chunk_requests().values()) == 0


# -- faults, named in one line --------------------------------------------------------------------

def test_a_missing_chunk_is_named_and_a_missing_bucket_too(s3, tmp_path):
    server, data, _ = s3
    server.put_folder("scrolls", "holed.zarr", _local_copy(s3, tmp_path))
    server.client().delete_object(Bucket="scrolls", Key="holed.zarr/c/1/2/3")
    with dask.config.set(FAST), pytest.raises(ChunkFetchError) as info:
        open_volume("s3://scrolls/holed.zarr", storage_options=server.options())[4:8, 64:96, 96:128].compute()
    text = str(info.value)
    assert len(text.splitlines()) == 1, text
    assert "chunk (1, 2, 3)" in text and "s3://scrolls/holed.zarr/c/1/2/3" in text and "404" in text, text
    with pytest.raises(VesuviusDaskError) as info:
        open_volume("s3://no-such-bucket/v3.zarr", storage_options=server.options())
    text = str(info.value)
    assert len(text.splitlines()) == 1 and "s3://no-such-bucket/v3.zarr" in text, text


def _local_copy(s3, tmp_path):
    folder = tmp_path / "copy.zarr"
    zarr.create_array(folder, shape=SHAPE, chunks=CHUNKS, dtype=np.uint16)[:] = s3[1]
    return folder


def test_the_server_going_down_mid_epoch_is_retried_then_named(s3):
    data_server = S3Server()  # moto's buckets live in this process: the same objects, its own port
    try:
        with dask.config.set(FAST):
            stream = DaskVesuviusStream(["s3://scrolls/v2.zarr"], 4, 32, 32, samples_per_epoch=1024,
                                        batch_size=8, seed=3, cache_bytes=0,
                                        storage_options=data_server.options())
        with pytest.raises(ChunkFetchError) as info:
            for i, _ in enumerate(stream):
                if i == 2:
                    data_server.stop()
        text = str(info.value).strip().splitlines()[-1]
        assert "s3://scrolls/v2.zarr/" in text and "chunk (" in text and "3 attempts" in text, text
    finally:
        data_server.stop()


def test_an_oversized_object_where_a_chunk_should_be_is_refused_after_a_range_read(s3, tmp_path):
    server, data, _ = s3
    server.put_folder("scrolls", "big.zarr", _local_copy(s3, tmp_path))
    bound = 2 * int(np.prod(CHUNKS))  # decoded chunk bytes; the fetcher allows 1/16 + 64 KiB more
    server.client().put_object(Bucket="scrolls", Key="big.zarr/c/0/0/0", Body=b"\0" * (16 * bound))
    server.reset()
    with dask.config.set(FAST), pytest.raises(ChunkFetchError) as info:
        open_volume("s3://scrolls/big.zarr", storage_options=server.options())[0:4, 0:32, 0:32].compute()
    text = str(info.value)
    assert len(text.splitlines()) == 1, text
    assert "chunk (0, 0, 0)" in text and "s3://scrolls/big.zarr/c/0/0/0" in text, text
    path = "/scrolls/big.zarr/c/0/0/0"
    asked = server.counts[path]
    assert asked >= 2  # retried
    limit = bound + bound // 16 + 65536
    assert f"{limit} bytes" in text, text
    assert server.ranges[path] == f"bytes=0-{limit}"  # [0, bound + 1): one byte past the bound
    assert server.sent[path] == asked * (limit + 1)  # never the whole object


def test_cli_info_check_of_an_s3_url(s3, tmp_path):
    server, _, _ = s3
    env = {k: v for k, v in os.environ.items() if k not in _AWS_ENV}
    env.update(AWS_ENDPOINT_URL_S3=server.endpoint, AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"))  # anonymous: the bucket is public
    cmd = [sys.executable, "-m", "vesuvius_dask.cli", "info", "s3://scrolls/v3.zarr", "--check", "--quiet",
           "--cache-dir", str(tmp_path / "c")]
    server.reset()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert f"{N_CHUNKS} chunks checked, 0 bad" in out.stdout
    assert server.signed[True] == 0 and len(server.chunk_requests("/scrolls/v3.zarr/")) == N_CHUNKS
    out = subprocess.run(cmd[:4] + ["s3://no-such-bucket/v3.zarr", "--check", "--quiet"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "s3://no-such-bucket/v3.zarr" in out.stderr


# -- throttling: what the fetcher sees --------------------------------------------------------------

@pytest.mark.parametrize("fault,status,code,errno_", [("slowdown", 503, "SlowDown", errno.EBUSY),
                                                      ("429", 429, "TooManyRequests", errno.EIO)])
def test_how_a_throttle_surfaces_from_s3fs(s3, fault, status, code, errno_):
    # what remote/fetch.py must recognise: s3fs raises OSError (errno EBUSY for SlowDown,
    # EIO for 429), caused by botocore's ClientError, whose response has the code, the
    # status and the headers (Retry-After among them)
    server, _, _ = s3
    remote = resolve_volume("s3://scrolls/v3.zarr", storage_options=server.options()).remote
    fs = remote._here().fs
    server.set_fault(fault, retry_after=2)
    try:
        with pytest.raises(OSError) as info:
            fs.cat_file("scrolls/v3.zarr/c/0/0/0", start=0, end=100)
    finally:
        server.set_fault(None)
    err = info.value
    assert err.errno == errno_
    response = err.__cause__.response
    assert response["Error"]["Code"] == code
    assert response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "2"


def test_slowdown_backs_off_and_the_read_completes(s3):
    # 12 SlowDowns of one chunk: more than the retries allow (2 attempts x s3fs's 5 tries);
    # a throttle is not a fault, so the read slows down and completes
    server, data, _ = s3
    path = "/scrolls/v3.zarr/c/1/1/1"
    with dask.config.set({**FAST, "vesuvius-dask.remote.retries": 1}):
        vol = open_volume("s3://scrolls/v3.zarr", storage_options=server.options())
    server.reset()
    server.throttle(path, 12)
    try:
        np.testing.assert_array_equal(vol[4:8, 32:64, 32:64].compute(), data[4:8, 32:64, 32:64])
    finally:
        server.throttle(path, 0)
    assert server.refusals[path] == 12


def test_slowdowns_under_two_workers_slow_the_epoch_and_every_block_arrives(s3, tmp_path):
    # SlowDown on half of the chunks, three times each: refusals are waited out in both
    # worker processes (one shared request window), never counted as retries
    server, data, _ = s3
    server.reset()
    throttled = [f"/scrolls/v3.zarr/c/{z}/{y}/{x}" for z in range(2) for y in range(4) for x in (0, 3)]
    for path in throttled:
        server.throttle(path, 3)
    with dask.config.set({"vesuvius-dask.remote.retries": 0,
                          "vesuvius-dask.remote.share-dir": str(tmp_path / "windows")}):
        stream = DaskVesuviusStream(["s3://scrolls/v3.zarr"], 4, 32, 32, samples_per_epoch=128, batch_size=16,
                                    return_coords=True, seed=5, storage_options=server.options())
        n = 0
        for blocks, coords in DataLoader(stream, batch_size=None, num_workers=2, timeout=120):
            _check_blocks(blocks.numpy(), coords, data, (4, 32, 32))
            n += blocks.shape[0]
    for path in throttled:
        server.throttle(path, 0)
    assert n == 128
    assert sum(server.refusals.values()) > 0  # the throttled chunks were asked for, refused, then read
