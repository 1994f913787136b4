"""Distributed benchmark: the stream through a LocalCluster vs the local threaded scheduler.

Measures, in one run on the same data and plan:
  * blocks/s through a LocalCluster (2 worker processes, 127.0.0.1) and locally;
  * with a simulated 50 ms training step per batch, the fraction of the loop's time
    spent waiting for data (target: under 5% once the pipeline is full, i.e. after
    the first batch).

    python benchmarks/distributed.py [--batches 40] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# This file's name shadows the `distributed` package when run as a script: drop its
# folder from sys.path and load the shared helpers by path instead.
_HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = __import__("importlib.util").util.spec_from_file_location("_common", _HERE / "_common.py")
_common = __import__("importlib.util").util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
headline_volume, median, timed = _common.headline_volume, _common.median, _common.timed


def wait_fraction(stream, step: float) -> tuple[float, float]:
    """(wait share of the whole loop, wait share after the first batch)."""
    waits = []
    t_start = t_end = time.perf_counter()
    for _ in stream:
        waits.append(time.perf_counter() - t_end)
        time.sleep(step)  # releases the GIL, like a torch training step
        t_end = time.perf_counter()
    total = t_end - t_start
    return sum(waits) / total, sum(waits[1:]) / (total - waits[0])


def main() -> None:
    from distributed import Client, LocalCluster

    from vesuvius_dask import DaskVesuviusStream

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    path = str(headline_volume())
    n = args.batches * 128
    kw = dict(samples_per_epoch=n, batch_size=128, seed=0)
    print(f"benchmarks/distributed.py: {n} blocks of (4, 64, 64) in batches of 128 from {path}")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        rates = {}
        for name, extra in (("local threads", {}), ("LocalCluster (2 processes)", {"client": client})):
            s = DaskVesuviusStream([path], 4, 64, 64, **kw, **extra)
            for _ in s:  # warm: caches on both sides
                pass
            t = median(timed(lambda s=s: [None for _ in s], args.reps))
            rates[name] = n / t
            print(f"  {name:<28} {rates[name]:>10,.0f} blocks/s")
        print(f"  cluster / local = {rates['LocalCluster (2 processes)'] / rates['local threads']:.2f}")
        for name, extra in (("local threads", {}), ("LocalCluster (2 processes)", {"client": client})):
            for prefetch in (0, 2, 4):
                if prefetch == 0 and extra:
                    continue
                s = DaskVesuviusStream([path], 4, 64, 64, prefetch=prefetch,
                                       **{**kw, "seed": 1}, **extra)
                whole, steady = wait_fraction(s, 0.05)
                print(f"  50 ms step, {name}, prefetch={prefetch}: waits {100 * whole:.1f}% of "
                      f"the loop ({100 * steady:.1f}% after the first batch)")


if __name__ == "__main__":
    main()
