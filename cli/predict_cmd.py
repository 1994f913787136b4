"""``vesuvius-dask predict``: argument parsing for whole-segment inference."""

from __future__ import annotations

import argparse

from .options import add_cache_dir, add_volume, non_negative, positive, positive_triple, triple


def run(args: argparse.Namespace) -> int:
    from vesuvius_dask.extras import require

    require("torch", "torch")
    from vesuvius_dask.errors import ArgumentError
    from vesuvius_dask.writers.predict import part_path, predict, predict_join

    if args.join or args.part is not None:
        if args.parts is None:
            raise ArgumentError(f"--{'join' if args.join else 'part'} needs --parts N")
        if args.join and args.part is not None:
            raise ArgumentError("give --part K (to run a part) or --join (to publish the parts), not both")
    elif args.parts is not None:
        raise ArgumentError("--parts N needs --part K (0..N-1) or --join")
    if args.join:
        out = predict_join(args.out, args.parts, png=args.png, overwrite=args.overwrite,
                           model=args.model, source=args.source)
        print(f"joined {args.parts} parts into {args.out}: shape {tuple(out.shape)} {out.dtype}"
              + (f", {args.png}" if args.png else ""))
        return 0
    part = None if args.part is None else (args.part, args.parts)
    out = predict(
        args.model, args.source, args.out, block=args.block, overlap=args.overlap,
        batch_size=args.batch_size, masks=args.mask, blend=args.blend, png=args.png,
        overwrite=args.overwrite, resume=args.resume, num_workers=args.num_workers,
        client=args.scheduler, quiet=args.quiet, cache_dir=args.cache_dir,
        normalization=args.normalization, part=part, chunks=args.chunks, exact=args.exact,
    )
    if part is not None:
        print(f"wrote part {args.part} of {args.parts} of {args.out} into {part_path(args.out, *part)}; "
              f"publish with --parts {args.parts} --join once every part is done")
        return 0
    print(f"wrote {args.out}: shape {tuple(out.shape)} {out.dtype}"
          + (f", {args.png}" if args.png else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="run a TorchScript model over a segment or volume",
        description="Run a TorchScript model over every block of a regular grid (with overlap) "
                    "and blend the predictions into a Zarr array (and a PNG for 2-D outputs). "
                    "The model gets (B, 1, z, y, x) float32 blocks, integer volumes scaled to "
                    "[0, 1]; it returns (B, y, x) for a 2-D map or (B, z, y, x) for a volume. "
                    "The output appears only once complete and may never be, contain or lie "
                    "inside an input; a killed run continues from its last checkpoint with --resume "
                    "(Ctrl-C or SIGTERM after a checkpoint keep it too). A model file is code: "
                    "loading it runs whatever it holds, so use only model files you trust.")
    p.add_argument("model", help="TorchScript model file (torch.jit.save) or torch.export .pt2; "
                                 "it is code: use only files you trust (a torch.save .pth "
                                 "checkpoint must be exported first)")
    p.add_argument("source", help="segment folder, Zarr volume, OME-Zarr group or TIFF stack")
    p.add_argument("out", help="output .zarr path")
    p.add_argument("--block", type=positive_triple, default=None,
                   help="Z,Y,X (default 16,64,64, clipped to the volume)")
    p.add_argument("--overlap", type=triple, default=None,
                   help="Z,Y,X (default: 0 and a quarter of the block in y and x, e.g. 0,16,16)")
    p.add_argument("--batch-size", type=positive, default=32)
    p.add_argument("--mask", nargs="?", const="segment", default=None,
                   help="predict only where the mask is: a mask image path, or no value for "
                        "the segment's mask.png")
    p.add_argument("--blend", choices=("hann", "mean"), default="hann")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-exact: weight a full grid's blocks up front, about a fifth faster for "
                        "3-D outputs and equal to the exact output up to float32 rounding (a few "
                        "units in the last place); every part of a job must use the same")
    p.add_argument("--png", default=None, help="also write a 2-D output as PNG")
    p.add_argument("--num-workers", type=non_negative, default=0, help="DataLoader workers")
    p.add_argument("--scheduler", default=None, help="dask.distributed scheduler address")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (once the new one is complete)")
    p.add_argument("--resume", action="store_true", help="continue a killed run")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.add_argument("--normalization", default=None,
                   choices=("none", "instance_zscore", "global_zscore", "instance_minmax",
                            "percentile_minmax", "ct"),
                   help="how blocks are scaled for the model (default: the model file's metadata, "
                        "else integer volumes scaled to [0, 1])")
    p.add_argument("--chunks", type=positive_triple, default=None,
                   help="output chunks Z,Y,X (a 2-D output uses Y,X); parts split the output by them")
    p.add_argument("--parts", type=positive, default=None,
                   help="split the job into N parts (with --part K, or --join)")
    p.add_argument("--part", type=non_negative, default=None,
                   help="run part K (0..N-1) of --parts N, e.g. one task of a job array")
    p.add_argument("--join", action="store_true",
                   help="check that every part of --parts N is complete and publish OUT")
    add_cache_dir(p)
    add_volume(p)
    p.set_defaults(func=run)
