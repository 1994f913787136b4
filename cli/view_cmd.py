"""``vesuvius-dask view``: argument parsing for the napari viewer."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def run(args: argparse.Namespace) -> int:
    from vesuvius_dask.viewer import _napari, show

    napari = _napari()
    stream = None
    if args.samples:
        from vesuvius_dask.stream import DaskVesuviusStream

        stream = DaskVesuviusStream(
            args.paths, args.z_size, args.y_size, args.x_size,
            samples_per_epoch=args.samples_per_epoch or args.samples,
            sampling_method=args.sampling_method, seed=args.seed)
        if args.epoch is not None:
            stream.set_epoch(args.epoch)
    viewer = show(args.paths, stream, samples=args.samples or None)
    if args.screenshot:
        from PIL import Image

        if args.z is not None:
            viewer.dims.set_point(0, args.z)
        Image.fromarray(viewer.screenshot(canvas_only=True)).save(args.screenshot)
        print(f"saved {args.screenshot}")
        viewer.close()
        return 0
    napari.run()
    return 0


def add_parser(sub: argparse._SubParsersAction, triple: Callable[[str], tuple[int, int, int]]) -> None:
    p = sub.add_parser(
        "view", help="open volumes lazily in napari (with the sampler's blocks)",
        description="Open Zarr arrays, OME-Zarr pyramids, TIFF layer folders or segment folders "
                    "in napari, lazily; "
                    "with --samples N, outline where DaskVesuviusStream draws its next N blocks "
                    "(one colour per volume).")
    p.add_argument("paths", nargs="+")
    p.add_argument("--samples", type=int, default=0, help="outline the next N sampled blocks")
    p.add_argument("--samples-per-epoch", type=int, default=None,
                   help="the stream's epoch size (default: --samples)")
    p.add_argument("--z-size", type=int, default=4)
    p.add_argument("--y-size", type=int, default=64)
    p.add_argument("--x-size", type=int, default=64)
    p.add_argument("--sampling-method", choices=("uniform", "proportional"), default="uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=None)
    p.add_argument("--screenshot", default=None, help="save a PNG of the canvas and exit")
    p.add_argument("--z", type=int, default=None, help="z slice to show (with --screenshot)")
    p.set_defaults(func=run)
