"""The stream and the conversion on a dask.distributed LocalCluster (loopback only)."""

import dask
import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

distributed = pytest.importorskip("distributed")

from vesuvius_dask import DaskVesuviusStream  # noqa: E402
from vesuvius_dask.errors import VesuviusDaskError  # noqa: E402

#: Starts processes or a dask cluster: the fast lane leaves the whole module out.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=":0") as c:
        yield c


@pytest.fixture()
def client(cluster):
    with distributed.Client(cluster) as c:
        yield c


def _coords(stream):
    return np.concatenate([c.numpy() for *_, c in stream])


def test_same_blocks_as_local(client, zarr_v3, rng_volume):
    kw = dict(samples_per_epoch=400, batch_size=50, seed=7, return_coords=True)
    local = DaskVesuviusStream([str(zarr_v3)], 4, 32, 32, **kw)
    remote = DaskVesuviusStream([str(zarr_v3)], 4, 32, 32, client=client, **kw)
    for (a, ca), (b, cb) in zip(local, remote):
        assert torch.equal(ca, cb) and torch.equal(a, b)
    for block, (_, z, y, x) in zip(b, cb.tolist()):
        np.testing.assert_array_equal(block.numpy(), rng_volume[z:z + 4, y:y + 32, x:x + 32])


def test_address_and_labels_and_memmap(cluster, zarr_v2, rng_volume, tmp_path):
    mm = np.memmap(tmp_path / "v.raw", dtype=np.uint16, mode="w+", shape=rng_volume.shape)
    mm[:] = rng_volume
    mm.flush()
    ro = np.memmap(tmp_path / "v.raw", dtype=np.uint16, mode="r", shape=rng_volume.shape)
    lab = zarr.create_array(tmp_path / "lab.zarr", shape=rng_volume.shape[1:], chunks=(64, 64),
                            dtype="u1")
    lab[:] = (rng_volume[0] % 5).astype(np.uint8)
    stream = DaskVesuviusStream([str(zarr_v2), ro], 4, 16, 16, samples_per_epoch=120, seed=1,
                                batch_size=40, labels=[str(tmp_path / "lab.zarr")] * 2,
                                return_coords=True, client=cluster.scheduler_address)
    n = 0
    for blocks, labels, coords in stream:
        for b, lb, (_, z, y, x) in zip(blocks, labels, coords.tolist()):
            np.testing.assert_array_equal(b.numpy(), rng_volume[z:z + 4, y:y + 16, x:x + 16])
            np.testing.assert_array_equal(lb.numpy(), lab[y:y + 16, x:x + 16])
            n += 1
    assert n == 120


def test_worker_lost_mid_epoch(client, zarr_v3):
    kw = dict(samples_per_epoch=600, batch_size=30, seed=5, return_coords=True, prefetch=4)
    expected = {tuple(r) for r in _coords(DaskVesuviusStream([str(zarr_v3)], 4, 32, 32, **kw))}
    stream = DaskVesuviusStream([str(zarr_v3)], 4, 32, 32, client=client, **kw)
    seen = []
    for i, (_, coords) in enumerate(stream):
        seen += [tuple(r) for r in coords.tolist()]
        if i == 3:  # kill a worker process while batches are in flight; a new one starts
            worker = sorted(client.scheduler_info()["workers"])[0]
            client.restart_workers([worker])
    assert len(seen) == 600 and set(seen) == expected


def test_dataloader_workers_connect_their_own_client(cluster, zarr_v3):
    kw = dict(samples_per_epoch=200, batch_size=20, seed=2, return_coords=True)
    stream = DaskVesuviusStream([str(zarr_v3)], 4, 32, 32, client=cluster.scheduler_address, **kw)
    stream.set_epoch(0)
    loader = DataLoader(stream, batch_size=None, num_workers=2, timeout=120,
                        multiprocessing_context="spawn")
    got = [tuple(r) for _, c in loader for r in c.tolist()]
    local = DaskVesuviusStream([str(zarr_v3)], 4, 32, 32, **kw)
    assert len(got) == 200 and set(got) == {tuple(r) for r in _coords(local)}


def test_in_ram_numpy_is_scattered_once(client, rng_volume):
    lab = (rng_volume[0] % 3).astype(np.uint8)
    stream = DaskVesuviusStream([rng_volume], 4, 8, 8, samples_per_epoch=60, batch_size=20,
                                seed=0, client=client, labels=[lab], return_coords=True)
    for blocks, labels, coords in stream:
        for b, lb, (_, z, y, x) in zip(blocks, labels, coords.tolist()):
            np.testing.assert_array_equal(b.numpy(), rng_volume[z:z + 4, y:y + 8, x:x + 8])
            np.testing.assert_array_equal(lb.numpy(), lab[y:y + 8, x:x + 8])
    assert len(stream.reader._scattered) == 1  # scattered once per client, then reused
    list(stream)
    assert len(stream.reader._scattered) == 1


def test_unreachable_scheduler_errors_within_timeout(zarr_v3):
    # the configured timeout is the one used (named in the message), so it cannot hang
    with dask.config.set({"vesuvius-dask.connect-timeout": 1}):
        with pytest.raises(VesuviusDaskError, match=r"at tcp://127.0.0.1:1 within 1 s"):
            DaskVesuviusStream([str(zarr_v3)], 4, 8, 8, samples_per_epoch=4, client="tcp://127.0.0.1:1")


def test_stream_command_on_cluster(cluster, capsys):
    from vesuvius_dask.cli.main import main

    from .conftest import EXAMPLE

    assert main(["stream", str(EXAMPLE), "--batches", "3", "--batch-size", "16",
                 "--scheduler", cluster.scheduler_address]) == 0
    out = capsys.readouterr().out
    assert "48 blocks" in out and f"scheduler {cluster.scheduler_address}" in out


def test_convert_with_scheduler_and_its_progress_bar(cluster, tmp_path, rng_volume, capsys):
    """--scheduler without --quiet: distributed's progress bar, exact data, shards beyond the volume."""
    import tifffile
    import zarr
    from vesuvius_dask.cli.main import main

    data = rng_volume[:6, :100, :120]
    (tmp_path / "tifs").mkdir()
    for i, layer in enumerate(data):
        tifffile.imwrite(tmp_path / "tifs" / f"{i:02d}.tif", layer)
    assert main(["convert", str(tmp_path / "tifs"), str(tmp_path / "o.zarr"), "--chunks", "2,64,64",
                 "--shards", "4,1024,1024", "--scheduler", cluster.scheduler_address]) == 0
    out = capsys.readouterr().out
    assert "100%" in out or "Completed" in out or "[####" in out, out
    arr = zarr.open(tmp_path / "o.zarr", mode="r")
    assert arr.shards == (4, 128, 128) and arr.chunks == (2, 64, 64)
    np.testing.assert_array_equal(arr[:], data)
