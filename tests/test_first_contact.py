"""First contact: `import degenjax` and `degenjax --help` do not load JAX, the lazy public namespace is complete and
consistent, `degenjax --version`, and importing every public name emits no warning."""

import ast
import importlib.metadata
import pathlib
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import degenjax
from degenjax.cli import app

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("jax", "jaxlib", "flax", "optax", "numpyro", "matplotlib", "sklearn", "networkx", "igraph", "scipy")


def _fresh(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter with warnings as errors (the suite's own process has JAX loaded)."""
    return subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_import_and_cli_do_not_load_jax():
    out = _fresh("import sys, degenjax, degenjax.cli\n"
                 f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.strip() == "[]", f"importing degenjax / its CLI loaded {out.stdout.strip()}"


def test_help_runs_without_jax():
    # the console script's own path: `degenjax --help` = degenjax.cli.main() with argv ["--help"]
    out = _fresh("import sys\nsys.argv = ['degenjax', '--help']\nfrom degenjax.cli import main\n"
                 "try:\n    main()\nexcept SystemExit:\n    pass\n"
                 f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert "Usage: degenjax" in out.stdout and "quickstart" in out.stdout and "--version" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "LOADED []"


def test_every_public_name_loads_without_warnings():
    # -W error: a warning raised while importing any module (e.g. a TqdmWarning, a DeprecationWarning) fails
    out = _fresh("import degenjax as dj\nfor name in dj.__all__:\n    getattr(dj, name)\n"
                 "from degenjax import estimate_llc, interaction_basis, models, theory\n"
                 "assert dj.estimate_llc is estimate_llc and models.MLP is dj.models.MLP\nprint('ok')")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert out.stderr == ""


def test_lazy_namespace_is_consistent():
    # __all__, the lazy table and the TYPE_CHECKING imports name the same objects, each defined where it points
    assert len(set(degenjax.__all__)) == len(degenjax.__all__)
    assert set(degenjax.__all__) == set(degenjax._LAZY)
    tree = ast.parse((ROOT / "degenjax" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    typed = {a.asname: (imp.module, a.name) for imp in block.body for a in imp.names}
    assert set(typed) == set(degenjax.__all__)
    for name, module in degenjax._LAZY.items():
        mod, attr = typed[name]
        assert (f"{mod}.{attr}" if mod == "degenjax" else mod) == module, name
        obj = getattr(degenjax, name)
        assert obj is (sys.modules[module] if module == f"degenjax.{name}" else getattr(sys.modules[module], name))
    assert set(degenjax.__all__) <= set(dir(degenjax))
    with pytest.raises(AttributeError, match="no attribute 'estimate_lcc'"):
        degenjax.estimate_lcc  # noqa: B018


def test_version_is_the_installed_distribution():
    expected = importlib.metadata.version("degenjax")
    assert degenjax.__version__ == expected
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"degenjax {expected}"
