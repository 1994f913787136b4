"""Which blocks an epoch reads (torch-free).

Start grids, permutations, epoch plans, rank and worker splits.
"""

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

__all__ = [
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
