"""vesuvius-dask: Herculaneum scroll volumes as lazy dask arrays, streamed into PyTorch.

``import vesuvius_dask`` is light: it registers the settings table
(:mod:`vesuvius_dask.config`, which loads dask's config and yaml); numpy, dask.array
and zarr load on first use of :func:`open_volume` and friends, and torch, napari or
dask.distributed never load with it. ``DaskVesuviusStream`` (which
needs torch) is loaded on first access, as are the torch-free samplers
(``UniformSampler``, ``GridSampler``, ...) and ``ReadOptions`` it takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import config  # noqa: F401 - registers the settings table with dask's config
from . import moved as _moved
from ._version import __version__
from .errors import (
    ArgumentError,
    CacheDirError,
    ChunkFetchError,
    ConversionError,
    CorruptChunkError,
    Interrupted,
    InvalidTypeError,
    MissingExtraError,
    ModelError,
    OutputError,
    OutputExistsError,
    ResumeError,
    SamplingError,
    VesuviusDaskError,
    VolumeError,
    VolumeNotFoundError,
)

_moved.install()  # the old module paths (vesuvius_dask.stream, ...) keep working

if TYPE_CHECKING:  # pragma: no cover
    from .io.catalog import Catalog, load_catalog
    from .io.context import Context
    from .io.open import open_volume
    from .io.segments import Segment
    from .loaders.augment import BatchAugment
    from .loaders.device import DevicePrefetcher
    from .loaders.options import ReadOptions
    from .loaders.prefetch import PrefetchPlan, predict_stream, prefetch
    from .loaders.stream import DaskVesuviusStream
    from .sampling.quotas import QuotaSampler
    from .sampling.samplers import (
        BalancedSampler,
        GridSampler,
        LocalitySampler,
        ProportionalSampler,
        Sampler,
        UniformSampler,
    )
    from .sampling.surface_patches import SurfaceSampler, SurfaceSegment
    from .sampling.weights import WeightMapSampler
    from .surfaces.render import render_segment, render_surface
    from .surfaces.segment import open_segment
    from .surfaces.tifxyz import Surface, open_surface
    from .writers.convert import convert_tiffs, convert_zarr
    from .writers.predict import PredictionWriter, model_metadata, predict, predict_join

__all__ = [
    "__version__",
    "open_volume",
    "DaskVesuviusStream",
    "Sampler",
    "UniformSampler",
    "ProportionalSampler",
    "LocalitySampler",
    "BalancedSampler",
    "GridSampler",
    "SurfaceSampler",
    "QuotaSampler",
    "WeightMapSampler",
    "SurfaceSegment",
    "ReadOptions",
    "convert_tiffs",
    "convert_zarr",
    "open_segment",
    "Segment",
    "open_surface",
    "Surface",
    "render_surface",
    "render_segment",
    "load_catalog",
    "Catalog",
    "PredictionWriter",
    "predict",
    "predict_join",
    "model_metadata",
    "DevicePrefetcher",
    "BatchAugment",
    "Context",
    "prefetch",
    "PrefetchPlan",
    "predict_stream",
    "VesuviusDaskError",
    "VolumeError",
    "VolumeNotFoundError",
    "SamplingError",
    "InvalidTypeError",
    "ConversionError",
    "CorruptChunkError",
    "ChunkFetchError",
    "ArgumentError",
    "CacheDirError",
    "ModelError",
    "OutputError",
    "OutputExistsError",
    "ResumeError",
    "MissingExtraError",
    "Interrupted",
]

_LAZY = {
    "open_volume": ("io.open", "open_volume"),
    "DaskVesuviusStream": ("loaders.stream", "DaskVesuviusStream"),
    "Sampler": ("sampling.samplers", "Sampler"),
    "UniformSampler": ("sampling.samplers", "UniformSampler"),
    "ProportionalSampler": ("sampling.samplers", "ProportionalSampler"),
    "LocalitySampler": ("sampling.samplers", "LocalitySampler"),
    "BalancedSampler": ("sampling.samplers", "BalancedSampler"),
    "GridSampler": ("sampling.samplers", "GridSampler"),
    "SurfaceSampler": ("sampling.surface_patches", "SurfaceSampler"),
    "QuotaSampler": ("sampling.quotas", "QuotaSampler"),
    "WeightMapSampler": ("sampling.weights", "WeightMapSampler"),
    "SurfaceSegment": ("sampling.surface_patches", "SurfaceSegment"),
    "ReadOptions": ("loaders.options", "ReadOptions"),
    "convert_tiffs": ("writers.convert", "convert_tiffs"),
    "convert_zarr": ("writers.convert", "convert_zarr"),
    "open_segment": ("surfaces.segment", "open_segment"),  # io's, plus volume= (renders)
    "PredictionWriter": ("writers.predict", "PredictionWriter"),
    "predict": ("writers.predict", "predict"),
    "predict_join": ("writers.predict", "predict_join"),
    "model_metadata": ("writers.predict", "model_metadata"),
    "DevicePrefetcher": ("loaders.device", "DevicePrefetcher"),
    "BatchAugment": ("loaders.augment", "BatchAugment"),
    "Context": ("io.context", "Context"),
    "prefetch": ("loaders.prefetch", "prefetch"),
    "PrefetchPlan": ("loaders.prefetch", "PrefetchPlan"),
    "predict_stream": ("loaders.prefetch", "predict_stream"),
    "Segment": ("io.segments", "Segment"),
    "open_surface": ("surfaces.tifxyz", "open_surface"),
    "Surface": ("surfaces.tifxyz", "Surface"),
    "render_surface": ("surfaces.render", "render_surface"),
    "render_segment": ("surfaces.render", "render_segment"),
    "load_catalog": ("io.catalog", "load_catalog"),
    "Catalog": ("io.catalog", "Catalog"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        try:
            value = getattr(importlib.import_module(f".{module}", __name__), attr)
        except ModuleNotFoundError as err:
            if err.name != "torch":
                raise
            from .errors import MissingExtraError
            from .extras import missing

            raise MissingExtraError(missing("torch", name)) from err
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vesuvius_dask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
