"""Scrolls and segments by name: the recorded catalogue, and the user's.

A catalogue has the structure of the official ``vesuvius`` package's ``scrolls.yaml``::

    "<scroll>":
      "<energy keV>":
        "<resolution um>":
          volume: URL
          segments: {"<id>": URL}

The recorded one (``scrolls.yaml`` beside this module) holds the published scroll
volumes of the legacy HTTPS tree (keys ``"1"`` to ``"5"``) and of the open-data S3
bucket (keys ``"PHercParis4"``, ``"PHerc0332"``, ...). A user's file of the same
structure, given as ``catalog=`` or in the environment variable
:data:`ENV_VAR`, extends it: its entries win, and a file whose top level holds
``replace: true`` is used alone. Names resolve offline: nothing here touches the
network.

Rules, in order (:func:`lookup`):

* only a ``str`` can be a name (an ``os.PathLike`` is always a path), and only when
  nothing exists at that path, it is not a URL and it has no folder separator or
  file suffix (``.zarr``, ``.tif``, ...): **a local path that exists always wins**;
* a scroll name matches without case, spaces, ``-`` or ``_`` and with or without a
  leading ``scroll``: ``"1"``, ``"Scroll 1"``, ``"scroll1"`` are the key ``"1"``;
* ``NAME:ENERGY:RESOLUTION`` (``"PHercParis4:78keV:2.4um"``, units optional) or
  ``energy=`` / ``resolution=`` pick among a scroll's volumes; without them, the
  scroll's default: its first energy and, under it, its first resolution, in
  catalogue order (a user's file comes before the recorded one);
* otherwise the name is a segment id (``"20230530164535"``), searched in every
  volume's ``segments``;
* an unknown name is a :class:`~vesuvius_dask.errors.VolumeNotFoundError` naming the
  nearest known names.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArgumentError, VolumeError, VolumeNotFoundError

__all__ = ["ENV_VAR", "RECORDED", "Catalog", "Entry", "Match", "load_catalog", "lookup",
           "resolve_source", "looks_like_name"]

#: The environment variable naming a user's catalogue file (used when ``catalog=`` is not given).
ENV_VAR = "VESUVIUS_DASK_CATALOG"
#: The recorded catalogue, shipped with the package.
RECORDED = Path(__file__).with_name("scrolls.yaml")
#: Suffixes that make a string a file name, never a catalogue name.
FILE_SUFFIXES = (".zarr", ".tif", ".tiff", ".png", ".jpg", ".json", ".yaml", ".yml", ".zip",
                 ".npy", ".pt", ".pt2")
#: Keys of a resolution's entry.
ENTRY_KEYS = ("volume", "segments")


@dataclass(frozen=True)
class Entry:
    """One volume of the catalogue: a scroll at one energy and resolution.

    Attributes
    ----------
    scroll, energy, resolution : str
        The keys as the catalogue spells them (``"1"``, ``"54"``, ``"7.91"``).
    volume : str or None
        The volume's URL (or a local path from a user's file).
    segments : dict
        Segment id to URL.
    default : bool
        Whether this is the scroll's default volume (its first).
    """

    scroll: str
    energy: str
    resolution: str
    volume: str | None
    segments: dict = field(default_factory=dict, compare=False, hash=False)
    default: bool = False

    @property
    def name(self) -> str:
        """The name that selects exactly this volume: ``scroll1:54keV:7.91um``."""
        return f"{display(self.scroll)}:{self.energy}keV:{self.resolution}um"


@dataclass(frozen=True)
class Match:
    """What a name resolved to: a volume or a segment, and its URL."""

    kind: str  # "volume" or "segment"
    url: str
    entry: Entry
    segment: str | None = None


def display(scroll: str) -> str:
    """How a scroll key is shown: ``scroll1`` for the numbered scrolls, the key otherwise."""
    return f"scroll{scroll}" if scroll.isdigit() else scroll


def normalize(name: Any) -> str:
    """A scroll name as it is compared: lower case, no spaces, ``-`` or ``_``, no ``scroll`` prefix."""
    text = re.sub(r"[\s_\-]+", "", str(name)).lower()
    m = re.fullmatch(r"scroll(\w+)", text)
    return m.group(1) if m else text


def number(value: Any, unit: str) -> float | None:
    """``"54"``, ``"54keV"``, ``54`` -> 54.0 (``unit`` stripped, any case); None if not a number."""
    text = re.sub(rf"(?i)\s*({unit})$", "", str(value).strip())
    try:
        return float(text)
    except ValueError:
        return None


def looks_like_name(source: Any) -> bool:
    """True for a ``str`` that may be a catalogue name: no URL, folder separator or file suffix."""
    if not isinstance(source, str) or not source.strip() or "://" in source:
        return False
    if "/" in source or "\\" in source or source.startswith(("~", ".")):
        return False
    return not source.lower().endswith(FILE_SUFFIXES)


class Catalog:
    """Scrolls by name: a mapping scroll -> energy -> resolution -> ``{volume, segments}``.

    Made by :func:`load_catalog`. Iterating yields every :class:`Entry` in order.

    Parameters
    ----------
    scrolls : dict
        The checked structure (see :func:`load_catalog`).
    sources : tuple of str
        The files it was read from, first wins.
    """

    def __init__(self, scrolls: dict, sources: tuple[str, ...] = ()) -> None:
        self.scrolls = scrolls
        self.sources = sources

    def __iter__(self) -> Iterator[Entry]:
        for scroll, energies in self.scrolls.items():
            first = True
            for energy, resolutions in energies.items():
                for resolution, item in resolutions.items():
                    yield Entry(scroll, energy, resolution, item.get("volume"),
                                dict(item.get("segments") or {}), default=first)
                    first = False

    def __repr__(self) -> str:
        return f"Catalog({len(self.scrolls)} scrolls from {', '.join(self.sources) or 'nothing'})"

    def scroll_key(self, name: str) -> str | None:
        """The scroll key ``name`` matches (see the module's rules), or None."""
        wanted = normalize(name)
        for key in self.scrolls:
            if normalize(key) == wanted:
                return key
        return None

    def entries(self, name: str) -> list[Entry]:
        """Every volume of a scroll (the default first), or ``[]`` if ``name`` is not a scroll."""
        key = self.scroll_key(name)
        return [e for e in self if e.scroll == key] if key is not None else []

    def volume(self, name: str, *, energy: Any = None, resolution: Any = None) -> Entry | None:
        """The entry of a scroll at ``energy`` keV and ``resolution`` µm (defaults: its first).

        Raises
        ------
        VolumeNotFoundError
            The scroll is known but has no volume at that energy or resolution.
        """
        entries = self.entries(name)
        if not entries:
            return None
        want_e, want_r = _wanted("energy", energy, "kev"), _wanted("resolution", resolution, "um|µm")
        found = [e for e in entries if e.volume and _close(number(e.energy, "kev"), want_e)
                 and _close(number(e.resolution, "um|µm"), want_r)]
        if not found:
            known = ", ".join(f"{e.energy} keV {e.resolution} um" for e in entries if e.volume)
            asked = " ".join(p for p in (energy is not None and f"{energy} keV",
                                         resolution is not None and f"{resolution} um") if p)
            raise VolumeNotFoundError(f"{name}: no volume at {asked or 'any energy'} in the catalogue "
                                      f"(known: {known or 'none'})")
        return found[0]

    def segment(self, seg_id: str) -> tuple[Entry, str] | None:
        """The entry holding segment ``seg_id`` and its URL (the first that lists it), or None."""
        wanted = str(seg_id).strip()
        for entry in self:
            if wanted in entry.segments:
                return entry, entry.segments[wanted]
        return None

    def names(self) -> list[str]:
        """Every name the catalogue knows: scrolls (shown as ``scroll1``), then segment ids."""
        scrolls = [display(k) for k in self.scrolls]
        segments = [s for e in self for s in e.segments]
        return list(dict.fromkeys(scrolls + segments))

    def nearest(self, name: str, n: int = 3) -> list[str]:
        """The known names closest to ``name`` (difflib), best first."""
        known = {}
        for shown in self.names():
            known.setdefault(shown.lower(), shown)
            known.setdefault(normalize(shown), shown)
        close = difflib.get_close_matches(str(name).lower().replace(" ", ""), list(known), n=2 * n,
                                          cutoff=0.6)
        return list(dict.fromkeys(known[c] for c in close))[:n]


def _wanted(label: str, value: Any, unit: str) -> float | None:
    """The number asked for (None: any), or an ArgumentError naming the keyword."""
    if value is None:
        return None
    want = number(value, unit)
    if want is None:
        raise ArgumentError(f"{label}={value!r} is not a number")
    return want


def _close(a: float | None, b: float | None) -> bool:
    """``a`` is ``b`` (None: anything goes)."""
    return b is None or (a is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b)))


