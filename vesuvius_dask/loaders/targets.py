"""The stream's ``targets=`` and ``context=``: what to read with each batch, and the item dict.

:func:`stream_bundle` opens the named targets (:mod:`vesuvius_dask.io.targets`) and
the coarse context level (:mod:`vesuvius_dask.io.context`) and makes one
:class:`~vesuvius_dask.engine.bundle.EngineBundle` of them, which the reader reads in
the same graph as the blocks. :func:`item_dict` turns its buffer into the item's dict
of tensors (views, no copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..engine.batches import BatchEngine
from ..engine.bundle import BundlePart, EngineBundle, StartMap
from ..errors import InvalidTypeError, SamplingError
from ..io.context import context_spec, context_volumes
from ..io.targets import target_volumes
from ..io.volume import Volume

__all__ = ["stream_bundle", "item_dict"]


def _context_part(context: Any, files: Sequence[Any], volumes: list[Volume], block: Sequence[int],
                  dtype: np.dtype, options: dict[str, Any]) -> BundlePart:
    spec = context_spec(context)
    ctx = context_volumes(spec, files, volumes, block, level=options["level"],
                          storage_options=options["storage_options"], cache_dir=options["cache_dir"])
    for i, v in enumerate(ctx.volumes):
        if not np.can_cast(v.dtype, dtype, casting="safe"):
            raise SamplingError(f"context of files[{i}] has dtype {v.dtype}, which the stream's dtype "
                                f"{dtype} cannot hold; use a wider dtype (e.g. torch.float32)")
    engine = BatchEngine(ctx.volumes, ctx.size, dtype=dtype, cache_bytes=options["cache_bytes"],
                         num_threads=options["num_threads"])
    return BundlePart("context", engine, StartMap("context", ctx))


def stream_bundle(targets: Any, context: Any, files: Sequence[Any], volumes: list[Volume],
                  block: Sequence[int], dtype: np.dtype, **options: Any) -> EngineBundle | None:
    """The bundle of a stream's targets and context (None when it has neither).

    ``options``: ``labels``, ``surface`` (refused together with targets or context),
    ``level``, ``storage_options``, ``cache_dir``, ``cache_bytes``, ``num_threads``.
    """
    if targets is None and context is None:
        return None
    if options["surface"] is not None:
        raise InvalidTypeError("targets= and context= are not available with a SurfaceSampler (its items "
                               "carry their own targets)")
    if options["labels"] is not None and targets is not None:
        raise InvalidTypeError("give labels= or targets=, not both (labels=x is targets={'labels': x} "
                               "yielded bare)")
    if options["labels"] is not None:
        raise InvalidTypeError("context= yields (block, {'context': ...}) items: give the labels as "
                               "targets={'labels': ...} instead of labels=")
    block = tuple(int(b) for b in block)
    parts = []
    for t in target_volumes(targets, files, volumes) or []:
        engine = BatchEngine(t.volumes, (1,) + block[1:] if t.flat else block,
                             cache_bytes=options["cache_bytes"] // 4, num_threads=options["num_threads"])
        parts.append(BundlePart(t.name, engine, StartMap("plane" if t.flat else "same"), t.flat))
    if context is not None:
        parts.append(_context_part(context, files, volumes, block, dtype,
                                   dict(options, cache_bytes=options["cache_bytes"] // 4)))
    return EngineBundle(parts)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def item_dict(bundle: EngineBundle, buffer: Any, vols: np.ndarray, normalizer: Any) -> dict[str, Any]:
    """The item dict ``{name: (B, ...)}`` of a bundle's buffer (numpy or a shared tensor), as views.

    The context is normalised like the blocks (in place).
    """
    if isinstance(buffer, np.ndarray):
        out: dict[str, Any] = bundle.split(buffer)
        if normalizer is not None and "context" in out:
            out["context"] = normalizer(out["context"], vols)
        return out
    b = buffer.shape[0]
    flat = buffer.reshape(-1)
    out = {p.name: flat[lo:hi].view(_torch_dtype(p.engine.dtype)).view((b,) + p.item_shape)
           for p, lo, hi in bundle.layout(b)}
    if normalizer is not None and "context" in out:
        normalizer(out["context"].numpy(), vols)  # in place: the tensor shares its memory
    return out
