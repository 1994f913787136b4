"""The one configuration table (vesuvius_dask/vesuvius-dask.yaml, read through vesuvius_dask.config)."""

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import yaml

from vesuvius_dask import config
from vesuvius_dask.remote.fetch import RemoteSettings

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "vesuvius_dask"
SOURCES = sorted([*PKG.rglob("*.py"), *(ROOT / "cli").rglob("*.py")])
KEYS = list(config.keys())

#: Keys of the table whose reading is a one-line change in a module another change
#: owns (writers/predict.py); they are read once those lines land. Empty this then.
PENDING: set[str] = set()

_GETTERS = {"get", "get_bytes"}
_DEFAULTS = {"default", "default_bytes"}


def _calls(tree):
    """``(function name, first argument)`` of every ``config.<fn>("...")`` call."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "config"
                and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            yield node.func.attr, node.args[0].value


def _read_keys():
    """Keys the package reads at run time.

    String literals of the table that are not a ``config.default`` argument
    (``config.get("x")``, or a key handed to a function that reads it), and the fields of
    RemoteSettings (``from_config`` reads ``remote.<field>``).
    """
    table = set(KEYS)
    found = set()
    for path in SOURCES:
        if path.name == "config.py":
            continue
        tree = ast.parse(path.read_text())
        only_default = {id(n.args[0]) for n in ast.walk(tree)
                        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                        and n.func.attr in _DEFAULTS and n.args}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and node.value in table
                    and id(node) not in only_default):
                found.add(node.value)
    found |= {f"remote.{f.name.replace('_', '-')}" for f in dataclasses.fields(RemoteSettings)}
    return found


def test_every_key_of_the_table_is_read_by_the_package():
    unread = set(KEYS) - _read_keys()
    assert unread <= PENDING, f"keys nothing reads: {sorted(unread - PENDING)}"


def test_every_key_the_package_names_is_in_the_table():
    """Keys in config.get/default calls, as ``vesuvius-dask.<key>`` and as environment variables.

    In code, docstrings and the docs pages.
    """
    table = set(KEYS)
    sections = {k.rsplit(".", 1)[0] for k in KEYS if "." in k}
    wrong = []
    for path in SOURCES:
        text = path.read_text()
        if path.name != "config.py":
            wrong += [f"{path.name}: config.{fn}({key!r})" for fn, key in _calls(ast.parse(text))
                      if (fn in _GETTERS or fn in _DEFAULTS) and key not in table]
    for path in [*SOURCES, *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text()
        for key in re.findall(r"vesuvius-dask\.([a-z][a-z0-9-]*(?:\.[a-z][a-z0-9-]*)*)", text):
            if key not in table and key not in sections and key != "yaml":  # the table's file
                wrong.append(f"{path.name}: vesuvius-dask.{key}")
        for env in re.findall(r"DASK_VESUVIUS_DASK__([A-Z0-9_]+)", text):
            key = env.lower().replace("__", ".").replace("_", "-")
            if key not in table:
                wrong.append(f"{path.name}: DASK_VESUVIUS_DASK__{env}")
    assert not wrong, wrong


def test_only_the_config_module_reads_dask_config():
    direct = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in SOURCES if p.name != "config.py"
              for node in ast.walk(ast.parse(p.read_text()))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "set", "update_defaults")
              and ast.unparse(node.func.value) in ("dask.config", "dask_config")]
    assert not direct, direct


def test_an_unknown_key_is_refused():
    with pytest.raises(KeyError, match="remote.concurrence"):
        config.get("remote.concurrence")
    with pytest.raises(KeyError, match="section"):
        config.get("remote")


def test_the_docs_page_lists_every_key_with_its_default():
    rows = re.findall(r"^\| `([a-z0-9.-]+)` \| (.*?) \| .* \| `(\w+)` \|$",
                      (ROOT / "docs" / "configuration.md").read_text(), flags=re.M)
    documented = {key: cell.strip().strip("`") for key, cell, _ in rows}
    assert sorted(documented) == sorted(KEYS) and len(rows) == len(KEYS)
    wrong = {k: v for k, v in documented.items() if yaml.safe_load(v) != config.default(k)}
    assert not wrong, wrong
    env = {key: var for key, _, var in rows}
    assert env == {k: "DASK_VESUVIUS_DASK__" + k.upper().replace(".", "__").replace("-", "_") for k in KEYS}


def test_defaults_are_registered_once_and_match_the_constants():
    assert dask.config.get("vesuvius-dask.remote.concurrency") == 32
    before = len(dask.config.defaults)
    config._register()
    assert len(dask.config.defaults) == before
    from vesuvius_dask.engine.batches import DEFAULT_CACHE_BYTES
    from vesuvius_dask.io.volume import DEFAULT_RAM_CHUNKS, MAX_CHUNK_BYTES
    from vesuvius_dask.writers.convert import DEFAULT_CHUNKS

    assert DEFAULT_CACHE_BYTES == 512 * 2**20 and MAX_CHUNK_BYTES == 2**31
    assert DEFAULT_RAM_CHUNKS == DEFAULT_CHUNKS == (4, 512, 512)
    assert RemoteSettings() == RemoteSettings.from_config()


def test_dask_config_set_changes_the_journal_interval(tmp_path):
    from vesuvius_dask.writers.outputs import OutputJob

    with dask.config.set({"vesuvius-dask.journal-interval": 0.25}):
        job = OutputJob(tmp_path / "a.zarr", [], {"a": 1}, what="test")
    job._unlock()
    assert job.journal.interval == 0.25
    job = OutputJob(tmp_path / "b.zarr", [], {"a": 1}, what="test")
    job._unlock()
    assert job.journal.interval == 2.0


def test_dask_config_set_changes_the_remote_settings():
    with dask.config.set({"vesuvius-dask.remote.concurrency": 3, "vesuvius-dask.remote.deadline-factor": 2}):
        settings = RemoteSettings.from_config()
    assert (settings.concurrency, settings.deadline_factor) == (3, 2.0)
    assert RemoteSettings.from_config().concurrency == 32


def test_dask_config_set_changes_the_open_tiff_layer_cap(tmp_path):
    import tifffile

    from vesuvius_dask.io.tiff import TiffStack

    vol = np.arange(12 * 6 * 7, dtype=np.uint16).reshape(12, 6, 7)
    for z in range(12):
        tifffile.imwrite(tmp_path / f"{z:02d}.tif", vol[z])
    files = [str(tmp_path / f"{z:02d}.tif") for z in range(12)]
    with dask.config.set({"vesuvius-dask.tiff.max-open-layers": 3}):
        stack = TiffStack(files, vol.shape, vol.dtype)
    np.testing.assert_array_equal(stack[0:12, 1:5, 2:6], vol[:, 1:5, 2:6])
    assert len(stack._maps) == 3
    stack = TiffStack(files, vol.shape, vol.dtype)  # the default again: 128
    np.testing.assert_array_equal(stack[0:12], vol)
    assert len(stack._maps) == 12


def test_dask_config_set_changes_a_metadata_limit(tmp_path):
    import zarr

    from vesuvius_dask.errors import VolumeError
    from vesuvius_dask.io.open import open_volume

    zarr.create_array(tmp_path / "v.zarr", shape=(4, 8, 8), chunks=(2, 8, 8), dtype="u1", zarr_format=2)
    with dask.config.set({"vesuvius-dask.limits.stored-chunks": 1}):
        with pytest.raises(VolumeError, match="2 stored chunks .* at most 1 "):
            open_volume(tmp_path / "v.zarr")
    assert open_volume(tmp_path / "v.zarr").shape == (4, 8, 8)


def _run(code, **env):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return out.stdout.split()


def test_importing_the_package_registers_the_defaults():
    assert _run("import dask, vesuvius_dask\n"
                "print(dask.config.get('vesuvius-dask.cache-bytes').replace(' ', ''))\n"
                "print(dask.config.get('vesuvius-dask.remote.missing'))") == ["512MiB", "error"]


def test_environment_variables_set_keys():
    env = {"DASK_VESUVIUS_DASK__REMOTE__CONCURRENCY": "3", "DASK_VESUVIUS_DASK__JOURNAL_INTERVAL": "0.5",
           "DASK_VESUVIUS_DASK__CACHE_BYTES": "1 GiB", "DASK_VESUVIUS_DASK__CHUNKS": "(2, 64, 64)"}
    code = ("from vesuvius_dask.remote.fetch import RemoteSettings\n"
            "from vesuvius_dask.writers import outputs, convert\n"
            "from vesuvius_dask.engine.batches import DEFAULT_CACHE_BYTES\n"
            "s = RemoteSettings.from_config()\n"
            "print(s.concurrency, outputs._journal_interval(), DEFAULT_CACHE_BYTES,\n"
            "      ','.join(map(str, convert.DEFAULT_CHUNKS)), s.retries)")
    assert _run(code, **env) == ["3", "0.5", str(2**30), "2,64,64", "4"]


def test_a_value_set_before_the_import_wins_over_the_default():
    code = ("import dask\n"
            "dask.config.set({'vesuvius-dask.cache-bytes': '64 MiB'})\n"
            "from vesuvius_dask.engine.batches import DEFAULT_CACHE_BYTES\n"
            "from vesuvius_dask import config\n"
            "print(DEFAULT_CACHE_BYTES, config.get('remote.concurrency'))")
    assert _run(code) == [str(64 * 2**20), "32"]


def test_random_stream_salts_are_one_named_table():
    from vesuvius_dask.sampling import plan, starts

    assert dict(starts.SALTS) == {"uniform-volumes": 1, "proportional": 2, "volume-order": 3,
                                  "class-slots": 5, "locality-runs": 11, "locality-cells": 12}
    with pytest.raises(TypeError):
        starts.SALTS["proportional"] = 4
    for module in (starts, plan):  # no bare salt left in a seed key
        text = Path(module.__file__).read_text()
        assert not re.search(r"\[self\.seed, (self\.)?epoch, \d", text), module.__name__
        assert not re.search(r"key \+ \[\d", text), module.__name__


def test_any_voxel_is_one_name():
    import inspect

    from vesuvius_dask.sampling.plan import BlockPlan
    from vesuvius_dask.sampling.starts import ANY_VOXEL

    assert inspect.signature(BlockPlan).parameters["positive_coverage"].default == ANY_VOXEL == 1e-9
