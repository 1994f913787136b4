"""cache_dir and remote fetches are safe (issue: nothing we write costs a user a file).

Nothing a server sends exhausts the machine, a bad response is never kept, and claims
survive fork and time out. Every check counts (bytes sent, requests, files) or asserts
that a call returned; synchronisation is by pipes and events, never by sleeping.
"""

import contextlib
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import zarr

from vesuvius_dask import cachefiles
from vesuvius_dask.errors import CacheDirError, ChunkFetchError, CorruptChunkError
from vesuvius_dask.remote.cache_files import claim, claim_key, release, write_atomic
from vesuvius_dask.remote.disk_cache import MARKER, DiskChunkCache
from vesuvius_dask.remote.fetch import RemoteChunks, RemoteSettings, stored_bound
from vesuvius_dask.testing.server import SlowServer

pytest.importorskip("aiohttp", reason="Zarr over HTTP needs the 'remote' extra (fsspec[http])")

SHAPE, CHUNKS = (8, 64, 64), (4, 32, 32)  # 8 chunks of 8 KiB
AID = "0123456789abcdef01234567"  # an array id (24 hex digits, as array_id makes)
FAST = RemoteSettings(retries=1, backoff=0.01, timeout=2.0)


def _one_line(err) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def _tree(root):
    """{relative path: bytes (files) or link target (symlinks)} of everything under ``root``."""
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        for n in names + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            out[rel] = ("->", os.readlink(p)) if os.path.islink(p) else open(p, "rb").read()
    return out


def _entries(cache):
    """Chunk files of a cache (what eviction may count)."""
    return sorted(p for p in cache.path.rglob("*") if p.is_file() and not p.is_symlink()
                  and p.name != "array.json" and not p.name.startswith("."))


# -- 1. cache_dir owns only what it wrote ------------------------------------------------------


def test_a_folder_of_user_files_is_refused_and_every_file_survives(tmp_path):
    data = tmp_path / "data"
    (data / "scans").mkdir(parents=True)
    (data / "notes.txt").write_text("my notes")
    (data / "scans" / "slice0001.tif").write_bytes(os.urandom(4096))
    (data / ".hidden").write_bytes(b"x")
    before = _tree(data)
    with pytest.raises(CacheDirError) as info:
        DiskChunkCache(data, AID, max_bytes=1)
    text = _one_line(info.value)
    assert str(data) in text and "not a vesuvius-dask cache" in text and "empty or new folder" in text
    assert _tree(data) == before  # not one file more or less


def test_info_check_with_a_home_folder_as_cache_dir_deletes_nothing(served, tmp_path):
    # the reported disaster: `info URL --check --cache-dir ~/data` with a small budget
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        (data / f"file{i}.dat").write_bytes(os.urandom(1000))
    before = _tree(data)
    env = {**os.environ, "DASK_VESUVIUS_DASK__REMOTE__CACHE_DIR_BYTES": "1000"}
    with SlowServer(served[0]) as srv:
        out = subprocess.run([sys.executable, "-m", "vesuvius_dask.cli", "info", srv.url("v3.zarr"),
                              "--check", "--quiet", "--cache-dir", str(data)],
                             capture_output=True, text=True, timeout=120, env=env)
        assert sum(srv.chunk_requests().values()) == 0  # refused before anything was fetched
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(data) in lines[0] and "not a vesuvius-dask cache" in lines[0], out.stderr
    assert _tree(data) == before


def test_a_new_or_empty_folder_becomes_a_cache_and_is_used_again(tmp_path):
    new = tmp_path / "a" / "b" / "cache"
    cache = DiskChunkCache(new, AID, max_bytes=2**20)
    marker = json.loads((new / MARKER).read_text())
    assert marker["version"] == 1 and "vesuvius-dask" in marker["format"]
    cache.put("c/0/0/0", b"abc")
    again = DiskChunkCache(new, AID, max_bytes=2**20)  # the marker says: ours
    assert again.get("c/0/0/0") == b"abc"
    empty = tmp_path / "empty"
    empty.mkdir()
    DiskChunkCache(empty, AID, max_bytes=2**20)
    assert (empty / MARKER).is_file()


