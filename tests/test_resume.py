"""Resume mid-epoch: the rest of the epoch, block for block, under 0/2/3 workers, loaders and ranks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from vesuvius_dask import DaskVesuviusStream, ResumeError, UniformSampler
from vesuvius_dask.sampling.resume import resume_point
from vesuvius_dask.sampling.samplers import Sampler

KW = dict(samples_per_epoch=700, seed=11, return_coords=True)
FORK = {"multiprocessing_context": "fork"}


def stream(volume, **kw):
    return DaskVesuviusStream([volume], 4, 16, 16, **{**KW, **kw})


def loader(kind, s, workers, batch_size=None):
    extra = FORK if workers else {}
    return kind(s, batch_size=batch_size, num_workers=workers, **extra)


def items(it, volume=None):
    """Coordinates of what a loader yields; with ``volume``, each block checked against numpy slicing."""
    out = []
    for blocks, coords in it:
        c = coords.numpy().reshape(-1, 4)
        if volume is not None:
            for b, (_, z, y, x) in zip(blocks.reshape(-1, 4, 16, 16).numpy(), c):
                np.testing.assert_array_equal(b, volume[z:z + 4, y:y + 16, x:x + 16])
        out.append(c)
    return out


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def full_epoch(volume, epoch=1, **kw):
    s = stream(volume, **kw)
    s.set_epoch(epoch)
    return items(DataLoader(s, batch_size=None))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_stateful_dataloader_resumes_the_rest_of_the_epoch(rng_volume, workers):
    full = full_epoch(rng_volume, batch_size=32)
    stop = int(np.random.default_rng(workers).integers(1, len(full) - 1))
    s = stream(rng_volume, batch_size=32)
    s.set_epoch(1)
    dl = loader(StatefulDataLoader, s, workers)
    it, head = iter(dl), []
    for _ in range(stop):
        head.append(next(it)[1].numpy())
    state = dl.state_dict()
    del it
    same(head, full[:stop])
    fresh = stream(rng_volume, batch_size=32)
    dl2 = loader(StatefulDataLoader, fresh, workers)
    dl2.load_state_dict(state)
    same(items(dl2, rng_volume), full[stop:])


@pytest.mark.parametrize("saved,resumed", [(0, 3), (2, 0), (3, 2)])
def test_plain_dataloader_and_another_worker_count(rng_volume, saved, resumed):
    full = full_epoch(rng_volume, batch_size=32)
    s = stream(rng_volume, batch_size=32)
    s.set_epoch(1)
    stop = 9
    head = items(b for b, _ in zip(loader(DataLoader, s, saved), range(stop)))
    same(head, full[:stop])
    state = json.loads(json.dumps(s.loader_state(stop, num_workers=saved)))  # plain values
    fresh = stream(rng_volume, batch_size=32)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)  # the loaded epoch: the state is kept
    same(items(loader(DataLoader, fresh, resumed)), full[stop:])
    fresh.set_epoch(2)  # the next epoch starts from its beginning: the state is dropped
    nxt = stream(rng_volume, batch_size=32)
    nxt.set_epoch(2)
    same(items(DataLoader(fresh, batch_size=None)), items(DataLoader(nxt, batch_size=None)))


def test_stateful_state_restores_with_another_worker_count(rng_volume):
    full = full_epoch(rng_volume, batch_size=32)
    s = stream(rng_volume, batch_size=32)
    s.set_epoch(1)
    dl = loader(StatefulDataLoader, s, 3)
    it = iter(dl)
    for _ in range(7):
        next(it)
    state = dl.state_dict()
    del it
    fresh = stream(rng_volume, batch_size=32)
    fresh.load_state_dict(state)  # the whole loader's state: its workers' positions merged
    same(items(loader(DataLoader, fresh, 2)), full[7:])


@pytest.mark.parametrize("workers", [0, 2])
def test_single_blocks_resume_with_their_worker_count(rng_volume, workers):
    s = stream(rng_volume)
    s.set_epoch(1)
    full = items(loader(DataLoader, s, workers, batch_size=24))
    stop = 5  # 120 blocks: not a multiple of read_batch, so the resume starts inside a read batch
    fresh = stream(rng_volume)
    fresh.load_state_dict(s.loader_state(stop, num_workers=workers, loader_batch_size=24, epoch=1))
    same(items(loader(DataLoader, fresh, workers, batch_size=24), rng_volume), full[stop:])
    if workers:
        other = stream(rng_volume)
        other.load_state_dict(s.loader_state(stop, num_workers=workers, loader_batch_size=24, epoch=1))
        with pytest.raises(ResumeError, match=r"^this state was saved with 2 DataLoader worker\(s\) "
                                              r"yielding single blocks.*num_workers=2"):
            list(other.__iter__())  # an iteration in one process: another worker count


def test_state_round_trips_and_in_one_process(rng_volume):
    full = full_epoch(rng_volume, batch_size=32)
    s = stream(rng_volume, batch_size=32)
    s.set_epoch(1)
    it = iter(s)
    for _ in range(4):
        next(it)
    state = s.state_dict()
    assert {k: state[k] for k in ("epoch", "base", "workers", "positions", "seed")} == \
        {"epoch": 1, "base": 0, "workers": 1, "positions": {"0": 4}, "seed": 11}
    fresh = stream(rng_volume, batch_size=32)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state  # a loaded, not yet used state is what it reports
    same(items(fresh), full[4:])


def test_resume_in_a_new_process(tmp_path, rng_volume):
    np.save(tmp_path / "vol.npy", rng_volume)
    full = full_epoch(rng_volume, batch_size=32)
    s = stream(rng_volume, batch_size=32)
    s.set_epoch(1)
    dl = loader(StatefulDataLoader, s, 2)
    it = iter(dl)
    for _ in range(6):
        next(it)
    torch.save(dl.state_dict(), tmp_path / "state.pt")
    del it
    code = f"""
