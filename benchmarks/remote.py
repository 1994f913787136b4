"""Remote volumes: blocks/s with 0, 20, 50 and 100 ms added per request, against the same volume on disk.

The issue's workload: 2048 random 4x64x64 blocks in batches of 32 from a
32x1024x1024 uint16 Zarr v3 (blosc-lz4, 4x128x128 chunks: 512 chunks, CT-like
data), single process. The volume is served by a loopback HTTP server that
sleeps ``delay`` per request (:class:`vesuvius_dask.testing.server.SlowServer`).
Two servers: a keep-alive HTTP/1.1 one with a long listen queue (as production
servers), and ``--plain``'s Python ``http.server`` defaults (HTTP/1.0, a new
connection per request, listen queue 5). For each server and delay, in one run:

* ``local``: the same Zarr read from disk (the ceiling);
* ``before``: the read path of the previous main — every chunk read through
  zarr-python on a thread pool the size of the CPU count, no read-ahead of
  chunks (the baseline; ``--no-baseline`` skips it, it is slow);
* ``cold``: this version, nothing cached;
* ``warm cache_dir``: this version in a new stream with the ``cache_dir`` the cold
  run filled (no chunk requested from the server).

Also printed: chunk requests, the most requests in flight, and the issue's bound
for the cold epoch, ``requests x delay / 16 + 3 s``. Medians of ``--reps`` runs.

``--rate-limited`` adds the rate-limited rows (issue 25): the server (20 ms per
request) refuses with 429 beyond a token bucket of ``--allow`` requests/s (burst
10), with and without ``Retry-After``, or beyond 8 requests in flight; cold epochs,
no cache_dir. Printed: blocks/s, chunk requests answered per second (from the first
answer to the last: the epoch's tail reads chunks already in memory) against the
server's allowance and against what is reachable (the allowance, or the client's own
pace with no limit — the first row — if that is lower), and the share refused.

Usage: python benchmarks/remote.py [--reps 3] [--no-baseline] [--delays 0,20,50,100]
       [--servers keep-alive,plain] [--rate-limited [--only-rate-limited]] [--allow 200]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DATA_DIR, make_zarr  # noqa: E402

from vesuvius_dask import DaskVesuviusStream  # noqa: E402
from vesuvius_dask.io import volume as volume_mod  # noqa: E402
from vesuvius_dask.testing.server import SlowServer  # noqa: E402

SHAPE, CHUNKS, BLOCK, N, BATCH = (32, 1024, 1024), (4, 128, 128), (4, 64, 64), 2048, 32


@contextlib.contextmanager
def previous_read_path():
    """The previous main's remote path: zarr-python per chunk, CPU-count threads, no read-ahead."""
    original = volume_mod.remote_chunks
    volume_mod.remote_chunks = lambda *a, **k: None
    try:
        yield
    finally:
        volume_mod.remote_chunks = original


def epoch(source: str, cache_dir: Path | None = None) -> tuple[float, DaskVesuviusStream]:
    stream = DaskVesuviusStream([source], *BLOCK, samples_per_epoch=N, batch_size=BATCH, seed=0,
                                cache_dir=cache_dir)
    t0 = time.perf_counter()
    n = sum(b.shape[0] for b in stream)
    assert n == N
    return N / (time.perf_counter() - t0), stream