def test_a_cache_made_before_the_marker_is_adopted(tmp_path):
    old = tmp_path / "old"
    (old / AID / "c" / "0").mkdir(parents=True)
    (old / AID / "array.json").write_text("{}")
    (old / ".evict.claim").write_bytes(b"")
    DiskChunkCache(old, AID, max_bytes=2**20)
    assert (old / MARKER).is_file()


def test_a_file_or_a_foreign_marker_is_refused_in_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"precious")
    with pytest.raises(CacheDirError, match="is a file") as info:
        DiskChunkCache(f, AID)
    assert str(f) in _one_line(info.value) and f.read_bytes() == b"precious"
    with pytest.raises(CacheDirError, match="part of its path is a file"):
        DiskChunkCache(f / "sub", AID)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / MARKER).write_text("not json")
    with pytest.raises(CacheDirError, match="not a vesuvius-dask cache marker"):
        DiskChunkCache(odd, AID)
    linked = tmp_path / "linked"
    linked.mkdir()
    (tmp_path / "elsewhere").write_text(json.dumps({"format": "vesuvius-dask cache_dir", "version": 1}))
    os.symlink(tmp_path / "elsewhere", linked / MARKER)
    with pytest.raises(CacheDirError, match="cannot be read"):
        DiskChunkCache(linked, AID)


def test_foreign_files_inside_a_cache_survive_eviction_with_a_tiny_budget(tmp_path):
    root = tmp_path / "cache"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.bin").write_bytes(b"T" * 5000)
    (outside / "dir").mkdir()
    (outside / "dir" / "deep.bin").write_bytes(b"D" * 5000)
    cache = DiskChunkCache(root, AID, max_bytes=2**20)
    for i in range(6):
        cache.put(f"c/0/0/{i}", os.urandom(2000))
    ours = _entries(cache)
    assert len(ours) == 6
    # dropped in by hand: at the root, in a folder the cache did not make, and inside its array folder
    (root / "notes.txt").write_bytes(b"n" * 3000)
    (root / "mine").mkdir()
    (root / "mine" / "c").write_bytes(b"m" * 3000)
    (cache.path / "c" / "0" / "0" / "99").write_bytes(b"chunk-like name, not ours" * 100)
    (cache.path / "README").write_bytes(b"r" * 3000)
    os.symlink(outside / "target.bin", cache.path / "c" / "0" / "0" / "7")  # a chunk's name, a symlink
    os.symlink(outside / "dir", cache.path / "c" / "1")  # a folder symlink: never walked
    stale = cache.path / "c" / "0" / "0" / "old.tmp"  # .tmp, but not the cache's naming
    stale.write_bytes(b"s" * 100)
    own_stale = cache.path / "c" / "0" / "0" / "5.1234-00ff00ff00ff00ff.tmp"
    own_stale.write_bytes(b"o" * 100)
    for p in (stale, own_stale):
        os.utime(p, (1, 1), follow_symlinks=False)  # long ago: a dead writer's
    before = _tree(tmp_path)
    cache.max_bytes = 1  # a tiny budget
    assert cache.evict() >= 0
    after = _tree(tmp_path)
    gone = {os.path.relpath(p, tmp_path) for p in ours + [own_stale]}
    assert set(before) - set(after) == gone  # its own chunks and its own dead temporary file
    assert set(after) - set(before) <= {os.path.relpath(root / ".evict.claim", tmp_path)}
    for k in after:
        assert after[k] == before.get(k, after[k]), k  # every foreign file, symlink and target as it was
    assert all(cache.get(f"c/0/0/{i}") is None for i in range(6))
    assert (outside / "target.bin").read_bytes() == b"T" * 5000
    assert (outside / "dir" / "deep.bin").read_bytes() == b"D" * 5000


def test_nbytes_counts_only_the_cache_s_own_folders(tmp_path):
    cache = DiskChunkCache(tmp_path / "c", AID, max_bytes=2**20)
    cache.put("c/0/0/0", b"x" * 100)
    (tmp_path / "c" / "other").mkdir()
    (tmp_path / "c" / "other" / "big").write_bytes(b"y" * 10000)
    assert cache.nbytes() == 100 + 16