import numpy as np, torch
from torchdata.stateful_dataloader import StatefulDataLoader
from vesuvius_dask import DaskVesuviusStream
vol = np.load({str(tmp_path / 'vol.npy')!r})
s = DaskVesuviusStream([vol], 4, 16, 16, samples_per_epoch=700, seed=11, return_coords=True, batch_size=32)
dl = StatefulDataLoader(s, batch_size=None, num_workers=2, multiprocessing_context="fork")
dl.load_state_dict(torch.load({str(tmp_path / 'state.pt')!r}, weights_only=False))
np.save({str(tmp_path / 'rest.npy')!r}, np.concatenate([c.numpy() for _, c in dl]))
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    np.testing.assert_array_equal(np.load(tmp_path / "rest.npy"), np.concatenate(full[6:]))


def test_other_configurations_are_refused_in_one_line(rng_volume):
    s = stream(rng_volume, batch_size=32)
    state = s.loader_state(3, epoch=0)
    cases = [
        (stream(rng_volume, batch_size=32, seed=12), r"^this state is from a stream with seed=11, this "
                                                     r"stream has seed=12"),
        (DaskVesuviusStream([rng_volume], 4, 32, 32, **KW, batch_size=32), r"^this state is from another "
                                                                           r"stream configuration"),
        (DaskVesuviusStream([rng_volume[:, :100]], 4, 16, 16, **KW, batch_size=32), r"another stream"),
        (stream(rng_volume, batch_size=16), r"another stream configuration"),
        (stream(rng_volume), r"^this state counts batches, this stream yields blocks"),
        (stream(rng_volume, batch_size=32, stride=2), r"^this state is from a stream whose sampler has "
                                                      r"stride=None; this one has stride=\[2, 2, 2\]"),
        (stream(rng_volume, batch_size=32, rank=1, world_size=2), r"^this state is from rank=0"),
    ]
    for other, message in cases:
        with pytest.raises(ResumeError, match=message) as err:
            other.load_state_dict(state)
        assert "\n" not in str(err.value)
    with pytest.raises(ResumeError, match="^not a DaskVesuviusStream state"):
        s.load_state_dict({"epoch": 3})


