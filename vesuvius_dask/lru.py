"""One least-recently-used map with a budget, for every cache of the library.

Decoded chunks (a byte budget), open TIFF layers (a count), in-memory prediction
accumulators (a byte budget, flushed on eviction) and epoch permutations (a count)
all use :class:`LRU`. It is thread-safe and travels empty through pickling: what it
holds belongs to one process.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["LRU"]


def _one(value: Any) -> int:
    return 1


class LRU:
    """A thread-safe least-recently-used map with a budget.

    Parameters
    ----------
    budget : int
        Largest total size kept; 0 keeps nothing (unless ``keep_newest``).
    size : callable, optional
        Size of a value in the budget's unit (default: 1 per value, a count).
    on_evict : callable, optional
        ``on_evict(key, value)`` for each value pushed out by the budget (not for
        :meth:`pop` or :meth:`clear`).
    keep_newest : bool
        Always keep the value just put, even beyond the budget (an accumulator in
        use); otherwise a value larger than the budget is not kept at all.
    """

    def __init__(self, budget: int, *, size: Callable[[Any], int] | None = None,
                 on_evict: Callable[[Any, Any], None] | None = None, keep_newest: bool = False) -> None:
        self.budget = int(budget)
        self.size = size or _one
        self.on_evict = on_evict
        self.keep_newest = keep_newest
        self.total = 0
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, default: Any = None) -> Any:
        """The value (now most recently used), or ``default``."""
        with self._lock:
            value = self._data.get(key, default)
            if key in self._data:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> bool:
        """Keep ``value`` (an existing key keeps its old value); return whether it is kept."""
        n = self.size(value)
        if n > self.budget and not self.keep_newest:
            return False
        evicted = []
        with self._lock:
            if key in self._data:
                return True
            self._data[key] = value
            self.total += n
            while self.total > self.budget and len(self._data) > 1:
                old_key, old = self._data.popitem(last=False)
                self.total -= self.size(old)
                evicted.append((old_key, old))
        if self.on_evict is not None:
            for old_key, old in evicted:
                self.on_evict(old_key, old)
        return True

    def pop(self, key: Any, default: Any = None) -> Any:
        """Remove and return a value (no ``on_evict``)."""
        with self._lock:
            if key not in self._data:
                return default
            value = self._data.pop(key)
            self.total -= self.size(value)
            return value

    def pop_oldest(self) -> tuple[Any, Any]:
        """Remove and return the least recently used ``(key, value)``."""
        with self._lock:
            key, value = self._data.popitem(last=False)
            self.total -= self.size(value)
            return key, value

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._data.clear()
            self.total = 0

    def keys(self) -> list[Any]:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._data)

    def __contains__(self, key: Any) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __bool__(self) -> bool:
        return bool(self._data)

    def __getstate__(self) -> dict:
        return {"budget": self.budget, "size": self.size, "on_evict": self.on_evict,
                "keep_newest": self.keep_newest}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["budget"], size=state["size"], on_evict=state["on_evict"],  # type: ignore[misc]
                      keep_newest=state["keep_newest"])

    def after_fork(self) -> None:
        """A fresh lock (a parent thread may have held the old one at ``fork``)."""
        self._lock = threading.Lock()
