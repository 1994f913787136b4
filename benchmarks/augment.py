"""Augmentation cost per batch: BatchAugment on 8x1x80x128x128 float32 batches (CPU; GPU when present).

Each op alone and the full recipe (flips, quarter turns, depth shift with fill, layer
cut-out, intensity jitter), with 3-D ink and supervision targets (uint8) as the stream
gives them. The baseline is a plain copy of the batch (``image.clone()``), measured in
the same run. kornia and MONAI are not installed here: nothing is measured against them.

Usage: python benchmarks/augment.py [--reps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import torch

from vesuvius_dask.loaders.augment import BatchAugment

SHAPE = (8, 1, 80, 128, 128)
RECIPES = {
    "copy (baseline)": None,
    "flips y, x": dict(flip_axes="yx", rotate90=False),
    "quarter turns": dict(p_flip=0.0, rotate90=True),
    "depth shift ±8 (fill)": dict(p_flip=0.0, rotate90=False, depth_shift=8),
    "depth crop 80 of 96": dict(p_flip=0.0, rotate90=False, depth_crop=80),
    "layer cut-out ≤8": dict(p_flip=0.0, rotate90=False, cutout_layers=8, p_cutout=1.0),
    "intensity jitter": dict(p_flip=0.0, rotate90=False, intensity=(0.1, 0.1)),
    "full recipe": dict(flip_axes="yx", depth_shift=8, cutout_layers=8, intensity=(0.1, 0.1)),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(device: str, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(SHAPE, generator=g).to(device)
    deep = torch.rand(SHAPE[:2] + (96,) + SHAPE[3:], generator=g).to(device)
    targets = {"ink": (image[:, 0] > 0.5).to(torch.uint8), "supervision": (image[:, 0] > 0.1).to(torch.uint8)}
    deep_targets = {k: torch.cat([v, v[:, :16]], dim=1) for k, v in targets.items()}
    print(f"device {device}, batch {tuple(SHAPE)} float32 + 2 uint8 3-D targets, median of {reps}")
    for name, kwargs in RECIPES.items():
        if kwargs is None:
            def step() -> None:
                image.clone()
        else:
            aug = BatchAugment(**kwargs, seed=0)
            x, t = (deep, deep_targets) if "depth_crop" in kwargs else (image, targets)

            def step(aug=aug, x=x, t=t) -> None:
                aug(x, t)
        step()  # warm-up
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        print(f"  {name:24s} {1000 * median(times):8.1f} ms/batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default=None, help="default: cpu, and cuda when available")
    args = parser.parse_args()
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for device in devices:
        run(device, args.reps)


if __name__ == "__main__":
    main()
