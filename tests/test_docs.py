"""The documentation site builds offline and strictly, and covers the public API, the CLI and the maths anchors.

`mkdocs build --strict` runs in a fresh interpreter with every proxy pointed at a closed local port, so a build step
that reached for the network would fail. Strict mode turns every warning into an error: a broken link or anchor, a
docstring object that does not resolve (``::: degenjax.NAME``), a page missing from the navigation.
"""

import html.parser
import importlib.util
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest

import degenjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "mkdocs.yml"

# Anchors that docstrings and notebooks link to (`[text][NAME]` in a docstring, maths.md#NAME from a page): renaming
# one breaks those links, so the set is fixed here. Add freely; remove only together with every link to it.
MATHS_ANCHORS = {
    "notation", "sections", "grams", "activation-gram", "jacobian-gram", "random-sources", "streaming",
    "interaction-basis", "basis-steps", "truncation", "constant-direction", "basis-invariants", "baselines",
    "edges", "output-edges", "sparsity", "eigensolvers", "dense-eigh", "topk", "spectral-density", "llc",
    "tempered-posterior", "sgld-update", "llc-estimate", "step-size", "mala", "convergence", "restricted-llc",
    "n-eff", "exact-learning-coefficients", "degeneracy-accounting", "rank-deficits", "synchronized-neurons",
    "modularity",
}
CONVENTIONS_ANCHORS = {"constant-last", "rib", "devinterp"}


def _offline_env() -> dict:
    env = dict(os.environ)
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there, so any request fails at once
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[var] = closed
    for var in ("NO_PROXY", "no_proxy"):
        env.pop(var, None)
    # Material for MkDocs and a plugin print a banner about MkDocs 2 on every build; it is not a build warning.
    env["NO_MKDOCS_2_WARNING"] = "1"
    env["DISABLE_MKDOCS_2_WARNING"] = "true"
    return env


def _build(config: pathlib.Path, site: pathlib.Path) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: the docs tools are in the `dev` extra (`make install`, or "
                    "`pip install -e '.[dev]'`).")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=ROOT, env=_offline_env(), capture_output=True, text=True,
                          timeout=300)


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)


def _ids(path: pathlib.Path) -> set:
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.ids


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    result = _build(CONFIG, out)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    warnings = [line for line in log.splitlines() if re.match(r"\s*WARNING\b", line)]
    assert not warnings, "\n".join(warnings)
    return out


def test_every_public_name_is_in_the_reference(site):
    ids = set()
    for page in (site / "reference").rglob("index.html"):
        ids |= _ids(page)
    public = [f"degenjax.{name}" for name in degenjax.__all__]
    for name in degenjax.__all__:  # submodules (degenjax.models, degenjax.theory) and their public names
        module = getattr(degenjax, name)
        if inspect.ismodule(module):
            public += [f"degenjax.{name}.{member}" for member in getattr(module, "__all__", ())]
    missing = [name for name in public if name not in ids]
    assert not missing, f"public names without an API reference entry: {missing}"


def test_maths_and_conventions_anchors(site):
    assert not MATHS_ANCHORS - _ids(site / "maths" / "index.html")
    assert not CONVENTIONS_ANCHORS - _ids(site / "conventions" / "index.html")
    # Docstrings link to these headings as `[text][anchor]` (mkdocs-autorefs resolves them from any page), which
    # needs each anchor on one page only.
    pages = {page: _ids(page) for page in site.rglob("index.html")}
    for anchor in MATHS_ANCHORS | CONVENTIONS_ANCHORS:
        holders = [str(page.relative_to(site)) for page, ids in pages.items() if anchor in ids]
        assert len(holders) == 1, (anchor, holders)


def test_cli_page_is_the_help_of_every_command(site):
    import typer

    from degenjax.cli import app

    text = (site / "cli" / "index.html").read_text(encoding="utf-8")
    commands = list(typer.main.get_command(app).commands)
    assert commands
    for name in commands:
        assert f"Usage: degenjax {name} [OPTIONS]" in text, name
        assert f'id="cli-{name}"' in text, name


def test_example_page_is_the_readme_example(site):
    page = html.unescape(re.sub(r"<[^>]+>", "", (site / "example" / "index.html").read_text(encoding="utf-8")))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", readme[readme.index("## A 20-line example"):], re.S).group(1)
    lines = [line.strip() for line in code.splitlines() if line.strip()]
    assert lines
    assert [line for line in lines if line not in page] == []


def test_strict_settings_fail_on_a_broken_anchor(tmp_path):
    """The site's own validation settings turn a link to a missing anchor into a failed build."""
    import yaml

    settings = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the maths](maths.md#no-such-anchor).\n")
    (docs / "maths.md").write_text("# Maths\n\n## Notation {#notation}\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(yaml.safe_dump({
        "site_name": "t", "docs_dir": str(docs), "strict": settings["strict"], "validation": settings["validation"],
        "markdown_extensions": ["attr_list"], "nav": ["index.md", "maths.md"]}))
    result = _build(config, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-anchor" in result.stdout + result.stderr
