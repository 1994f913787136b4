"""Regenerate ``example_zarr/example.zarr``: a small synthetic papyrus volume.

The bundled example is synthetic (curved fibrous sheets in noise), not scroll data.
Usage: python examples/make_example.py [OUT] (default example_zarr/example.zarr)
"""

import shutil
import sys

import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from vesuvius_dask.testing import synthetic_ink, synthetic_papyrus

out = sys.argv[1] if len(sys.argv) > 1 else "example_zarr/example.zarr"
shape = (16, 512, 512)
ink = synthetic_ink(shape[1:], seed=1)
vol = synthetic_papyrus(shape, seed=0, ink=ink)
shutil.rmtree(out, ignore_errors=True)
arr = zarr.create_array(
    out, shape=shape, chunks=(4, 128, 128), dtype=vol.dtype, zarr_format=3,
    compressors=BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),
)
arr[:] = vol
arr.attrs["description"] = "synthetic papyrus-like volume made by examples/make_example.py"
print(f"wrote {out}: shape {shape}, dtype {vol.dtype}, chunks {arr.chunks}")
