"""Train ink detection in the scroll's own space (native 3D) and score it on validation patches.

What it teaches:

* a segment is a tifxyz surface, its label Zarrs (ink labels, supervision mask,
  optionally a validation mask) and the scroll volume it lives in:
  ``SurfaceSegment(surface, scroll, inklabels, supervision, validation)``;
* ``SurfaceSampler`` finds patches on the flat label grid, crops a block of the scroll
  centred where the sheet passes, and projects the 2-D labels into it along the
  normals: items are ``(image, {"inklabels", "supervision"})``, all of the block's
  shape. The loss uses only ``supervision`` voxels;
* validation: patches touching the validation mask are never trained on; the model is
  scored on them (``split="validation"``), voxel by voxel on supervision, against
  the all-background (F1 0) and all-ink baselines, as ``train_ink.py`` does.

Everything is synthetic and written to a temporary folder: a scroll (a Zarr, chunks
16³) with two wavy sheets painted in, denser where there is ink, and their tifxyz
surfaces and label Zarrs (vesuvius_dask.testing). Runs in well under a minute on CPU.

Usage::

    python examples/train_native3d.py [--steps 60] [--batch-size 8] [--num-workers 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream
from vesuvius_dask.sampling.surface_patches import SurfaceSampler, SurfaceSegment
from vesuvius_dask.surfaces.project import project_labels
from vesuvius_dask.surfaces.tifxyz import open_surface
from vesuvius_dask.testing.data import synthetic_ink, synthetic_sheet, write_label_zarr, write_tifxyz

VOLUME = (48, 112, 120)
GRID, SCALE = (20, 24), (0.25, 0.25)
POS_WEIGHT = torch.tensor(4.0)


def make_scroll(root: Path) -> list[SurfaceSegment]:
    """Two sheets with ink in a noisy scroll; the right third of the first is held out."""
    import zarr

    rng = np.random.default_rng(0)
    sheet = np.zeros(VOLUME, np.uint8)
    ink_vox = np.zeros(VOLUME, np.uint8)
    segments = []
    for k, dz in enumerate((0.0, 9.0)):
        g = synthetic_sheet(GRID, SCALE, VOLUME, seed=k)
        folder = write_tifxyz(root / f"segment{k}", g["x"], g["y"], g["z"] + dz, SCALE)
        surface = open_surface(folder)
        h, w = surface.shape
        ink = np.max([synthetic_ink((h, w), seed=10 * k + s) for s in range(6)], axis=0)  # a few strokes
        sup = np.ones((h, w), np.uint8)
        val = np.zeros((h, w), np.uint8)
        if k == 0:
            val[:, 2 * w // 3:] = 1
        paths = {}
        for name, plane in (("inklabels", ink * 255), ("supervision_mask", sup * 255),
                            ("validation_mask", val * 255)):
            paths[name] = folder / f"segment{k}_{name}.zarr"
            write_label_zarr(paths[name], plane)
        pts, nrm, ok = surface.sample(np.arange(h)[:, None], np.arange(w)[None, :])
        project_labels(pts[ok], nrm[ok], ink[ok] > 0, 1.5, (0, 0, 0), ink_vox, sheet)  # paint the sheet
        segments.append((folder, paths))
    volume = rng.normal(60, 18, VOLUME) + 90 * sheet + 60 * ink_vox
    scroll = root / "scroll.zarr"
    zarr.create_array(scroll, data=np.clip(volume, 0, 255).astype(np.uint8), chunks=(16, 16, 16))
    return [SurfaceSegment(folder, scroll, p["inklabels"], p["supervision_mask"], p["validation_mask"])
            for folder, p in segments]


class InkNet3d(nn.Module):
    """A few 3-D convolutions: one ink logit per voxel."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.unsqueeze(1)).squeeze(1)


def prepare(image: torch.Tensor) -> torch.Tensor:
    return (image.float() - 100.0) / 60.0


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float((pred & truth).sum())
    return 2 * tp / max(1.0, float(pred.sum() + truth.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    block = (12, 24, 24)
    with tempfile.TemporaryDirectory() as tmp:
        segments = make_scroll(Path(tmp))
        train = DaskVesuviusStream(segments, block=block, batch_size=args.batch_size, sampler=SurfaceSampler(
            level=0, half_thickness=2.0, overlap=0.5, min_labeled_coverage=0.5, translate=(3, 4, 4),
            seed=args.seed))
        valid = DaskVesuviusStream(segments, block=block, batch_size=args.batch_size, sampler=SurfaceSampler(
            level=0, half_thickness=2.0, overlap=1.0, split="validation", shuffle=False, seed=args.seed))
        print(f"{len(train.surface.patches)} training patches, {len(valid.surface.patches)} validation "
              f"patches, in {len(segments)} segments")
        model = InkNet3d()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        loader = DataLoader(train, batch_size=None, num_workers=args.num_workers,
                            persistent_workers=args.num_workers > 0)
        step, seen, t0, epoch = 0, 0, time.perf_counter(), 0
        while step < args.steps:
            train.set_epoch(epoch)
            for image, targets in loader:
                sup = targets["supervision"].float()
                logits = model(prepare(image))
                loss = (nn.functional.binary_cross_entropy_with_logits(  # ink is rare: weigh it up
                    logits, targets["inklabels"].float(), reduction="none", pos_weight=POS_WEIGHT)
                        * sup).sum() / sup.sum().clamp(min=1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step, seen = step + 1, seen + image.shape[0]
                if step >= args.steps:
                    break
            epoch += 1
        print(f"trained on {seen} blocks in {step} steps ({seen / (time.perf_counter() - t0):.0f} blocks/s), "
              f"last loss {loss.item():.3f}")
        preds, truth = [], []
        with torch.no_grad():
            for image, targets in valid:
                on = targets["supervision"].numpy() > 0
                preds.append((model(prepare(image)).numpy() > 0)[on])
                truth.append(targets["inklabels"].numpy()[on] > 0)
        pred, gt = np.concatenate(preds), np.concatenate(truth)
        share = gt.mean()
        print(f"validation voxels {gt.size}, ink share {share:.2f}: ink F1 {f1(pred, gt):.3f} "
              f"(all-background 0.000, all-ink {2 * share / (1 + share):.3f})")


if __name__ == "__main__":
    main()
