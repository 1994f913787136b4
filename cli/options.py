"""Option types and options shared by the commands (one parser per kind of value, from ``checks``).

The commands import from here, never from ``main``, so the command line has no
import cycle: ``main`` imports the commands, the commands import this module.
"""

from __future__ import annotations

import argparse
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
