"""Which blocks an epoch reads (torch-free).

Samplers (the objects the stream takes), start grids, permutations, epoch plans,
rank and worker splits.
"""

from .planned import PlannedSampler
from .quotas import QuotaSampler
from .samplers import (
    BalancedSampler,
    GridSampler,
    LocalitySampler,
    ProportionalSampler,
    RandomSampler,
    Sampler,
    UniformSampler,
)

# the names of the former module vesuvius_dask.sampling
from .starts import (
    SAMPLING_METHODS,
    BalancedEpochPlan,
    EpochPlan,
    FeistelPermutation,
    LocalityPermutation,
    MaskedStartGrid,
    RankSlice,
    StartGrid,
    Tiling,
    footprint_valid,
)
from .weights import WeightMapSampler

__all__ = [
    "Sampler",
    "RandomSampler",
    "UniformSampler",
    "ProportionalSampler",
    "LocalitySampler",
    "BalancedSampler",
    "GridSampler",
    "PlannedSampler",
    "QuotaSampler",
    "WeightMapSampler",
    "StartGrid",
    "Tiling",
    "MaskedStartGrid",
    "footprint_valid",
    "FeistelPermutation",
    "LocalityPermutation",
    "EpochPlan",
    "BalancedEpochPlan",
    "RankSlice",
    "SAMPLING_METHODS",
]
