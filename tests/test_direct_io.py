"""Files written around the page cache (``DirectFiles``): the bytes, the fallbacks, the errors."""

from __future__ import annotations

import errno
import os

import dask
import numpy as np
import pytest

from vesuvius_dask.writers.direct import ALIGN, AUTO_MIN_BYTES, DirectFiles, use_direct

SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 5, 2**20 + 7]


def payload(n: int) -> bytes:
    return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_every_length_reads_back_exactly(tmp_path, where):
    folder = tmp_path
    if where == "shm":  # tmpfs: O_DIRECT refused on many kernels, written the ordinary way
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        import tempfile
        folder = tempfile.mkdtemp(dir="/dev/shm")
    files = DirectFiles(enabled=True)
    try:
        for n in SIZES + SIZES[::-1]:  # a longer file replaced by a shorter one and back
            path = os.path.join(folder, "f")
            files.write(path, payload(n))
            with open(path, "rb") as f:
                assert f.read() == payload(n), n
            files.write(os.path.join(folder, f"v{n}"), memoryview(np.frombuffer(payload(n), np.uint8)))
            assert os.path.getsize(os.path.join(folder, f"v{n}")) == n
    finally:
        if where == "shm":
            import shutil
            shutil.rmtree(folder)


def test_a_filesystem_refusing_o_direct_gets_ordinary_writes(tmp_path, monkeypatch):
    real_open = os.open
    tried = []

    def refusing(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            tried.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    files = DirectFiles(enabled=True)
    for k in range(3):
        files.write(tmp_path / f"f{k}", payload(3 * ALIGN + k))
        assert (tmp_path / f"f{k}").read_bytes() == payload(3 * ALIGN + k)
    assert len(tried) == (1 if hasattr(os, "O_DIRECT") else 0)  # tried once, then never again
    assert not files.direct


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real_write = os.write
    calls = []

    def short(fd, data):
        calls.append(len(data))
        return real_write(fd, memoryview(data)[:2 * ALIGN])  # (still aligned: a view of the buffer)

    monkeypatch.setattr(os, "write", short)
    files = DirectFiles(enabled=True)
    files.write(tmp_path / "f", payload(5 * ALIGN + 3))
    assert (tmp_path / "f").read_bytes() == payload(5 * ALIGN + 3)
    if files.direct:
        assert len(calls) == 3  # 6 blocks (padded), 2 per call


def test_a_full_disk_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    files = DirectFiles(enabled=True)
    with pytest.raises(OSError) as err:
        files.write(tmp_path / "f", payload(3 * ALIGN))
    assert err.value.errno == errno.ENOSPC


def test_the_setting_turns_it_off(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        assert not flags & getattr(os, "O_DIRECT", 0)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    with dask.config.set({"vesuvius-dask.direct-io": False}):
        assert not use_direct(2**40)
        files = DirectFiles(use_direct(2**40))
    assert not files.direct
    assert use_direct(AUTO_MIN_BYTES) and not use_direct(AUTO_MIN_BYTES - 1)  # auto: by size
    with dask.config.set({"vesuvius-dask.direct-io": True}):
        assert use_direct(1)
    files.write(tmp_path / "f", payload(4 * ALIGN))
    assert (tmp_path / "f").read_bytes() == payload(4 * ALIGN)


def test_prediction_outputs_are_the_same_either_way(tmp_path):
    """The writer's chunk files are byte-identical with and without O_DIRECT."""
    from vesuvius_dask.writers.predict import PredictionWriter

    shape, block = (8, 40, 40), (8, 16, 16)
    starts = np.array([[0, y, x] for y in range(0, 25, 12) for x in range(0, 25, 12)])
    preds = np.random.default_rng(0).random((len(starts), *block), dtype=np.float32)
    trees = []
    for setting in (True, False):
        with dask.config.set({"vesuvius-dask.direct-io": setting}):
            out = tmp_path / f"{setting}.zarr"
            w = PredictionWriter(out, shape, block, chunks=(8, 20, 20))
            w.expect(starts)
            w.add(preds, starts)
            w.finalize()
        trees.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*"))
                      if p.is_file() and p.name != "zarr.json"})
    assert trees[0] == trees[1] and len(trees[0]) == 4


def test_a_failed_write_keeps_the_thread_usable(tmp_path):
    """An error kept alive (as a write pool keeps it) must not pin the buffer: a bigger file still goes."""
    files = DirectFiles(enabled=True)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # (root writes anywhere)
            missing = tmp_path / "no" / "such" / "folder"
            with pytest.raises(OSError) as kept:
                files.write(missing / "f", payload(2 * ALIGN))
        else:
            with pytest.raises(OSError) as kept:
                files.write(locked / "f", payload(2 * ALIGN))
        files.write(tmp_path / "big", payload(64 * ALIGN + 9))
        assert (tmp_path / "big").read_bytes() == payload(64 * ALIGN + 9)
        assert kept.value is not None
    finally:
        locked.chmod(0o700)


def test_removing_a_tree_never_follows_links(tmp_path):
    from vesuvius_dask.writers.outputs import remove_path

    outside = tmp_path / "outside"
    outside.mkdir()
    for k in range(100):
        (outside / f"keep{k}").write_text("mine")
    tree = tmp_path / ".o.zarr.partial"
    (tree / "data" / "c").mkdir(parents=True)
    for k in range(100):
        (tree / "data" / "c" / str(k)).write_bytes(b"x")
    (tree / "data" / "link").symlink_to(outside, target_is_directory=True)
    (tree / "file-link").symlink_to(outside / "keep0")
    remove_path(tree)
    assert not tree.exists() and len(list(outside.iterdir())) == 100
