"""Stream benchmark: DaskVesuviusStream against the baselines, in one run.

Methods, same machine, same data, same block starts:
  (a) DaskVesuviusStream from Zarr on disk       (b) DaskVesuviusStream from numpy in RAM
  (c) per-block Zarr slicing (the inspiration)    (d) naive dask: one getitem per block,
  (e) the limit: numpy slicing of the volume        dask.compute per batch
      in RAM in a Python loop (warm; first call reported too)

Workloads: the headline (1024 blocks of 4x64x64, batch 128; single process and
DataLoader(num_workers=2)), larger blocks (16x64x64, 32x128x128), and a generated
volume larger than the chunk cache (>= 4 GB on disk) with locality off and on.
Prints blocks/s, MB/s, ratios, read amplification (bytes decoded per byte delivered)
and peak RSS. Medians of --reps repetitions.

    python benchmarks/stream.py [--reps 7] [--skip-big] [--big-shape 128,4096,4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import DATA_DIR, headline_volume, make_zarr, median, peak_rss_mb, timed  # noqa: E402


def _row(name: str, seconds: float, n: int, nbytes: int, extra: str = "") -> dict:
    r = {"name": name, "s": seconds, "blocks_s": n / seconds, "mb_s": nbytes / seconds / 1e6}
    print(f"  {name:<44} {r['blocks_s']:>12,.0f} blocks/s {r['mb_s']:>9,.1f} MB/s  {extra}")
    return r


def _ready_batches(batch, n):
    """A do-nothing IterableDataset: one prepared shared-memory batch, ``n`` times per epoch."""
    from torch.utils.data import IterableDataset, get_worker_info

    class ReadyBatches(IterableDataset):
        def __iter__(self):
            import torch.multiprocessing

            torch.multiprocessing.set_sharing_strategy("file_system")  # as the stream's workers
            info = get_worker_info()
            share = n if info is None else n // info.num_workers
            return (batch.view(batch.shape) for _ in range(share))

    batch.share_memory_()
    return ReadyBatches()


def compare(path, block, n_blocks, batch, reps, label, loader_workers=True):
    import dask
    import torch
    import zarr
    from torch.utils.data import DataLoader

    from vesuvius_dask import DaskVesuviusStream, open_volume

    print(f"\n== {label}: {n_blocks} blocks of {block}, batch {batch}, volume {path}")
    z = zarr.open(str(path), mode="r")
    ram = z[:]
    print(f"   volume {ram.shape} {ram.dtype}, chunks {z.chunks}")
    kw = dict(samples_per_epoch=n_blocks, batch_size=batch, seed=0)
    bz, by, bx = block
    nbytes = n_blocks * bz * by * bx * ram.dtype.itemsize
    probe = DaskVesuviusStream([str(path)], *block, **kw)
    coords = probe.epoch_coords(0)[:, 1:].tolist()
    res = {}

    # (a) from disk: a fresh stream each repetition (cold cache) ...
    def a_cold():
        for _ in DaskVesuviusStream([str(path)], *block, **kw):
            pass
    res["a_cold"] = _row("(a) stream, Zarr on disk, cold cache", median(timed(a_cold, reps)),
                         n_blocks, nbytes)
    # ... and one stream over successive epochs (decoded chunks stay cached). The warm
    # measurements and the numpy limit (e) run interleaved, one repetition of each per
    # round, so drift on a noisy machine hits all of them alike.
    warm = DaskVesuviusStream([str(path)], *block, **kw)
    ramstream = DaskVesuviusStream([ram], *block, **kw)
    # prefetch=0: no producer thread. Faster when the consumer does nothing (no GIL
    # hand-off); prefetch pays off when a training step runs (see the wait test below).
    warm0 = DaskVesuviusStream([str(path)], *block, prefetch=0, **kw)
    ram0 = DaskVesuviusStream([ram], *block, prefetch=0, **kw)
    out = np.empty((n_blocks,) + tuple(block), ram.dtype)

    def numpy_loop():
        for i, (zz, yy, xx) in enumerate(coords):
            out[i] = ram[zz:zz + bz, yy:yy + by, xx:xx + bx]

    runs = {"a": lambda: [None for _ in warm], "b": lambda: [None for _ in ramstream],
            "a0": lambda: [None for _ in warm0], "b0": lambda: [None for _ in ram0],
            "e": numpy_loop}
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm caches, recycled outputs and (e)'s output pages
    for _ in range(reps):
        for k, fn in runs.items():
            times[k].extend(timed(fn, 1))
    res["a"] = _row("(a) stream, Zarr on disk, warm cache", median(times["a"]), n_blocks, nbytes,
                    f"amplification {warm.engine.stats.amplification:.2f}")
    res["b"] = _row("(b) stream, numpy in RAM", median(times["b"]), n_blocks, nbytes)
    res["a0"] = _row("(a) same, warm cache, prefetch=0", median(times["a0"]), n_blocks, nbytes)
    res["b0"] = _row("(b) same, numpy in RAM, prefetch=0", median(times["b0"]), n_blocks, nbytes)

    def per_block_zarr():
        for zz, yy, xx in coords:
            torch.from_numpy(z[zz:zz + bz, yy:yy + by, xx:xx + bx])
    res["c"] = _row("(c) per-block Zarr slicing", median(timed(per_block_zarr, max(1, reps // 3))),
                    n_blocks, nbytes)

    vol = open_volume(str(path))

    def naive_dask():
        for i in range(0, n_blocks, batch):
            parts = [vol[zz:zz + bz, yy:yy + by, xx:xx + bx] for zz, yy, xx in coords[i:i + batch]]
            np.stack(dask.compute(*parts, scheduler="threads"))
    res["d"] = _row("(d) naive dask getitem per block", median(timed(naive_dask, max(1, reps // 3))),
                    n_blocks, nbytes)

    def numpy_first():
        fresh = np.empty((n_blocks,) + tuple(block), ram.dtype)
        for i, (zz, yy, xx) in enumerate(coords):
            fresh[i] = ram[zz:zz + bz, yy:yy + by, xx:xx + bx]
    res["e_first"] = _row("(e) numpy slicing in RAM, fresh output", median(timed(numpy_first, reps)),
                          n_blocks, nbytes)
    res["e"] = _row("(e) numpy slicing in RAM, warm", median(times["e"]), n_blocks, nbytes)
    a, b, c, e = (res[k]["blocks_s"] for k in ("a", "b", "c", "e"))
    ac = res["a_cold"]["blocks_s"]
    a0, b0 = res["a0"]["blocks_s"], res["b0"]["blocks_s"]
    print(f"   ratios: a/c = {a / c:.1f}x (cold: {ac / c:.1f}x)   a/e = {a / e:.2f} "
          f"(cold: {ac / e:.2f}, prefetch=0: {a0 / e:.2f})   b/e = {b / e:.2f} "
          f"(prefetch=0: {b0 / e:.2f})   a/d = {a / res['d']['blocks_s']:.1f}x")

    if loader_workers:
        # warm: every chunk is in each process's cache (memory-bound); cache_bytes=0:
        # every batch decodes its chunks (decode-bound, like volumes far larger than
        # the cache), which is where worker processes pay off
        # (the two loaders run interleaved, a repetition each per round).
        def loader_pair(n, extra):
            loaders = {}
            for workers in (0, 2):
                s = DaskVesuviusStream([str(path)], *block, **{**kw, "samples_per_epoch": n},
                                       **extra)
                s.set_epoch(0)
                loaders[workers] = DataLoader(s, batch_size=None, num_workers=workers,
                                              persistent_workers=bool(workers))
                for _ in loaders[workers]:  # start workers, warm caches
                    pass
            t = {0: [], 2: []}
            for _ in range(reps):
                for workers, loader in loaders.items():
                    t[workers].extend(timed(lambda loader=loader: [None for _ in loader], 1))
            return {w: median(v) for w, v in t.items()}

        for label, n, extra in (("warm cache", n_blocks, {}),
                                ("cache_bytes=0", n_blocks, {"cache_bytes": 0}),
                                (f"warm, {8 * n_blocks} blocks/epoch", 8 * n_blocks, {})):
            t = loader_pair(n, extra)
            for workers in (0, 2):
                res[f"dl{workers}-{label}"] = _row(
                    f"(a) DataLoader(num_workers={workers}), {label}", t[workers], n,
                    nbytes * n // n_blocks)
            print(f"   DataLoader(num_workers=2) / single process, {label} = "
                  f"{res[f'dl2-{label}']['blocks_s'] / res[f'dl0-{label}']['blocks_s']:.2f}")
        # The DataLoader's own cost per epoch with workers (resume handshake, first and
        # last batch hand-offs), measured with a dataset that yields one ready batch:
        # it weighs on short epochs like the 8 batches above.
        zeros = torch.zeros((batch,) + tuple(block), dtype=torch.uint16)
        t_epoch = {}
        for n in (8, 64):
            loader = DataLoader(_ready_batches(zeros, n), batch_size=None, num_workers=2,
                                persistent_workers=True)
            for _ in loader:
                pass
            t_epoch[n] = median(timed(lambda loader=loader: [None for _ in loader], reps))
        per_batch = (t_epoch[64] - t_epoch[8]) / 56
        print(f"   DataLoader(num_workers=2) itself, batches ready in the workers: "
              f"{1e3 * (t_epoch[8] - 8 * per_batch):.1f} ms per epoch + "
              f"{1e3 * per_batch:.2f} ms per batch")
        # A training loop: 20 ms "step" per batch (sleep releases the GIL like torch ops).
        for pf in (0, 2):
            s = DaskVesuviusStream([str(path)], *block, prefetch=pf,
                                   **{**kw, "seed": 99, "samples_per_epoch": 32 * batch})
            wait = total = 0.0
            t_end = time.perf_counter()
            t_start = t_end
            for _ in s:
                wait += time.perf_counter() - t_end
                time.sleep(0.02)
                t_end = time.perf_counter()
            total = t_end - t_start
            print(f"  training loop, 32 batches, 20 ms step, fresh stream, prefetch={pf}: waits for data "
                  f"{100 * wait / total:.1f}% of the time")
    return res


def masked(path, reps):
    """Masked vs unmasked sampling, same volume, mask covering half of the (y, x) area."""
    import zarr

    from vesuvius_dask import DaskVesuviusStream

    z = zarr.open(str(path), mode="r")
    _, ny, nx = z.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    mask = (np.hypot(yy - ny / 2, xx - nx / 2) < np.sqrt(0.5 * ny * nx / np.pi)).astype(np.uint8)
    print(f"\n== masked sampling: 1024 blocks of (4, 64, 64), batch 128, mask covers "
          f"{mask.mean():.0%} of (y, x), mask_coverage=1.0, volume {path}")
    kw = dict(samples_per_epoch=1024, batch_size=128, seed=0, prefetch=0)
    rates = {}
    for name, extra in (("unmasked", {}), ("masked", {"masks": [mask]})):
        s = DaskVesuviusStream([str(path)], 4, 64, 64, **kw, **extra)
        for _ in s:
            pass
        t = median(timed(lambda s=s: [None for _ in s], reps))
        rates[name] = 1024 / t
        print(f"  {name:<10} {rates[name]:>10,.0f} blocks/s  ({s.starts_per_volume[0]:,} starts)")
    t0 = time.perf_counter()
    DaskVesuviusStream([str(path)], 4, 64, 64, masks=[mask], **kw)
    print(f"  unmasked/masked = {rates['unmasked'] / rates['masked']:.2f} (target <= 1.5); "
          f"building the masked start grid took {time.perf_counter() - t0:.3f} s")


def _half_mask(shape):
    """A mask covering about half of the (y, x) area: an ellipse, as a segment's would be."""
    _, h, w = shape
    yy, xx = np.ogrid[:h, :w]
    return (((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.35 * w)) ** 2 < 1).astype(np.uint8)


