"""Train a tiny 3D CNN on random blocks streamed from Zarr volumes.

The task is self-supervised denoising (the model learns to undo added noise), so it
runs on any volume with no labels. Blocks come from ``DaskVesuviusStream`` through a
``DataLoader(num_workers=2)``; the script prints the loss and the throughput.

Usage::

    python examples/train.py --data example_zarr/example.zarr [--steps 40]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream


def normalise(block: torch.Tensor) -> torch.Tensor:
    """uint16 CT values (as float32) to roughly [-2, 2]."""
    return block.sub_(32768.0).div_(16384.0)  # in place: the batch stays in shared memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["example_zarr/example.zarr"])
    parser.add_argument("--block", default="4,64,64", help="Z,Y,X block size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    z, y, x = (int(v) for v in args.block.split(","))

    torch.manual_seed(args.seed)
    stream = DaskVesuviusStream(
        args.data, z, y, x, samples_per_epoch=args.steps * args.batch_size,
        batch_size=args.batch_size, seed=args.seed, dtype=torch.float32,
        transform=normalise,
    )
    # persistent workers keep their decoded-chunk caches from epoch to epoch;
    # set_epoch below reaches them all the same
    loader = DataLoader(stream, batch_size=None, num_workers=args.num_workers,
                        persistent_workers=args.num_workers > 0)
    model = nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv3d(8, 1, 3, padding=1),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    print(stream)
    for epoch in range(args.epochs):
        stream.set_epoch(epoch)  # a new, reproducible order per epoch
        t0 = time.perf_counter()
        wait = 0.0
        n = 0
        losses = []
        t_wait = time.perf_counter()
        for batch in loader:
            wait += time.perf_counter() - t_wait
            clean = batch.unsqueeze(1)  # (B, 1, z, y, x)
            noisy = clean + 0.3 * torch.randn_like(clean)
            loss = nn.functional.mse_loss(model(noisy), clean)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            n += batch.shape[0]
            t_wait = time.perf_counter()
        dt = time.perf_counter() - t0
        print(
            f"epoch {epoch}: {n} blocks in {dt:.2f} s ({n / dt:,.0f} blocks/s with training, "
            f"loader wait {100 * wait / dt:.0f}% of the time); loss {losses[0]:.4f} -> "
            f"{sum(losses[-5:]) / min(5, len(losses)):.4f}"
        )
    t0 = time.perf_counter()
    stream.set_epoch(args.epochs)
    n = sum(b.shape[0] for b in loader)
    dt = time.perf_counter() - t0
    print(f"streaming only (no training): {n / dt:,.0f} blocks/s through "
          f"DataLoader(num_workers={args.num_workers})")


if __name__ == "__main__":
    main()
