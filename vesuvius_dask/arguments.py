"""Argument checks shared by the Python API and the command line: one parser per shape of value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import InvalidTypeError, SamplingError

__all__ = ["positive_int", "non_negative_int", "positive_triple", "int_triple", "renamed"]


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int > 0; ``name`` is how the error calls it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        raise SamplingError(f"{name} must be a positive integer, got {value}")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise SamplingError(f"{name} must be 0 or more, got {value}")
    return int(value)


def int_triple(name: str, value: Any, *, minimum: int = 1, broadcast: bool = True) -> tuple[int, int, int]:
    """``(z, y, x)`` of ints >= ``minimum``; one int stands for all three when ``broadcast``.

    A string ``"Z,Y,X"`` (the command line's form) is accepted too, so the CLI and
    the Python API parse triples in one place.
    """
    what = "positive integers" if minimum == 1 else f"integers >= {minimum}"
    if isinstance(value, str):
        try:
            value = [int(p) for p in value.split(",")]
        except ValueError:
            raise InvalidTypeError(f"{name} must be Z,Y,X (three {what}), got {value!r}") from None
    if broadcast and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,) * 3
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise InvalidTypeError(f"{name} must be Z,Y,X (three {what}), got {value!r}")
    check = positive_int if minimum == 1 else non_negative_int
    if minimum not in (0, 1):
        raise ValueError("minimum must be 0 or 1")
    return tuple(check(f"{name}[{axis}]", v) for axis, v in zip("zyx", value))  # type: ignore[return-value]


def positive_triple(name: str, value: Any, *, broadcast: bool = True) -> tuple[int, int, int]:
    """``(z, y, x)`` of positive ints (see :func:`int_triple`)."""
    return int_triple(name, value, minimum=1, broadcast=broadcast)


#: (function, old keyword) pairs already warned about in this process.
_WARNED: set[tuple[str, str]] = set()


def renamed(**old_to_new: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Keep keyword arguments working under their old names, with one ``DeprecationWarning`` each.

    ``@renamed(dst="output")`` lets ``f(dst=...)`` call ``f(output=...)``; giving both
    is an error that names them.
    """
    import functools
    import warnings

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise InvalidTypeError(f"{fn.__qualname__}: pass {new}= only ({old}= is its old name)")
                kwargs[new] = kwargs.pop(old)
                if (fn.__qualname__, old) not in _WARNED:
                    _WARNED.add((fn.__qualname__, old))
                    warnings.warn(f"{fn.__qualname__}({old}=...) is now {new}=", DeprecationWarning,
                                  stacklevel=2)
            return fn(*args, **kwargs)
        return call
    return wrap
