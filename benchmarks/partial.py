"""Partial reads (issue 30, read side): a block costs its own bytes, not its chunks'.

A generated uint8 volume (default 1024^3, 1 GiB; ``--size 512`` for 128 MiB) in 128^3
chunks, stored four ways (Zarr v3): blosc-lz4 chunks, uncompressed chunks, sharded
(256^3 shards) with 32^3 blosc-lz4 inner chunks, and sharded with uncompressed inner
chunks. For each, and for 256 random 64^3 blocks and 256 random 80x128x128 blocks:

* stream, cold: a fresh ``DaskVesuviusStream`` (cache 128 MB, single process), the
  read path the volume gets (``Volume.read_path``);
* uncompressed, as before: the same stream with the whole-chunk path forced (today's);
* decode-once limit: every chunk (inner chunk when sharded) the blocks touch read and
  decoded once with numcodecs, blocks cut with numpy, no scheduler (the issue's
  reference);
* bytes read per block: stored bytes read (counted: chunk files read whole, or the
  partial paths' ranges, shard indexes included) and bytes decoded per block.

Ratios come from the same run. Medians of ``--reps``. The page cache is warm (the
files were just written or read): this measures reading work, not the disk.

Over loopback HTTP (``SlowServer``, no added latency, no ``cache_dir``): 64^3 blocks read
by range (the partial paths) and, for uncompressed chunks, whole chunks as before;
MB fetched per block (bytes the server sent) and requests per block (``HEAD`` not counted).

    python benchmarks/partial.py [--size 1024] [--reps 3] [--blocks 256] [--http-blocks 128] [--only-http]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numcodecs
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, median  # noqa: E402

CHUNK = 128
BLOCKS = {"64^3": (64, 64, 64), "80x128x128": (80, 128, 128)}


def _slab(rng: np.random.Generator, z0: int, z1: int, n: int) -> np.ndarray:
    """CT-like uint8 voxels: noisy papyrus sheets (a sine of y and z) with air (zeros) between them.

    About half the voxels are papyrus; blosc-lz4 stores it in about 55% of its size.
    """
    yy = np.arange(n, dtype=np.float32)[:, None]
    xx = np.arange(n, dtype=np.float32)[None, :]
    out = np.empty((z1 - z0, n, n), np.uint8)
    for i, z in enumerate(range(z0, z1)):
        sheet = np.sin(yy / 9 + z / 23 + np.cos(xx / 31))
        value = 140 + 60 * sheet + rng.normal(0, 12, (n, n))
        out[i] = np.where(sheet > 0, np.clip(value, 1, 255), 0).astype(np.uint8)
    return out


def make(kind: str, n: int) -> Path:
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    path = DATA_DIR / f"partial-{n}-{kind}.zarr"
    if (path / ".complete").exists():
        return path
    blosc = BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)
    kw = {"blosc": dict(chunks=(CHUNK,) * 3, compressors=blosc),
          "raw": dict(chunks=(CHUNK,) * 3, compressors=None),
          "sharded": dict(chunks=(32,) * 3, shards=(256,) * 3, compressors=blosc),
          "sharded-raw": dict(chunks=(32,) * 3, shards=(256,) * 3, compressors=None)}[kind]
    arr = zarr.create_array(path, shape=(n,) * 3, dtype="uint8", overwrite=True, **kw)
    rng = np.random.default_rng(0)
    step = 256 if "sharded" in kind else CHUNK
    for z0 in range(0, n, step):
        arr[z0:z0 + step] = _slab(rng, z0, min(n, z0 + step), n)
    (path / ".complete").touch()
    return path


class Counted:
    """Counts stored bytes read: chunk files read whole, and the partial paths' ranges and maps."""

    def __init__(self) -> None:
        from vesuvius_dask.io import chunks, ranges

        self.n = 0
        orig_file, orig_ranges = chunks.read_file, ranges.LocalFiles.read_ranges

        def read_file(path, *args):
            data = orig_file(path, *args)
            self.n += len(data)
            return data

        def read_ranges(source, key, asked):
            got = orig_ranges(source, key, asked)
            self.n += sum(len(g) for g in got or ())
            return got

        chunks.read_file = read_file
        ranges.LocalFiles.read_ranges = read_ranges


