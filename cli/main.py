"""``vesuvius-dask`` console script: argument parsing, one function per command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _triple(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X (three integers), got {text!r}")
    try:
        return tuple(int(p) for p in parts)  # type: ignore[return-value]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X (three integers), got {text!r}") from err


def cmd_info(args: argparse.Namespace) -> int:
    from vesuvius_dask.info import describe

    for path in args.paths:
        print(describe(path, level=args.level))
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from vesuvius_dask.throughput import stream_throughput

    report = stream_throughput(
        args.paths, block=(args.z_size, args.y_size, args.x_size), batch_size=args.batch_size,
        batches=args.batches, num_workers=args.num_workers, seed=args.seed,
        sampling_method=args.sampling_method, scheduler=args.scheduler,
    )
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vesuvius_dask._version import __version__

    parser = argparse.ArgumentParser(
        prog="vesuvius-dask",
        description="Herculaneum scroll volumes as lazy dask arrays, streamed into PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"vesuvius-dask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe a Zarr / OME-Zarr volume")
    p.add_argument("paths", nargs="+", help="Zarr array or OME-Zarr group")
    p.add_argument("--level", type=int, default=None, help="OME-Zarr level (default: all)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("stream", help="stream random blocks and print throughput")
    p.add_argument("paths", nargs="+", help="volumes (Zarr arrays or OME-Zarr groups)")
    p.add_argument("--z-size", type=int, default=4)
    p.add_argument("--y-size", type=int, default=64)
    p.add_argument("--x-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=8, help="batches to read (default 8)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--sampling-method", choices=("uniform", "proportional"), default="uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", default=None,
                   help="dask.distributed scheduler address (default: local threads)")
    p.set_defaults(func=cmd_stream)

    from . import convert_cmd, predict_cmd, view_cmd

    convert_cmd.add_parser(sub, _triple)
    predict_cmd.add_parser(sub, _triple)
    view_cmd.add_parser(sub, _triple)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from vesuvius_dask.errors import VesuviusDaskError

    try:
        return int(args.func(args) or 0)
    except (VesuviusDaskError, FileNotFoundError, FileExistsError) as err:
        print(f"vesuvius-dask {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vesuvius-dask {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
