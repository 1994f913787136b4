"""Partial reads: uncompressed chunks cut in place, sharded v3 read by inner chunk.

They equal numpy slicing, read about a block's own bytes, and refuse what a corrupt
index or a truncated shard says, in one line.
"""

import json

import numcodecs
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vesuvius_dask.engine.batches import BatchEngine
from vesuvius_dask.errors import CorruptChunkError
from vesuvius_dask.io import partial, ranges, shards
from vesuvius_dask.io.info import describe
from vesuvius_dask.io.open import resolve_volume
from vesuvius_dask.io.volume import read_stored

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _drop_index_crc(path):
    """Rewrite a sharded array's metadata so that its shard index has no crc32c."""
    meta = json.loads((path / "zarr.json").read_text())
    codec = meta["codecs"][0]["configuration"]
    codec["index_codecs"] = [c for c in codec["index_codecs"] if c["name"] != "crc32c"]
    (path / "zarr.json").write_text(json.dumps(meta))


@st.composite
def stored_arrays(draw, tmp):
    """A random array stored on a partial path (or next to one), its values, and what it is."""
    kind = draw(st.sampled_from(["v2-raw", "v3-raw", "sharded-raw", "sharded-blosc", "sharded-zstd-crc",
                                 "v3-zstd-crc"]))
    dtype = np.dtype(draw(st.sampled_from(["u1", "<u2", ">u2"])))
    shape = tuple(draw(st.integers(1, n)) for n in (13, 21, 25))
    chunks = tuple(draw(st.integers(1, s)) for s in shape)
    fill = draw(st.sampled_from([0, 7]))
    kw = dict(shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
    if kind == "v2-raw":
        kw.update(zarr_format=2, compressors=None)
    else:
        endian = "big" if dtype.byteorder == ">" else "little"
        kw.update(serializer=zarr.codecs.BytesCodec(endian=endian), compressors=None)
        if kind.endswith("zstd-crc"):
            kw.update(compressors=[zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec()])
        if kind == "sharded-blosc":
            kw.update(compressors=zarr.codecs.BloscCodec(cname="lz4"))
        if kind.startswith("sharded"):
            per = tuple(draw(st.integers(1, 3)) for _ in shape)
            kw["shards"] = {"shape": tuple(c * p for c, p in zip(chunks, per)),
                            "index_location": draw(st.sampled_from(["start", "end"]))}
    path = tmp / "a.zarr"
    zarr.create_array(path, overwrite=True, **kw)
    if kind.startswith("sharded") and draw(st.booleans()):
        _drop_index_crc(path)
    arr = zarr.open_array(path, mode="r+")
    data = np.random.default_rng(draw(st.integers(0, 999))).integers(0, 250, shape).astype(dtype)
    box = tuple(slice(draw(st.integers(0, s)), draw(st.integers(0, s))) for s in shape)
    data[box] = fill  # chunks (inner chunks) all fill are not written: absent, read as the fill value
    arr[:] = data
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr")))
    for p in files[:draw(st.integers(0, 2))]:  # and some absent chunk (shard) files
        region = _region_of(arr, p.relative_to(path))
        data[region] = fill
        p.unlink()
    return zarr.open_array(path, mode="r"), data, kind


def _region_of(arr, key):
    """The region a chunk or shard file covers."""
    parts = key.parts[1:] if key.parts[0] == "c" else str(key).split(".")
    step = arr.shards or arr.chunks
    return tuple(slice(int(i) * c, (int(i) + 1) * c) for i, c in zip(parts, step))


def _starts(data, n, shape, block):
    return np.stack([data.draw(st.lists(st.integers(0, s - b), min_size=n, max_size=n))
                     for s, b in zip(shape, block)], 1)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "ranges"])
