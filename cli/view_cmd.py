"""``vesuvius-dask view``: argument parsing for the napari viewer."""

from __future__ import annotations

import argparse

from .options import add_cache_dir, non_negative, positive


def _check_paths(paths: list[str]) -> None:
    from vesuvius_dask.errors import VolumeNotFoundError
    from vesuvius_dask.io.paths import PathKind, path_kind

    for path in paths:
        if path_kind(path) == PathKind.MISSING:
            raise VolumeNotFoundError(f"{path}: no such file or directory")


def run(args: argparse.Namespace) -> int:
    from vesuvius_dask.errors import SamplingError
    from vesuvius_dask.io.open import open_volume
    from vesuvius_dask.viewer import require_napari, show

    _check_paths(args.paths)
    napari = require_napari()
    depth = open_volume(args.paths[0]).shape[0]
    if args.z is not None and args.z >= depth:
        raise SamplingError(f"--z {args.z} is outside {args.paths[0]}, which has {depth} slices "
                            f"(--z 0..{depth - 1})")
    plan = None
    if args.samples:  # the stream's plan, without torch: the same blocks for the same seed
        from vesuvius_dask.io.open import resolve_volume
        from vesuvius_dask.sampling.plan import BlockPlan

        volumes = [resolve_volume(p, name=f"files[{i}]") for i, p in enumerate(args.paths)]
        try:
            plan = BlockPlan(volumes, (args.z_size, args.y_size, args.x_size),
                             args.samples_per_epoch or args.samples,
                             sampling_method=args.sampling_method, seed=args.seed)
        except SamplingError as err:
            err.cli.setdefault("samples_per_epoch=", "--samples-per-epoch " if args.samples_per_epoch
                               else "--samples ")
            raise
    viewer = show(args.paths, plan, samples=args.samples or None, epoch=args.epoch,
                  cache_dir=args.cache_dir)
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view", help="open volumes lazily in napari (with the sampler's blocks)",
        description="Open Zarr arrays, OME-Zarr pyramids, TIFF layer folders or segment folders "
                    "in napari, lazily; with --samples N, outline where DaskVesuviusStream draws "
                    "its next N blocks (one colour per volume). To open a segment or TIFF folder "
                    "with plain napari, use `napari --plugin vesuvius-dask PATH`.")
    p.add_argument("paths", nargs="+")
    p.add_argument("--samples", type=non_negative, default=0,
                   help="outline the next N blocks DaskVesuviusStream(seed=--seed) would draw")
    p.add_argument("--samples-per-epoch", type=positive, default=None,
                   help="the stream's epoch size (default: --samples)")
    p.add_argument("--z-size", type=positive, default=4)
    p.add_argument("--y-size", type=positive, default=64)
    p.add_argument("--x-size", type=positive, default=64)
    p.add_argument("--sampling-method", choices=("uniform", "proportional"), default="uniform")
    p.add_argument("--seed", type=non_negative, default=0)
    p.add_argument("--epoch", type=non_negative, default=None)
    p.add_argument("--screenshot", default=None, help="save a PNG of the canvas and exit")
    p.add_argument("--z", type=non_negative, default=None, help="z slice to show")
    add_cache_dir(p)
    p.set_defaults(func=run)
