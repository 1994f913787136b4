"""``vesuvius-dask`` console script: argument parsing, one function per command.

Every failure is one line on stderr and exit status 2 (an interrupt: 130 for SIGINT,
143 for SIGTERM); errors speak the command line's flag names.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence

from .options import (
    Parser,
    add_cache_dir,
    add_catalog,
    add_stream_plan,
    add_volume,
    non_negative,
    render_segments,
    resolve_names,
)


def cmd_info(args: argparse.Namespace) -> int:
    from vesuvius_dask.io.info import check, describe
    from vesuvius_dask.io.paths import PathKind, path_kind

    status = 0
    for path in args.paths:
        if not args.check and path_kind(path) == PathKind.SEGMENT:  # a segment or tifxyz folder
            from vesuvius_dask.surfaces.segment import describe as describe_segment

            print(describe_segment(path, level=args.level, volume=args.volume, cache_dir=args.cache_dir))
            continue
        if not args.check:
            print(describe(path, level=args.level))
            continue
        n, bad = check(path, level=args.level, quiet=args.quiet, cache_dir=args.cache_dir)
        for line in bad:
            print(line)
        print(f"{path}: {n} chunks checked, {len(bad)} bad")
        status = status or (1 if bad else 0)
    return status


def cmd_stream(args: argparse.Namespace) -> int:
    from vesuvius_dask.errors import SamplingError
    from vesuvius_dask.extras import require

    require("torch", "torch")
    from vesuvius_dask.loaders.throughput import stream_throughput

    try:
        report = stream_throughput(
            args.paths, block=(args.z_size, args.y_size, args.x_size), batch_size=args.batch_size,
            batches=args.batches, num_workers=args.num_workers, seed=args.seed,
            sampling_method=args.sampling_method, client=args.scheduler, cache_dir=args.cache_dir,
        )
    except SamplingError as err:
        err.cli.setdefault("samples_per_epoch=", "--batches x --batch-size = ")
        raise
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vesuvius_dask._version import __version__

    parser = Parser(
        prog="vesuvius-dask",
        description="Herculaneum scroll volumes as lazy dask arrays, streamed into PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"vesuvius-dask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe (or --check) a volume: Zarr, OME-Zarr, TIFFs, segment")
    p.add_argument("paths", nargs="+", help="Zarr array, OME-Zarr group, TIFF stack or segment folder")
    p.add_argument("--level", type=non_negative, default=None, help="OME-Zarr level (default: all)")
    p.add_argument("--check", action="store_true",
                   help="read and decode every chunk and list the bad ones (exit 1 if any)")
    p.add_argument("--quiet", action="store_true", help="no progress bar with --check")
    add_cache_dir(p)
    add_volume(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("stream", help="stream random blocks and print throughput")
    p.add_argument("paths", nargs="+", help="volumes (Zarr, OME-Zarr, TIFF stacks, segments)")
    add_stream_plan(p)  # the options prefetch shares (cli/options.py)
    p.add_argument("--num-workers", type=non_negative, default=0, help="DataLoader workers")
    p.add_argument("--scheduler", default=None,
                   help="dask.distributed scheduler address (default: local threads)")
    add_cache_dir(p)
    add_volume(p)
    p.set_defaults(func=cmd_stream)

    from . import convert_cmd, ls_cmd, predict_cmd, prefetch_cmd, render_cmd, view_cmd

    convert_cmd.add_parser(sub)
    render_cmd.add_parser(sub)
    predict_cmd.add_parser(sub)
    prefetch_cmd.add_parser(sub)
    view_cmd.add_parser(sub)
    ls_cmd.add_parser(sub)
    for name in ("info", "stream", "convert", "predict", "prefetch", "view"):  # volumes by name too
        add_catalog(sub.choices[name])
    return parser


def _one_line(err: BaseException, flags: Sequence[str] = ()) -> str:
    """The error's message in one line (a DataLoader worker's traceback reduced to its last line).

    Python's ``name=value`` for each of the command's options becomes ``--name value``.
    """
    from vesuvius_dask.errors import VesuviusDaskError

    text = err.cli_message() if hasattr(err, "cli_message") else str(err)
    for dest in flags:
        text = re.sub(rf"\b{dest}=", f"--{dest.replace('_', '-')} ", text)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    if isinstance(err, OSError) and err.filename and not isinstance(err, VesuviusDaskError):
        text = f"{err.filename}: {err.strerror or text}"
    return " ".join(text.split())


def _missing_extra(err: ImportError) -> str | None:
    from vesuvius_dask.extras import missing

    return missing(getattr(err, "name", None) or "")


def _quiet_exit(signum: int, frame: object) -> None:
    """Before any command runs (nothing written yet): one line and the conventional status."""
    sys.stderr.write(f"vesuvius-dask: interrupted by {signal.Signals(signum).name}\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def console() -> None:
    """The ``vesuvius-dask`` script: :func:`main`, and after an interrupt an immediate exit.

    By the time an interrupt's line is printed the job has cleaned up (or kept its
    checkpoint, see :mod:`vesuvius_dask.writers.outputs`); threads still waiting on a
    slow server would keep the interpreter alive until their requests time out, so
    the script does not wait for them (what they were writing to ``cache_dir`` is
    atomic: at worst a temporary file that a later run sweeps).
    """
    code = main()
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    early = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                early[sig] = signal.signal(sig, _quiet_exit)
    try:
        return _main(argv)
    finally:
        for sig, handler in early.items():
            signal.signal(sig, handler)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"vesuvius-dask {args.command}: %(message)s"))
    log = logging.getLogger("vesuvius_dask")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    from vesuvius_dask.errors import Interrupted, VesuviusDaskError
    from vesuvius_dask.writers.outputs import interruptible

    where = f"vesuvius-dask {args.command}"
    try:
        with interruptible():  # SIGTERM too ends in one line (exit 143), after cleanup
            resolve_names(args)  # scroll names and segment ids to their URLs (offline)
            render_segments(args)  # --volume: segments never rendered, rendered lazily from it
            return int(args.func(args) or 0)
    except Interrupted as err:  # a job that kept its finished part says where and how to resume
        print(f"{where}: {err.cli_message()}{'' if err.kept else '; stopped cleanly'}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except ImportError as err:
        message = _missing_extra(err)
        if message is None and not isinstance(err, VesuviusDaskError):
            raise
        print(f"{where}: error: {message or _one_line(err)}", file=sys.stderr)
        return 2
    except (VesuviusDaskError, OSError) as err:
        print(f"{where}: error: {_one_line(err, [k for k in vars(args) if k != 'func'])}",
              file=sys.stderr)
        return 2
    except Exception as err:  # a bug or an unforeseen failure: still one line
        if os.environ.get("VESUVIUS_DASK_DEBUG"):
            raise
        print(f"{where}: error: {type(err).__name__}: {_one_line(err)} "
              "(set VESUVIUS_DASK_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