@SETTINGS
@given(data=st.data())
def test_every_read_path_equals_numpy_slicing(tmp_path, monkeypatch, mapped, data):
    monkeypatch.setattr(partial, "MAP_FILES", mapped)
    arr, values, kind = data.draw(stored_arrays(tmp_path))
    vol = resolve_volume(arr)
    expected_path = {"v2-raw": "partial-uncompressed", "v3-raw": "partial-uncompressed",
                     "v3-zstd-crc": "whole-chunk"}.get(kind, "sharded")
    assert vol.read_path == expected_path
    block = tuple(data.draw(st.integers(1, s)) for s in arr.shape)
    starts = _starts(data, 6, arr.shape, block)
    engine = BatchEngine([vol], block, cache_bytes=data.draw(st.sampled_from([0, 1 << 20])))
    for _ in range(2):  # the second time, decoded inner chunks may come from the cache
        got = engine.read(np.zeros(len(starts), np.int64), starts)
        want = np.stack([values[z:z + block[0], y:y + block[1], x:x + block[2]] for z, y, x in starts])
        np.testing.assert_array_equal(got, want)
    for idx in np.ndindex(*[-(-s // c) for s, c in zip(arr.shape, arr.chunks)]):  # one stored chunk at a time
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, arr.chunks, arr.shape))
        got = read_stored(arr, region, "a")
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got, values[region])


@pytest.fixture()
def counted(monkeypatch):
    """Partial reads by byte range, every byte read counted (by object key)."""
    monkeypatch.setattr(partial, "MAP_FILES", False)
    seen = {}
    original = ranges.LocalFiles.read_ranges

    def read_ranges(self, key, asked):
        got = original(self, key, asked)
        seen[key] = seen.get(key, 0) + sum(len(g) for g in got or ())
        return got

    monkeypatch.setattr(ranges.LocalFiles, "read_ranges", read_ranges)
    return seen


def test_an_uncompressed_block_reads_about_its_own_bytes(tmp_path, counted):
    arr = zarr.create_array(tmp_path / "u.zarr", shape=(64, 64, 64), chunks=(32, 32, 32), dtype="<u2",
                            compressors=None)
    values = np.random.default_rng(0).integers(0, 60000, arr.shape).astype("<u2")
    arr[:] = values
    vol = resolve_volume(str(tmp_path / "u.zarr"))
    engine = BatchEngine([vol], (16, 16, 16), cache_bytes=1 << 30)
    rng = np.random.default_rng(1)
    for start in rng.integers(0, 48, (20, 3)):
        counted.clear()
        got = engine.read(np.zeros(1, np.int64), start[None])
        z, y, x = start
        np.testing.assert_array_equal(got[0], values[z:z + 16, y:y + 16, x:x + 16])
        # each piece: one range per plane, from its first to its last voxel there (+1/4 when merged)
        spans = 0
        for a0, a1, b0, b1, c0, c1 in _pieces(start, 16, 32):
            spans += (a1 - a0) * ((b1 - b0 - 1) * 32 + c1 - c0) * 2
        read = sum(counted.values())
        assert read <= spans * 1.25
        assert read <= 5 * 16**3 * 2 and 3 * read < len(counted) * 32**3 * 2  # not the chunks' bytes
    assert engine.cache.nbytes == 0  # nothing decoded, nothing cached: the page cache is the cache