# ----------------------------------------------------------------------------- reading files
def _fail(source: str, what: str) -> VolumeError:
    return VolumeError(f"{source}: malformed catalogue: {what}")


def _key(value: Any, source: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _fail(source, f"{where}: key {value!r} is not a name or number")
    return str(value)


def _location(value: Any, source: str, where: str, base: Path | None) -> str:
    """A URL as is; a local path from a user's file relative to that file's folder."""
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, f"{where}: expected a URL or path string, got {value!r}")
    if "://" in value or base is None:
        return value
    path = Path(os.path.expanduser(value))
    return os.fspath(path if path.is_absolute() else base / path)


def _entry(item: Any, source: str, where: str, base: Path | None) -> dict:
    if not isinstance(item, Mapping):
        raise _fail(source, f"{where}: expected a mapping with 'volume' and/or 'segments', "
                            f"got {type(item).__name__}")
    unknown = [str(k) for k in item if k not in ENTRY_KEYS]
    if unknown:
        raise _fail(source, f"{where}: unknown key {unknown[0]!r} (expected 'volume', 'segments')")
    out: dict = {}
    if item.get("volume") is not None:
        out["volume"] = _location(item["volume"], source, f"{where} volume", base)
    segments = item.get("segments") or {}
    if not isinstance(segments, Mapping):
        raise _fail(source, f"{where} segments: expected a mapping id: URL, got {type(segments).__name__}")
    out["segments"] = {_key(k, source, f"{where} segments"):
                       _location(v, source, f"{where} segment {k}", base) for k, v in segments.items()}
    if "volume" not in out and not out["segments"]:
        raise _fail(source, f"{where}: neither a 'volume' nor any 'segments'")
    return out


