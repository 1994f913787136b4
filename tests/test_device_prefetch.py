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
