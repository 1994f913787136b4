"""Where an interrupted epoch resumes: the stream's state as a few integers (torch-free).

The plan of an epoch is a pure function of ``(seed, epoch)``, so a stream's state is
small: the epoch, the batch the iteration started from (``base``), how it was split
(``workers``: 1 for one process) and how many items each worker had yielded
(``positions``), plus the seed and a fingerprint of the configuration, so that a
state is never applied to another stream. :func:`resume_point` turns a state into
where a worker of a new iteration starts.

Why another worker count works (batches, ``unit="batches"``): worker ``w`` of ``k``
reads the batches ``base + w + i·k``, and a DataLoader (plain or stateful) consumes
them round-robin, so after ``n`` batches worker ``w`` has yielded ``n // k + (w <
n % k)`` of them and those are exactly batches ``base … base + n - 1``. A state whose
positions have that form is *global position* ``n``; any split of the batches from
``base + n`` on continues the same sequence. Single blocks (``unit="blocks"``) are
interleaved by the DataLoader per worker, so their order depends on ``k``: they
resume only with the same worker count (0 and 1 worker are the same order).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ..errors import ResumeError

__all__ = ["STATE_FORMAT", "fingerprint", "resume_point", "global_position", "merge_states",
           "check_state"]

#: The ``format`` key of every stream state.
STATE_FORMAT = "vesuvius_dask stream state/1"


def fingerprint(description: Mapping[str, Any]) -> str:
    """16 hex digits naming a JSON-serialisable description of a configuration."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _positions(state: Mapping[str, Any]) -> dict[int, int]:
    return {int(w): int(c) for w, c in state.get("positions", {}).items()}


def global_position(state: Mapping[str, Any]) -> int | None:
    """Items of the epoch consumed in plan order, or None when the positions are not round-robin.

    With ``k`` workers the positions of a round-robin consumer are ``n // k + (w < n % k)``.
    """
    k, positions = int(state["workers"]), _positions(state)
    if sorted(positions) != list(range(k)):
        return None
    n = sum(positions.values())
    if any(positions[w] != n // k + (w < n % k) for w in range(k)):
        return None
    return n


def _order_free(state: Mapping[str, Any], workers: int) -> bool:
    """Whether the item order of the saved run and of a run with ``workers`` are the same."""
    return state["unit"] == "batches" or (int(state["workers"]) <= 1 and workers <= 1)


def resume_point(state: Mapping[str, Any], worker: int, workers: int,
                 read_batch: int) -> tuple[int, int, int, int, int]:
    """Where ``worker`` of ``workers`` resumes: ``(part, split, skip, base, done)``.

    The worker takes share ``part`` of the batches from ``split`` on (as it would
    from a fresh start there), drops the first ``skip`` items, and counts its
    position as ``done`` plus what it yields, relative to ``base`` (for its own next
    state). Batches resume from the global position whenever the positions are
    round-robin. Otherwise (single blocks, or one worker's own state inside a
    ``StatefulDataLoader`` worker) each worker continues one saved worker's
    sequence; when all positions are known the roles are rotated, so that a plain
    DataLoader, which starts its round-robin at worker 0, asks first the worker
    whose turn it was.

    Parameters
    ----------
    state : dict
        A stream state (checked with :func:`check_state`).
    worker, workers : int
        This consumer and the number of consumers (``workers`` ≥ 1).
    read_batch : int
        Blocks per batch of the plan.

    Raises
    ------
    ResumeError
        The state cannot continue the same sequence with this worker count.
    """
    saved, base, unit = int(state["workers"]), int(state["base"]), state["unit"]
    per_item = 1 if unit == "batches" else int(read_batch)
    positions = _positions(state)
    n = global_position(state)
    if saved == workers and worker in positions and (n is None or not _order_free(state, workers)):
        complete = sorted(positions) == list(range(saved))
        rotate = sum(c > min(positions.values()) for c in positions.values()) if complete else 0
        role = (worker + rotate) % workers
        done = positions[role]
        return role, base + (done // per_item) * workers, done % per_item, base, done
    if n is None or not _order_free(state, workers):
        raise ResumeError(
            f"this state was saved with {saved} DataLoader worker(s) yielding single blocks, whose "
            f"order depends on the worker count; resume with num_workers={saved if saved > 1 else 0} "
            "(or give the stream batch_size= to resume with any count)"
            if sorted(positions) == list(range(saved)) else
            f"this state holds the positions of {len(positions)} of its {saved} workers; resume with "
            f"num_workers={saved}, or load the whole loader's state")
    split = base + n // per_item
    return worker, split, n % per_item, split, n % per_item


def merge_states(states: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One state from the per-worker states of one iteration (a stateful loader's snapshot)."""
    first = dict(states[0])
    positions: dict[str, int] = {}
    for s in states:
        for key in ("fingerprint", "seed", "epoch", "base", "workers", "unit", "rank", "world_size"):
            if s.get(key) != first.get(key):
                raise ResumeError(f"the workers' states disagree on {key} ({first.get(key)!r} and "
                                  f"{s.get(key)!r}): they are not from one iteration")
        positions.update({str(w): int(c) for w, c in s.get("positions", {}).items()})
    first["positions"] = positions
    return first


def check_state(state: Any, expected: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` if it belongs to the stream described by ``expected``; else one line saying why not.

    ``expected`` holds the stream's ``seed``, ``fingerprint``, ``rank``, ``world_size``,
    ``unit`` and ``sampler`` (a sampler state, whose differing field is named).
    """
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ResumeError(f"not a DaskVesuviusStream state (expected a dict with format="
                          f"{STATE_FORMAT!r}, got {type(state).__name__})")
    if state.get("seed") != expected["seed"]:
        raise ResumeError(f"this state is from a stream with seed={state.get('seed')}, this stream has "
                          f"seed={expected['seed']}; pass the same seed (or sampler) to resume")
    old, new = state.get("sampler", {}), expected["sampler"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise ResumeError(f"this state is from a stream whose sampler has {key}={old.get(key)!r}; "
                              f"this one has {key}={new.get(key)!r}")
    for key in ("rank", "world_size"):
        if state.get(key) != expected[key]:
            raise ResumeError(f"this state is from {key}={state.get(key)!r}, this stream has "
                              f"{key}={expected[key]!r}; load each rank's own state")
    if state.get("unit") != expected["unit"]:
        raise ResumeError(f"this state counts {state.get('unit')}, this stream yields {expected['unit']}: "
                          "give the stream the same batch_size")
    if state.get("fingerprint") != expected["fingerprint"]:
        raise ResumeError(
            f"this state is from another stream configuration (fingerprint {state.get('fingerprint')}, "
            f"this stream {expected['fingerprint']}): the volumes, block, masks, labels or batch "
            "size differ")
    for key in ("epoch", "base", "workers"):
        if not isinstance(state.get(key), int) or state[key] < (1 if key == "workers" else 0):
            raise ResumeError(f"a damaged stream state: {key}={state.get(key)!r}")
    return dict(state)