def _number_keys(mapping: Any, source: str, where: str, unit: str, label: str) -> Iterator[tuple[str, Any]]:
    if not isinstance(mapping, Mapping) or not mapping:
        plural = "energies (keV)" if label == "energy" else "resolutions (um)"
        raise _fail(source, f"{where}: expected a mapping of {plural}, got "
                            f"{type(mapping).__name__ if mapping is not None else 'nothing'}")
    for key, value in mapping.items():
        text = _key(key, source, where)
        if number(text, unit) is None:
            raise _fail(source, f"{where}: {label} {text!r} is not a number")
        yield text, value


def check_structure(data: Any, source: str, base: Path | None = None) -> tuple[dict, bool]:
    """Check a loaded catalogue; return ``(scrolls, replace)``.

    Raises
    ------
    VolumeError
        One line naming ``source`` and what is wrong.
    """
    if data is None:
        return {}, False
    if not isinstance(data, Mapping):
        raise _fail(source, f"expected a mapping of scrolls at the top, got {type(data).__name__}")
    replace = data.get("replace", False)
    if not isinstance(replace, bool):
        raise _fail(source, f"'replace' must be true or false, got {replace!r}")
    scrolls: dict = {}
    for scroll, energies in data.items():
        if scroll == "replace":
            continue
        name = _key(scroll, source, "top level")
        where = f"scroll {name!r}"
        scrolls[name] = {
            energy: {res: _entry(item, source, f"{where} {energy} keV {res} um", base)
                     for res, item in _number_keys(resolutions, source, f"{where} {energy} keV",
                                                   "um|µm", "resolution")}
            for energy, resolutions in _number_keys(energies, source, where, "kev", "energy")}
    return scrolls, replace


