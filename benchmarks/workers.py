"""DataLoader workers with and without the machine-wide decoded-chunk cache, decode-bound.

A 16x1024x1024 uint16 Zarr (chunks 4x256x256, blosc-lz4), 2048 random 4x64x64
blocks per epoch in batches of 64, ``cache_bytes`` 16 MB (a quarter of the volume:
decode-bound). For 1 (in process), 2 and 4 workers: blocks/s, stored-chunk reads
(counted at the store, all processes), and the peak bytes of the shared cache folder
in /dev/shm (the machine's cache footprint) against ``cache_bytes``.

Usage: python benchmarks/workers.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import warnings
from pathlib import Path
from statistics import median

import numpy as np
import zarr
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VESUVIUS_DASK_BENCH_DATA", ROOT / "bench-data"))
LOG = DATA / "workers-reads.log"


def _count_reads() -> None:
    original = zarr.storage.LocalStore.get

    async def get(self, key, *args, **kwargs):  # inherited by forked workers
        if key.startswith("c/"):
            fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, b"x\n")
            os.close(fd)
        return await original(self, key, *args, **kwargs)

    zarr.storage.LocalStore.get = get
    from vesuvius_dask import chunkio

    original_file = chunkio.read_file

    def read_file(path, *args):  # the fast chunk path reads files itself
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"x\n")
        os.close(fd)
        return original_file(path, *args)

    chunkio.read_file = read_file


def _peak(path_of: callable, stop: threading.Event, out: list) -> None:
    peak = 0
    while not stop.is_set():
        p = path_of()
        total = 0
        try:
            for e in os.scandir(p) if p is not None else ():
                if e.name.endswith(".chunk"):
                    total += e.stat().st_size
        except FileNotFoundError:  # a file evicted (or the folder removed) while counting
            pass
        peak = max(peak, total)
        time.sleep(0.02)
    out.append(peak)


def run(path: Path, workers: int, shared: bool, cache: int) -> tuple[float, int, int]:
    LOG.unlink(missing_ok=True)
    stream = DaskVesuviusStream([str(path)], 4, 64, 64, samples_per_epoch=2048, batch_size=64, seed=0,
                                cache_bytes=cache, machine_cache=shared)
    stream.set_epoch(0)
    kw = {"multiprocessing_context": "fork"} if workers else {}
    stop, peak = threading.Event(), []
    folder = stream.engine.shared.path if stream.engine.shared is not None else None
    watcher = threading.Thread(target=_peak, args=(lambda: folder, stop, peak))
    watcher.start()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = sum(b.shape[0] for b in DataLoader(stream, batch_size=None, num_workers=workers, **kw))
    dt = time.perf_counter() - t0
    stop.set()
    watcher.join()
    reads = len(LOG.read_text().split()) if LOG.exists() else 0
    return n / dt, reads, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    DATA.mkdir(exist_ok=True)
    path = DATA / "workers16x1024.zarr"
    if not path.exists():
        arr = zarr.create_array(path, shape=(16, 1024, 1024), chunks=(4, 256, 256), dtype="u2")
        arr[:] = np.random.default_rng(0).integers(0, 60000, arr.shape, dtype=np.uint16)
    _count_reads()
    cache = 16 * 2**20
    print(f"{path.name}: 2048 blocks of 4x64x64 per epoch, cache_bytes {cache / 2**20:.0f} MB, "
          f"medians of {args.reps}")
    base = None
    for workers in (0, 2, 4):
        for shared in ((True,) if workers == 0 else (False, True)):
            rows = [run(path, workers, shared, cache) for _ in range(args.reps)]
            rate, reads, peak = (median(r[i] for r in rows) for i in range(3))
            base = base or rate
            how = "shared" if shared else "per worker"
            name = "in process" if workers == 0 else f"{workers} workers, {how}"
            print(f"  {name:<26} {rate:>9,.0f} blocks/s ({rate / base:4.2f}x)  chunk reads {reads:>5.0f}  "
                  f"shared cache peak {peak / 2**20:5.1f} MB of {cache / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
