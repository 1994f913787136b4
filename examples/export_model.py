r"""Export the tiny ink model of train_ink.py to TorchScript, for `vesuvius-dask predict`.

    make segment                                   # example_zarr/segment (synthetic)
    python examples/train_ink.py --segment example_zarr/segment --save inknet.pth
    python examples/export_model.py inknet.pth inknet.pt
    vesuvius-dask predict inknet.pt example_zarr/segment prediction.zarr --block 8,32,32 \\
        --overlap 0,8,8 --mask --png prediction.png

`predict` feeds the model (B, 1, z, y, x) float32 blocks with integer volumes scaled
to [0, 1]; InkNet was trained on (value - 32768) / 16384, so the exported wrapper
converts back before calling it, and applies a sigmoid so the output is an ink
probability per pixel, (B, y, x).
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("weights", nargs="?", default=None,
                        help="state_dict saved by train_ink.py --save (default: untrained weights)")
    parser.add_argument("out", nargs="?", default="inknet.pt", help="TorchScript file to write")
    args = parser.parse_args()
    weights, out = args.weights, args.out
    if Path(out).exists() and weights and Path(out).resolve() == Path(weights).resolve():
        parser.error(f"{out} is the weights file; choose another output")
    net = InkNet()
    if weights:
        try:
            net.load_state_dict(torch.load(weights, map_location="cpu"))
        except (OSError, RuntimeError) as err:
            parser.error(f"{weights}: cannot load the weights ({err})".splitlines()[0])
    scripted = torch.jit.script(InkProbability(net).eval())
    scripted.save(out)
    print(f"saved TorchScript model to {out}")


if __name__ == "__main__":
    main()
