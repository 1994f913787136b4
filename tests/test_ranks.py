"""torch.distributed ranks x DataLoader workers: equal counts per rank, the single-process set overall."""

import socket

import numpy as np
import pytest
import torch.multiprocessing as tmp
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream, SamplingError

#: Starts processes or a dask cluster: the fast lane leaves the whole module out.
pytestmark = pytest.mark.slow

KW = dict(samples_per_epoch=1001, batch_size=32, seed=4, return_coords=True)


def _coords(stream, workers):
    stream.set_epoch(0)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, timeout=120 if workers else 0,
                        **({"multiprocessing_context": "fork"} if workers else {}))
    batches = [c.numpy() for _, c in loader]
    return batches


@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2), (3, 1)])
def test_ranks_times_workers_split_the_epoch(rng_volume, world, workers):
    single = {tuple(c) for c in DaskVesuviusStream([rng_volume], 4, 16, 16, **KW).epoch_coords(0).tolist()}
    counts, union, batches = [], [], []
    for rank in range(world):
        stream = DaskVesuviusStream([rng_volume], 4, 16, 16, rank=rank, world_size=world, **KW)
        got = _coords(stream, workers)
        batches.append(len(got))
        coords = np.concatenate(got)
        counts.append(len(coords))
        union += [tuple(c) for c in coords.tolist()]
        assert len(got) == len(stream)  # __len__ is this rank's batch count
    assert len(set(counts)) == 1 and len(set(batches)) == 1  # DDP: the same on every rank
    assert counts[0] == -(-1001 // world)
    assert set(union) == single and len(union) - len(single) < world  # padding: < world repeats


def test_grid_on_ranks_visits_every_position_once(rng_volume):
    kw = dict(sampling_method="grid", overlap=(1, 8, 8), batch_size=7, return_coords=True)
    everything = DaskVesuviusStream([rng_volume], 4, 32, 32, **kw).epoch_coords(0)
    seen = []
    for rank in range(3):
        stream = DaskVesuviusStream([rng_volume], 4, 32, 32, rank=rank, world_size=3, **kw)
        seen += [tuple(c) for c in np.concatenate(_coords(stream, 0)).tolist()]
    assert sorted(seen) == sorted(tuple(c) for c in everything.tolist())


def test_bad_rank(rng_volume):
    with pytest.raises(SamplingError, match=r"rank must be in \[0, 2\)"):
        DaskVesuviusStream([rng_volume], 4, 16, 16, rank=2, world_size=2, **KW)


def _gloo_worker(rank, world, port, volume, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stream = DaskVesuviusStream([volume], 4, 16, 16, **KW)  # rank and world from the group
        assert (stream.rank, stream.world_size) == (rank, world)
        np.save(f"{out}/rank{rank}.npy", np.concatenate(_coords(stream, 0)))
    finally:
        dist.destroy_process_group()


def test_ranks_from_a_gloo_process_group(tmp_path, rng_volume):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.start_processes(_gloo_worker, args=(2, port, rng_volume, str(tmp_path)), nprocs=2,
                        start_method="fork")
    got = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    assert len(got[0]) == len(got[1]) == 501
    single = DaskVesuviusStream([rng_volume], 4, 16, 16, **KW).epoch_coords(0)
    assert {tuple(c) for g in got for c in g.tolist()} == {tuple(c) for c in single.tolist()}
