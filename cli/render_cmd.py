"""``vesuvius-dask render``: a segment's surface volume rendered from the scroll, written to Zarr."""

from __future__ import annotations

import argparse

from .options import add_cache_dir, non_negative, positive, positive_triple


def run(args: argparse.Namespace) -> int:
    from vesuvius_dask.io.info import describe
    from vesuvius_dask.surfaces.render import render_segment
    from vesuvius_dask.surfaces.segment import open_segment
    from vesuvius_dask.writers.convert import convert_zarr

    seg = open_segment(args.segment)  # a rendered volume found beside it does not matter here
    seg = render_segment(seg, args.volume, layers=args.layers, step=args.step, level=args.level,
                         flip_normals=args.flip_normals, cache_dir=args.cache_dir)
    convert_zarr(seg, args.out, chunks=tuple(args.chunks), compressor=args.compressor,
                 zarr_format=args.zarr_format, ome=args.ome, overwrite=args.overwrite,
                 resume=args.resume, client=args.scheduler, quiet=args.quiet)
    if not args.quiet:
        print(describe(args.out))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vesuvius_dask.writers.convert import COMPRESSORS, DEFAULT_COMPRESSOR

    p = sub.add_parser(
        "render", help="render a segment's surface volume from the scroll into a Zarr",
        description="Sample the scroll volume along the normals of a segment's tifxyz surface "
                    "(trilinear; layer LAYERS//2 is the surface) and write the (layers, H, W) "
                    "surface volume to a Zarr (or OME-Zarr with --ome), as convert writes: built "
                    "in .OUT.partial/ and published once complete; --resume continues a killed run.")
    p.add_argument("segment", help="segment folder (either published tree) or tifxyz folder")
    p.add_argument("volume", help="the scroll volume: Zarr, OME-Zarr (with --level), URL or name")
    p.add_argument("out", help="output .zarr path")
    p.add_argument("--layers", type=positive, default=65, help="layers along the normal (default 65)")
    p.add_argument("--step", type=float, default=1.0, help="distance between layers, level-0 voxels")
    p.add_argument("--level", type=non_negative, default=0, help="pyramid level of the scroll read")
    p.add_argument("--flip-normals", action="store_true",
                   help="volume-cartographer's normal sign (tx x ty) instead of the default")
    p.add_argument("--chunks", type=positive_triple, default=(65, 128, 128),
                   help="output chunks Z,Y,X (default 65,128,128)")
    p.add_argument("--compressor", choices=COMPRESSORS, default=DEFAULT_COMPRESSOR)
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=3)
    p.add_argument("--ome", action="store_true", help="write an OME-Zarr multiscale pyramid")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--resume", action="store_true", help="continue a run that was killed")
    add_cache_dir(p)
    p.add_argument("--scheduler", default=None, help="dask.distributed scheduler address")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
