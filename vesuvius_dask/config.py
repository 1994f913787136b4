"""The one configuration table: every tunable of vesuvius-dask, read through dask's config.

The defaults are the YAML file ``vesuvius-dask.yaml`` beside this module (one comment
per key; the documentation's Configuration page describes each). Importing this
module (``import vesuvius_dask`` does) registers them once with
:func:`dask.config.update_defaults`, as distributed and dask-awkward do, so every key is
dask config ``vesuvius-dask.<key>``: ``dask.config.set``, the environment
(``DASK_VESUVIUS_DASK__REMOTE__CONCURRENCY=64``) and dask's YAML files set them, and
values set before the import keep priority over the defaults.

Modules read their settings with :func:`get` (or :func:`get_bytes`), never with
``dask.config`` directly, and only keys of the table: an unknown key is a ``KeyError``.
A setting is read where it is used, once per object or call (never per chunk); the few
that are default arguments of public functions are read when their module is imported.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
import dask.utils
import yaml

__all__ = ["get", "get_bytes", "default", "default_bytes", "keys", "PREFIX", "TABLE_FILE"]

#: The dask config section of the table.
PREFIX = "vesuvius-dask"
#: The table, shipped with the package.
TABLE_FILE = Path(__file__).with_name("vesuvius-dask.yaml")


def _load() -> dict:
    with open(TABLE_FILE, encoding="utf-8") as f:
        table = yaml.safe_load(f)
    if not isinstance(table, dict) or not isinstance(table.get(PREFIX), dict):
        raise RuntimeError(f"{TABLE_FILE}: expected one mapping {PREFIX!r} of settings")
    return table


#: ``{"vesuvius-dask": {...}}``: the defaults as the file states them.
_TABLE: dict = _load()


def _register() -> None:
    """Add the table to dask's defaults, once (an equal table already there is kept)."""
    if not any(d == _TABLE for d in dask.config.defaults):
        dask.config.update_defaults(copy.deepcopy(_TABLE))


_register()


def _canonical(part: str) -> str:
    return part.replace("_", "-")


def default(key: str) -> Any:
    """The table's default of ``key`` (``"remote.concurrency"``), whatever the config says now.

    Raises
    ------
    KeyError
        ``key`` is not in the table.
    """
    node: Any = _TABLE[PREFIX]
    for part in key.split("."):
        if not isinstance(node, dict) or _canonical(part) not in node:
            raise KeyError(f"{PREFIX}.{key} is not a setting of the table {TABLE_FILE.name}")
        node = node[_canonical(part)]
    if isinstance(node, dict):
        raise KeyError(f"{PREFIX}.{key} is a section of the table, not a setting")
    return copy.deepcopy(node)


def get(key: str) -> Any:
    """The value of ``vesuvius-dask.<key>`` in dask's config now (the table's default if unset).

    Raises
    ------
    KeyError
        ``key`` is not in the table.
    """
    fallback = default(key)
    return dask.config.get(f"{PREFIX}.{key}", fallback)


def _bytes(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        return int(dask.utils.parse_bytes(value))
    return int(value)


def get_bytes(key: str) -> int | None:
    """:func:`get` for a byte size: an int, or a string such as ``"512 MiB"``; None stays None."""
    return _bytes(get(key))


def default_bytes(key: str) -> int | None:
    """:func:`default` for a byte size (``"256 MiB"`` in the table is 268435456)."""
    return _bytes(default(key))


def keys() -> Iterator[str]:
    """Every key of the table, dotted (``"remote.concurrency"``), in the file's order."""

    def walk(node: dict, prefix: str) -> Iterator[str]:
        for name, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    return walk(_TABLE[PREFIX], "")