def test_a_symlink_planted_at_a_temporary_name_is_not_followed(tmp_path, monkeypatch):
    names = iter(["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc"])
    monkeypatch.setattr(cachefiles, "_token", lambda: next(names))
    target = tmp_path / "entry"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    absent = tmp_path / "absent"
    os.symlink(victim, tmp_path / f"entry.{os.getpid()}-aaaaaaaaaaaaaaaa.tmp")
    write_atomic(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and victim.read_bytes() == b"keep me"
    assert os.path.islink(tmp_path / f"entry.{os.getpid()}-aaaaaaaaaaaaaaaa.tmp")  # left alone
    # a symlink at the entry's own name is replaced, not written through
    os.symlink(absent, tmp_path / "entry2")
    write_atomic(tmp_path / "entry2", lambda f: f.write(b"two"), mode=0o600)
    assert not absent.exists() and not os.path.islink(tmp_path / "entry2")


def test_a_symlink_planted_at_a_claims_file_is_not_followed(tmp_path):
    cache = DiskChunkCache(tmp_path / "c", AID, max_bytes=2**20)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, cache.path / ".claims")
    os.symlink(tmp_path / "absent", tmp_path / "entry.claim")
    with pytest.warns(RuntimeWarning, match="cannot open the claims file"):
        data, fetched = cache.get_or_fetch("c/0/0/0", lambda: b"fetched")
    assert (data, fetched) == (b"fetched", True) and cache.get("c/0/0/0") == b"fetched"
    assert victim.read_bytes() == b"keep me" and os.path.islink(cache.path / ".claims")
    with pytest.raises(OSError):
        claim(tmp_path / "entry")  # the flock claim file: O_NOFOLLOW
    assert not (tmp_path / "absent").exists()


def test_a_chunk_name_that_is_a_symlink_or_a_fifo_is_a_miss(tmp_path):
    cache = DiskChunkCache(tmp_path / "c", AID, max_bytes=2**20)
    cache.put("c/0/0/0", b"abc")
    real = cache.file("c/0/0/0").read_bytes()
    (tmp_path / "copy").write_bytes(real)
    os.symlink(tmp_path / "copy", cache.file("c/0/0/1"))
    os.mkfifo(cache.file("c/0/0/2"))
    assert cache.get("c/0/0/1") is None  # not read through the link
    assert cache.get("c/0/0/2") is None  # and a FIFO does not block the reader
    cache.put("c/0/0/1", b"def")  # replaced by the cache's own file, the link's target untouched
    assert cache.get("c/0/0/1") == b"def" and (tmp_path / "copy").read_bytes() == real


def test_a_symlinked_folder_inside_the_cache_is_not_written_through(tmp_path):
    cache = DiskChunkCache(tmp_path / "c", AID, max_bytes=2**20)
    outside = tmp_path / "outside"
    outside.mkdir()
    (cache.path / "c").mkdir()
    os.symlink(outside, cache.path / "c" / "1")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert not cache.put("c/1/0/0", b"abc")
    assert os.listdir(outside) == []
    other = tmp_path / "other"
    DiskChunkCache(other, "f" * 24, max_bytes=2**20)
    os.symlink(outside, other / AID)  # an array folder that is a symlink
    with pytest.raises(CacheDirError, match="not a folder the cache made"):
        DiskChunkCache(other, AID)