def rate_limited(path: Path, reps: int, allow: float) -> None:
    """The rate-limited rows: blocks/s, answered requests/s against the allowance, refusals."""
    cases = [("none (the client's own pace)", {}, float("nan")),
             ("token bucket, no Retry-After", dict(rate=allow, burst=10), allow),
             ("token bucket, Retry-After", dict(rate=allow, burst=10, retry_after="auto"), allow),
             ("8 in flight at most", dict(max_in_flight=8), 8 / 0.02)]
    print(f"\nrate-limited server (20 ms per request), {N} blocks cold, median of {reps}:\n")
    print("| limit | blocks/s | requests/s answered | allowance/s | answered/allowance "
          "| answered/reachable | refused |")
    print("|---|---|---|---|---|---|---|")
    own = float("nan")
    for name, limits, allowance in cases:
        rows = []
        for _ in range(reps):
            with SlowServer(path.parent, 0.02) as srv:
                srv.limit(**limits)
                t0 = time.perf_counter()
                blocks, _ = epoch(srv.url(path.name))
                elapsed = time.perf_counter() - t0
                answered, refused = len(srv.answered), sum(srv.refusals.values())
                span = srv.answered[-1] - srv.answered[0] if answered > 1 else elapsed
                rows.append((blocks, (answered - 1) / span, refused / max(1, answered + refused)))
        blocks, rate, refused = (median(r[i] for r in rows) for i in range(3))
        own = rate if not limits else own  # the first row: what the client reaches unlimited
        reachable = min(allowance, own) if limits else own
        print(f"| {name} | {blocks:,.0f} | {rate:,.0f} | {allowance:,.0f} | {rate / allowance:.2f} "
              f"| {rate / reachable:.2f} | {refused:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--delays", default="0,20,50,100", help="ms added per request")
    parser.add_argument("--servers", default="keep-alive,plain",
                        help="keep-alive (HTTP/1.1, long listen queue) and/or plain (HTTP/1.0, queue 5)")
    parser.add_argument("--rate-limited", action="store_true", help="add the rate-limited rows")
    parser.add_argument("--only-rate-limited", action="store_true", help="only the rate-limited rows")
    parser.add_argument("--allow", type=float, default=200.0, help="the token bucket's requests/s")
    args = parser.parse_args()
    path = make_zarr(DATA_DIR / "remote-32x1024x1024.zarr", SHAPE, chunks=CHUNKS)
    if args.only_rate_limited:
        rate_limited(path, args.reps, args.allow)
        return
    delays = [int(d) for d in args.delays.split(",")]
    local = median([epoch(str(path))[0] for _ in range(args.reps)])
    print(f"{N} random {BLOCK} blocks, batches of {BATCH}, from {SHAPE} uint16 in {CHUNKS} chunks "
          f"(512); median of {args.reps}; local disk: {local:,.0f} blocks/s\n")
    print("| server | ms/request | before | cold | warm cache_dir | local | cold/before | cold/local "
          "| warm/local | requests | peak in flight | cold epoch | bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, delay in [(k, d) for k in args.servers.split(",") for d in delays]:
        with SlowServer(path.parent, delay / 1000, plain=kind == "plain") as srv:
            url = srv.url(path.name)
            before = float("nan")
            if not args.no_baseline:
                with previous_read_path():
                    before = median([epoch(url)[0] for _ in range(args.reps)])
            cold, warm, requests, peak = [], [], 0, 0
            for _ in range(args.reps):
                cache = Path(tempfile.mkdtemp(prefix="vd-remote-bench-"))
                try:
                    srv.reset()
                    rate, _ = epoch(url, cache)
                    cold.append(rate)
                    requests, peak = sum(srv.chunk_requests().values()), srv.peak
                    srv.reset()
                    rate, _ = epoch(url, cache)
                    warm.append(rate)
                    assert sum(srv.chunk_requests().values()) == 0, "the warm run asked for chunks"
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
            c, w = median(cold), median(warm)
            bound = requests * delay / 1000 / 16 + 3
            print(f"| {kind} | {delay} | {before:,.0f} | {c:,.0f} | {w:,.0f} | {local:,.0f} "
                  f"| {c / before:.1f}x | {c / local:.2f} | {w / local:.2f} | {requests} | {peak} "
                  f"| {N / c:.2f} s | {bound:.2f} s |")
    print(f"\nmachine: {os.cpu_count()} CPUs; 'before' reads through zarr-python with "
          f"{os.cpu_count()} threads (the previous main's engine on a URL)")
    if args.rate_limited:
        rate_limited(path, args.reps, args.allow)


if __name__ == "__main__":
    main()
