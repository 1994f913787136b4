"""Inference benchmark: grid inference vs per-block Zarr slicing, and the writer's memory.

1. Blocks/s of `predict` with an identity model (every grid block, overlap, blended
   3-D output written to Zarr) against reading the same grid blocks by plain
   per-block Zarr slicing (no model, no output), in one run.
2. Peak RSS of a PredictionWriter filling a >= 2 GB float32 output (3-D, overlapping
   blocks, hann blending), in its own process, against the output size.

    python benchmarks/predict.py [--out-shape 32,4096,4096] [--memory-mb 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, make_zarr, peak_rss_mb  # noqa: E402


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


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--writer-child":
        writer_child(tuple(json.loads(sys.argv[2])), int(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-shape", default="32,4096,4096")
    p.add_argument("--memory-mb", type=int, default=256)
    args = p.parse_args()
    import zarr

    from vesuvius_dask import predict
    from vesuvius_dask.sampling.starts import Tiling

    path = make_zarr(DATA_DIR / "medium-64x1024x1024.zarr", (64, 1024, 1024))
    block, overlap = (16, 64, 64), (0, 16, 16)
    print(f"benchmarks/predict.py: grid inference over {path.name} (64x1024x1024 uint16), "
          f"block {block}, overlap {overlap}")
    out = DATA_DIR / "predict-identity.zarr"
    t0 = time.perf_counter()
    predict(lambda x: x, str(path), out, block=block, overlap=overlap, batch_size=32,
            overwrite=True)
    t_pred = time.perf_counter() - t0
    grid = Tiling((64, 1024, 1024), block, overlap)
    z = zarr.open(str(path), mode="r")
    starts = grid.unravel(np.arange(grid.n)).tolist()
    t0 = time.perf_counter()
    for a, b, c in starts:
        z[a:a + block[0], b:b + block[1], c:c + block[2]]
    t_slice = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    print(f"  predict (identity model, read + blend + write): {grid.n / t_pred:,.0f} blocks/s "
          f"({grid.n} blocks in {t_pred:.2f} s)")
    print(f"  per-block Zarr slicing (read only):            {grid.n / t_slice:,.0f} blocks/s")
    print(f"  ratio: {t_slice / t_pred:.2f}x")

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
