"""Label-balanced sampling on a whole-segment-sized volume: construction time and blocks/s.

A lazily defined 65x8000x8000 uint16 segment (dask zeros: reading costs only the
cut), a blob mask over about half of it and thin ink strokes (3 px wide, about 1% of
the papyrus). Baseline: the same stream with uniform sampling, in the same run.

Usage: python benchmarks/balanced.py [--reps 3]
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import dask.array as da
import numpy as np

from vesuvius_dask import DaskVesuviusStream


def strokes(shape: tuple[int, int], n: int = 400, width: int = 3, seed: int = 0) -> np.ndarray:
    """Thin straight pen strokes: ``n`` segments of random direction and length."""
    rng = np.random.default_rng(seed)
    ink = np.zeros(shape, np.uint8)
    for _ in range(n):
        y0, x0 = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        angle, length = rng.uniform(0, np.pi), rng.integers(50, 400)
        t = np.arange(length)
        ys = np.clip((y0 + t * np.sin(angle)).astype(int), 0, shape[0] - width)
        xs = np.clip((x0 + t * np.cos(angle)).astype(int), 0, shape[1] - width)
        for d in range(width):
            ink[ys + d, xs] = 1
            ink[ys, xs + d] = 1
    return ink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    shape = (65, 8000, 8000)
    vol = da.zeros(shape, dtype=np.uint16, chunks=(4, 512, 512))
    yy, xx = np.ogrid[:shape[1], :shape[2]]
    mask = (((yy - 4000) / 3500.0) ** 2 + ((xx - 4000) / 2800.0) ** 2 < 1).astype(np.uint8)
    ink = strokes(shape[1:]) * mask
    print(f"segment {shape} lazy; mask {mask.mean():.1%} of the area; ink {ink[mask > 0].mean():.2%} "
          f"of the papyrus")
    kw = dict(samples_per_epoch=4096, batch_size=128, seed=0, labels=[ink], masks=[mask], prefetch=0)
    for name, extra in (("uniform (baseline)", {}), ("positive_fraction=0.5", {"positive_fraction": 0.5})):
        builds, rates = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            stream = DaskVesuviusStream([vol], 4, 64, 64, **kw, **extra)
            builds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n = sum(b.shape[0] for b, _ in stream)
            rates.append(n / (time.perf_counter() - t0))
        share = np.mean([ink[y:y + 64, x:x + 64].any() for _, _, y, x in stream.epoch_coords(0).tolist()])
        print(f"  {name:<24} construction {median(builds):.2f} s   {median(rates):>9,.0f} blocks/s   "
              f"blocks with ink {share:.1%}")


if __name__ == "__main__":
    main()
