"""The package's folders are its layers: imports point down, and only loaders/ and viewer/ need torch."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "vesuvius_dask"

#: Layers from the bottom up: a module may import only from its own layer or those below.
LAYERS = {
    "base": 0,      # errors, config, arguments, lru, extras, moved (top-level modules)
    "remote": 1,
    "io": 2,
    "surfaces": 3,  # tifxyz meshes, normals, lazy renders (reads through io)
    "sampling": 4,
    "engine": 5,
    "loaders": 6,
    "writers": 7,
    "viewer": 8,
    "testing": 2,   # data makers and the test server: io at most
}
HEAVY = ("torch", "napari", "distributed")
#: The public face, above every layer: the package's ``__init__`` and the old-name aliases.
FACADE = ("vesuvius_dask", "vesuvius_dask.moved")


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in LAYERS else "base"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), is_pkg, ast.parse(path.read_text())


def _imports(module: str, is_pkg: bool, tree: ast.Module, top_level_only: bool):
    """(imported module, line) for every import; module level only when asked."""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if top_level_only and isinstance(node, ast.Try):  # `try: import torch` at module level
            for inner in node.body:
                yield from _imports_of(inner, base)
        yield from _imports_of(node, base)


def _imports_of(node, base):
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, node.lineno
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        else:
            names = [node.module]
        for name in names:
            yield name, node.lineno


def test_imports_point_down():
    wrong = []
    for module, is_pkg, tree in _modules():
        if module in FACADE:
            continue
        here = LAYERS[_layer(module)]
        for name, line in _imports(module, is_pkg, tree, top_level_only=False):
            if not name.startswith("vesuvius_dask."):
                continue
            if LAYERS[_layer(name)] > here and _layer(name) != _layer(module):
                wrong.append(f"{module}:{line} imports {name}")
    assert not wrong, wrong


@pytest.mark.slow
@pytest.mark.parametrize("heavy", HEAVY)
def test_only_loaders_and_viewer_import_torch_or_napari_at_module_level(heavy):
    found = []
    for module, is_pkg, tree in _modules():
        for name, line in _imports(module, is_pkg, tree, top_level_only=True):
            if name.split(".")[0] == heavy and _layer(module) not in ("loaders", "viewer"):
                found.append(f"{module}:{line}")
    assert not found, found


def test_importing_the_package_loads_no_extra():
    import subprocess
    import sys

    code = ("import sys, vesuvius_dask, vesuvius_dask.io, vesuvius_dask.remote, vesuvius_dask.sampling, "
            "vesuvius_dask.engine, vesuvius_dask.writers\n"
            "print(sorted(m for m in ('torch', 'napari', 'distributed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_old_module_paths_still_work_with_a_warning():
    import importlib
    import warnings

    from vesuvius_dask.moved import MOVED

    for old, new in MOVED.items():
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert importlib.import_module(old) is importlib.import_module(new)


def test_the_design_notes_name_every_module():
    # docs/design.md's layout is the one list of modules, each with its job: a new module
    # that is not in it fails here
    import re

    text = (PKG.parent / "docs" / "design.md").read_text()
    block = text[text.index("```\nvesuvius_dask/"):]
    block = block[: block.index("```", 4)]
    named = set(re.findall(r"[\w]+\.py", block))
    modules = [p for root in (PKG, PKG.parent / "cli") for p in root.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")]
    missing = sorted(str(p.relative_to(PKG.parent)) for p in modules if p.name not in named)
    assert not missing, f"add to docs/design.md's layout: {missing}"
