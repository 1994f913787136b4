"""Conversion benchmark: `convert_tiffs` against loading the stack into RAM, in one run.

Generates (once) a stack of uncompressed uint16 TIFF layers of at least 2 GB, then
runs, each in its own process so that peak RSS (VmHWM) is its own:

  baseline  tifffile.imread of every layer into one numpy array, then zarr write
  convert   vesuvius_dask.convert_tiffs (lazy dask graph, bounded memory)

Both write the same chunks (4, 512, 512) and codec. Prints wall time, MB/s, peak RSS
and the ratios.

    python benchmarks/convert.py [--layers 64 --height 4096 --width 4096] [--reps 3]
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
from _common import DATA_DIR, median, peak_rss_mb  # noqa: E402


def make_stack(folder: Path, layers: int, height: int, width: int) -> Path:
    import tifffile

    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy = np.linspace(0, 8 * np.pi, height, dtype=np.float32)[:, None]
    xx = np.linspace(0, 8 * np.pi, width, dtype=np.float32)[None, :]
    for z in range(layers):
        layer = 30000 + 12000 * np.sin(yy + z / 5) * np.cos(xx)
        layer += rng.normal(0, 5000, size=(height, width)).astype(np.float32)
        tifffile.imwrite(folder / f"{z:02d}.tif", np.clip(layer, 0, 65535).astype(np.uint16))
    done.touch()
    return folder


def child(mode: str, src: str, dst: str) -> None:
    import zarr

    from vesuvius_dask.writers.convert import _codec, convert_tiffs, find_layers

    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    if mode == "baseline":
        import tifffile

        files = [layer.path for layer in find_layers(src)]
        data = np.stack([tifffile.imread(f) for f in files])
        arr = zarr.create_array(dst, shape=data.shape, chunks=(4, 512, 512), dtype=data.dtype,
                                compressors=_codec("blosc-lz4", 3))
        arr[:] = data
        nbytes = data.nbytes
    else:
        out = convert_tiffs(src, dst, chunks=(4, 512, 512), quiet=True)
        nbytes = out.nbytes
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "mb_s": nbytes / dt / 1e6, "rss_mb": peak_rss_mb(),
                      "gb": nbytes / 1e9}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--height", type=int, default=4096)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    src = make_stack(DATA_DIR / f"tiffs-{args.layers}x{args.height}x{args.width}",
                     args.layers, args.height, args.width)
    dst = DATA_DIR / "convert-out.zarr"
    print(f"benchmarks/convert.py: {args.layers} layers of {args.height}x{args.width} uint16 "
          f"({args.layers * args.height * args.width * 2 / 1e9:.2f} GB), chunks 4x512x512, "
          f"blosc-lz4, medians of {args.reps}")
    res = {}
    for mode in ("baseline", "convert"):
        runs = []
        for _ in range(args.reps):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(src), str(dst)],
                                 capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        res[mode] = {k: median([r[k] for r in runs]) for k in runs[0]}
        r = res[mode]
        print(f"  {mode:<9} {r['seconds']:7.2f} s  {r['mb_s']:7.0f} MB/s  peak RSS {r['rss_mb']:7.0f} MB")
    shutil.rmtree(dst, ignore_errors=True)
    b, c = res["baseline"], res["convert"]
    print(f"  convert/baseline: time {c['seconds'] / b['seconds']:.2f}x, "
          f"peak RSS {c['rss_mb'] / b['rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
