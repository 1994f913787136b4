"""The catalogue (issue 25): scrolls and segments by name, offline; a user's file over the recorded one."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from vesuvius_dask.cli.main import main

import vesuvius_dask as vd
from vesuvius_dask.errors import ArgumentError, VolumeError, VolumeNotFoundError
from vesuvius_dask.io import catalog as catalog_mod
from vesuvius_dask.io.catalog import ENV_VAR, RECORDED, load_catalog, lookup, resolve_source

from .conftest import ROOT, write_ome, write_zarr

S1 = ("https://dl.ash2txt.org/full-scrolls/Scroll1/PHercParis4.volpkg/volumes_zarr_standardized/"
      "54keV_7.91um_Scroll1A.zarr/")
S1_S3_78 = ("s3://vesuvius-challenge-open-data/PHercParis4/volumes/"
            "20260411134726-2.400um-0.2m-78keV-masked.zarr/")
SEG = "https://dl.ash2txt.org/full-scrolls/Scroll1/PHercParis4.volpkg/paths/20230530164535/"


@pytest.fixture(autouse=True)
def _no_user_catalogue(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def local_vol(tmp_path, rng_volume):
    write_zarr(tmp_path / "mine.zarr", rng_volume, chunks=(4, 64, 64))
    return tmp_path / "mine.zarr"


# ----------------------------------------------------------------------------- the recorded catalogue
@pytest.mark.parametrize("name", ["scroll1", "Scroll 1", "1", "SCROLL_1", "scroll-1", " Scroll1 "])
def test_scroll_names_and_aliases_resolve_offline(name):
    assert lookup(name).url == S1
    assert resolve_source(name) == S1


def test_both_trees_are_recorded_with_the_official_structure():
    data = yaml.safe_load(RECORDED.read_text())
    assert set(data) >= {"1", "2", "3", "4", "5", "PHercParis4", "PHerc0332"}
    urls = [e.volume for e in load_catalog()]
    assert sum(u.startswith("https://dl.ash2txt.org/full-scrolls/") for u in urls) == 5
    assert all(u.startswith("s3://vesuvius-challenge-open-data/") and u.endswith("-masked.zarr/")
               for u in urls if not u.startswith("https://"))
    assert len(urls) > 5 and len(set(urls)) == len(urls)
    assert lookup("20230530164535").url == SEG


def test_energy_and_resolution_pick_among_a_scrolls_volumes():
    first = lookup("PHercParis4")
    assert first.entry.default and first.entry.energy == "54" and first.url.endswith("54keV-masked.zarr/")
    assert lookup("PHercParis4", energy=78).url == S1_S3_78
    assert lookup("phercparis4", resolution="2.4um").url == S1_S3_78
    assert lookup("PHercParis4:78keV:2.40um").url == S1_S3_78       # the name ls prints
    assert lookup("PHercParis4:78", energy=78.0).url == S1_S3_78
    with pytest.raises(ArgumentError, match="contradicts"):
        lookup("PHercParis4:78", energy=54)
    with pytest.raises(VolumeNotFoundError, match=r"no volume at 60 keV .*known: 54 keV 7.91 um, 78 keV"):
        lookup("PHercParis4", energy=60)
    with pytest.raises(ArgumentError, match="not a number"):
        lookup("scroll1", energy="high")


def test_open_volume_passes_the_url_and_level_on(monkeypatch):
    seen = []

    class _Vol:
        array = "lazy"

    def fake_zarr_volume(source, *, level=None, **kw):
        seen.append((source, level))
        return _Vol()

    monkeypatch.setattr("vesuvius_dask.io.open.zarr_volume", fake_zarr_volume)
    assert vd.open_volume("scroll1", level=2) == "lazy"
    assert vd.open_volume("Scroll 1") == "lazy"
    assert vd.open_volume("PHercParis4", energy=78, level=5) == "lazy"
    assert seen == [(S1, 2), (S1, None), (S1_S3_78, 5)]
    with pytest.raises(ArgumentError, match="energy= applies to catalogue names"):
        vd.open_volume("https://example.org/v.zarr", energy=54)


def test_unknown_name_names_the_nearest_ones_in_one_line():
    with pytest.raises(VolumeNotFoundError) as err:
        vd.open_volume("scrol1")
    text = str(err.value)
    assert "\n" not in text and text.startswith("scrol1: ") and "nearest: scroll1" in text
    with pytest.raises(VolumeNotFoundError, match="nearest: 20230530164535"):
        vd.open_segment("2023053016453")
    with pytest.raises(VolumeNotFoundError, match="names a volume .*not a segment"):
        vd.open_segment("scroll1")


def test_a_missing_path_that_cannot_be_a_name_keeps_its_error(tmp_path):
    with pytest.raises(VolumeNotFoundError) as err:
        vd.open_volume(str(tmp_path / "nope.zarr"))
    assert "catalogue" not in str(err.value) and "no such file" in str(err.value)
    with pytest.raises(VolumeNotFoundError) as err:
        vd.open_volume("nope.zarr")
    assert "catalogue" not in str(err.value)
    assert resolve_source(Path("scroll1")) == Path("scroll1")  # a PathLike is never a name


def test_a_local_path_that_exists_wins_over_a_name(tmp_path, monkeypatch, rng_volume):
    monkeypatch.chdir(tmp_path)
    write_zarr(tmp_path / "scroll1", rng_volume[:4], chunks=(4, 64, 64))
    assert resolve_source("scroll1") == "scroll1"
    np.testing.assert_array_equal(vd.open_volume("scroll1").compute(), rng_volume[:4])


# ----------------------------------------------------------------------------- a user's catalogue
def test_a_user_file_extends_and_overrides(tmp_path, local_vol):
    user = _write(tmp_path / "cat.yaml", {
        "Scroll 1": {54: {7.91: {"volume": "mine.zarr",          # relative to the file's folder
                                 "segments": {"20990101000000": "segs/x"}}}},
        "myscroll": {"88": {"3.24": {"volume": "https://example.org/m.zarr/"}}},
    })
    cat = load_catalog(user)
    assert lookup("scroll1", catalog=cat).url == os.fspath(local_vol)       # the user's wins
    assert lookup("20230530164535", catalog=cat).url == SEG                  # recorded segments kept
    assert lookup("20990101000000", catalog=cat).url == os.fspath(tmp_path / "segs" / "x")
    assert lookup("scroll2", catalog=cat).entry.scroll == "2"                 # the rest kept
    assert lookup("my scroll", catalog=user).url == "https://example.org/m.zarr/"
    assert list(cat)[0].scroll == "Scroll 1" and len([e for e in cat if e.scroll in ("1", "Scroll 1")]) == 1
    np.testing.assert_array_equal(vd.open_volume("scroll1", catalog=user)[:2].compute(),
                                  vd.open_volume(local_vol)[:2].compute())


def test_replace_true_uses_the_user_file_alone(tmp_path):
    user = _write(tmp_path / "only.yaml", {"replace": True,
                                           "mine": {"54": {"7.91": {"volume": "s3://b/v.zarr/"}}}})
    cat = load_catalog(user)
    assert [e.scroll for e in cat] == ["mine"] and cat.sources == (str(user),)
    with pytest.raises(VolumeNotFoundError, match="no scroll or segment of that name"):
        lookup("scroll1", catalog=cat)


def test_the_environment_variable_names_the_user_file(tmp_path, monkeypatch, local_vol):
    env = _write(tmp_path / "env.yaml", {"envscroll": {"54": {"7.91": {"volume": str(local_vol)}}}})
    arg = _write(tmp_path / "arg.yaml", {"argscroll": {"54": {"7.91": {"volume": str(local_vol)}}}})
    monkeypatch.setenv(ENV_VAR, str(env))
    assert vd.open_volume("envscroll").shape == (13, 150, 170)
    assert lookup("scroll1").url == S1                       # extends the recorded one
    cat = load_catalog(arg)                                  # catalog= wins over the variable
    assert lookup("argscroll", catalog=cat) and cat.scroll_key("envscroll") is None


def test_open_segment_by_id_from_a_user_file(tmp_path):
    from vesuvius_dask.testing import write_segment

    written = write_segment(tmp_path / "seg", (6, 40, 50))
    user = _write(tmp_path / "cat.yaml", {"9": {"54": {"7.91": {"segments": {"20240101000000": "seg"}}}}})
    seg = vd.open_segment("20240101000000", catalog=user)
    np.testing.assert_array_equal(seg.volume.compute(), written["volume"])
    assert seg.mask is not None
    assert vd.open_volume("20240101000000", catalog=user).shape == (6, 40, 50)


MALFORMED = [
    ("scroll1: [unclosed", "not YAML (line 1"),
    ("- 1\n- 2\n", "expected a mapping of scrolls at the top, got list"),
    ('"1": {"abc": {"7.91": {"volume": "x"}}}', "scroll '1': energy 'abc' is not a number"),
    ('"1": {"54": {"fine": {"volume": "x"}}}', "scroll '1' 54 keV: resolution 'fine' is not a number"),
    ('"1": {"54": {"7.91": {"volme": "x"}}}', "unknown key 'volme'"),
    ('"1": {"54": {"7.91": {}}}', "neither a 'volume' nor any 'segments'"),
    ('"1": {"54": {"7.91": {"volume": "x", "segments": ["a"]}}}', "segments: expected a mapping"),
    ('"1": {"54": {"7.91": {"volume": 3}}}', "expected a URL or path string"),
    ('"1": [54]', "scroll '1': expected a mapping of energies"),
    ('replace: "yes"\n', "'replace' must be true or false"),
]


@pytest.mark.parametrize("text,what", MALFORMED)
def test_a_malformed_file_is_one_line_naming_it(tmp_path, text, what):
    bad = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(VolumeError) as err:
        load_catalog(bad)
    message = str(err.value)
    assert message.startswith(f"{bad}: malformed catalogue: ") and what in message and "\n" not in message


def test_a_missing_user_file(tmp_path):
    with pytest.raises(VolumeNotFoundError, match="no such catalogue file"):
        load_catalog(tmp_path / "none.yaml")


def test_the_recorded_file_ships_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert RECORDED.name in data["tool"]["setuptools"]["package-data"]["vesuvius_dask.io"]
    assert catalog_mod.check_structure(yaml.safe_load(RECORDED.read_text()), "recorded")[0]


# ----------------------------------------------------------------------------- end to end, loopback
def test_a_name_opens_a_served_ome_zarr_at_a_level(tmp_path, rng_volume, capsys):
    pytest.importorskip("aiohttp", reason="Zarr over HTTP needs the 'remote' extra")
    from vesuvius_dask.testing.server import SlowServer

    write_ome(tmp_path / "served" / "vol.ome.zarr", rng_volume, chunks=(4, 64, 64), levels=3)
    with SlowServer(tmp_path / "served") as srv:
        user = _write(tmp_path / "cat.yaml", {"Scroll 9": {"54": {"7.91": {
            "volume": srv.url("vol.ome.zarr/")}}}})
        vol = vd.open_volume("scroll9", level=1, catalog=user)
        np.testing.assert_array_equal(vol.compute(), rng_volume[:, ::2, ::2])
        assert sum(srv.chunk_requests().values()) > 0
        assert main(["info", "scroll 9", "--catalog", str(user), "--level", "2"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(srv.url("vol.ome.zarr/")) and "(13, 38, 43)" in out


# ----------------------------------------------------------------------------- the command line
def test_ls_lists_every_volume_and_a_scrolls_segments(capsys, tmp_path):
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list(load_catalog()))
    assert lines[0].split()[:2] == ["scroll1:54keV:7.91um", "default"] and lines[0].endswith(S1)
    assert any(line.startswith("PHercParis4:78keV:2.4um ") and line.endswith(S1_S3_78) for line in lines)
    assert main(["ls", "Scroll 1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"20230530164535  scroll1:54keV:7.91um  {SEG}" in lines and len(lines) == 5
    user = _write(tmp_path / "cat.yaml", {"replace": True, "x": {"1": {"2": {"volume": "s3://b/x/"}}}})
    assert main(["ls", "--catalog", str(user)]) == 0
    assert capsys.readouterr().out.split() == ["x:1keV:2um", "default", "0", "segments", "s3://b/x/"]


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["ls", "scrol1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nearest: scroll1" in err and "Traceback" not in err
    bad = _write(tmp_path / "bad.yaml", "- 1\n")
    assert main(["info", str(tmp_path), "--catalog", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: malformed catalogue" in err


def test_console_ls_and_names_in_a_subprocess(tmp_path):
    run = [sys.executable, "-m", "vesuvius_dask.cli"]
    out = subprocess.run(run + ["ls"], capture_output=True, text=True, check=True,
                         env={**os.environ, ENV_VAR: ""}).stdout
    assert S1 in out and S1_S3_78 in out
    done = subprocess.run(run + ["convert", "scrolll1", str(tmp_path / "o.zarr")], capture_output=True,
                          text=True, env={**os.environ, ENV_VAR: ""})
    assert done.returncode == 2 and "scrolll1: no such file" in done.stderr
    assert "nearest: scroll1" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o.zarr").exists()
