"""Surface benchmarks: lazy renders and native-3D blocks from a 128³-chunked uint8 scroll, in one run.

(a) **Lazy render vs the same render stored as Zarr.** A 65 x S x S surface (default S =
    2048; a gently curved sheet, tifxyz grid at scale 1/16) is rendered lazily from the
    scroll's level 0. Its full render (written to Zarr with ``convert_zarr``, the
    "rendered beforehand" baseline) counts the scroll chunks the render reads against the
    chunks of its bounding slab (the box of every sample position). Then the same random
    blocks are streamed (``DaskVesuviusStream``, one process) from the lazy render and from
    the Zarr: a first epoch on a new stream (cold: the lazy render computes every render
    chunk a block touches, once, into the decoded-chunk cache) and a second epoch on the
    same stream (warm). blocks/s of both and their ratio, same run.
(b) **Native-3D blocks** (``SurfaceSampler``) of 80 x 128 x 128 at levels 0 and 2 from the
    scroll (OME-Zarr, every level 128³-chunked) with a stream cache smaller than the
    scroll: blocks/s and read amplification (bytes decoded / bytes of the blocks), against
    the decode-once limit: every chunk the epoch's crops touch read once, then the crops
    cut from them in RAM.

Medians of --reps repetitions. Data is generated once into bench-data/ (the scroll is
about 2 GB by default: --scroll-shape 384,2304,2304).

    python benchmarks/surfaces.py [--reps 3] [--size 2048] [--scroll-shape 384,2304,2304]
    python benchmarks/surfaces.py --only-native3d [--levels 0,2] [--profile 30]   # (b) alone, profiled
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, median  # noqa: E402

CHUNK = 128


def _fill(arr, factor: int, seed: int) -> None:
    """Papyrus-like waves plus noise; level ``L`` (``factor = 2**L``) samples the same pattern."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = arr.shape
    xx = np.arange(nx, dtype=np.float32)[None, None, :] * factor
    for z0 in range(0, nz, CHUNK):
        zz = np.arange(z0, min(z0 + CHUNK, nz), dtype=np.float32)[:, None, None] * factor
        for y0 in range(0, ny, CHUNK):
            yy = np.arange(y0, min(y0 + CHUNK, ny), dtype=np.float32)[None, :, None] * factor
            wave = 120 + 80 * np.sin(zz / 9 + yy / 150) * np.cos(xx / 70)
            noise = rng.integers(0, 40, size=wave.shape, dtype=np.uint8)
            arr[z0:z0 + CHUNK, y0:y0 + CHUNK] = (wave + noise).astype(np.uint8)


def make_scroll(path: Path, shape: tuple[int, int, int], levels: int = 3) -> Path:
    """An OME-Zarr uint8 scroll, 128³ chunks at every level (generated once)."""
    import zarr

    done = path / ".complete"
    if done.exists():
        return path
    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(path, mode="w", zarr_format=2)
    datasets = []
    for lvl in range(levels):
        lshape = tuple(-(-s // 2 ** lvl) for s in shape)
        _fill(group.create_array(str(lvl), shape=lshape, chunks=(CHUNK,) * 3, dtype="uint8"), 2 ** lvl, lvl)
        datasets.append({"path": str(lvl), "coordinateTransformations": [
            {"type": "scale", "scale": [2.0 ** lvl] * 3}]})
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
                                   "datasets": datasets}]
    done.touch()
    return path