def test_samplers_state_dict():
    sampler = UniformSampler(100, seed=3, stride=(1, 2, 2))
    state = sampler.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert Sampler.from_state_dict(state) == sampler
    sampler.load_state_dict(state)
    with pytest.raises(ResumeError, match=r"^this state is of a sampler with seed=3; this sampler "
                                          r"has seed=4"):
        UniformSampler(100, seed=4, stride=(1, 2, 2)).load_state_dict(state)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 60), saved=st.integers(1, 5), resumed=st.integers(1, 5), data=st.data())
def test_the_split_is_exact_for_any_worker_counts(total, saved, resumed, data):
    """Proof by enumeration: round-robin consumers of ``saved`` workers, resumed by ``resumed`` ones.

    Worker ``w`` of ``k`` from ``split`` reads batches ``split + w + i·k`` (the plan's rule);
    the loader takes them round-robin. The resumed sequence must be the batches after ``n``.
    """
    base = data.draw(st.integers(0, 5))
    n = data.draw(st.integers(0, total))

    def consumed(start, k):  # the order a round-robin loader yields the batches from start
        per = [list(range(start + w, base + total, k)) for w in range(k)]
        order = []
        for i in range(max(len(p) for p in per)):
            order += [p[i] for p in per if i < len(p)]
        return order

    assert consumed(base, saved) == list(range(base, base + total))
    positions = {str(w): n // saved + (w < n % saved) for w in range(saved)}
    state = {"workers": saved, "base": base, "unit": "batches", "positions": positions}
    splits = {resume_point(state, w, resumed, 1)[1] for w in range(resumed)}
    assert len(splits) == 1 or saved == resumed
    if saved == resumed:  # each worker continues its own sequence
        rest = []
        for w in range(resumed):
            role, split, skip, _, _ = resume_point(state, w, resumed, 1)
            rest.append(list(range(split + role, base + total, resumed))[skip:])
        merged = []
        for i in range(max(map(len, rest))):
            merged += [r[i] for r in rest if i < len(r)]
        assert merged == list(range(base + n, base + total))
    else:
        assert consumed(splits.pop(), resumed) == list(range(base + n, base + total))


def _rank_worker(rank, world, port, volume, out, stop):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s = stream(volume, batch_size=16)  # rank and world size from the group
        s.set_epoch(3)
        full = items(DataLoader(s, batch_size=None))
        s2 = stream(volume, batch_size=16)
        s2.set_epoch(3)
        dl = StatefulDataLoader(s2, batch_size=None, num_workers=2, **FORK)
        it = iter(dl)
        for _ in range(stop):
            next(it)
        state = dl.state_dict()
        del it
        torch.save(state, f"{out}/state{rank}.pt")
        fresh = stream(volume, batch_size=16)
        dl3 = StatefulDataLoader(fresh, batch_size=None, num_workers=2, **FORK)
        dl3.load_state_dict(torch.load(f"{out}/state{rank}.pt", weights_only=False))
        rest = items(dl3)
        np.save(f"{out}/full{rank}.npy", np.concatenate(full))
        np.save(f"{out}/rest{rank}.npy", np.concatenate(rest))
        if rank == 1:  # the other rank's state is refused
            other = stream(volume, batch_size=16)
            other.load_state_dict(torch.load(f"{out}/state1.pt", weights_only=False))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_resume_per_rank_under_torch_distributed(tmp_path, rng_volume):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stop = 5
    tmp.start_processes(_rank_worker, args=(2, port, rng_volume, str(tmp_path), stop), nprocs=2,
                        start_method="fork")
    for rank in range(2):
        full, rest = np.load(tmp_path / f"full{rank}.npy"), np.load(tmp_path / f"rest{rank}.npy")
        np.testing.assert_array_equal(rest, full[stop * 16:])
    whole = {tuple(c) for r in range(2) for c in np.load(tmp_path / f"full{r}.npy").tolist()}
    assert whole == {tuple(c) for c in stream(rng_volume, batch_size=16).epoch_coords(3).tolist()}
    s = stream(rng_volume, batch_size=16, rank=0, world_size=2)
    with pytest.raises(ResumeError, match=r"^this state is from rank=1, this stream has rank=0"):
        s.load_state_dict(torch.load(tmp_path / "state1.pt", weights_only=False))
