"""``vesuvius-dask prefetch``: fetch into ``--cache-dir`` exactly the chunks a run will read.

The run is described as ``vesuvius-dask stream`` takes it (volumes, block, batches,
sampling method, seed) plus ``--epochs``, or as ``predict`` reads it (``--grid`` with
``--block``, ``--overlap``, ``--mask``). The report comes first; ``--dry-run`` stops there.
"""

from __future__ import annotations

import argparse

from .options import (
    STREAM_PLAN,
    add_cache_dir,
    add_stream_plan,
    positive,
    positive_triple,
    stream_plan,
    triple,
)

_GRID_ONLY = ("block", "overlap", "mask")


def _check(args: argparse.Namespace) -> None:
    """Options of the other mode, or several sources for a grid: one line."""
    from vesuvius_dask.errors import ArgumentError

    if args.grid:
        given = [k for k in STREAM_PLAN if getattr(args, k) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ArgumentError(f"{flag} describes a stream's blocks; with --grid give --block and "
                                "--overlap, as predict takes them")
        if len(args.paths) != 1:
            raise ArgumentError(f"--grid takes one source, as predict does; got {len(args.paths)}")
        return
    given = [k for k in _GRID_ONLY if getattr(args, k) is not None]
    if given:
        raise ArgumentError(f"--{given[0]} applies to --grid (the grid predict reads); a stream's "
                            "blocks are --z-size, --y-size, --x-size")


def _stream(args: argparse.Namespace) -> object:
    from vesuvius_dask.errors import SamplingError
    from vesuvius_dask.loaders.prefetch import predict_stream

    if args.grid:
        return predict_stream(args.paths[0], block=args.block, overlap=args.overlap, masks=args.mask,
                              cache_dir=args.cache_dir)
    from vesuvius_dask.loaders.stream import DaskVesuviusStream

    o = stream_plan(args)
    try:
        return DaskVesuviusStream(
            args.paths, o["z_size"], o["y_size"], o["x_size"],
            samples_per_epoch=o["batch_size"] * o["batches"], batch_size=o["batch_size"], seed=o["seed"],
            sampling_method=o["sampling_method"], cache_dir=args.cache_dir)
    except SamplingError as err:
        err.cli.setdefault("samples_per_epoch=", "--batches x --batch-size = ")
        raise


def run(args: argparse.Namespace) -> int:
    from vesuvius_dask.errors import ArgumentError
    from vesuvius_dask.extras import require

    _check(args)
    require("torch", "torch")
    from vesuvius_dask.loaders.prefetch import prefetch

    stream = _stream(args)
    try:
        plan = prefetch(stream, args.epochs, dry_run=True)  # a dry run needs no --cache-dir
        if not args.dry_run:
            plan.check_cache()  # refused before anything is printed
        print(plan.summary(), flush=True)
        if args.dry_run or not plan.remote:
            return 0
        plan.fetch(progress=not args.quiet)
    except ArgumentError as err:
        err.cli.setdefault("the stream has no cache_dir", "no --cache-dir was given")
        raise
    print(plan.result())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prefetch", help="fetch into --cache-dir exactly the chunks a stream (or predict) will read",
        description="List the stored chunks that `vesuvius-dask stream` with the same options reads "
                    "over --epochs epochs (or, with --grid, that `predict` reads), say how many "
                    "there are, how many --cache-dir holds already and how many bytes the rest take "
                    "at most, then fetch the rest into --cache-dir (many requests in flight). A run "
                    "with the same options and --cache-dir then asks the server for no chunk. "
                    "Chunks already there are skipped: a killed prefetch run again resumes.")
    p.add_argument("paths", nargs="+", help="volumes, as `stream` takes them (one SOURCE with --grid)")
    add_stream_plan(p, defaults=False)
    p.add_argument("--epochs", type=positive, default=1,
                   help="epochs 0 .. N-1 of the stream (default 1: what `stream` reads)")
    p.add_argument("--grid", action="store_true",
                   help="the grid `predict` reads instead: with --block, --overlap, --mask as predict "
                        "takes them")
    p.add_argument("--block", type=positive_triple, default=None,
                   help="with --grid: Z,Y,X (default 16,64,64, clipped to the volume)")
    p.add_argument("--overlap", type=triple, default=None,
                   help="with --grid: Z,Y,X (default: 0 and a quarter of the block in y and x)")
    p.add_argument("--mask", nargs="?", const="segment", default=None,
                   help="with --grid: only where the mask is, as predict: a mask image, or no value "
                        "for the segment's mask.png")
    p.add_argument("--dry-run", action="store_true", help="report only: request no chunk")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_cache_dir(p)
    p.set_defaults(func=run)