def _mode(p):
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_what_the_cache_makes_is_private_by_default(tmp_path):
    root = tmp_path / "c"
    cache = DiskChunkCache(root, AID, max_bytes=2**20, about={"url": "http://x"})
    cache.put("c/0/1/2", b"abc")
    fd = cache.claim("c/0/1/2")
    release(fd)
    cache.evict()
    assert _mode(root) == 0o700
    for d in (cache.path, cache.path / "c", cache.path / "c" / "0", cache.path / "c" / "0" / "1"):
        assert _mode(d) == 0o700, d
    for f in (root / MARKER, cache.path / "array.json", cache.path / ".claims", cache.file("c/0/1/2"),
              root / ".evict.claim"):
        assert _mode(f) == 0o600, f


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_a_group_shared_root_is_followed_whatever_the_umask(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o2770)  # mkdir -m 2770 DIR (chgrp GROUP DIR)
    with _umask(0o077):  # the strictest umask: group bits come from the root, not from it
        cache = DiskChunkCache(root, AID, max_bytes=2**20)
        cache.put("c/0/1/2", b"abc")
        release(cache.claim("c/0/1/2"))
        cache.evict()
    for d in (cache.path, cache.path / "c", cache.path / "c" / "0", cache.path / "c" / "0" / "1"):
        assert _mode(d) == 0o2770, (d, oct(_mode(d)))
    for f in (root / MARKER, cache.path / "array.json", cache.path / ".claims", cache.file("c/0/1/2"),
              root / ".evict.claim"):
        assert _mode(f) == 0o660, (f, oct(_mode(f)))