def _pieces(start, block, chunk):
    """``(z0, z1, y0, y1, x0, x1)`` of a cubic block's overlap with each chunk it touches."""
    edges = [[(max(s, c * chunk), min(s + block, (c + 1) * chunk))
              for c in range(s // chunk, (s + block - 1) // chunk + 1)] for s in start]
    return [(*a, *b, *c) for a in edges[0] for b in edges[1] for c in edges[2]]


@pytest.mark.parametrize("compressors", [None, zarr.codecs.BloscCodec(cname="zstd")], ids=["raw", "blosc"])
@pytest.mark.parametrize("where", ["start", "end"])
def test_a_sharded_block_reads_the_inner_chunks_it_touches(tmp_path, counted, compressors, where):
    path = tmp_path / "s.zarr"
    arr = zarr.create_array(path, shape=(64, 64, 64), chunks=(8, 8, 8), dtype="u1", compressors=compressors,
                            shards={"shape": (32, 32, 32), "index_location": where})
    values = np.random.default_rng(0).integers(0, 30, arr.shape).astype("u1")
    arr[:] = values
    sizes = {}  # stored bytes of each inner chunk, from the shard indexes
    for f in path.glob("c/*/*/*"):
        raw = f.read_bytes()
        index = np.frombuffer(raw[:-4][-16 * 64:] if where == "end" else raw[:16 * 64], "<u8")
        shard = tuple(int(p) for p in f.relative_to(path).parts[1:])
        for i, (_, n) in enumerate(index.reshape(-1, 2)):
            local = np.unravel_index(i, (4, 4, 4))
            sizes[tuple(s * 4 + k for s, k in zip(shard, local))] = int(n)
    vol = resolve_volume(str(path))
    engine = BatchEngine([vol], (10, 10, 10), cache_bytes=0)
    indexed = set()  # shards whose index was read (and is cached)
    for start in np.random.default_rng(1).integers(0, 54, (20, 3)):
        counted.clear()
        got = engine.read(np.zeros(1, np.int64), start[None])
        z, y, x = start
        np.testing.assert_array_equal(got[0], values[z:z + 10, y:y + 10, x:x + 10])
        touched = [(i, j, k) for i in range(z // 8, (z + 9) // 8 + 1) for j in range(y // 8, (y + 9) // 8 + 1)
                   for k in range(x // 8, (x + 9) // 8 + 1)]
        shards_touched = {tuple(c // 4 for c in cid) for cid in touched}
        index_bytes = (16 * 64 + 4) * len(shards_touched - indexed)
        read = sum(counted.values())
        assert read <= sum(sizes[c] for c in touched) + index_bytes  # never the whole shard
        assert len(counted) == len(shards_touched)
        if compressors is None:  # inner chunks cut in part: less than the inner chunks hold
            assert read - index_bytes < sum(sizes[c] for c in touched)
        indexed |= shards_touched
    assert sum(counted.values()) < 32**3  # a shard's bytes


def _sharded(tmp_path, index_location="end"):
    path = tmp_path / "bad.zarr"
    arr = zarr.create_array(path, shape=(16, 16, 16), chunks=(4, 4, 4), dtype="u1",
                            shards={"shape": (8, 8, 8), "index_location": index_location})
    arr[:] = np.random.default_rng(0).integers(1, 200, arr.shape).astype("u1")
    return path, path / "c" / "1" / "0" / "0"


def _read_all(path):
    vol = resolve_volume(str(path))
    engine = BatchEngine([vol], vol.shape, cache_bytes=0)
    return engine.read(np.zeros(1, np.int64), np.zeros((1, 3), np.int64))


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "ranges"])
@pytest.mark.parametrize("damage", ["crc", "truncated", "huge-entry", "outside", "tiny-file"])
def test_a_corrupt_index_or_truncated_shard_is_one_line(tmp_path, monkeypatch, mapped, damage):
    monkeypatch.setattr(partial, "MAP_FILES", mapped)
    shards.SHARD_INDEXES.clear()
    path, shard = _sharded(tmp_path, "start" if damage in ("huge-entry", "outside") else "end")
    raw = bytearray(shard.read_bytes())
    if damage == "crc":
        raw[-10] ^= 0xFF  # inside the index
        says = "crc32c"
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
        says = "crc32c|truncated"
    elif damage == "tiny-file":
        raw = raw[:100]
        says = "truncated"
    else:
        index = np.frombuffer(bytes(raw[:8 * 16]), "<u8").reshape(8, 2).copy()
        if damage == "huge-entry":
            index[3, 1] = 2**40  # a terabyte for a 64-byte inner chunk
            says = "gives it 1099511627776 bytes"
        else:
            index[3, 0] = len(raw) + 100
            says = "outside the shard's data"
        import google_crc32c

        body = index.tobytes()
        raw[:8 * 16 + 4] = body + np.uint32(google_crc32c.value(body)).tobytes()
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunkError, match=says) as err:
        _read_all(path)
    msg = str(err.value)
    assert "\n" not in msg and "bad.zarr" in msg and "'c/1/0/0'" in msg, msg
    assert msg.startswith(str(path))  # the volume's name first


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "ranges"])
def test_an_uncompressed_chunk_of_another_size_is_refused(tmp_path, monkeypatch, mapped):
    monkeypatch.setattr(partial, "MAP_FILES", mapped)
    arr = zarr.create_array(tmp_path / "u.zarr", shape=(8, 8, 8), chunks=(4, 4, 4), dtype="u2",
                            compressors=None)
    arr[:] = 5
    (tmp_path / "u.zarr" / "c" / "1" / "0" / "0").write_bytes(bytes(10))
    with pytest.raises(CorruptChunkError, match=r"chunk \(1, 0, 0\).*'c/1/0/0'.*holds 10 bytes") as err:
        _read_all(tmp_path / "u.zarr")
    assert "\n" not in str(err.value)


def test_a_crc32c_chunk_is_checked_on_the_fast_path(tmp_path):
    path = tmp_path / "c.zarr"
    arr = zarr.create_array(path, shape=(8, 8, 8), chunks=(4, 4, 4), dtype="u2",
                            compressors=[zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()])
    arr[:] = np.arange(512).reshape(8, 8, 8)
    assert resolve_volume(str(path)).read_path == "whole-chunk"
    f = path / "c" / "0" / "1" / "0"
    raw = bytearray(f.read_bytes())
    raw[5] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunkError, match=r"chunk \(0, 1, 0\).*crc32c mismatch"):
        _read_all(path)


def test_read_paths_and_info(tmp_path):
    made = {
        "raw": dict(compressors=None),
        "blosc": dict(compressors=zarr.codecs.BloscCodec()),
        "sharded": dict(shards=(8, 8, 8)),
        "transposed": dict(filters=[zarr.codecs.TransposeCodec(order=(2, 1, 0))], compressors=None),
    }
    paths = {}
    for name, kw in made.items():
        paths[name] = tmp_path / f"{name}.zarr"
        zarr.create_array(paths[name], shape=(8, 8, 8), chunks=(4, 4, 4), dtype="u1", **kw)[:] = 1
    v2 = zarr.create_array(tmp_path / "v2.zarr", shape=(8, 8, 8), chunks=(4, 4, 4), dtype="u1", zarr_format=2,
                           compressors=numcodecs.Zstd())
    v2[:] = 1
    paths["v2"] = tmp_path / "v2.zarr"
    want = {"raw": "partial-uncompressed", "blosc": "whole-chunk", "sharded": "sharded",
            "transposed": "zarr", "v2": "whole-chunk"}
    for name, path in paths.items():
        assert resolve_volume(str(path)).read_path == want[name]
        assert f"read    {want[name]} (" in describe(path)
    assert resolve_volume(np.zeros((2, 2, 2))).read_path == "memory"


def test_stream_blocks_equal_numpy_on_partial_paths(tmp_path):
    torch = pytest.importorskip("torch")
    from vesuvius_dask import DaskVesuviusStream

    values = np.random.default_rng(3).integers(0, 250, (20, 40, 40)).astype("u1")
    for name, kw in {"raw": dict(compressors=None),
                     "sharded": dict(shards={"shape": (10, 20, 20), "index_location": "start"},
                                     compressors=None),
                     "sharded-blosc": dict(shards=(10, 20, 20))}.items():
        path = tmp_path / f"{name}.zarr"
        zarr.create_array(path, shape=values.shape, chunks=(5, 10, 10), dtype="u1", **kw)[:] = values
        stream = DaskVesuviusStream([str(path)], block=(6, 12, 12), samples_per_epoch=40, batch_size=8,
                                    seed=1, return_coords=True, cache_bytes=1 << 20)
        n = 0
        for blocks, coords in stream:
            for b, (_, z, y, x) in zip(blocks, torch.as_tensor(coords).tolist()):
                np.testing.assert_array_equal(b.numpy(), values[z:z + 6, y:y + 12, x:x + 12])
                n += 1
        assert n == 40


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "ranges"])
@pytest.mark.parametrize("what", ["folder", "fifo", "dev-zero"])
@pytest.mark.parametrize("layout", ["raw", "sharded", "compressed"])
def test_a_folder_or_fifo_where_a_file_should_be_is_one_line(tmp_path, monkeypatch, mapped, what, layout):
    """A folder, FIFO or ``/dev/zero`` in place of a chunk file is one line naming the chunk.

    Never waited on (a FIFO has no writer), mapped, or read without end.
    """
    import os
    import threading

    monkeypatch.setattr(partial, "MAP_FILES", mapped)
    shards.SHARD_INDEXES.clear()
    kw = {"raw": dict(compressors=None), "sharded": dict(shards=(8, 8, 8)), "compressed": {}}[layout]
    arr = zarr.create_array(tmp_path / "a.zarr", shape=(8, 8, 8), chunks=(4, 4, 4), dtype="u1", **kw)
    arr[:] = 3
    target = tmp_path / "a.zarr" / "c" / "0" / "0" / "0"
    target.unlink()
    if what == "folder":
        target.mkdir()
    elif what == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    outcome = []

    def read():
        try:
            _read_all(tmp_path / "a.zarr")
        except CorruptChunkError as err:
            outcome.append(str(err))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)  # a guard against waiting on the FIFO for ever, not a measure
    assert not reader.is_alive(), "the read waited on a FIFO"
    assert outcome and "'c/0/0/0'" in outcome[0] and "\n" not in outcome[0], outcome
    assert ("is a folder" if what == "folder" else "is not a regular file") in outcome[0], outcome


