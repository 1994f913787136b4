"""Train a tiny ink-detection model on a segment folder: blocks, ink labels and a mask.

By default it first writes a synthetic segment folder (surface_volume/00.tif ...,
mask.png, inklabels.png) to a temporary directory; pass --segment to use a real one.
Blocks are drawn only where the papyrus mask covers the block footprint, each paired
with its ink-label window, through DataLoader(num_workers=2).

Usage::

    python examples/train_ink.py [--segment PATH] [--steps 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream, open_segment
from vesuvius_dask.testing import write_segment


class InkNet(nn.Module):
    """3-D convolutions over the block, mean over depth, one ink logit per pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(),
            nn.Conv3d(8, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.unsqueeze(1)).mean(dim=2).squeeze(1)  # (B, y, x)


def prepare(block: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint16 CT to ~[-2, 2] float; labels to 0/1 float."""
    return (block.float() - 32768.0) / 16384.0, (label > 0).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segment", default=None, help="segment folder (default: synthetic)")
    parser.add_argument("--block", default="8,32,32", help="Z,Y,X block size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="save the trained weights (state_dict)")
    args = parser.parse_args()
    z, y, x = (int(v) for v in args.block.split(","))
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.segment
        if folder is None:
            folder = f"{tmp}/synthetic_segment"
            write_segment(folder, (16, 384, 384), seed=args.seed)
        segment = open_segment(folder)
        print(segment)
        stream = DaskVesuviusStream(
            [segment], z, y, x, samples_per_epoch=args.steps * args.batch_size,
            batch_size=args.batch_size, seed=args.seed, labels="segment", masks="segment",
            mask_coverage=0.5, transform=prepare,
        )
        print(stream, f"({stream.starts_per_volume[0]:,} starts inside the mask)")
        loader = DataLoader(stream, batch_size=None, num_workers=args.num_workers)
        model = InkNet()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        loss_fn = nn.BCEWithLogitsLoss()
        stream.set_epoch(0)
        t0 = time.perf_counter()
        losses, n = [], 0
        for blocks, labels in loader:
            loss = loss_fn(model(blocks), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            n += blocks.shape[0]
        dt = time.perf_counter() - t0
        # evaluate on another epoch's blocks (a different, reproducible draw)
        stream.set_epoch(1)
        correct = total = 0
        with torch.no_grad():
            for blocks, labels in loader:
                pred = model(blocks) > 0
                correct += (pred == (labels > 0)).sum().item()
                total += labels.numel()
        if args.save:
            torch.save(model.state_dict(), args.save)
            print(f"saved weights to {args.save} (export: examples/export_model.py)")
        k = min(5, len(losses))
        print(f"trained on {n} blocks in {dt:.1f} s ({n / dt:,.0f} blocks/s with training); "
              f"loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f}; "
              f"pixel accuracy on epoch 1 blocks {correct / total:.3f}")


if __name__ == "__main__":
    main()
