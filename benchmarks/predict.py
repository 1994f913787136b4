"""Inference benchmark: the grid read alone vs ``predict`` (3-D and 2-D output), and the writer's memory.

1. In one run, per volume, interleaved (one repetition of each per round, medians):
   blocks/s of (a) the grid read alone (the stream ``predict`` uses, fresh each time,
   no model, no output), (b) ``predict`` with an identity model (3-D output: read +
   blend + write Zarr; (b') with ``exact=False``: a full grid weighted up front),
   (c) ``predict`` with a max-projection over z (2-D output) and (d) the 3-D writer
   alone (``PredictionWriter`` fed the same plan's blocks from
   memory: its pace where the read has cores of its own), and the ratios to (a).
   Each run writes a new output (the previous one is removed before the clock starts:
   replacing a 1 GB output with ``overwrite=True`` costs ~0.2 s more).
   Volumes: ``../shared/data/example.zarr`` (the real crop, 441 blocks of 11x64x64,
   overlap 0,16,16) when present, else a generated
   64x1024x1024 volume; then a generated uint16 volume of ``--shape`` (default
   64x2048x2048, blocks of 16x64x64: the per-run costs amortised; ``--shape ''``
   skips it).
2. Peak RSS of a PredictionWriter filling a >= 2 GB float32 output (3-D, overlapping
   blocks, hann blending), in its own process, against the output size
   (``--memory``).

    python benchmarks/predict.py [--reps 5] [--shape 64,2048,2048]
                                 [--memory [--out-shape 32,4096,4096] [--memory-mb 256]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, REAL_CROP, make_zarr, peak_rss_mb  # noqa: E402


def writer_child(shape: tuple[int, int, int], memory_mb: int) -> None:
    from vesuvius_dask import PredictionWriter
    from vesuvius_dask.sampling.starts import Tiling

    out = DATA_DIR / "predict-out.zarr"
    shutil.rmtree(out, ignore_errors=True)
    block, overlap = (16, 256, 256), (0, 32, 32)
    grid = Tiling(shape, block, overlap)
    writer = PredictionWriter(out, shape, block, chunks=(16, 512, 512),
                              memory_bytes=memory_mb * 2**20, overwrite=True)
    t0 = time.perf_counter()
    batch = 16
    for first in range(0, grid.n, batch):
        starts = grid.unravel(np.arange(first, min(grid.n, first + batch)))
        # a prediction whose value is known everywhere: z + y/1000 at the block's voxels
        preds = np.stack([np.broadcast_to(
            (np.arange(z, z + block[0])[:, None, None] + np.arange(y, y + block[1])[None, :, None] / 1000),
            block).astype(np.float32) for z, y, _ in starts.tolist()])
        writer.add(preds, starts)
    result = writer.finalize()
    dt = time.perf_counter() - t0
    check = np.asarray(result[shape[0] // 2, 1000:1010, 2000])
    expected = (shape[0] // 2 + np.arange(1000, 1010) / 1000).astype(np.float32)
    ok = bool(np.allclose(check, expected, rtol=1e-5))
    print(json.dumps({"seconds": dt, "rss_mb": peak_rss_mb(), "gb": result.nbytes / 1e9,
                      "flushes": writer.flushes, "blocks": grid.n, "correct": ok}))
    shutil.rmtree(out, ignore_errors=True)


def identity(x):
    return x


def max_projection(x):
    return x.amax(dim=2)  # (B, 1, z, y, x) -> (B, 1, y, x): a 2-D map


def grid_read(path: str, block: tuple, overlap: tuple, batch_size: int) -> int:
    """Every grid block through the stream predict uses (fresh, so cold as predict's), no model."""
    import torch
    from torch.utils.data import DataLoader

    from vesuvius_dask import DaskVesuviusStream
    from vesuvius_dask.sampling.samplers import GridSampler

    stream = DaskVesuviusStream([path], *block, sampler=GridSampler(overlap=overlap),
                                batch_size=batch_size, return_coords=True, dtype=torch.float32,
                                normalization="none")
    stream.set_epoch(0)
    n = 0
    for blocks, _ in DataLoader(stream, batch_size=None, num_workers=0):
        n += len(blocks)
    return n


def writer_alone(path: str, block: tuple, overlap: tuple, batch_size: int, out: Path) -> int:
    """The grid's blocks fed to a PredictionWriter from memory (no read, no model): its pace alone."""
    import torch

    from vesuvius_dask import DaskVesuviusStream, PredictionWriter
    from vesuvius_dask.sampling.samplers import GridSampler

    stream = DaskVesuviusStream([path], *block, sampler=GridSampler(overlap=overlap),
                                batch_size=batch_size, return_coords=True)
    coords = stream.epoch_coords(0)
    preds = np.random.default_rng(0).random((batch_size, *block), dtype=np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as predict leaves it on a 2-core machine
    try:
        writer = PredictionWriter(out, stream.volumes[0].shape, block)
        writer.expect(coords)
        for first in range(0, len(coords), batch_size):
            batch = coords[first:first + batch_size]
            writer.add(preds[:len(batch)], batch)
        writer.finalize()
    finally:
        torch.set_num_threads(before)
    return len(coords)


def cpu_seconds() -> float:
    """CPU time of this process so far (all threads, user + system)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def stolen_share() -> tuple[int, int]:
    """``(steal, total)`` jiffies of the machine so far (``/proc/stat``; (0, 0) elsewhere).

    On a virtual machine the hypervisor's steal is CPU time this run could not have.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def _cases(shape: str) -> list[tuple[str, Path, tuple]]:
    """The volumes measured: the real crop (else a generated 64x1024x1024), and ``--shape`` if given."""
    cases = []
    if REAL_CROP.exists():
        cases.append(("real crop", REAL_CROP, (11, 64, 64)))
    else:
        cases.append(("generated", make_zarr(DATA_DIR / "medium-64x1024x1024.zarr", (64, 1024, 1024)),
                      (16, 64, 64)))
    if shape:
        dims = tuple(int(v) for v in shape.split(","))
        path = make_zarr(DATA_DIR / f"synthetic-{'x'.join(map(str, dims))}.zarr", dims)
        cases.append(("synthetic", path, tuple(min(b, n) for b, n in zip((16, 64, 64), dims))))
    return cases


def headline(reps: int, shape: str = "") -> None:
    """Each volume: grid read, predict 3-D, predict 2-D, interleaved; ratios from the same run."""
    import zarr

    from vesuvius_dask import predict

    overlap, batch = (0, 16, 16), 32
    out = DATA_DIR / "predict-identity.zarr"
    print(f"benchmarks/predict.py: grid read vs predict, overlap {overlap}, batch {batch}, "
          f"{reps} interleaved reps per volume (medians)")
    for label, path, block in _cases(shape):
        vshape = zarr.open_array(str(path), mode="r").shape
        runs: dict[str, list[float]] = {"read": [], "3d": [], "3d-up-front": [], "2d": [], "writer": []}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        n = 0
        steal0 = stolen_share()
        for _ in range(reps):
            c0, t0 = cpu_seconds(), time.perf_counter()
            n = grid_read(str(path), block, overlap, batch)
            runs["read"].append(time.perf_counter() - t0)
            cpu["read"].append(cpu_seconds() - c0)
            for key, model, exact in (("3d", identity, True), ("3d-up-front", identity, False),
                                      ("2d", max_projection, True)):
                shutil.rmtree(out, ignore_errors=True)  # a new output, as a run makes (not timed)
                c0, t0 = cpu_seconds(), time.perf_counter()
                predict(model, str(path), out, block=block, overlap=overlap, batch_size=batch, exact=exact)
                runs[key].append(time.perf_counter() - t0)
                cpu[key].append(cpu_seconds() - c0)
            shutil.rmtree(out, ignore_errors=True)
            c0, t0 = cpu_seconds(), time.perf_counter()
            writer_alone(str(path), block, overlap, batch, out)
            runs["writer"].append(time.perf_counter() - t0)
            cpu["writer"].append(cpu_seconds() - c0)
        shutil.rmtree(out, ignore_errors=True)
        steal1 = stolen_share()
        rate = {k: n / statistics.median(v) for k, v in runs.items()}
        work = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"  {label} {path.name} {tuple(vshape)}, block {block}, {n} blocks:")
        print(f"    (a) grid read alone (stream, fresh):          {rate['read']:9,.0f} blocks/s")
        print(f"    (b) predict, identity model, 3-D output:      {rate['3d']:9,.0f} blocks/s  "
              f"(b)/(a) = {rate['3d'] / rate['read']:.2f}")
        print(f"    (b') the same with exact=False:               {rate['3d-up-front']:9,.0f} blocks/s  "
              f"(b')/(a) = {rate['3d-up-front'] / rate['read']:.2f}")
        print(f"    (c) predict, max over z, 2-D output:          {rate['2d']:9,.0f} blocks/s  "
              f"(c)/(a) = {rate['2d'] / rate['read']:.2f}")
        print(f"    (d) the 3-D writer alone (blocks from memory): {rate['writer']:9,.0f} blocks/s  "
              f"(d)/(a) = {rate['writer'] / rate['read']:.2f}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        stolen = (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1])
        print(f"    CPU seconds per run (all threads, medians): (a) {work['read']:.2f}, (b) {work['3d']:.2f} "
              f"({work['3d'] / work['read']:.1f}x the read's), (b') {work['3d-up-front']:.2f} "
              f"({work['3d-up-front'] / work['read']:.1f}x), (c) {work['2d']:.2f} "
              f"({work['2d'] / work['read']:.1f}x), (d) {work['writer']:.2f}; "
              f"{cores} cores, {stolen:.0%} of the machine's CPU time stolen by the hypervisor")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--writer-child":
        writer_child(tuple(json.loads(sys.argv[2])), int(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shape", default="64,2048,2048",
                   help="also a generated uint16 volume of this shape (Z,Y,X; '' for none): "
                        "per-run costs amortised over more blocks")
    p.add_argument("--memory", action="store_true", help="also the writer's peak RSS on a big output")
    p.add_argument("--out-shape", default="32,4096,4096")
    p.add_argument("--memory-mb", type=int, default=256)
    args = p.parse_args()
    headline(args.reps, args.shape)
    if not args.memory:
        return
    shape = [int(v) for v in args.out_shape.split(",")]
    res = subprocess.run([sys.executable, __file__, "--writer-child", json.dumps(shape),
                          str(args.memory_mb)], capture_output=True, text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  PredictionWriter, {shape} float32 output ({r['gb']:.2f} GB), {r['blocks']} blocks "
          f"of 16x256x256 with overlap 32: {r['seconds']:.1f} s, peak RSS {r['rss_mb']:,.0f} MB "
          f"with memory_bytes {args.memory_mb} MB ({r['flushes']} chunk flushes), "
          f"values correct: {r['correct']}")


if __name__ == "__main__":
    main()