def whole_chunk_reader(arr, mapped=None, remote=None):
    """Today's path for an uncompressed array: each touched chunk read whole."""
    from vesuvius_dask.io.chunks import ChunkCodec, fast_reader
    from vesuvius_dask.io.partial import ArrayReader

    return ArrayReader("whole-chunk", ChunkCodec.of(arr), fast_reader(arr))


def stream(path: Path, block, n_blocks: int, batch: int, forced=None) -> tuple[float, np.ndarray, dict]:
    from vesuvius_dask import DaskVesuviusStream
    from vesuvius_dask.io import partial

    original = partial.array_reader
    if forced is not None:
        partial.array_reader = forced
    try:
        s = DaskVesuviusStream([str(path)], block=block, samples_per_epoch=n_blocks, batch_size=batch,
                               seed=0, cache_bytes=128 << 20, prefetch=0)
        t0 = time.perf_counter()
        n = sum(b.shape[0] for b in s)
        dt = time.perf_counter() - t0
        st = s.engine.stats
        info = {"path": s.engine.volumes[0].read_path, "decoded": st.bytes_decoded / n,
                "read": st.bytes_read / n}
        return n / dt, s.epoch_coords(0)[:, 1:], info
    finally:
        partial.array_reader = original


def decode_once(path: Path, coords: np.ndarray, block) -> float:
    """Every touched (inner) chunk read and decoded once (numcodecs), blocks cut with numpy."""
    import zarr

    from vesuvius_dask.io.ranges import LocalFiles
    from vesuvius_dask.io.shards import ShardedChunks

    arr = zarr.open_array(path, mode="r")
    chunks = tuple(int(c) for c in arr.chunks)
    sharded = ShardedChunks.of(arr, LocalFiles(path, mapped=False)) if arr.shards else None
    compressed = bool(arr.compressors)
    blosc = numcodecs.Blosc()
    t0 = time.perf_counter()
    touched = []
    for start in coords.tolist():
        ranges = [range(s // c, (s + b - 1) // c + 1) for s, b, c in zip(start, block, chunks)]
        touched.append([(i, j, k) for i in ranges[0] for j in ranges[1] for k in ranges[2]])
    need = {cid for cids in touched for cid in cids}
    decoded = {}
    for cid in need:
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(cid, chunks))
        if sharded is not None:
            decoded[cid] = sharded.read_chunk(region)
            continue
        with open(path / arr.metadata.encode_chunk_key(cid), "rb") as f:
            data = f.read()
        decoded[cid] = np.frombuffer(blosc.decode(data) if compressed else data, np.uint8).reshape(chunks)
    out = np.empty((len(coords),) + tuple(block), np.uint8)
    for i, start in enumerate(coords.tolist()):
        for cid in touched[i]:
            lo = [max(s, c * k) for s, c, k in zip(start, cid, chunks)]
            hi = [min(s + b, (c + 1) * k) for s, b, c, k in zip(start, block, cid, chunks)]
            if all(a < b for a, b in zip(lo, hi)):
                out[(i,) + tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = decoded[cid][
                    tuple(slice(a - c * k, b - c * k) for a, b, c, k in zip(lo, hi, cid, chunks))]
    return len(coords) / (time.perf_counter() - t0)


def http_rows(paths: dict, blocks: int, reps: int) -> None:
    """The same streams over loopback HTTP (SlowServer, no added latency, no cache_dir)."""
    from vesuvius_dask.io import shards
    from vesuvius_dask.testing.server import SlowServer

    block = BLOCKS["64^3"]
    print(f"\nover loopback HTTP, 64^3 blocks, {blocks} blocks, batches of 32, no cache_dir")
    print(f"  {'':<34} {'read path':<21} {'blocks/s':>12} {'MB fetched/block':>17} {'requests/block':>15}")
    rows = [("uncompressed chunks", "uncompressed chunks", None),
            ("uncompressed, whole chunks (before)", "uncompressed chunks", whole_chunk_reader),
            ("sharded, 32^3 blosc-lz4 inner", "sharded, 32^3 blosc-lz4 inner", None),
            ("sharded, 32^3 uncompressed inner", "sharded, 32^3 uncompressed inner", None)]
    rates = {}
    for label, kind, forced in rows:
        path = paths[kind]
        with SlowServer(path.parent) as server:
            got, sent, asked = [], [], []
            for _ in range(reps):
                shards.SHARD_INDEXES.clear()
                b0, r0 = server.bytes_sent, sum(server.counts.values())
                rate, _, info = stream(server.url(path.name), block, blocks, 32, forced)
                got.append(rate)
                # whole chunks are answered without Range (not counted by the server): decoded bytes
                sent.append(server.bytes_sent - b0 if forced is None else info["decoded"] * blocks)
                asked.append(sum(server.counts.values()) - r0)
        rates[label] = median(got)
        print(f"  {label:<34} {info['path']:<21} {median(got):>12,.0f} {median(sent) / blocks / 1e6:>17.2f} "
              f"{median(asked) / blocks:>15.1f}")
    print(f"  uncompressed partial / whole chunks over HTTP: "
          f"{rates['uncompressed chunks'] / rates['uncompressed, whole chunks (before)']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--http-blocks", type=int, default=128, help="blocks over loopback HTTP (0: none)")
    parser.add_argument("--only-http", action="store_true")
    args = parser.parse_args()
    DATA_DIR.mkdir(exist_ok=True)
    kinds = {"blosc-lz4 chunks": "blosc", "uncompressed chunks": "raw",
             "sharded, 32^3 blosc-lz4 inner": "sharded", "sharded, 32^3 uncompressed inner": "sharded-raw"}
    paths = {label: make(kind, args.size) for label, kind in kinds.items()}
    counted = Counted()
    print(f"{args.size}^3 uint8 in {CHUNK}^3 chunks, {args.blocks} random blocks, cache 128 MB, "
          f"medians of {args.reps}")
    for bname, block in ({} if args.only_http else BLOCKS).items():
        batch = 32 if bname == "64^3" else 16
        block_bytes = int(np.prod(block))
        print(f"\n{bname} blocks ({block_bytes / 1e6:.2f} MB each), batches of {batch}")
        print(f"  {'':<34} {'read path':<21} {'stream cold':>12} {'decode-once':>12} {'ratio':>6} "
              f"{'MB read/block':>14} {'MB decoded/block':>17}")
        rates = {}
        rows = [(label, p, None) for label, p in paths.items()]
        today = ("uncompressed, whole chunks (today)", paths["uncompressed chunks"], whole_chunk_reader)
        rows.insert(2, today)
        for label, path, forced in rows:
            got, limit, nread = [], [], []
            for _ in range(args.reps):  # interleaved: a stream, then its reference
                counted.n = 0
                rate, coords, info = stream(path, block, args.blocks, batch, forced)
                nread.append(counted.n / args.blocks + info["read"])  # files read + partial reads
                got.append(rate)
                limit.append(decode_once(path, coords, block))
            rates[label] = median(got)
            print(f"  {label:<34} {info['path']:<21} {median(got):>12,.0f} {median(limit):>12,.0f} "
                  f"{median(got) / median(limit):>6.2f} {median(nread) / 1e6:>14.2f} "
                  f"{info['decoded'] / 1e6:>17.2f}")
        today = rates["uncompressed, whole chunks (today)"]
        print(f"  uncompressed partial / today: {rates['uncompressed chunks'] / today:.1f}x; "
              "uncompressed partial / blosc-lz4: "
              f"{rates['uncompressed chunks'] / rates['blosc-lz4 chunks']:.1f}x; "
              f"sharded / blosc-lz4 chunks: "
              f"{rates['sharded, 32^3 blosc-lz4 inner'] / rates['blosc-lz4 chunks']:.1f}x")
    if args.http_blocks:
        http_rows(paths, args.http_blocks, args.reps)


if __name__ == "__main__":
    main()
