"""Hostile input costs no memory: chunk bombs, metadata declaring millions of chunks, thousands of layers."""

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import tracemalloc
import zlib

import numcodecs
import numpy as np
import pytest
import zarr

from vesuvius_dask import open_volume
from vesuvius_dask import tiff as tiff_mod
from vesuvius_dask.errors import CorruptChunkError, VolumeError
from vesuvius_dask.io.chunks import ChunkCodec, fast_reader
from vesuvius_dask.io.open import resolve_volume
from vesuvius_dask.io.volume import MAX_DASK_CHUNKS, MAX_DASK_CHUNKS_PER_AXIS, read_stored

GIB = 2**30
SHAPE, CHUNKS = (8, 32, 32), (4, 32, 32)  # a chunk holds 8 KB of uint16


def _peak(fn):
    """``(result or exception, peak traced bytes)`` of ``fn()``."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001 - returned to the test
            out = err
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _array(tmp_path, fmt, codec):
    kw = {"compressors": codec} if codec is not None else {"compressors": None}
    arr = zarr.create_array(tmp_path / "a.zarr", shape=SHAPE, chunks=CHUNKS, dtype="u2", zarr_format=fmt,
                            fill_value=0, **kw)
    data = np.random.default_rng(0).integers(0, 1000, SHAPE).astype("u2")
    arr[:] = data
    arr = zarr.open_array(tmp_path / "a.zarr", mode="r")
    key = arr.metadata.encode_chunk_key((1, 0, 0))
    return arr, data, tmp_path / "a.zarr" / key


def _zstd_rle_frame(total, content_size):
    """A real zstd frame of ``total`` bytes of 7s in RLE blocks (4 bytes per 128 KB); RFC 8878."""
    if content_size is None:
        head = bytes([0, (17 - 10) << 3])  # no content size, window 128 KB
    else:
        head = bytes([3 << 6, (17 - 10) << 3]) + struct.pack("<Q", content_size)
    blocks, left = [], total
    while left:
        n = min(left, 1 << 17)
        left -= n
        blocks.append(struct.pack("<I", int(left == 0) | (1 << 1) | (n << 3))[:3] + b"\x07")
    return struct.pack("<I", 0xFD2FB528) + head + b"".join(blocks)


def _gzip_bomb(total, wbits):
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    zeros = bytes(1 << 20)
    return b"".join([c.compress(zeros) for _ in range(total >> 20)] + [c.flush()])


def _blosc_declaring(valid, nbytes):
    return valid[:4] + struct.pack("<I", nbytes) + valid[8:]


_GZ_BOMB = {}


def _bombs():
    """``(id, zarr format, codec, bytes to store, what the error must say)``."""
    v3 = {"blosc": zarr.codecs.BloscCodec(cname="lz4"), "zstd": zarr.codecs.ZstdCodec(level=1),
          "gzip": zarr.codecs.GzipCodec(level=1)}
    return [
        ("v2-blosc-header", 2, numcodecs.Blosc("lz4"), lambda ok: _blosc_declaring(ok, GIB), str(GIB)),
        ("v3-blosc-header", 3, v3["blosc"], lambda ok: _blosc_declaring(ok, GIB), str(GIB)),
        ("v3-zstd-declared", 3, v3["zstd"], lambda ok: _zstd_rle_frame(GIB, GIB), str(GIB)),
        ("v2-zstd-undeclared", 2, numcodecs.Zstd(1), lambda ok: _zstd_rle_frame(GIB, None), "more than 8192"),
        ("v3-gzip", 3, v3["gzip"], lambda ok: _GZ_BOMB.setdefault(31, _gzip_bomb(32 << 20, 31)),
         "more than 8192"),
        ("v2-zlib", 2, numcodecs.Zlib(1), lambda ok: _GZ_BOMB.setdefault(15, _gzip_bomb(32 << 20, 15)),
         "more than 8192"),
        ("v2-lz4-header", 2, numcodecs.LZ4(), lambda ok: struct.pack("<I", GIB - 1) + ok[4:], str(GIB - 1)),
        ("v2-bz2", 2, numcodecs.BZ2(1), lambda ok: numcodecs.BZ2(1).encode(bytes(4 << 20)), "more than"),
        ("v2-lzma", 2, numcodecs.LZMA(preset=0), lambda ok: numcodecs.LZMA(preset=0).encode(bytes(16 << 20)),
         "more than"),
    ]


@pytest.mark.parametrize("case", _bombs(), ids=[b[0] for b in _bombs()])
def test_a_chunk_bomb_is_refused_before_its_size_is_allocated(tmp_path, case):
    name, fmt, codec, craft, says = case
    arr, data, path = _array(tmp_path, fmt, codec)
    region = (slice(4, 8), slice(0, 32), slice(0, 32))
    np.testing.assert_array_equal(read_stored(arr, region, "vol"), data[4:8])  # intact first
    path.write_bytes(craft(path.read_bytes()))
    assert path.stat().st_size < 1 << 20 or "bz2" in name or "lzma" in name  # a small file...
    err, peak = _peak(lambda: read_stored(arr, region, "vol"))
    assert isinstance(err, CorruptChunkError), err
    msg = str(err)
    key = arr.metadata.encode_chunk_key((1, 0, 0))
    assert "\n" not in msg and msg.startswith("vol: chunk (1, 0, 0)")
    assert repr(key) in msg and "a.zarr" in msg and says in msg and "8192 bytes (4x32x32 uint16)" in msg
    assert peak < 2 << 20, peak  # ... declaring or inflating to 4 MB - 1 GiB: refused within 2 MB
    # the chunk next to it is untouched
    np.testing.assert_array_equal(read_stored(arr, (slice(0, 4),) + region[1:], "vol"), data[0:4])


@pytest.mark.parametrize("declared", [8192 - 2, 8192 + 2])
def test_a_chunk_declaring_a_slightly_different_size_is_refused_too(tmp_path, declared):
    arr, _, path = _array(tmp_path, 2, numcodecs.Blosc("zstd"))
    path.write_bytes(_blosc_declaring(path.read_bytes(), declared))
    with pytest.raises(CorruptChunkError, match=f"declares {declared} decoded bytes"):
        fast_reader(arr)((slice(4, 8), slice(0, 32), slice(0, 32)))


def test_a_truncated_or_oversized_stream_is_refused(tmp_path):
    arr, data, path = _array(tmp_path, 2, numcodecs.GZip(1))
    good = path.read_bytes()
    region = (slice(4, 8), slice(0, 32), slice(0, 32))
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptChunkError, match="truncated|inflates to"):
        read_stored(arr, region, "vol")
    path.write_bytes(numcodecs.GZip(1).encode(data[4:8].tobytes()[:-2]))  # two bytes short
    with pytest.raises(CorruptChunkError, match="inflates to 8190 bytes"):
        read_stored(arr, region, "vol")
    path.write_bytes(bytes(10 << 20))  # 10 MB of junk for an 8 KB chunk: not even decompressed
    with pytest.raises(CorruptChunkError, match="more than any compressed chunk"):
        read_stored(arr, region, "vol")


@pytest.mark.parametrize("codec", [
    numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE),
    numcodecs.Blosc("zstd", 1, numcodecs.Blosc.NOSHUFFLE),
    numcodecs.Zstd(3), numcodecs.GZip(1), numcodecs.Zlib(1), numcodecs.LZ4(), numcodecs.BZ2(1),
    numcodecs.LZMA(), None], ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("filters", [None, "delta", "scale"])
def test_normal_chunks_decode_bounded_and_equal_to_zarr(tmp_path, codec, filters):
    dtype = np.dtype("<f8") if filters == "scale" else np.dtype(">i4")
    filt = {"delta": [numcodecs.Delta(dtype=dtype.str)],  # same size
            "scale": [numcodecs.FixedScaleOffset(0, 1, dtype=dtype.str, astype="u1")]}.get(filters)  # 1/8
    arr = zarr.create_array(tmp_path / "n.zarr", shape=(9, 20, 30), chunks=(4, 8, 16), dtype=dtype,
                            zarr_format=2, compressors=codec, filters=filt, fill_value=0)
    arr[:] = np.random.default_rng(1).integers(0, 200, arr.shape).astype(dtype)
    arr = zarr.open_array(tmp_path / "n.zarr", mode="r")
    codec_obj = ChunkCodec.of(arr)
    if codec is not None:  # every compressor listed decodes through a bounded step
        assert codec_obj._steps[0] != codec_obj.decoders[0].decode
    read = fast_reader(arr)
    for idx in np.ndindex(3, 3, 2):
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, arr.chunks, arr.shape))
        np.testing.assert_array_equal(read(region), arr[region])


# -- metadata -----------------------------------------------------------------------------
def _zarray(path, **fields):
    meta = {"zarr_format": 2, "shape": [8, 64, 64], "chunks": [4, 64, 64], "dtype": "<u2",
            "compressor": None, "fill_value": 0, "filters": None, "order": "C"}
    meta.update(fields)
    path.mkdir()
    (path / ".zarray").write_text(json.dumps(meta, separators=(",", ":")))
    return path / ".zarray"


def test_a_150_byte_zarray_declaring_20_million_chunks_is_refused_cheaply(tmp_path):
    meta = _zarray(tmp_path / "bomb.zarr", shape=[20000000, 64, 64], chunks=[1, 64, 64])
    assert meta.stat().st_size <= 150
    err, peak = _peak(lambda: open_volume(tmp_path / "bomb.zarr"))
    assert isinstance(err, VolumeError)
    assert str(err) == (f"{meta}: shape [20000000, 64, 64] in chunks [1, 64, 64] is 20000000 stored chunks "
                        "([20000000, 1, 1] per axis); at most 16777216 (1048576 per axis) are supported")
    assert peak < 100 * 2**20, peak


def test_a_million_chunks_open_with_coarser_dask_chunks(tmp_path):
    _zarray(tmp_path / "many.zarr", shape=[1000000, 64, 64], chunks=[1, 64, 64])
    vol, peak = _peak(lambda: resolve_volume(tmp_path / "many.zarr"))
    assert peak < 100 * 2**20, peak
    assert vol.zarr.chunks == (1, 64, 64)  # the engine still reads stored chunks
    assert max(vol.array.numblocks) <= MAX_DASK_CHUNKS_PER_AXIS
    assert int(np.prod(vol.array.numblocks)) <= MAX_DASK_CHUNKS
    assert vol.array.chunksize[1:] == (64, 64)
    np.testing.assert_array_equal(vol.array[999990:1000000, :4, :4].compute(), 0)


def test_a_zarr_json_declaring_millions_of_inner_chunks_is_refused(tmp_path):
    arr = zarr.create_array(tmp_path / "s.zarr", shape=(64, 64, 64), chunks=(8, 8, 8), shards=(64, 64, 64),
                            dtype="u1")
    meta_path = tmp_path / "s.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [4096, 4096, 4096]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [4096, 4096, 4096]
    meta["codecs"][0]["configuration"]["chunk_shape"] = [8, 8, 8]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(VolumeError, match=r"zarr.json: one chunk \[4096, 4096, 4096\] holds"):
        open_volume(tmp_path / "s.zarr")
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [1024, 1024, 1024]  # 1 GiB shards
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(VolumeError, match=r"zarr.json: shape \[4096, 4096, 4096\] in chunks \[8, 8, 8\] "
                                          r"is 134217728 stored"):
        open_volume(tmp_path / "s.zarr")
    del arr


@pytest.mark.parametrize("fields,says", [
    ({"shape": [-5, 64, 64]}, r"shape \[-5, 64, 64\] has a size outside 1\.\."),
    ({"shape": [0, 64, 64]}, r"shape \[0, 64, 64\] has a size outside"),
    ({"shape": [8.5, 64, 64]}, r"shape \[8.5, 64, 64\] is not a list of integers"),
    ({"shape": [8, 64, 10**30]}, r"shape \[8, 64, 10{30}\] has a size outside"),
    ({"chunks": [0, 64, 64]}, r"chunks \[0, 64, 64\] has a size outside"),
    ({"chunks": [4, 64, True]}, r"chunks \[4, 64, True\] is not a list of integers"),
    ({"chunks": [4, 64]}, r"chunks \[4, 64\] do not match the 3-D shape"),
    ({"chunks": "64"}, r"chunks '64' is not a list of integers"),
    ({"chunks": [8, 65536, 65536]}, r"one chunk \[8, 65536, 65536\] holds 68719476736 bytes; at most"),
    ({"dtype": "<q9"}, r"unsupported dtype '<q9'"),
    ({"dtype": "|S4"}, r"unsupported dtype '\|S4'"),
    ({"dtype": [["a", "<u2"]]}, r"unsupported dtype \[\['a', '<u2'\]\]"),
])
def test_bad_metadata_is_one_line_naming_the_file_and_value(tmp_path, fields, says):
    meta = _zarray(tmp_path / "bad.zarr", **fields)
    with pytest.raises(VolumeError, match=says) as info:
        open_volume(tmp_path / "bad.zarr")
    assert str(info.value).startswith(f"{meta}: ") and "\n" not in str(info.value)


def test_huge_metadata_file_is_not_read(tmp_path):
    import dask

    meta = _zarray(tmp_path / "fat.zarr", attributes="x" * 2000)
    with dask.config.set({"vesuvius-dask.limits.metadata-bytes": 1000}), \
            pytest.raises(VolumeError, match=f"{meta}: .* bytes of metadata; at most 1000"):
        open_volume(tmp_path / "fat.zarr")


def test_limits_hold_for_zarr_objects_and_for_chunks_asked(tmp_path):
    _zarray(tmp_path / "many.zarr", shape=[20000000, 64, 64], chunks=[1, 64, 64])
    arr = zarr.open_array(tmp_path / "many.zarr", mode="r")  # zarr itself opens it cheaply
    with pytest.raises(VolumeError, match=r"zarr array .* \(metadata\): shape \[20000000, 64, 64\]"):
        open_volume(arr)
    _zarray(tmp_path / "ok.zarr", shape=[4000, 64, 64], chunks=[1, 64, 64])
    with pytest.raises(VolumeError, match=r"chunks=\(1, 1, 1\) make \[4000, 64, 64\] dask chunks"):
        open_volume(tmp_path / "ok.zarr", chunks=(1, 1, 1))
    with pytest.raises(VolumeError, match="chunks='auto' must be 3 positive integers"):
        open_volume(tmp_path / "ok.zarr", chunks="auto")


# -- TIFF layers ------------------------------------------------------------------------------
def _tiff_folders(root, n, layers, shape=(16, 16), compression=None):
    import tifffile

    vols = []
    for i in range(n):
        vol = np.random.default_rng(i).integers(0, 65535, (layers,) + shape, dtype=np.uint16)
        (root / f"s{i:02d}").mkdir()
        for z in range(layers):
            tifffile.imwrite(root / f"s{i:02d}" / f"{z:02d}.tif", vol[z], compression=compression)
        vols.append(vol)
    return vols


def test_sixteen_segments_of_65_layers_read_under_256_descriptors(tmp_path):
    vols = _tiff_folders(tmp_path, 16, 65)
    np.save(tmp_path / "expected.npy", np.stack(vols))
    script = textwrap.dedent(f"""
        import os, resource
        import numpy as np
        from vesuvius_dask import DaskVesuviusStream, open_volume
        from vesuvius_dask.io.open import resolve_volume

        expected = np.load({str(tmp_path / "expected.npy")!r})
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        vols = [resolve_volume({str(tmp_path)!r} + f"/s{{i:02d}}") for i in range(16)]
        for rep in range(2):  # every layer of every segment, twice: 2080 layer reads
            for i, v in enumerate(vols):
                np.testing.assert_array_equal(v.data[:, 3:9, 2:11], expected[i][:, 3:9, 2:11])
        assert len(os.listdir("/proc/self/fd")) < 256
        stream = DaskVesuviusStream(vols, 65, 8, 8, samples_per_epoch=64, batch_size=16, seed=0,
                                    return_coords=True)
        n = 0
        for blocks, coords in stream:
            for b, (vi, z, y, x) in zip(blocks.numpy(), coords.tolist()):
                np.testing.assert_array_equal(b, expected[vi][z:z + 65, y:y + 8, x:x + 8])
                n += 1
        print("ok", n, len(os.listdir("/proc/self/fd")))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ok, blocks, fds = done.stdout.split()
    assert ok == "ok" and int(blocks) == 64 and int(fds) < 256


