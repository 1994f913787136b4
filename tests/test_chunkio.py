"""The fast chunk read path gives exactly what zarr gives, or steps aside."""

import numcodecs
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vesuvius_dask.io.chunks import fast_reader
from vesuvius_dask.io.volume import read_stored

DTYPES = ["u1", "u2", "<u2", ">u2", "i2", ">i4", "f4", ">f8", "u8"]


@st.composite
def arrays(draw, tmp):
    fmt = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(1, n)) for n in (7, 19, 23))
    chunks = tuple(draw(st.integers(1, s)) for s in shape)
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    fill = draw(st.sampled_from([0, 3]))
    kw = dict(shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, zarr_format=fmt)
    if fmt == 2:
        comp = draw(st.sampled_from([None, numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE),
                                     numcodecs.Zstd(3), numcodecs.GZip(1), numcodecs.LZ4(),
                                     numcodecs.Zlib(1), numcodecs.BZ2(1), numcodecs.LZMA(preset=0)]))
        delta = [numcodecs.Delta(dtype=dtype.str)]
        # a filter that changes the stored size: the bounded decode must know the compressor's output
        scale = [numcodecs.FixedScaleOffset(0, 1, dtype=dtype.str, astype="u1")]
        filters = draw(st.sampled_from([None, delta] if dtype.kind != "f" else [None, scale]))
        kw.update(compressors=comp, filters=filters, order=draw(st.sampled_from(["C", "F"])))
    else:
        choice = draw(st.sampled_from(["none", "blosc", "zstd", "gzip", "shard", "crc"]))
        codec = {"blosc": zarr.codecs.BloscCodec(cname="lz4", shuffle="bitshuffle"),
                 "zstd": zarr.codecs.ZstdCodec(level=1), "gzip": zarr.codecs.GzipCodec(level=1),
                 "crc": zarr.codecs.Crc32cCodec()}.get(choice)
        kw.update(compressors=codec)
        if choice == "shard":
            kw.update(shards=tuple(c * 2 for c in chunks))
    arr = zarr.create_array(tmp / "a.zarr", overwrite=True, **kw)
    data = np.random.default_rng(draw(st.integers(0, 999))).integers(0, 120, shape).astype(dtype)
    arr[:] = data
    missing = draw(st.integers(0, 3))  # delete some chunk files: they read as the fill value
    files = sorted(p for p in (tmp / "a.zarr").rglob("*")
                   if p.is_file() and not p.name.startswith((".z", "zarr")))
    for p in files[:missing]:
        p.unlink()
    return zarr.open_array(tmp / "a.zarr", mode="r")


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fast_path_equals_zarr_for_every_chunk(tmp_path, data):
    arr = data.draw(arrays(tmp_path))
    read = fast_reader(arr)
    sharded = getattr(arr, "shards", None) is not None
    assert (read is None) == sharded  # crc32c is checked here; shards are read by io.shards
    for idx in np.ndindex(*[-(-s // c) for s, c in zip(arr.shape, arr.chunks)]):
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, arr.chunks, arr.shape))
        expected = arr[region]
        got = read_stored(arr, region, "a")  # fast when it can, zarr otherwise
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
        if read is not None:
            np.testing.assert_array_equal(read(region), expected)


def test_every_known_compressor_decodes_through_a_bounded_step(tmp_path):
    from vesuvius_dask.io.chunks import ChunkCodec

    for comp in (numcodecs.Blosc(), numcodecs.Zstd(), numcodecs.GZip(), numcodecs.Zlib(), numcodecs.LZ4(),
                 numcodecs.BZ2(), numcodecs.LZMA()):
        arr = zarr.create_array(tmp_path / "b.zarr", shape=(4, 4, 4), chunks=(2, 2, 2), dtype="u2",
                                zarr_format=2, compressors=comp, overwrite=True)
        codec = ChunkCodec.of(arr)
        assert codec._steps[0] != comp.decode and codec.nbytes == 16, comp
    v3 = zarr.create_array(tmp_path / "c.zarr", shape=(4, 4, 4), chunks=(2, 2, 2), dtype="u2",
                           compressors=[zarr.codecs.ZstdCodec(), zarr.codecs.GzipCodec()])
    assert fast_reader(v3) is None  # two compressors in a row: only the last one's size is known


def test_zstd_frame_content_size():
    import struct

    from vesuvius_dask.io.chunks import _zstd_content_size

    for n in (0, 1, 255, 256, 300, 65535 + 256, 70000):  # every size field: 1, 2 (+256), 4 bytes
        assert _zstd_content_size(numcodecs.zstd.compress(bytes(n), 1)) == n
    magic = struct.pack("<I", 0xFD2FB528)
    assert _zstd_content_size(magic + bytes([3 << 6, 0x38]) + struct.pack("<Q", 2**40)) == 2**40
    assert _zstd_content_size(magic + bytes([0, 0x38])) is None  # streamed: no declared size
    assert _zstd_content_size(b"not zstd") is None
