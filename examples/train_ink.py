"""Train a tiny ink-detection model on a segment folder and score it on held-out papyrus.

What it teaches:

* a segment folder (surface_volume/ or layers/, mask.png, inklabels.png) streams
  blocks and their ink-label windows, only where the papyrus mask covers the block;
* ink is rare (a few percent of the papyrus), so uniformly drawn blocks are almost
  all blank and a plain loss learns "no ink". By default the stream draws
  label-balanced blocks: exactly half of them hold ink (``positive_fraction=0.5``).
  ``--uniform`` draws uniformly instead and weighs ink pixels by the background/ink
  ratio of the training area, for comparison;
* score on papyrus the model never saw: the right quarter of the segment is held
  out (masked away during training, with a margin of one block), then predicted
  block by block on a grid and compared with the labels. The all-background
  baseline has ink F1 0 and balanced accuracy 0.5 (calling everything ink: F1
  2p/(1+p) for ink share p, balanced accuracy 0.5); plain accuracy is shown next to
  the all-background baseline's, which is high only because ink is rare.

By default it first writes a synthetic segment folder to a temporary directory;
pass --segment to use a real one (or the one `make segment` writes).

Usage::

    python examples/train_ink.py [--segment PATH] [--steps 150] [--save inknet.pth]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
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


def split_masks(mask: np.ndarray, held_out: float, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Training mask (left part) and evaluation mask (right ``held_out`` fraction)."""
    width = mask.shape[1]
    cut = int(round(width * (1 - held_out)))
    train, test = mask.copy(), mask.copy()
    train[:, max(cut - margin, 0):] = 0  # no training footprint reaches the held-out part
    test[:, :cut] = 0
    return train, test


def scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Per-pixel ink F1, balanced accuracy and accuracy (boolean arrays)."""
    tp = float(np.sum(pred & truth))
    fp = float(np.sum(pred & ~truth))
    fn = float(np.sum(~pred & truth))
    tn = float(np.sum(~pred & ~truth))
    f1 = 2 * tp / max(2 * tp + fp + fn, 1.0)
    recall, specificity = tp / max(tp + fn, 1.0), tn / max(tn + fp, 1.0)
    return {"f1": f1, "balanced": (recall + specificity) / 2, "accuracy": (tp + tn) / max(pred.size, 1)}


def evaluate(model: nn.Module, segment, test_mask: np.ndarray, block: tuple[int, int, int]
             ) -> dict[str, dict[str, float]]:
    """Predict the held-out area on a grid and score every held-out papyrus pixel."""
    z, y, x = block
    stream = DaskVesuviusStream([segment], z, y, x, None, sampling_method="grid",
                                overlap=(0, y // 4, x // 4), batch_size=64, return_coords=True,
                                masks=[test_mask], mask_coverage=1e-9)
    logits = np.zeros(test_mask.shape, np.float32)
    counts = np.zeros(test_mask.shape, np.float32)
    with torch.no_grad():
        for blocks, coords in stream:
            out = model((blocks.float() - 32768.0) / 16384.0).numpy()
            for o, (_, _, yy, xx) in zip(out, coords.tolist()):
                logits[yy:yy + y, xx:xx + x] += o
                counts[yy:yy + y, xx:xx + x] += 1
    keep = (test_mask > 0) & (counts > 0)
    truth = np.asarray(segment.labels)[keep] > 0
    pred = (logits[keep] / counts[keep]) > 0
    return {"model": scores(pred, truth), "all-background": scores(np.zeros_like(truth), truth),
            "all-ink": scores(np.ones_like(truth), truth), "ink share": {"f1": float(truth.mean())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--segment", default=None, help="segment folder (default: a synthetic one)")
    parser.add_argument("--block", default="8,32,32", help="Z,Y,X block size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--held-out", type=float, default=0.25,
                        help="right fraction of the segment kept for evaluation")
    parser.add_argument("--positive-fraction", type=float, default=0.5,
                        help="share of blocks that hold ink (label-balanced sampling)")
    parser.add_argument("--positive-coverage", type=float, default=0.2,
                        help="share of a block's footprint that must be ink for it to count as ink")
    parser.add_argument("--uniform", action="store_true",
                        help="uniform blocks and a class-weighted loss instead of balanced blocks")
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
        if segment.mask is None or segment.labels is None:
            parser.error(f"{folder}: the segment needs mask.png and inklabels.png")
        print(segment)
        mask = np.asarray(segment.mask) > 0
        train_mask, test_mask = split_masks(mask, args.held_out, margin=x)
        labels = np.asarray(segment.labels) > 0
        ink = labels[train_mask].mean()
        stream = DaskVesuviusStream(
            [segment], z, y, x, samples_per_epoch=args.steps * args.batch_size,
            batch_size=args.batch_size, seed=args.seed, labels="segment", masks=[train_mask],
            mask_coverage=0.5, transform=prepare,
            positive_fraction=None if args.uniform else args.positive_fraction,
            positive_coverage=args.positive_coverage,
        )
        how = "uniform blocks, class-weighted loss" if args.uniform else \
            f"{100 * args.positive_fraction:.0f}% of blocks hold ink"
        print(stream, f"({stream.starts_per_volume[0]:,} starts in the training area; "
                      f"ink is {100 * ink:.1f}% of its papyrus; {how})")
        loader = DataLoader(stream, batch_size=None, num_workers=args.num_workers,
                            persistent_workers=args.num_workers > 0)
        model = InkNet()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            # ink pixels weigh background/ink, so both classes count equally: the training
            # area's ratio for uniform blocks, the batch's own for balanced ones
            share = ink if args.uniform else float(target.mean().clamp(1e-3, 0.999))
            weight = torch.tensor((1 - share) / max(share, 1e-6))
            return nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
        stream.set_epoch(0)
        t0 = time.perf_counter()
        losses, n = [], 0
        for blocks, target in loader:
            loss = loss_fn(model(blocks), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            n += blocks.shape[0]
        dt = time.perf_counter() - t0
        k = min(5, len(losses))
        print(f"trained on {n} blocks in {dt:.1f} s ({n / dt:,.0f} blocks/s with training); "
              f"loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f}")
        model.eval()
        result = evaluate(model, segment, test_mask, (z, y, x))
        m, b, a = result["model"], result["all-background"], result["all-ink"]
        print(f"held-out papyrus ({100 * args.held_out:.0f}% of the width, "
              f"{100 * result['ink share']['f1']:.1f}% ink): "
              f"ink F1 {m['f1']:.3f} (all-background {b['f1']:.3f}, all-ink {a['f1']:.3f}), "
              f"balanced accuracy {m['balanced']:.3f} (all-background {b['balanced']:.3f}), "
              f"accuracy {m['accuracy']:.3f} (all-background {b['accuracy']:.3f})")
        if args.save:
            torch.save(model.state_dict(), args.save)
            print(f"saved weights to {args.save} (export: examples/export_model.py)")


if __name__ == "__main__":
    main()