def make_segment(root: Path, size: int, scroll_shape: tuple[int, int, int]) -> Path:
    """A tifxyz segment (scale 1/16, full resolution size x size) with its label Zarrs (once)."""
    from vesuvius_dask.testing.data import synthetic_ink, write_label_zarr, write_tifxyz

    folder = root / f"segment-{size}"
    if (folder / ".complete").exists():
        return folder
    scale = 1 / 16
    g = int(size * scale)
    j, i = np.mgrid[0:g, 0:g].astype(np.float64)
    x, y = 100 + i / scale, 100 + j / scale
    z = scroll_shape[0] / 2 + 20 * np.sin(x / 300) + 10 * np.cos(y / 400)
    tif = write_tifxyz(folder / "mesh" / "tifxyz", x, y, z, (scale, scale))
    sup = np.zeros((size, size), np.uint8)
    sup[size // 16: -size // 16, size // 16: -size // 16] = 1
    ink = synthetic_ink((size, size), seed=1) * sup
    write_label_zarr(tif / "bench_inklabels.zarr", ink, levels=3)
    write_label_zarr(tif / "bench_supervision_mask.zarr", sup, levels=3)
    (folder / ".complete").touch()
    return folder


# -- (a) lazy render vs the render stored as Zarr ------------------------------------------------------


class BoxLog:
    """Records the scroll boxes the render reads (patched into the render module)."""

    def __init__(self) -> None:
        import vesuvius_dask.surfaces.render as render_mod

        self.mod, self.original = render_mod, render_mod._read_box
        self.boxes: list = []
        self.lock = threading.Lock()

    def __enter__(self) -> BoxLog:
        def logged(vol, box):
            with self.lock:
                self.boxes.append(tuple((s.start, s.stop) for s in box))
            return self.original(vol, box)

        self.mod._read_box = logged
        return self

    def __exit__(self, *exc) -> None:
        self.mod._read_box = self.original

    def chunks(self) -> set:
        out = set()
        for box in self.boxes:
            ranges = [range(a // CHUNK, (b - 1) // CHUNK + 1) for a, b in box]
            out.update((z, y, x) for z in ranges[0] for y in ranges[1] for x in ranges[2])
        return out


def slab_chunks(surface, layers: int, step: float, shape) -> set:
    """Chunks of the bounding slab: the box of every sample position (+ the upper neighbour)."""
    h, w = surface.shape
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for r0 in range(0, h, 512):
        p, n, ok = surface.sample(np.arange(r0, min(r0 + 512, h))[:, None], np.arange(w)[None, :])
        p, n = p[ok], n[ok]
        for k in (0, layers - 1):  # the extremes along each normal
            q = p + (k - layers // 2) * step * n
            lo, hi = np.minimum(lo, q.min(axis=0)), np.maximum(hi, q.max(axis=0))
    a = np.clip(np.floor(lo), 0, np.array(shape) - 1).astype(int) // CHUNK
    b = np.clip(np.floor(hi) + 1, 0, np.array(shape) - 1).astype(int) // CHUNK
    return {(z, y, x) for z in range(a[0], b[0] + 1) for y in range(a[1], b[1] + 1)
            for x in range(a[2], b[2] + 1)}


def _epochs(make_stream, n_epochs: int = 2) -> list[float]:
    """Seconds of each epoch of one stream (the first cold, the next warm)."""
    s = make_stream()
    out = []
    for _ in range(n_epochs):
        t0 = time.perf_counter()
        for _batch in s:
            pass
        out.append(time.perf_counter() - t0)
    return out


def render_vs_zarr(scroll: Path, segment: Path, reps: int, n_blocks: int, block, batch: int) -> None:
    import torch

    from vesuvius_dask import DaskVesuviusStream, convert_zarr, open_segment
    from vesuvius_dask.surfaces.tifxyz import open_surface

    print(f"(a) lazy render vs the same render stored as Zarr: scroll {scroll.name} level 0")
    seg = open_segment(segment, volume=scroll / "0")
    surf = open_surface(seg)
    surf.nodes()
    render = seg.volume
    shape = tuple(int(s) for s in __import__("zarr").open_array(scroll / "0", mode="r").shape)
    total = np.prod([-(-s // CHUNK) for s in shape])
    stored = DATA_DIR / f"render-{render.shape[1]}.zarr"
    if stored.exists():
        shutil.rmtree(stored)
    t0 = time.perf_counter()
    with BoxLog() as log:
        convert_zarr(seg, stored, chunks=(65, CHUNK, CHUNK))
    t_render = time.perf_counter() - t0
    touched, slab = log.chunks(), slab_chunks(surf, 65, 1.0, shape)
    print(f"  render {tuple(render.shape)} {render.dtype} written to Zarr in {t_render:.1f} s "
          f"({render.size / t_render / 1e6:.1f} M samples/s)")
    print(f"  scroll chunks read: {len(touched)} touched, {len(slab)} in the bounding slab, {total} in "
          f"the scroll; touched outside the slab: {len(touched - slab)}")
    kw = dict(samples_per_epoch=n_blocks, batch_size=batch, seed=3, dtype=torch.uint8)
    rates = {}
    for name, make in (("lazy render", lambda: DaskVesuviusStream(
                            [open_segment(segment, volume=scroll / "0").volume], *block, **kw)),
                       ("render stored as Zarr", lambda: DaskVesuviusStream([stored], *block, **kw))):
        runs = [_epochs(make) for _ in range(reps)]
        cold, warm = median([r[0] for r in runs]), median([r[1] for r in runs])
        rates[name] = (n_blocks / cold, n_blocks / warm)
        print(f"  {name:<24} epoch 1 (cold) {n_blocks / cold:>9,.1f} blocks/s   "
              f"epoch 2 (warm) {n_blocks / warm:>9,.1f} blocks/s")
    (lc, lw), (zc, zw) = rates["lazy render"], rates["render stored as Zarr"]
    print(f"  Zarr / lazy: cold {zc / lc:.2f}x, warm {zw / lw:.2f}x (target <= 3); "
          f"{n_blocks} blocks of {block}, batch {batch}")


# -- (b) native-3D blocks ---------------------------------------------------------------------------


def decode_once(arr, starts: np.ndarray, block) -> tuple[float, int]:
    """The limit: every chunk the crops touch read once (zarr), then the crops cut in RAM."""
    t0 = time.perf_counter()
    ids = set()
    for s in starts:
        ranges = [range(a // CHUNK, (a + b - 1) // CHUNK + 1) for a, b in zip(s, block)]
        ids.update((z, y, x) for z in ranges[0] for y in ranges[1] for x in ranges[2])
    chunks = {c: arr[tuple(slice(i * CHUNK, (i + 1) * CHUNK) for i in c)] for c in sorted(ids)}
    out = np.empty(tuple(block), arr.dtype)
    for s in starts:
        ranges = [range(a // CHUNK, (a + b - 1) // CHUNK + 1) for a, b in zip(s, block)]
        for c in ((z, y, x) for z in ranges[0] for y in ranges[1] for x in ranges[2]):
            data = chunks[c]
            lo = [max(a, i * CHUNK) for a, i in zip(s, c)]
            hi = [min(a + b, i * CHUNK + n) for a, b, i, n in zip(s, block, c, data.shape)]
            out[tuple(slice(low - a, h - a) for low, h, a in zip(lo, hi, s))] = data[
                tuple(slice(low - i * CHUNK, h - i * CHUNK) for low, h, i in zip(lo, hi, c))]
    return time.perf_counter() - t0, sum(d.nbytes for d in chunks.values())


def native3d(scroll: Path, segment: Path, reps: int, cache_mb: int, block=(80, 128, 128),
             levels=(0, 2), profile: int = 0) -> None:
    import torch
    import zarr

    from vesuvius_dask import DaskVesuviusStream, SurfaceSampler, SurfaceSegment

    print(f"(b) native-3D blocks {block}, stream cache {cache_mb} MiB (scroll level 0: "
          f"{sum(f.stat().st_size for f in (scroll / '0').rglob('*') if f.is_file()) / 2**20:,.0f} MiB "
          "stored)")
    for level in levels:
        seg = SurfaceSegment.from_segment(segment, scroll)
        sampler = SurfaceSampler(level=level, overlap=0.5, half_thickness=8, seed=0)

        def make(sampler=sampler, seg=seg):
            return DaskVesuviusStream([seg], block=block, batch_size=8, sampler=sampler,
                                      cache_bytes=cache_mb << 20, dtype=torch.uint8)

        if profile:
            _profile(make(), profile)
        secs, amps = [], []
        n = 0
        for _ in range(reps):
            s = make()
            t0 = time.perf_counter()
            n = sum(image.shape[0] for image, _targets in s)
            secs.append(time.perf_counter() - t0)
            amps.append(s.engine.stats.amplification)
        starts = s.epoch_coords(0)[:, 1:]
        arr = zarr.open_array(scroll / str(level), mode="r")
        limit = [decode_once(arr, starts, block) for _ in range(reps)]
        t_lim, bytes_lim = median([t for t, _ in limit]), limit[0][1]
        amp_lim = bytes_lim / (len(starts) * np.prod(block) * arr.dtype.itemsize)
        t = median(secs)
        print(f"  level {level}: {n} blocks/epoch; stream {n / t:8.1f} blocks/s, amplification "
              f"{median(amps):.2f} | decode-once limit {len(starts) / t_lim:8.1f} blocks/s, amplification "
              f"{amp_lim:.2f} | stream / limit {(n / t) / (len(starts) / t_lim):.2f}")


def _profile(stream, top: int) -> None:
    """One epoch under cProfile (the main thread: labels and assembly; reads run in threads)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    n = sum(image.shape[0] for image, _targets in stream)
    prof.disable()
    print(f"  profiled epoch: {n} blocks in {time.perf_counter() - t0:.2f} s")
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=sys.stdout).sort_stats(key).print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=2048, help="the render's y and x size")
    ap.add_argument("--scroll-shape", default="384,2304,2304")
    ap.add_argument("--blocks", type=int, default=1024, help="random blocks per epoch in (a)")
    ap.add_argument("--block", default="16,128,128", help="random block in (a)")
    ap.add_argument("--cache-mb", type=int, default=256, help="stream cache in (b)")
    ap.add_argument("--skip-render", action="store_true")
    ap.add_argument("--skip-native3d", action="store_true")
    ap.add_argument("--only-native3d", action="store_true", help="part (b) alone (same as --skip-render)")
    ap.add_argument("--levels", default="0,2", help="pyramid levels of (b)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="before timing (b), profile one epoch per level; print the top N functions")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.scroll_shape.split(","))
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scroll = make_scroll(DATA_DIR / ("surface-scroll-" + "x".join(map(str, shape)) + ".ome.zarr"), shape)
    segment = make_segment(DATA_DIR / "surface-segments", args.size, shape)
    print(f"data ready in {time.perf_counter() - t0:.1f} s: {scroll}, {segment}")
    if not (args.skip_render or args.only_native3d):
        render_vs_zarr(scroll, segment, args.reps, args.blocks,
                       tuple(int(v) for v in args.block.split(",")), 32)
    if not args.skip_native3d:
        native3d(scroll, segment, args.reps, args.cache_mb,
                 levels=tuple(int(v) for v in args.levels.split(",")), profile=args.profile)


if __name__ == "__main__":
    main()
