"""Write the synthetic example data: a papyrus-like Zarr volume, or a segment folder.

The bundled examples are synthetic (curved fibrous sheets in noise, ink strokes that
make the top sheet denser), not scroll data. The script never deletes a path it
did not make: an existing output is replaced only if this script wrote it.

Usage::

    python examples/make_example.py [OUT]               # default example_zarr/example.zarr
    python examples/make_example.py --segment [OUT]     # default example_zarr/segment
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

#: What marks a path as made by this script (zarr attribute, or a file in a segment).
MARK = "made by examples/make_example.py"
SEGMENT_MARK = "SYNTHETIC.txt"


def _ours(path: Path) -> bool:
    if (path / SEGMENT_MARK).is_file():
        return True
    try:
        import zarr

        return MARK in str(zarr.open(path, mode="r").attrs.get("description", ""))
    except Exception:
        return False


def write_volume(out: Path) -> str:
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    from vesuvius_dask.testing import synthetic_ink, synthetic_papyrus

    shape = (16, 512, 512)
    vol = synthetic_papyrus(shape, seed=0, ink=synthetic_ink(shape[1:], seed=1))
    arr = zarr.create_array(
        out, shape=shape, chunks=(4, 128, 128), dtype=vol.dtype, zarr_format=3,
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),
    )
    arr[:] = vol
    arr.attrs["description"] = f"synthetic papyrus-like volume {MARK}"
    return f"wrote {out}: shape {shape}, dtype {vol.dtype}, chunks {arr.chunks}"


def write_synthetic_segment(out: Path) -> str:
    from vesuvius_dask.testing import write_segment

    parts = write_segment(out, (16, 384, 384), seed=0)
    (out / SEGMENT_MARK).write_text(f"A synthetic segment folder {MARK}: surface_volume/, mask.png, "
                                    "inklabels.png. Not scroll data.\n")
    ink = parts["labels"][parts["mask"] > 0].mean()
    return (f"wrote {out}: surface_volume/ 16 layers of 384x384 uint16, mask.png, inklabels.png "
            f"(ink {100 * ink:.1f}% of the papyrus)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("out", nargs="?", default=None, help="output path")
    parser.add_argument("--segment", action="store_true", help="write a segment folder instead")
    args = parser.parse_args()
    out = Path(args.out or ("example_zarr/segment" if args.segment else "example_zarr/example.zarr"))
    if out.exists() or out.is_symlink():
        if not _ours(out):
            parser.error(f"{out} exists and was not made by this script; choose another path")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(write_synthetic_segment(out) if args.segment else write_volume(out))


if __name__ == "__main__":
    main()