@pytest.mark.parametrize("compressors", [None, "default"], ids=["raw", "blosc"])
def test_a_v2_null_fill_value_reads_absent_chunks_as_zeros_as_zarr_does(tmp_path, compressors):
    path = tmp_path / "n.zarr"
    kw = {} if compressors == "default" else {"compressors": None}
    arr = zarr.create_array(path, shape=(16, 16, 16), chunks=(8, 8, 8), dtype="<u2", zarr_format=2,
                            fill_value=None, **kw)
    arr[:8, :8, :8] = np.arange(512, dtype="<u2").reshape(8, 8, 8) + 1  # one chunk stored, 7 absent
    assert json.loads((path / ".zarray").read_text())["fill_value"] is None
    want = zarr.open_array(path, mode="r")[:]
    vol = resolve_volume(str(path))
    engine = BatchEngine([vol], (12, 12, 12), cache_bytes=0)
    starts = np.array([[0, 0, 0], [4, 4, 4], [2, 3, 1]])
    got = engine.read(np.zeros(len(starts), np.int64), starts)
    np.testing.assert_array_equal(got, np.stack([want[z:z + 12, y:y + 12, x:x + 12] for z, y, x in starts]))
    np.testing.assert_array_equal(vol.array.compute(), want)


def test_a_compressed_chunk_file_larger_than_any_stored_chunk_is_refused_unread(tmp_path):
    from vesuvius_dask.io.chunks import max_stored_bytes

    arr = zarr.create_array(tmp_path / "z.zarr", shape=(8, 8, 8), chunks=(4, 4, 4), dtype="u1")
    arr[:] = 3
    too_big = max_stored_bytes(4 * 4 * 4) + 1
    (tmp_path / "z.zarr" / "c" / "1" / "0" / "0").write_bytes(bytes(too_big))
    with pytest.raises(CorruptChunkError, match=rf"'c/1/0/0'.*holds {too_big} bytes, more than any") as err:
        _read_all(tmp_path / "z.zarr")
    assert "\n" not in str(err.value)
