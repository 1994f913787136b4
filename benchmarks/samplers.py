"""Quota, weight-map and coverage-filter samplers against uniform sampling: blocks/s, same run.

Four in-RAM uint16 volumes of different sizes (two "scrolls" of two segments each),
2-D labels (blobs covering about a third of each volume) and a smooth weight volume
per volume (lazy dask, chunks 8x128x128). Each sampler streams the same number of
4x64x64 blocks in batches of 64 (``prefetch=0``, one process); construction is timed
apart. Reps are interleaved after a warm-up pass; the ratio to uniform is taken from the
medians of the same run (target >= 0.8).

Usage: python benchmarks/samplers.py [--reps 5] [--samples 8192]
"""

from __future__ import annotations

import argparse
import time
import warnings
from statistics import median

import dask.array as da
import numpy as np

from vesuvius_dask import DaskVesuviusStream, QuotaSampler, UniformSampler, WeightMapSampler

SHAPES = [(16, 512, 512), (16, 256, 384), (16, 768, 768), (16, 320, 320)]


def data(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[da.Array]]:
    rng = np.random.default_rng(seed)
    volumes = [rng.integers(0, 65535, size=s, dtype=np.uint16) for s in SHAPES]
    labels, weights = [], []
    for s in SHAPES:
        yy, xx = np.ogrid[: s[1], : s[2]]
        labels.append((np.sin(yy / 37.0) * np.cos(xx / 53.0) > 0.3).astype(np.uint8))
        z = np.arange(s[0])[:, None, None]
        w = 1.0 + np.sin(z / 5.0) ** 2 + np.cos(yy / 41.0)[None] ** 2 + np.sin(xx / 29.0)[None] ** 2
        weights.append(da.from_array(w, chunks=(8, 128, 128)))
    return volumes, labels, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8192)
    args = parser.parse_args()
    volumes, labels, weights = data()
    n = args.samples
    samplers = {
        "uniform (baseline)": UniformSampler(n, seed=0),
        "quotas 40/24, equal": QuotaSampler(n, quotas={"s1": 40, "s2": 24},
                                            groups={"s1": [0, 1], "s2": [2, 3]}, seed=0),
        "weights (centre, stride 2x8x8)": WeightMapSampler(n, weights=weights, stride=(2, 8, 8), seed=0),
        "coverage >= 0.5 (2-D labels)": WeightMapSampler(n, min_label_coverage=0.5, stride=(2, 8, 8), seed=0),
    }
    builds: dict[str, list[float]] = {name: [] for name in samplers}
    speeds: dict[str, list[float]] = {name: [] for name in samplers}
    warnings.simplefilter("ignore", RuntimeWarning)  # the coverage filter's "no background" (expected)
    # reps interleaved (uniform, quotas, ... then again), after one warm-up pass, so that the
    # load of a shared machine and warm caches affect every sampler alike
    for rep in range(-1, args.reps):
        for name, sampler in samplers.items():
            t0 = time.perf_counter()
            stream = DaskVesuviusStream(volumes, 4, 64, 64, sampler=sampler, batch_size=64, prefetch=0,
                                        labels=labels)
            built = time.perf_counter() - t0
            stream.set_epoch(max(rep, 0))
            t0 = time.perf_counter()
            count = sum(b.shape[0] for b, _ in stream)
            if rep >= 0:
                builds[name].append(built)
                speeds[name].append(count / (time.perf_counter() - t0))
    base = median(speeds["uniform (baseline)"])
    for name in samplers:
        rate = median(speeds[name])
        print(f"{name:<32} construction {median(builds[name]):6.2f} s  {rate:>9,.0f} blocks/s  "
              f"ratio {rate / base:.2f}", flush=True)


if __name__ == "__main__":
    main()
