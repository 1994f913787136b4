"""Option types and options shared by the commands (one parser per kind of value, from ``checks``).

The commands import from here, never from ``main``, so the command line has no
import cycle: ``main`` imports the commands, the commands import this module.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = _old_flag_hint(message)
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


#: Flags of the original converter and what replaced them.
OLD_FLAGS = {"--z_chunksize": "--chunks Z,Y,X", "--y_chunksize": "--chunks Z,Y,X",
             "--x_chunksize": "--chunks Z,Y,X", "--input": "the SRC argument",
             "--output": "the DST argument", "--num_threads": "--scheduler"}


def _old_flag_hint(message: str) -> str:
    for old, new in OLD_FLAGS.items():
        if old in message:
            return f" ({old} is now {new})"
    return ""


def _argument(check: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse type from a library check (one parser per kind of value, in vesuvius_dask.arguments)."""
    def parse(text: str) -> Any:
        from vesuvius_dask.errors import VesuviusDaskError

        try:
            return check(text)
        except VesuviusDaskError as err:
            text = re.sub(rf"^{name}\[(\w)\] ", r"\1 ", str(err))  # value[z] must -> z must
            raise argparse.ArgumentTypeError(text.replace(f"{name} ", "", 1)) from None
    parse.__name__ = name
    return parse


def _as_int(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text  # the check names it as not an integer


def _checks() -> Any:
    from vesuvius_dask import arguments

    return arguments


triple = _argument(lambda t: _checks().int_triple("value", t, minimum=0, broadcast=False), "value")
positive_triple = _argument(lambda t: _checks().int_triple("value", t, broadcast=False), "value")
positive = _argument(lambda t: _checks().positive_int("value", _as_int(t)), "value")
non_negative = _argument(lambda t: _checks().non_negative_int("value", _as_int(t)), "value")


def add_cache_dir(p: argparse.ArgumentParser) -> None:
    """``--cache-dir``, as every command that reads URLs takes it."""
    p.add_argument("--cache-dir", default=None,
                   help="keep chunks fetched from URLs in this folder (shared by workers and later "
                        "runs; a new or empty folder, or one vesuvius-dask made)")


def add_catalog(p: argparse.ArgumentParser) -> None:
    """``--catalog FILE``, as every command that takes volumes by name takes it."""
    p.add_argument("--catalog", default=None, metavar="FILE",
                   help="a catalogue YAML (the official scrolls.yaml structure) over the recorded "
                        "one; `replace: true` in it uses it alone (default: $VESUVIUS_DASK_CATALOG)")


#: The arguments that hold volumes (one path, or a list of them), in every command.
VOLUME_ARGS = ("paths", "src", "source")


def resolve_names(args: argparse.Namespace) -> None:
    """Replace scroll names and segment ids in the volume arguments by their URLs (offline).

    Only for commands that took ``--catalog`` (:func:`add_catalog`); a path that
    exists, a URL or a string that cannot be a name stays as given.
    """
    if not hasattr(args, "catalog"):
        return
    from vesuvius_dask.io.catalog import load_catalog, looks_like_name, resolve_source

    cat = load_catalog(args.catalog) if args.catalog is not None else None  # a bad file: one line
    for dest in VOLUME_ARGS:
        value = getattr(args, dest, None)
        values = value if isinstance(value, list) else [value]
        if not any(looks_like_name(v) for v in values):
            continue
        cat = cat or load_catalog()
        done = [resolve_source(v, catalog=cat) for v in values]
        setattr(args, dest, done if isinstance(value, list) else done[0])


def add_volume(p: argparse.ArgumentParser) -> None:
    """``--volume SCROLL``: the scroll volume segments never rendered are rendered from (lazily)."""
    p.add_argument("--volume", default=None, metavar="SCROLL",
                   help="scroll volume (Zarr, OME-Zarr, URL or name) to render a segment's surface "
                        "volume from, lazily, when the segment has a tifxyz surface but no rendered "
                        "volume (with --level: that level of the scroll)")


def render_segments(args: argparse.Namespace) -> None:
    """Segments in the volume arguments that have no rendered volume become renders from ``--volume``.

    ``info`` describes the render itself (its paths stay paths); a segment with a
    rendered volume, and any other volume, stays as given.
    """
    volume = getattr(args, "volume", None)
    if volume is None or args.command == "info":
        return
    from vesuvius_dask.io.paths import PathKind, path_kind
    from vesuvius_dask.surfaces.segment import open_segment

    def render(value: Any) -> Any:
        if not isinstance(value, (str, os.PathLike)) or path_kind(value) != PathKind.SEGMENT:
            return value
        seg = open_segment(value, volume=volume, level=getattr(args, "level", None),
                           cache_dir=getattr(args, "cache_dir", None))
        return seg if str(seg.sources.get("volume", "")).startswith("rendered") else value

    for dest in VOLUME_ARGS:
        value = getattr(args, dest, None)
        if value is not None:
            setattr(args, dest, [render(v) for v in value] if isinstance(value, list) else render(value))


#: What ``vesuvius-dask stream`` plans its blocks with, and the defaults (``prefetch`` takes the same).
STREAM_PLAN = {"z_size": 4, "y_size": 64, "x_size": 64, "batch_size": 128, "batches": 8,
               "sampling_method": "uniform", "seed": 0}


def add_stream_plan(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The options that decide which blocks ``stream`` reads (block, batches, sampling, seed).

    ``defaults=False`` leaves them None, so that a command can tell whether they were
    given (:func:`stream_plan` fills the defaults in).
    """
    d = STREAM_PLAN if defaults else dict.fromkeys(STREAM_PLAN)
    p.add_argument("--z-size", type=positive, default=d["z_size"])
    p.add_argument("--y-size", type=positive, default=d["y_size"])
    p.add_argument("--x-size", type=positive, default=d["x_size"])
    p.add_argument("--batch-size", type=positive, default=d["batch_size"])
    p.add_argument("--batches", type=positive, default=d["batches"],
                   help=f"batches per epoch (default {STREAM_PLAN['batches']})")
    p.add_argument("--sampling-method", choices=("uniform", "proportional"), default=d["sampling_method"])
    p.add_argument("--seed", type=non_negative, default=d["seed"])


def stream_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`add_stream_plan` options given, with the defaults for those that were not."""
    return {k: (v if getattr(args, k) is None else getattr(args, k)) for k, v in STREAM_PLAN.items()}