def big_child(path: str, block, n_blocks: int, batch: int, locality: int | None, mix: int,
              cache_bytes: int, masked: bool = False) -> None:
    """Runs in a subprocess so that its peak RSS is its own."""
    import zarr

    from vesuvius_dask import DaskVesuviusStream

    masks = [_half_mask(zarr.open(path, mode="r").shape)] if masked else None
    s = DaskVesuviusStream([path], *block, samples_per_epoch=n_blocks, batch_size=batch, seed=1,
                           cache_bytes=cache_bytes, locality=locality, locality_mix=mix,
                           masks=masks)
    t0 = time.perf_counter()
    n = 0
    for b in s:
        n += b.shape[0]
    dt = time.perf_counter() - t0
    st = s.engine.stats
    print(json.dumps({"blocks_s": n / dt, "mb_s": st.bytes_delivered / dt / 1e6,
                      "amplification": st.amplification, "rss_mb": peak_rss_mb(),
                      "chunks_read": st.chunks_read, "seconds": dt}))


def big(shape, reps, cache_mb):
    path = make_zarr(DATA_DIR / ("big-" + "x".join(map(str, shape)) + ".zarr"), shape)
    gb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
    print(f"\n== volume larger than the cache: {shape} uint16, {gb:.2f} GB on disk, "
          f"cache_bytes {cache_mb} MB, 8192 blocks of (4, 64, 64), batch 128")
    results = {}
    for name, loc, mix, masked in (("locality off", None, 8, False),
                                   ("locality=256, mix=8", 256, 8, False),
                                   ("locality=512, mix=4", 512, 4, False),
                                   ("50% mask, locality off", None, 8, True),
                                   ("50% mask, locality=256", 256, 8, True)):
        runs = []
        for _ in range(max(1, reps // 3)):
            out = subprocess.run(
                [sys.executable, __file__, "--big-child", str(path),
                 json.dumps([loc, mix, cache_mb, masked])],
                capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        r = {k: median([x[k] for x in runs]) for k in runs[0]}
        results[name] = r
        print(f"  {name:<24} {r['blocks_s']:>9,.0f} blocks/s {r['mb_s']:>8,.1f} MB/s  "
              f"amplification {r['amplification']:6.2f}  peak RSS {r['rss_mb']:,.0f} MB "
              f"(cache {cache_mb} MB + {r['rss_mb'] - cache_mb:,.0f} MB)")
    # the inspiration's method on the same volume, for scale
    import zarr
    z = zarr.open(str(path), mode="r")
    rng = np.random.default_rng(0)
    starts = [(rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 64),
               rng.integers(0, shape[2] - 64)) for _ in range(256)]
    t = median(timed(lambda: [z[a:a + 4, b:b + 64, c:c + 64] for a, b, c in starts], 1))
    print(f"  (c) per-block Zarr slicing: {256 / t:,.0f} blocks/s")
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--big-child":
        loc, mix, cache_mb, masked = json.loads(sys.argv[3])
        big_child(sys.argv[2], (4, 64, 64), 8192, 128, loc, mix, cache_mb * 2**20, masked)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--skip-big", action="store_true", help="skip the >= 4 GB volume")
    p.add_argument("--only-big", action="store_true", help="only the >= 4 GB volume")
    p.add_argument("--only-headline", action="store_true", help="only the headline workload")
    p.add_argument("--big-shape", default="128,4096,4096")
    p.add_argument("--cache-mb", type=int, default=512)
    p.add_argument("--only-workers", action="store_true",
                   help="only the decode-bound DataLoader rows (1, 2, 4 workers, shared chunk cache)")
    args = p.parse_args()
    print(f"benchmarks/stream.py  (reps={args.reps}, medians)")
    if args.only_workers:
        _worker_rows(args.reps)
        return
    if not args.only_big:
        compare(headline_volume(), (4, 64, 64), 1024, 128, args.reps, "headline")
        if args.only_headline:
            return
        larger = make_zarr(DATA_DIR / "medium-64x1024x1024.zarr", (64, 1024, 1024))
        compare(larger, (16, 64, 64), 1024, 128, args.reps, "larger blocks", loader_workers=False)
        compare(larger, (32, 128, 128), 256, 32, args.reps, "larger blocks", loader_workers=False)
        masked(headline_volume(), args.reps)
    if not args.skip_big:
        big(tuple(int(v) for v in args.big_shape.split(",")), args.reps, args.cache_mb)
    if not (args.only_big or args.only_headline):
        _worker_rows(args.reps)  # last: it counts chunk reads by patching the store


def _worker_rows(reps: int) -> None:
    """Decode-bound DataLoader rows for 1, 2 and 4 workers (benchmarks/workers.py)."""
    import workers

    sys.argv = [sys.argv[0], "--reps", str(min(reps, 3))]
    workers.main()


if __name__ == "__main__":
    main()
