"""DevicePrefetcher on CPU: order, identity, and the next batch asked for before the current is handed out."""

from __future__ import annotations

import torch

from vesuvius_dask.loaders.device import DevicePrefetcher


class Counting:
    """An iterable of batches that records every request."""

    def __init__(self, n: int) -> None:
        self.items = [(torch.full((2, 3), i), {"i": torch.tensor(i)}) for i in range(n)]
        self.requests = 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        for item in self.items:
            self.requests += 1
            yield item


def test_order_identity_and_one_ahead_on_cpu():
    source = Counting(5)
    pre = DevicePrefetcher(source, "cpu")
    assert len(pre) == 5
    seen = []
    for i, batch in enumerate(pre):
        # when batch i is handed out, batch i + 1 has been asked for already (except at the end)
        assert source.requests == min(i + 2, 5)
        assert batch is source.items[i]  # the same tensors: nothing copied on CPU
        seen.append(int(batch[1]["i"]))
    assert seen == list(range(5))
    assert list(DevicePrefetcher(Counting(0), "cpu")) == []
    one = Counting(1)
    assert [b is one.items[0] for b in DevicePrefetcher(one, "cpu")] == [True]


def test_on_cuda_copies_go_on_a_side_stream_and_compute_waits_for_each(monkeypatch):
    # No GPU here: torch.cuda's stream calls are replaced by recorders, so the order of
    # events is what is checked (copy i+1 started on the side stream before batch i is
    # handed out; the compute stream waits for the side stream before each hand-out).
    import contextlib

    import vesuvius_dask.loaders.device as device_mod

    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(("wait", self.name, other.name))

    side, compute = Stream("side"), Stream("compute")
    active = []

    @contextlib.contextmanager
    def on(stream):
        active.append(stream.name)
        yield
        active.pop()

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: side)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)

    def to_device(self, tensor):
        events.append(("copy", int(tensor.flatten()[0]), active[-1] if active else None))
        return tensor

    monkeypatch.setattr(device_mod.DevicePrefetcher, "_to_device", to_device)
    source = Counting(3)
    pre = DevicePrefetcher(source, "cuda")
    for i, batch in enumerate(pre):
        events.append(("out", i))
        assert batch[0] is source.items[i][0]
    copies = [e for e in events if e[0] == "copy"]
    assert all(c[2] == "side" for c in copies)  # every copy on the side stream
    out_at = {e[1]: k for k, e in enumerate(events) if e[0] == "out"}
    copy_at = {}
    for k, e in enumerate(events):
        if e[0] == "copy":
            copy_at.setdefault(e[1], k)
    for i in range(2):
        assert copy_at[i + 1] < out_at[i]  # the next copy starts before this batch is used
    for i in range(3):  # the compute stream waits for the side stream right before each hand-out
        assert events[out_at[i] - 1] == ("wait", "compute", "side")
