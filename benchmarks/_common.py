"""Helpers shared by the benchmark scripts: timing, data, RSS."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL_CROP = ROOT.parent / "shared" / "data" / "example.zarr"
EXAMPLE = ROOT / "example_zarr" / "example.zarr"
DATA_DIR = Path(os.environ.get("VESUVIUS_DASK_BENCH_DATA", ROOT / "bench-data"))


def timed(fn: Callable[[], object], reps: int) -> list[float]:
    """Run ``fn`` ``reps`` times; return the wall times (seconds)."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB).

    Reads VmHWM (per address space) where available: ``ru_maxrss`` survives
    ``exec`` on Linux, so a child started by a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def headline_volume() -> Path:
    return REAL_CROP if REAL_CROP.exists() else EXAMPLE


def make_zarr(path: Path, shape: tuple[int, int, int], chunks=(4, 512, 512), seed: int = 0,
              slab: int = 4) -> Path:
    """Write (once) a generated CT-like uint16 volume, slab by slab (bounded memory)."""
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    done = path / ".complete"
    if done.exists():
        return path
    arr = zarr.create_array(path, shape=shape, chunks=chunks, dtype="uint16", overwrite=True,
                            compressors=BloscCodec(cname="lz4", clevel=5,
                                                   shuffle=BloscShuffle.shuffle))
    rng = np.random.default_rng(seed)
    _, ny, nx = shape
    yy = np.linspace(0, 6 * np.pi, ny, dtype=np.float32)[:, None]
    xx = np.linspace(0, 6 * np.pi, nx, dtype=np.float32)[None, :]
    for z0 in range(0, shape[0], slab):
        z1 = min(shape[0], z0 + slab)
        base = 30000 + 12000 * np.sin(yy + z0 / 7) * np.cos(xx)
        noise = rng.normal(0, 6000, size=(z1 - z0, ny, nx)).astype(np.float32)
        arr[z0:z1] = np.clip(base[None] + noise, 0, 65535).astype(np.uint16)
    done.touch()
    return path
