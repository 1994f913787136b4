"""``vesuvius-dask convert``: argument parsing for TIFF-stack conversion."""

from __future__ import annotations

import argparse

from .options import add_cache_dir, add_volume, non_negative, positive, positive_triple


def run(args: argparse.Namespace) -> int:
    from vesuvius_dask.errors import ConversionError
    from vesuvius_dask.io.info import describe
    from vesuvius_dask.io.paths import PathKind, path_kind
    from vesuvius_dask.writers.convert import convert_tiffs, convert_zarr

    chunks = list(args.chunks)
    for i, axis in enumerate("zyx"):  # the original converter's --z_chunksize etc.
        old = getattr(args, f"{axis}_chunksize")
        if old is not None:
            chunks[i] = old
    common = dict(
        z=(args.z_start, args.z_end), y=(args.y_start, args.y_end), x=(args.x_start, args.x_end),
        chunks=tuple(chunks), compressor=args.compressor, zarr_format=args.zarr_format,
        shards=args.shards, ome=args.ome, overwrite=args.overwrite, resume=args.resume,
        client=args.scheduler, quiet=args.quiet,
    )
    if hasattr(args.src, "__vesuvius_volume__"):  # a segment rendered from --volume: written like a Zarr
        convert_zarr(args.src, args.dst, **common)
    elif path_kind(args.src) in (PathKind.URL, PathKind.ZARR):  # a crop of a (remote) Zarr
        convert_zarr(args.src, args.dst, level=args.level, cache_dir=args.cache_dir, **common)
    elif args.level is not None or args.cache_dir is not None:
        flag = "--level" if args.level is not None else "--cache-dir"
        raise ConversionError(f"{args.src}: {flag} applies to a Zarr or URL source; this is a TIFF stack")
    else:
        convert_tiffs(args.src, args.dst, **common)
    if not args.quiet:
        print(describe(args.dst))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vesuvius_dask.writers.convert import COMPRESSORS, DEFAULT_CHUNKS, DEFAULT_COMPRESSOR

    p = sub.add_parser(
        "convert", help="convert a TIFF stack, or copy a (remote) Zarr region, to Zarr / OME-Zarr",
        description="Convert a folder of 2-D TIFF layers (00.tif ... in numeric order), a segment "
                    "folder, a glob or a multi-page TIFF to Zarr; or copy a region of a Zarr or "
                    "OME-Zarr (a local path or a URL) to a new local Zarr, with its own chunks and "
                    "codec. Coordinates are source voxels, "
                    "end-exclusive. The output is built in .DST.partial/ beside it and appears "
                    "only once complete; it may never be, contain or lie inside the input. "
                    "Ctrl-C or SIGTERM stop cleanly, keeping only finished output chunks "
                    "(then --resume continues); a run killed outright continues with --resume. "
                    "--overwrite replaces only an output vesuvius-dask wrote.")
    p.add_argument("src", help="folder of TIFF layers, segment folder, glob ('layers/*.tif'), "
                               "multi-page TIFF, or a Zarr / OME-Zarr path or URL")
    p.add_argument("dst", help="output .zarr path")
    for axis in "zyx":
        p.add_argument(f"--{axis}-start", f"--{axis}_start", type=int, default=None,
                       help=f"first {axis} (default 0)")
        p.add_argument(f"--{axis}-end", f"--{axis}_end", type=int, default=None,
                       help=f"end {axis}, exclusive (default: the stack's size)")
        p.add_argument(f"--{axis}_chunksize", type=positive, default=None, help=argparse.SUPPRESS)
    p.add_argument("--chunks", type=positive_triple, default=DEFAULT_CHUNKS,
                   help=f"Z,Y,X (default {','.join(map(str, DEFAULT_CHUNKS))}; "
                        "config vesuvius-dask.chunks)")
    p.add_argument("--compressor", choices=COMPRESSORS, default=DEFAULT_COMPRESSOR,
                   help=f"codec (default {DEFAULT_COMPRESSOR}, bit-shuffled)")
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=3)
    p.add_argument("--shards", type=positive_triple, default=None,
                   help="Z,Y,X shard shape (Zarr v3; a multiple of --chunks, trimmed to the volume)")
    p.add_argument("--ome", action="store_true", help="write an OME-Zarr multiscale pyramid")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (once the new one is complete)")
    p.add_argument("--resume", action="store_true",
                   help="continue a run that was killed (same input and options)")
    p.add_argument("--level", type=non_negative, default=None,
                   help="level of an OME-Zarr source (default 0)")
    add_cache_dir(p)
    add_volume(p)
    p.add_argument("--scheduler", default=None, help="dask.distributed scheduler address")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
