"""Batches ready on the GPU: the next batch's copy overlaps the current step (a no-op on CPU).

:class:`DevicePrefetcher` wraps any iterable of batches (a DataLoader over the stream).
It asks for batch ``i + 1`` and starts its copy to the device *before* handing out
batch ``i``, so the host-to-device transfer runs while the model trains on batch
``i``. On CUDA the copy is made from pinned host memory (tensors already pinned,
e.g. by ``DataLoader(pin_memory=True)``, are not copied again) with
``non_blocking=True`` on a side CUDA stream; the compute stream waits for it before
the batch is used, and the batch's memory is recorded on the compute stream so it is
not reused early. On a CPU device the batches are handed out as they are (the same
tensors), still one ahead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["DevicePrefetcher"]


def _map(batch: Any, fn: Any) -> Any:
    """``fn`` applied to every tensor of a (nested) batch: tensors, tuples, lists, dicts."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_map(b, fn) for b in batch)
    if isinstance(batch, tuple):  # a named tuple
        return type(batch)(*(_map(b, fn) for b in batch))
    if isinstance(batch, dict):
        return {k: _map(v, fn) for k, v in batch.items()}
    return batch


class DevicePrefetcher:
    """Iterate ``batches`` moved to ``device``, one batch ahead.

    Parameters
    ----------
    batches : iterable
        Batches of tensors (or tuples, lists, dicts of them), e.g. a DataLoader.
    device : str or torch.device, optional
        Default: ``"cuda"`` when available, else ``"cpu"`` (where nothing is copied).
    pin_memory : bool
        On CUDA, pin host tensors that are not pinned yet before the copy (one
        host copy; give the DataLoader ``pin_memory=True`` to have it done in its
        thread instead).

    Examples
    --------
    >>> for blocks, coords in DevicePrefetcher(loader, "cuda"):   # doctest: +SKIP
    ...     loss = model(blocks).mean()
    """

    def __init__(self, batches: Iterable[Any], device: Any = None, *, pin_memory: bool = True) -> None:
        self.batches = batches
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pin_memory = bool(pin_memory)
        self._side = None

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu" and self.pin_memory and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _start(self, batch: Any) -> Any:
        """Start moving ``batch`` to the device (on the side stream); returns it."""
        if self.device.type != "cuda":
            return batch
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._side):
            return _map(batch, self._to_device)

    def _ready(self, batch: Any) -> Any:
        """Make the compute stream wait for ``batch``'s copy, and own its memory."""
        if self.device.type != "cuda":
            return batch
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._side)

        def own(t: torch.Tensor) -> torch.Tensor:
            if t.is_cuda:
                t.record_stream(current)
            return t

        return _map(batch, own)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.batches)
        try:
            pending = self._start(next(it))
        except StopIteration:
            return
        for batch in it:  # the next one is asked for, and its copy started, first
            ahead = self._start(batch)
            yield self._ready(pending)
            pending = ahead
        yield self._ready(pending)
