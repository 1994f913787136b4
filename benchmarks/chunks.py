"""Cold reads (cache_bytes=0): the stream against the raw limit, Zarr v2 blosc-lz4 and v3 zstd.

The raw limit reads each batch's touched chunk files, decodes each once with
numcodecs and cuts the blocks with numpy: no scheduler, no zarr. Also shown: the
stream reading through zarr-python (the fast chunk path switched off), as before.
16x1024x1024 uint16 (random, 4x128x128 chunks), 2048 random 4x64x64 blocks in
batches of 128, single process, one run.

Usage: python benchmarks/chunks.py [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from statistics import median

import numcodecs
import numpy as np
import zarr

from vesuvius_dask import DaskVesuviusStream
from vesuvius_dask import volume as volume_mod

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VESUVIUS_DASK_BENCH_DATA", ROOT / "bench-data"))


def make(path: Path, fmt: int) -> Path:
    if not path.exists():
        codec = (numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE) if fmt == 2
                 else zarr.codecs.ZstdCodec(level=3))
        arr = zarr.create_array(path, shape=(16, 1024, 1024), chunks=(4, 128, 128), dtype="u2",
                                zarr_format=fmt, compressors=codec)
        arr[:] = np.random.default_rng(0).normal(30000, 3000, arr.shape).astype(np.uint16)
    return path


def raw_limit(path: Path, coords: np.ndarray, batch: int) -> float:
    arr = zarr.open_array(path, mode="r")
    meta = arr.metadata
    if meta.zarr_format == 2:
        decode = meta.compressor.decode
    else:
        decode = numcodecs.Zstd().decode
    t0 = time.perf_counter()
    for b in range(0, len(coords), batch):
        starts = coords[b:b + batch, 1:]
        need = {(z // 4 + dz, y // 128 + dy, x // 128 + dx) for z, y, x in starts.tolist()
                for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)
                if z // 4 + dz <= (z + 3) // 4 and y // 128 + dy <= (y + 63) // 128
                and x // 128 + dx <= (x + 63) // 128}
        decoded = {}
        for c in need:
            with open(path / meta.encode_chunk_key(c), "rb") as f:
                decoded[c] = np.frombuffer(decode(f.read()), "<u2").reshape(4, 128, 128)
        out = np.empty((len(starts), 4, 64, 64), np.uint16)
        for i, (z, y, x) in enumerate(starts.tolist()):
            for (cz, cy, cx), chunk in decoded.items():
                z0, y0, x0 = max(z, cz * 4), max(y, cy * 128), max(x, cx * 128)
                z1, y1, x1 = min(z + 4, cz * 4 + 4), min(y + 64, cy * 128 + 128), min(x + 64, cx * 128 + 128)
                if z0 < z1 and y0 < y1 and x0 < x1:
                    src = chunk[z0 - cz * 4:z1 - cz * 4, y0 - cy * 128:y1 - cy * 128,
                                x0 - cx * 128:x1 - cx * 128]
                    out[i, z0 - z:z1 - z, y0 - y:y1 - y, x0 - x:x1 - x] = src
    return len(coords) / (time.perf_counter() - t0)


def stream_rate(path: Path, fast: bool) -> tuple[float, np.ndarray]:
    volume_mod._FAST.clear()
    if not fast:
        for_array = volume_mod._readers
        volume_mod._readers = lambda arr: (None, None)
    try:
        s = DaskVesuviusStream([str(path)], 4, 64, 64, samples_per_epoch=2048, batch_size=128, seed=0,
                               cache_bytes=0, prefetch=0)
        t0 = time.perf_counter()
        n = sum(b.shape[0] for b in s)
        return n / (time.perf_counter() - t0), s.epoch_coords(0)
    finally:
        if not fast:
            volume_mod._readers = for_array


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    DATA.mkdir(exist_ok=True)
    for fmt, name in ((2, "Zarr v2 blosc-lz4"), (3, "Zarr v3 zstd")):
        path = make(DATA / f"chunks-v{fmt}.zarr", fmt)
        rows = {"fast": [], "zarr": [], "raw": []}
        for _ in range(args.reps):  # interleaved, one of each per round
            rate, coords = stream_rate(path, True)
            rows["fast"].append(rate)
            rows["zarr"].append(stream_rate(path, False)[0])
            rows["raw"].append(raw_limit(path, coords, 128))
        fast, slow, raw = (median(rows[k]) for k in ("fast", "zarr", "raw"))
        print(f"{name}: stream {fast:,.0f} blocks/s, through zarr-python {slow:,.0f}, raw limit {raw:,.0f}; "
              f"stream/raw = {fast / raw:.2f} (before: {slow / raw:.2f})")


if __name__ == "__main__":
    main()
