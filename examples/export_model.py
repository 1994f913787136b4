r"""Export the tiny ink model of train_ink.py to TorchScript, for `vesuvius-dask predict`.

    python examples/train_ink.py --save inknet.pth
    python examples/export_model.py inknet.pth inknet.pt
    vesuvius-dask predict inknet.pt SEGMENT_FOLDER prediction.zarr --block 8,32,32 \\
        --overlap 0,8,8 --mask --png prediction.png

`predict` feeds the model (B, 1, z, y, x) float32 blocks with integer volumes scaled
to [0, 1]; InkNet was trained on (value - 32768) / 16384, so the exported wrapper
converts back before calling it, and applies a sigmoid so the output is an ink
probability per pixel, (B, y, x).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_ink import InkNet  # noqa: E402


class InkProbability(torch.nn.Module):
    """[0, 1]-scaled uint16 blocks in, ink probability per pixel out."""

    def __init__(self, net: InkNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = x[:, 0] * 65535.0
        return torch.sigmoid(self.net((raw - 32768.0) / 16384.0))


def main() -> None:
    weights = sys.argv[1] if len(sys.argv) > 1 else None
    out = sys.argv[2] if len(sys.argv) > 2 else "inknet.pt"
    net = InkNet()
    if weights:
        net.load_state_dict(torch.load(weights, map_location="cpu"))
    scripted = torch.jit.script(InkProbability(net).eval())
    scripted.save(out)
    print(f"saved TorchScript model to {out}")


if __name__ == "__main__":
    main()