def test_roots_others_could_plant_bytes_in_are_refused(tmp_path):
    open_to_all = tmp_path / "all"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o777)
    with pytest.raises(CacheDirError, match="writable by every user") as info:
        DiskChunkCache(open_to_all, AID)
    assert str(open_to_all) in _one_line(info.value) and os.listdir(open_to_all) == []
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: others cannot replace what we make
    DiskChunkCache(sticky, AID, max_bytes=2**20)
    if os.geteuid() != 0:
        pytest.skip("making a folder another user owns needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chmod(theirs, 0o755)
    os.chown(theirs, 54321, 54321)
    with pytest.raises(CacheDirError, match="belongs to another user") as info:
        DiskChunkCache(theirs, AID)
    assert str(theirs) in _one_line(info.value) and os.listdir(theirs) == []
    group = tmp_path / "group"
    group.mkdir()
    os.chown(group, 54321, os.getegid())
    os.chmod(group, 0o2770)  # theirs, but shared with a group of ours: used
    DiskChunkCache(group, AID, max_bytes=2**20)


_GROUP = 54320


def _as_user(uid, work):
    """Run ``work()`` in a forked child as user ``uid`` of group ``_GROUP`` (umask 022); its exit code."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 1
        try:
            os.setgroups([_GROUP])
            os.setgid(uid)
            os.setuid(uid)
            os.umask(0o022)
            work()
            code = 0
        except BaseException as err:  # reported to the parent through the pipe
            os.write(w, f"{type(err).__name__}: {err}".encode()[:4000])
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), said


@pytest.mark.skipif(os.geteuid() != 0, reason="two users of one group need root to set up")
def test_two_users_of_a_group_share_one_cache_dir():
    base = tempfile.mkdtemp(prefix="vd-shared-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        root = os.path.join(base, "cache")
        os.mkdir(root)
        os.chown(root, 5001, _GROUP)  # user 5001 made it: mkdir -m 2770 && chgrp
        os.chmod(root, 0o2770)
        import fcntl as _f  # noqa: F401  (imported before the children drop root)
        import struct  # noqa: F401
        import zlib  # noqa: F401

        def first():
            cache = DiskChunkCache(root, AID, max_bytes=2**20)
            assert cache.put("c/0/0/0", b"from user 1")
            release(cache.claim("c/0/0/0"))

        def second():
            cache = DiskChunkCache(root, AID, max_bytes=2**20)
            assert cache.get("c/0/0/0") == b"from user 1"
            fd = cache.claim("c/0/0/1", timeout=5)
            assert fd is not None
            assert cache.put("c/0/0/1", b"from user 2")
            release(fd)
            cache.max_bytes = 1
            assert cache.evict() >= 0  # and may evict what user 1 wrote
            assert cache.get("c/0/0/0") is None

        assert _as_user(5001, first) == (0, "")
        assert _as_user(5002, second) == (0, "")
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- 2. every size a server declares is checked ------------------------------------------------


class _Hostile(BaseHTTPRequestHandler):
    """``/huge/...``: declares 1 GiB and streams it; ``/endless/...``: a body without end."""

    protocol_version = "HTTP/1.1"
    sent = 0
    requests = 0
    done = None  # threading.Event, set when a response ended (the client went away)

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        cls = type(self)
        cls.requests += 1
        piece = b"\0" * 65536
        try:
            self.send_response(200)
            if self.path.startswith("/huge/"):
                self.send_header("Content-Length", str(2**30))
            else:
                self.send_header("Connection", "close")  # the body ends when the connection does
            self.end_headers()
            while cls.sent < 2**30:
                self.wfile.write(piece)
                cls.sent += len(piece)
        except OSError:
            pass
        finally:
            self.close_connection = True
            cls.done.release()


@pytest.fixture()
def hostile():
    handler = type("H", (_Hostile,), {"sent": 0, "requests": 0, "done": threading.Semaphore(0)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("kind", ["huge", "endless"])
def test_a_response_larger_than_any_chunk_is_refused_without_reading_it(hostile, kind):
    url, handler = hostile
    nbytes = int(np.prod(CHUNKS)) * 2
    bound = stored_bound(nbytes)
    remote = RemoteChunks("http", f"{url}/{kind}/a.zarr", "files[0]", settings=FAST, chunk_nbytes=nbytes)
    assert remote.max_stored == bound == nbytes + nbytes // 16 + 65536
    with pytest.raises(ChunkFetchError) as info:
        remote.get("c/0/1/2", (0, 1, 2))
    text = _one_line(info.value)
    assert f"{url}/{kind}/a.zarr/c/0/1/2" in text and "chunk (0, 1, 2)" in text and str(bound) in text, text
    assert ("declared 1073741824 bytes" in text) if kind == "huge" else ("stopped reading at" in text), text
    assert "2 attempts" in text  # a bad response, retried like one, not for ever
    for _ in range(2):  # both responses ended (the client hung up): their byte counts are final
        assert handler.done.acquire(timeout=60)
    assert handler.requests == 2
    assert handler.sent < 2 * 32 * 2**20, handler.sent  # at most bound + socket buffers each, not 1 GiB


def test_other_filesystems_are_bounded_by_a_ranged_read():
    import fsspec

    fs = fsspec.filesystem("memory")
    nbytes = 1000
    bound = stored_bound(nbytes)
    fs.pipe_file("/vd-bound/a.zarr/c/0/0/0", b"x" * (bound + 5000))
    fs.pipe_file("/vd-bound/a.zarr/c/0/0/1", b"y" * bound)
    try:
        remote = RemoteChunks("memory", "/vd-bound/a.zarr", "mem", settings=FAST, chunk_nbytes=nbytes)
        assert remote.get("c/0/0/1") == b"y" * bound  # up to the bound: fine
        too_big = rf"more than the {bound} bytes.*stopped reading at {bound + 1}"
        with pytest.raises(ChunkFetchError, match=too_big):
            remote.get("c/0/0/0", (0, 0, 0))
    finally:
        fs.rm("/vd-bound", recursive=True)


# -- 3. a bad response is never kept ----------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    data = np.random.default_rng(3).integers(0, 65535, SHAPE, dtype=np.uint16)
    zarr.create_array(root / "v3.zarr", shape=SHAPE, chunks=CHUNKS, dtype=data.dtype)[:] = data
    return root, data


@pytest.fixture()
def broken(served, tmp_path):
    """(server, url, data, chunk file on the server): a copy of the array the test may damage."""
    root = tmp_path / "srv"
    shutil.copytree(served[0] / "v3.zarr", root / "v3.zarr")
    with SlowServer(root) as srv:
        yield srv, srv.url("v3.zarr"), served[1], root / "v3.zarr" / "c" / "0" / "1" / "0"


def _remote(url, cache_dir, **settings):
    from vesuvius_dask.io.chunks import ChunkCodec
    from vesuvius_dask.io.volume import remote_chunks

    arr = zarr.open_array(url, mode="r")
    remote = remote_chunks(arr, "files[0]", None, cache_dir)
    from dataclasses import replace

    remote.settings = replace(FAST, **settings)
    codec = ChunkCodec.of(arr)

    def decoder(cid):
        own = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cid, CHUNKS, SHAPE))
        return lambda data: codec.decode(data, own)

    return remote, decoder


def _block(data, cid):
    return data[tuple(slice(i * c, (i + 1) * c) for i, c in zip(cid, CHUNKS))]


@pytest.mark.parametrize("prefetched", [False, True])
def test_corrupt_bytes_from_the_server_are_named_and_never_kept(broken, tmp_path, prefetched):
    srv, url, data, chunk_file = broken
    good = chunk_file.read_bytes()
    chunk_file.write_bytes(b"\x28\xb5\x2f\xfd garbage, not a zstd frame" * 10)
    remote, decoder = _remote(url, tmp_path / "c")
    key, cid, other = "c/0/1/0", (0, 1, 0), ("c/0/0/0", (0, 0, 0))
    if prefetched:  # fetched ahead and written behind (for other processes) before it is decoded
        remote.prefetch([(key, cid), other])
    with pytest.raises(CorruptChunkError) as info:
        remote.get(key, cid, decode=decoder(cid))
    text = _one_line(info.value)
    assert f"fetched from {url}/{key}" in text and "chunk (0, 1, 0)" in text and "not" in text, text
    np.testing.assert_array_equal(remote.get(*other, decode=decoder(other[1])), _block(data, other[1]))
    remote.flush()
    assert not remote.cache.file(key).exists()  # nothing of the bad response is in cache_dir
    assert [p.relative_to(remote.cache.path).as_posix() for p in _entries(remote.cache)] == [other[0]]
    chunk_file.write_bytes(good)  # the server is fixed: the chunk reads, and is kept now
    srv.reset()
    np.testing.assert_array_equal(remote.get(key, cid, decode=decoder(cid)), _block(data, cid))
    assert remote.cache.file(key).is_file() and sum(srv.chunk_requests().values()) == 1


def test_undecodable_bytes_in_cache_dir_are_fetched_again_once(broken, tmp_path):
    srv, url, data, _ = broken
    remote, decoder = _remote(url, tmp_path / "c")
    key, cid = "c/0/1/0", (0, 1, 0)
    remote.cache.put(key, b"whole and checksummed, but not a chunk")  # passes the cache's own check
    srv.reset()
    np.testing.assert_array_equal(remote.get(key, cid, decode=decoder(cid)), _block(data, cid))
    assert srv.chunk_requests()[f"/v3.zarr/{key}"] == 1
    srv.reset()
    np.testing.assert_array_equal(remote.get(key, cid, decode=decoder(cid)), _block(data, cid))
    assert sum(srv.chunk_requests().values()) == 0  # the good bytes replaced the bad ones


def test_an_undecodable_cache_file_names_itself_when_the_server_cannot_help(broken, tmp_path):
    srv, url, data, chunk_file = broken
    remote, decoder = _remote(url, tmp_path / "c")
    key, cid = "c/0/1/0", (0, 1, 0)
    remote.cache.put(key, b"bad bytes")
    path = remote.cache.file(key)
    chunk_file.write_bytes(b"also bad")  # the server too
    with pytest.raises(CorruptChunkError) as info:
        remote.get(key, cid, decode=decoder(cid))
    text = _one_line(info.value)
    assert f"fetched from {url}/{key}" in text and f"read from cache_dir {path}" in text, text
    assert not path.exists()
    remote.cache.put(key, b"bad bytes")
    srv.set_fault("500")  # the server down: the cache file is what the message is about
    with pytest.raises(CorruptChunkError) as info:
        remote.get(key, cid, decode=decoder(cid))
    text = _one_line(info.value)
    assert f"read from cache_dir {path}" in text and "HTTP 500" in text, text
    assert not path.exists()


def test_get_without_decode_keeps_the_bytes_as_before(broken, tmp_path):
    srv, url, data, _ = broken
    remote, _ = _remote(url, tmp_path / "c")
    raw = remote.get("c/0/0/1", (0, 0, 1))
    assert isinstance(raw, bytes) and remote.cache.get("c/0/0/1") == raw


# -- 4. claims that are fork-safe and time out -------------------------------------------------


def _wait_child(pid):
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLK"), reason="OFD locks are Linux's")
def test_a_forked_child_does_not_keep_its_parent_s_claim(tmp_path):
    table, entry = tmp_path / ".claims", tmp_path / "entry"
    fd = claim_key(table, "c/0/0/0", entry)
    assert fd is not None and fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    stay_r, stay_w = os.pipe()
    child = os.fork()
    if child == 0:  # a DataLoader worker forked while the parent holds the claim: it lives on
        os.close(stay_w)
        os.read(stay_r, 1)
        os._exit(0 if not cachefiles._HELD else 3)
    os.close(stay_r)
    try:
        release(fd)
        waiter = os.fork()
        if waiter == 0:  # another process waiting for the claim gets it
            got = claim_key(table, "c/0/0/0", entry, timeout=30)
            os._exit(0 if got is not None else 1)
        assert _wait_child(waiter) == 0
    finally:
        os.write(stay_w, b"x")
        os.close(stay_w)
        assert _wait_child(child) == 0


@pytest.mark.parametrize("kind", ["ofd", "flock"])
def test_a_claim_is_free_once_its_holder_dies_even_if_it_forked(tmp_path, kind):
    if kind == "ofd" and not hasattr(fcntl, "F_OFD_SETLK"):
        pytest.skip("OFD locks are Linux's")
    table, entry = tmp_path / ".claims", tmp_path / "entry"

    def take(**kw):
        return claim_key(table, "k", entry, **kw) if kind == "ofd" else claim(entry, **kw)

    ready_r, ready_w = os.pipe()
    stay_r, stay_w = os.pipe()
    holder = os.fork()
    if holder == 0:  # takes the claim, forks a worker that lives on, dies without releasing
        os.close(ready_r)
        os.close(stay_w)
        fd = take()
        if os.fork() == 0:
            os.write(ready_w, b"1")
            os.read(stay_r, 1)
            os._exit(0)
        os._exit(0 if fd is not None else 1)
    os.close(ready_w)
    os.close(stay_r)
    try:
        assert _wait_child(holder) == 0
        assert os.read(ready_r, 1) == b"1"  # the grandchild was forked and is alive
        fd = take(wait=False)
        assert fd is not None  # the holder's death freed it: the grandchild closed its copy
        release(fd)
    finally:
        os.write(stay_w, b"x")
        os.close(stay_w)
        os.close(ready_r)


@pytest.mark.parametrize("kind", ["ofd", "flock"])
def test_waiting_for_a_claim_that_is_never_released_times_out(tmp_path, kind):
    table, entry = tmp_path / ".claims", tmp_path / "entry"

    def take(**kw):
        return claim_key(table, "k", entry, **kw) if kind == "ofd" else claim(entry, **kw)

    held = take()  # another open file description: excludes this process's other claims too
    try:
        with pytest.warns(RuntimeWarning, match="going on without it") as record:
            assert take(timeout=0.05) is None  # it returned, without the claim
            assert take(timeout=0.05) is None
        assert len([w for w in record if "going on without it" in str(w.message)]) == 1  # one warning
        assert take(wait=False) is None
    finally:
        release(held)
    fd = take(timeout=0.05)
    assert fd is not None
    release(fd)
    release(None)  # nothing to give back: no error


def test_a_remote_get_goes_on_without_a_stuck_claim(broken, tmp_path):
    srv, url, data, _ = broken
    remote, decoder = _remote(url, tmp_path / "c", claim_timeout=0.05)
    key, cid = "c/0/0/1", (0, 0, 1)
    stuck = claim_key(remote.cache.path / ".claims", key, remote.cache.file(key))  # never released here
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            np.testing.assert_array_equal(remote.get(key, cid, decode=decoder(cid)), _block(data, cid))
        assert any("going on without it" in str(w.message) for w in record)
        assert srv.chunk_requests()[f"/v3.zarr/{key}"] == 1
    finally:
        release(stuck)


def test_remote_settings_take_the_claim_timeout_from_dask_config():
    import dask

    with dask.config.set({"vesuvius-dask.remote.claim-timeout": 7}):
        assert RemoteSettings.from_config().claim_timeout == 7.0
    with pytest.raises(Exception, match="out of range"):
        RemoteSettings(claim_timeout=0)
