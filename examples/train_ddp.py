r"""Train on several ranks with DistributedDataParallel: each rank streams its own share of every epoch.

Run with torchrun (CPU and the gloo backend work here; use nccl on GPUs)::

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29511 \\
        examples/train_ddp.py --data example_zarr/example.zarr

``DaskVesuviusStream`` takes its rank and world size from the initialised process
group: sample ``i`` of each epoch goes to rank ``i % world_size``, padded (as
``DistributedSampler`` does) so that every rank runs the same number of steps, which
DDP needs. ``set_epoch`` before each epoch gives every rank the same new plan.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from vesuvius_dask import DaskVesuviusStream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]).replace("\\\\", "\\"))
    parser.add_argument("--data", nargs="+", default=["example_zarr/example.zarr"])
    parser.add_argument("--block", default="4,32,32", help="Z,Y,X block size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=512, help="blocks per epoch, all ranks together")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPUs)")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("run me with torchrun (see --help)")
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    z, y, x = (int(v) for v in args.block.split(","))
    stream = DaskVesuviusStream(args.data, z, y, x, samples_per_epoch=args.samples,
                                batch_size=args.batch_size, seed=0, dtype=torch.float32)
    loader = DataLoader(stream, batch_size=None, num_workers=args.num_workers,
                        persistent_workers=args.num_workers > 0)
    model = DistributedDataParallel(nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(),
                                                  nn.Conv3d(4, 1, 3, padding=1)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(args.epochs):
        stream.set_epoch(epoch)
        steps, blocks, total = 0, 0, 0.0
        for batch in loader:
            batch = (batch - 32768.0) / 16384.0
            noisy = batch + 0.1 * torch.randn_like(batch)
            loss = nn.functional.mse_loss(model(noisy.unsqueeze(1)).squeeze(1), batch)
            opt.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks here
            opt.step()
            steps, blocks, total = steps + 1, blocks + batch.shape[0], total + loss.item()
        counts = torch.tensor([steps, blocks])
        every = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(every, counts)
        if rank == 0:
            per_rank = ", ".join(f"rank {r}: {int(c[0])} steps, {int(c[1])} blocks"
                                 for r, c in enumerate(every))
            print(f"epoch {epoch}: {per_rank}; rank 0 mean loss {total / max(steps, 1):.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