def read_catalog_file(path: str | os.PathLike) -> tuple[dict, bool]:
    """Read and check a catalogue file; return ``(scrolls, replace)``.

    Raises
    ------
    VolumeNotFoundError
        No such file.
    VolumeError
        Not YAML, or not a catalogue (one line naming the file and what is wrong).
    """
    import yaml

    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise VolumeNotFoundError(f"{source}: no such catalogue file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise VolumeError(f"{source}: cannot read the catalogue ({err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise _fail(source, f"not YAML ({line}{getattr(err, 'problem', None) or err})") from None
    return check_structure(data, source, Path(source).resolve().parent)


@functools.lru_cache(maxsize=1)
def _recorded() -> dict:
    return read_catalog_file(RECORDED)[0]


def _merge(first: dict, then: dict) -> dict:
    """``first``'s scrolls, energies, resolutions and segments win; ``then`` adds what it lacks.

    Scrolls are merged by their normalized name (``Scroll1`` in a user's file is the
    recorded ``"1"``), in ``first``'s order, then the rest of ``then``'s.
    """
    out = {k: {e: {r: {"volume": i.get("volume"), "segments": dict(i.get("segments") or {})}
                   for r, i in res.items()} for e, res in en.items()} for k, en in first.items()}
    keys = {normalize(k): k for k in out}
    for scroll, energies in then.items():
        target = out.setdefault(keys.setdefault(normalize(scroll), scroll), {})
        for energy, resolutions in energies.items():
            e_key = next((e for e in target if number(e, "kev") == number(energy, "kev")), energy)
            tier = target.setdefault(e_key, {})
            for res, item in resolutions.items():
                r_key = next((r for r in tier if number(r, "um|µm") == number(res, "um|µm")), res)
                mine = tier.setdefault(r_key, {"volume": None, "segments": {}})
                if mine.get("volume") is None:
                    mine["volume"] = item.get("volume")
                mine["segments"] = {**dict(item.get("segments") or {}), **mine["segments"]}
    return out


def load_catalog(catalog: str | os.PathLike | Mapping | None = None) -> Catalog:
    """The catalogue names resolve against: the user's (if any) over the recorded one.

    Parameters
    ----------
    catalog : str, os.PathLike or mapping, optional
        A user's catalogue file (or an already loaded mapping of the same
        structure). Default: the file named by the environment variable
        ``VESUVIUS_DASK_CATALOG``, if set. Its entries win over the recorded
        ones; with a top-level ``replace: true`` it is used alone.

    Returns
    -------
    Catalog

    Raises
    ------
    VolumeNotFoundError
        The user's file does not exist.
    VolumeError
        The user's file is malformed (one line naming it and what is wrong).
    """
    if catalog is None:
        catalog = os.environ.get(ENV_VAR) or None
    if catalog is None:
        return Catalog(_recorded(), (os.fspath(RECORDED),))
    if isinstance(catalog, Mapping):
        source = "catalog="
        user, replace = check_structure(catalog, source)
    else:
        source = os.fspath(catalog)
        user, replace = read_catalog_file(catalog)
    if replace:
        return Catalog(_merge(user, {}), (source,))
    return Catalog(_merge(user, _recorded()), (source, os.fspath(RECORDED)))


# ----------------------------------------------------------------------------- names
def _split(name: str) -> tuple[str, str | None, str | None]:
    """``"scroll1:54keV:7.91um"`` -> ``("scroll1", "54keV", "7.91um")``."""
    parts = [p.strip() or None for p in name.split(":")]
    if len(parts) > 3 or parts[0] is None:
        raise ArgumentError(f"{name!r}: a catalogue name is NAME, NAME:ENERGY or "
                            "NAME:ENERGY:RESOLUTION (e.g. scroll1:54keV:7.91um)")
    parts += [None] * (3 - len(parts))
    return parts[0], parts[1], parts[2]


def _pick(label: str, unit: str, from_name: str | None, given: Any) -> Any:
    if given is None:
        return from_name
    if from_name is not None and number(from_name, unit) != number(given, unit):
        raise ArgumentError(f"{label}={given!r} contradicts the name's {from_name!r}")
    return given


def lookup(name: str, *, catalog: str | os.PathLike | Mapping | Catalog | None = None,
           energy: Any = None, resolution: Any = None) -> Match:
    """Resolve a scroll name or segment id (see the module's rules), offline.

    Parameters
    ----------
    name : str
        ``"scroll1"``, ``"Scroll 1"``, ``"1"``, ``"PHercParis4:78keV:2.4um"``, a segment id.
    catalog : str, os.PathLike, mapping or Catalog, optional
        A user's catalogue (see :func:`load_catalog`).
    energy, resolution : float or str, optional
        Pick one of the scroll's volumes (keV, µm); default its first.

    Returns
    -------
    Match

    Raises
    ------
    VolumeNotFoundError
        An unknown name (the message names the nearest known ones), or a known scroll
        with no volume at that energy and resolution.
    """
    cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
    scroll, e_part, r_part = _split(str(name))
    energy = _pick("energy", "kev", e_part, energy)
    resolution = _pick("resolution", "um|µm", r_part, resolution)
    entry = cat.volume(scroll, energy=energy, resolution=resolution)
    if entry is not None:
        return Match("volume", entry.volume or "", entry)
    if energy is None and resolution is None:
        found = cat.segment(scroll)
        if found is not None:
            return Match("segment", found[1], found[0], segment=scroll.strip())
    near = cat.nearest(scroll)
    hint = f"; nearest: {', '.join(near)}" if near else "; `vesuvius-dask ls` lists the known names"
    raise VolumeNotFoundError(f"{name}: no such file or directory, and no scroll or segment of that "
                              f"name in the catalogue{hint}")


def resolve_source(source: Any, *, catalog: str | os.PathLike | Mapping | Catalog | None = None,
                   energy: Any = None, resolution: Any = None, kind: str | None = None) -> Any:
    """``source`` itself unless it is a catalogue name; then the URL (or path) it stands for.

    A path that exists, a URL, a non-``str`` and a string that cannot be a name
    (:func:`looks_like_name`) come back unchanged; a name that the catalogue does not
    know raises :class:`~vesuvius_dask.errors.VolumeNotFoundError`. With ``kind``
    (``"volume"`` or ``"segment"``), a name of the other kind raises it too.

    Raises
    ------
    VolumeNotFoundError
        An unknown name (with the nearest known ones), or one of the wrong ``kind``.
    ArgumentError
        ``energy`` or ``resolution`` given with a source that is not a catalogue name.
    """
    if looks_like_name(source) and not os.path.lexists(source):
        match = lookup(source, catalog=catalog, energy=energy, resolution=resolution)
        if kind is not None and match.kind != kind:
            raise VolumeNotFoundError(
                f"{source}: the catalogue names a {match.kind} ({match.entry.name}"
                f"{' segment ' + match.segment if match.segment else ''}), not a {kind}")
        return match.url
    what = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "this source"
    for label, value in (("energy", energy), ("resolution", resolution)):
        if value is not None:
            raise ArgumentError(f"{label}= applies to catalogue names (scroll1, ...); "
                                f"{what} is a path or an object")
    return source