@pytest.mark.slow
def test_compressed_layers_from_many_threads_with_few_open(tmp_path, monkeypatch):
    vols = _tiff_folders(tmp_path, 3, 12, compression="zlib")
    stacks = [resolve_volume(tmp_path / f"s{i:02d}").data for i in range(3)]
    assert not stacks[0].memmap
    monkeypatch.setattr(tiff_mod.TiffStack, "max_open", 4)  # layers closed while others read them
    errors, reads = [], [0]

    def reader(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(60):
                i, z, y = int(rng.integers(3)), int(rng.integers(10)), int(rng.integers(8))
                got = stacks[i][z:z + 2, y:y + 8, 1:9]
                np.testing.assert_array_equal(got, vols[i][z:z + 2, y:y + 8, 1:9])
                reads[0] += 1
        except Exception as err:  # noqa: BLE001 - reported by the test thread
            errors.append(err)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert reads[0] == 480
    assert len(tiff_mod._LAYERS) <= 4
    open_now = [layer for layer in (tiff_mod._LAYERS.get(k) for k in tiff_mod._LAYERS.keys()) if layer]
    assert all(layer.users == 0 and layer.obj is not None for layer in open_now)


def test_a_forked_child_opens_its_own_layers(tmp_path):
    vols = _tiff_folders(tmp_path, 1, 6, compression="zlib")
    stack = resolve_volume(tmp_path / "s00").data
    np.testing.assert_array_equal(stack[0:6], vols[0])
    assert len(stack._maps) == 6
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        ok = len(tiff_mod._LAYERS) == 0 and np.array_equal(stack[1:5, 2:9], vols[0][1:5, 2:9])
        os._exit(0 if ok and len(stack._maps) == 4 else 1)
    assert os.waitpid(pid, 0)[1] == 0
    np.testing.assert_array_equal(stack[0:6], vols[0])  # the parent's handles are intact


def test_the_layers_of_a_collected_stack_are_closed(tmp_path):
    import gc

    _tiff_folders(tmp_path, 2, 5)
    stack = resolve_volume(tmp_path / "s00").data
    stack[0:5, 0:2, 0:2]
    assert len(stack._maps) == 5
    gone = stack._id
    del stack
    gc.collect()
    other = resolve_volume(tmp_path / "s01").data
    other[0:1, 0:2, 0:2]  # a miss closes what collected stacks left open
    assert gone not in {k[0] for k in tiff_mod._LAYERS.keys()} and len(other._maps) == 1
