"""Old module paths (before the package had layer folders) keep working, with a warning.

``import vesuvius_dask.stream`` still gives :mod:`vesuvius_dask.loaders.stream` (the
same module object, so patches and ``isinstance`` agree), with one
``DeprecationWarning`` per old name. Installed by ``vesuvius_dask/__init__.py``.
The public API (``from vesuvius_dask import ...``) never moved.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

__all__ = ["MOVED", "install"]

#: Old module name -> where it lives now.
MOVED = {
    "vesuvius_dask.checks": "vesuvius_dask.arguments",
    "vesuvius_dask.paths": "vesuvius_dask.io.paths",
    "vesuvius_dask.chunkio": "vesuvius_dask.io.chunks",
    "vesuvius_dask.volume": "vesuvius_dask.io.volume",
    "vesuvius_dask.volumes": "vesuvius_dask.io.open",
    "vesuvius_dask.tiff": "vesuvius_dask.io.tiff",
    "vesuvius_dask.segment": "vesuvius_dask.io.segments",
    "vesuvius_dask.labels": "vesuvius_dask.io.labels",
    "vesuvius_dask.info": "vesuvius_dask.io.info",
    "vesuvius_dask.disk_cache": "vesuvius_dask.remote.disk_cache",
    "vesuvius_dask.cachefiles": "vesuvius_dask.remote.cache_files",
    "vesuvius_dask.plan": "vesuvius_dask.sampling.plan",
    "vesuvius_dask.shared_cache": "vesuvius_dask.engine.machine_cache",
    "vesuvius_dask.cluster": "vesuvius_dask.engine.cluster",
    "vesuvius_dask.readers": "vesuvius_dask.loaders.reader",
    "vesuvius_dask.shm": "vesuvius_dask.loaders.batch_buffers",
    "vesuvius_dask.stream": "vesuvius_dask.loaders.stream",
    "vesuvius_dask.throughput": "vesuvius_dask.loaders.throughput",
    "vesuvius_dask.outputs": "vesuvius_dask.writers.outputs",
    "vesuvius_dask.convert": "vesuvius_dask.writers.convert",
    "vesuvius_dask.inference": "vesuvius_dask.writers.predict",
    "vesuvius_dask.testserver": "vesuvius_dask.testing.server",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names and hands out the new modules."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: Any) -> Any:
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old name will go in a later "
                      "release", DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: Any) -> None:
        """Nothing to run: the module was imported under its new name."""


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once); it answers only the old names."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())  # before the path finders: one module per name
