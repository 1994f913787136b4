"""``vesuvius-dask ls``: what the catalogue knows, one line per entry, offline."""

from __future__ import annotations

import argparse
import sys

from .options import add_catalog


def volume_lines(entries: list) -> list[str]:
    """``NAME  default  N segments  URL`` per volume, the names padded to one column."""
    width = max((len(e.name) for e in entries), default=0)
    return [f"{e.name:<{width}}  {'default' if e.default else '       '}  "
            f"{len(e.segments):>3} segments  {e.volume or '-'}" for e in entries]


def run(args: argparse.Namespace) -> int:
    from vesuvius_dask.io.catalog import load_catalog, lookup

    cat = load_catalog(args.catalog)
    if args.scroll is None:
        for line in volume_lines(list(cat)):
            print(line)
        return 0
    match = lookup(args.scroll, catalog=cat)
    if match.kind == "segment":
        print(f"{match.segment}  {match.entry.name}  {match.url}")
        return 0
    qualified = ":" in args.scroll  # scroll1:54keV picks one volume; scroll1 all of them
    entries = [match.entry] if qualified else cat.entries(match.entry.scroll)
    lines = [f"{seg}  {e.name}  {url}" for e in entries for seg, url in e.segments.items()]
    for line in lines:
        print(line)
    if not lines:
        print(f"vesuvius-dask ls: {args.scroll}: no segments in the catalogue", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ls", help="list the catalogue: scrolls, energies, resolutions, volume URLs (offline)",
        description="List what the catalogue knows, one line per entry, without the network. "
                    "Without SCROLL: every volume (NAME:ENERGY:RESOLUTION, whether it is the "
                    "scroll's default, its segment count, its URL). With SCROLL: its segments "
                    "(id, volume, URL). Every NAME and segment id is accepted wherever a command "
                    "takes a volume.")
    p.add_argument("scroll", nargs="?", default=None,
                   help="a scroll (scroll1, 'Scroll 1', PHercParis4:78keV) or a segment id")
    add_catalog(p)
    p.set_defaults(func=run)
