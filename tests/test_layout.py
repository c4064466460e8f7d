"""The package's layout rules, read from the source with `ast` (nothing is imported or run).

1. No module of ``degenjax._src`` (nor ``degenjax/cli.py``) uses another module's private (underscore) names: not
   ``from degenjax._src.x import _name``, not ``x._name`` on an imported degenjax module. Shared helpers live in
   ``types``, ``numerics`` and ``operators`` under public names.
2. The numerical modules do no file I/O and draw nothing: they import neither matplotlib nor the plotting or
   results-I/O modules.
3. ``ArrayTree`` is defined once (``types.py``).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "degenjax" / "_src"
MODULES = sorted(SRC.glob("*.py")) + [ROOT / "degenjax" / "cli.py"]

# modules that compute numbers (no figures, no files); the application layer (quickstart, sweep, checkpoints, cli,
# plots, resultsio, records, gpt2's weight loader) is deliberately not in this list
NUMERICAL = ("sections", "grams", "eigen", "spectral", "basis", "edges", "degeneracy", "modularity", "theory",
             "numerics", "operators", "types", "structure", "attention", "sgld", "llc", "minibatch", "checks",
             "diagnostics", "calibrate", "validation", "hashing")


def _private_uses(path: pathlib.Path) -> list[str]:
    """``file:line: what`` for every use of another degenjax module's private name in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bad, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("degenjax"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    bad.append(f"{path.name}:{node.lineno}: from {node.module} import {alias.name}")
                elif node.module in ("degenjax._src", "degenjax"):  # `from degenjax._src import eigen`
                    modules[alias.asname or alias.name] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("degenjax"):
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return bad


def test_checker_finds_private_uses(tmp_path):
    """The checker itself: both forms are found, public names and dunders are not."""
    f = tmp_path / "mod.py"
    f.write_text("from degenjax._src.grams import _HIGHEST, activation_grams\n"
                 "from degenjax._src import eigen as E\n"
                 "def g():\n    from degenjax import __version__\n    return E._layout, E.eigh, __version__\n")
    assert _private_uses(f) == ["mod.py:1: from degenjax._src.grams import _HIGHEST", "mod.py:5: E._layout"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_private_names_across_modules(path):
    bad = _private_uses(path)
    assert not bad, "private names of other modules used (give the helper a public name in types/numerics/" \
                    "operators or in its own module):\n" + "\n".join(bad)


@pytest.mark.parametrize("name", NUMERICAL)
def test_numerical_modules_draw_nothing(name):
    path = SRC / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{name}.py is not in this tree")
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported |= {f"{node.module}.{a.name}" for a in node.names}
    drawing = sorted(m for m in imported if m.startswith("matplotlib") or m in (
        "degenjax._src.plots", "degenjax._src.resultsio"))
    assert not drawing, f"{name}.py is a numerical module but imports {drawing}; move the drawing/I/O to plots.py " \
                        "or resultsio.py"


def test_array_tree_defined_once():
    defs = []
    for path in MODULES:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ArrayTree" for t in node.targets):
                defs.append(path.name)
    assert defs == ["types.py"]
