"""Generates the API reference and the command-line page at build time (run by the mkdocs-gen-files plugin).

The reference lists every name in ``degenjax.__all__``, so it stays complete when names are added: a name is placed
in the area the README's "API at a glance" table gives it, else in the area of the private module that defines it,
else under "Other names" on the overview page. A name that no longer exists is simply not listed. Each object is
rendered by mkdocstrings from its docstring (``::: degenjax.NAME``).

The command-line page is the ``--help`` text of every command of the typer app, so it is always the installed CLI.
The first-example page is the README's example (which tests/test_readme.py runs), so the two cannot drift apart.
"""

from __future__ import annotations

import inspect
import pathlib
import re

import click
import mkdocs_gen_files
import typer

import degenjax
from degenjax.cli import app

# (page, title, introduction, names in the order of the README table). Names missing from degenjax.__all__ are
# skipped; names of __all__ missing here are placed by MODULE_AREAS below.
AREAS = [
    ("sections", "Models as sections",
     "A network is a sequence of pure sections `f_l(params, h_l) -> h_{l+1}`; the node layers are their inputs "
     "([maths](../maths.md#sections)).",
     ["Sections", "forward", "from_linen", "from_nnx", "as_sections", "section_shapes", "structured_sections",
      "models"]),
    ("grams", "Gram matrices",
     "Streamed activation and Jacobian Gram matrices in bounded memory "
     "([maths](../maths.md#activation-gram), [Jacobian Gram](../maths.md#jacobian-gram)).",
     ["activation_grams", "jacobian_grams", "jacobian_gram", "activation_stats", "ActivationStats",
      "gram_accumulator", "GramAccumulator", "GramState", "GramStats", "GramSums"]),
    ("eigen", "Eigensolvers",
     "Dense and sharded symmetric eigensolvers and the spectral density "
     "([maths](../maths.md#eigensolvers)).",
     ["eigh", "eigh_topk", "EigResult", "spectral_density", "SpectralDensity"]),
    ("basis", "Interaction basis",
     "The (Local) Interaction Basis, its PCA and random baselines, and the network re-expressed in it "
     "([maths](../maths.md#interaction-basis)).",
     ["interaction_basis", "InteractionBasis", "transform", "layer_basis", "LayerBasis"]),
    ("edges", "Edges and sparsity",
     "Interaction edges between basis directions, their sparsity and ablations "
     "([maths](../maths.md#edges)).",
     ["interaction_edges", "edge_sparsity", "EdgeSparsity", "edges_required", "EdgesRequired", "ablated_output",
      "node_ablation_curves"]),
    ("degeneracy", "Degeneracy and modules",
     "Free directions from rank deficits and synchronized ReLUs, and modules of the interaction graph "
     "([maths](../maths.md#degeneracy-accounting), [modularity](../maths.md#modularity)).",
     ["degeneracy_report", "DegeneracyReport", "SectionCounts", "synchronized_neurons", "SyncResult", "sync_accumulator",
      "SyncAccumulator", "find_modules", "ModuleResult", "plot_modules"]),
    ("llc", "Local learning coefficient",
     "The SGLD estimator of the local learning coefficient, its samplers and diagnostics, N_eff and behavioural "
     "losses ([maths](../maths.md#llc)).",
     ["estimate_llc", "LLCResult", "LLCDivergenceError", "effective_parameter_count", "behavioral_loss",
      "convergence", "Convergence", "sgld", "rmsprop_sgld", "sgnht", "SGMCMCAlgorithm", "SGMCMCInfo", "SGLDState",
      "RMSPropSGLDState", "SGNHTState", "SGLDKernel", "SGLDKernelState"]),
    ("calibration", "Calibration and theory",
     "Choosing sampler settings, and the exact learning coefficients that estimates are checked against "
     "([maths](../maths.md#exact-learning-coefficients)).",
     ["calibrate", "Calibration", "CalibrationRow", "calibration_sweep", "CalibrationGrid", "CalibrationCell",
      "plot_calibration", "recommend",
      "theory"]),
    ("toolkit", "Toolkit",
     "Resumable sweeps, checkpoints, the quickstart report and figures.",
     ["run_sweep", "load_sweep_config", "SweepConfig", "load_checkpoint", "save_msgpack", "run_quickstart",
      "QuickstartConfig"]),
]

# Private module (degenjax._src.NAME, first component) -> area, for names the table above does not list.
MODULE_AREAS = {
    "sections": "sections", "structure": "sections", "models": "sections",
    "grams": "grams",
    "eigen": "eigen", "spectral": "eigen",
    "basis": "basis",
    "edges": "edges",
    "degeneracy": "degeneracy", "modularity": "degeneracy",
    "llc": "llc", "sgld": "llc", "numpyro_kernel": "llc", "diagnostics": "llc", "convergence": "llc",
    "calibrate": "calibration", "theory": "calibration",
    "sweep": "toolkit", "checkpoints": "toolkit", "quickstart": "toolkit", "plots": "toolkit", "resultsio": "toolkit",
}


def _module_area(name: str) -> str | None:
    """The area of a public name from where it is defined (``degenjax._src.<module>...``), or None."""
    obj = getattr(degenjax, name, None)
    module = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None)
    if not isinstance(module, str):
        return None
    parts = module.split(".")
    if parts[:2] == ["degenjax", "_src"] and len(parts) > 2:
        parts = parts[2:]
    elif parts[0] == "degenjax" and len(parts) > 1:
        parts = parts[1:]
    else:
        return None
    head = parts[0]
    if head in MODULE_AREAS:
        return MODULE_AREAS[head]
    for prefix, area in MODULE_AREAS.items():  # e.g. a split-out llc_recipe module
        if head.startswith(prefix):
            return area
    if name.startswith("plot_"):
        return "toolkit"
    return None


def assign_areas(public: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """``({page: [names]}, other_names)`` for the public names, each name exactly once."""
    pages = {page: [] for page, *_ in AREAS}
    placed = set()
    for page, _, _, names in AREAS:
        for name in names:
            if name in public and name not in placed:
                pages[page].append(name)
                placed.add(name)
    other = []
    for name in public:  # in __all__ order
        if name in placed:
            continue
        area = _module_area(name)
        if area is None and name.startswith("plot_"):
            area = "toolkit"
        if area is None:
            other.append(name)
        else:
            pages[area].append(name)
        placed.add(name)
    return pages, other


def _object_block(name: str) -> str:
    if inspect.ismodule(getattr(degenjax, name, None)):
        # a submodule lists its members even where one has no docstring yet (it is public all the same)
        return f"::: degenjax.{name}\n    options:\n      show_if_no_docstring: true\n"
    return f"::: degenjax.{name}\n"


def write_reference() -> None:
    public = [n for n in degenjax.__all__ if hasattr(degenjax, n)]
    pages, other = assign_areas(public)
    overview = [
        "# API reference\n",
        "Everything below is importable from `degenjax` (`import degenjax as dj`) and generated from the "
        "docstrings of the installed package; `degenjax.models` and `degenjax.theory` are submodules. Shapes are "
        "written in the docstrings; the maths behind each function is on the [maths page](../maths.md).\n",
        "| area | names |",
        "| --- | --- |",
    ]
    for page, title, intro, _ in AREAS:
        names = pages[page]
        links = ", ".join(f"[`{n}`][degenjax.{n}]" for n in names) or "(none)"
        overview.append(f"| [{title}]({page}.md) | {links} |")
        lines = [f"# {title} {{#api-{page}}}\n", intro + "\n"]  # "api-": unique anchors across pages
        if not names:
            lines.append("No public names in this area.\n")
        lines += [_object_block(n) for n in names]
        with mkdocs_gen_files.open(f"reference/{page}.md", "w") as f:
            f.write("\n".join(lines))
    overview.append("")
    if other:
        overview.append("## Other names\n")
        overview.append("Public names that belong to none of the areas above.\n")
        overview += [_object_block(n) for n in other]
    with mkdocs_gen_files.open("reference/index.md", "w") as f:
        f.write("\n".join(overview))


def _help(command: click.Command, ctx: click.Context) -> str:
    return command.get_help(ctx).rstrip()


def write_cli() -> None:
    root = typer.main.get_command(app)
    width = 88  # fits the content column of the page without scrolling
    ctx = click.Context(root, info_name="degenjax", terminal_width=width, max_content_width=width)
    lines = [
        "# Command line\n",
        "The `degenjax` command is installed with the package. Input errors (a missing file, a malformed config, "
        "an entry point that does not exist) print one line `Error: ...` and exit with status 1. The text below is "
        "the `--help` output of the installed version, generated when the site is built.\n",
        "```text",
        "$ degenjax --help",
        _help(root, ctx),
        "```\n",
    ]
    commands = getattr(root, "commands", {})
    for name, command in commands.items():
        sub = click.Context(command, info_name=name, parent=ctx, terminal_width=width, max_content_width=width)
        summary = (command.get_short_help_str(limit=200) or "").strip()
        lines += [f"## degenjax {name} {{#cli-{name}}}\n"]  # "cli-" keeps anchors unique across pages
        if summary:
            lines.append(summary + "\n")
        lines += ["```text", f"$ degenjax {name} --help", _help(command, sub), "```\n"]
    with mkdocs_gen_files.open("cli.md", "w") as f:
        f.write("\n".join(lines))


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def write_example() -> None:
    """The first ```python block of the README's "A 20-line example" section, with a few words around it."""
    text = README.read_text(encoding="utf-8") if README.exists() else ""
    section = re.search(r"^## A \S+ example\s*$(.*?)(?=^## )", text, flags=re.M | re.S)
    code = re.search(r"```python\n(.*?)```", section.group(1), flags=re.S) if section else None
    lines = ["# A first example\n"]
    if code is None:
        lines.append("The repository's README.md shows a first example.\n")
    else:
        lines += [
            "A three-layer MLP on random data: its Local Interaction Basis, the interaction edges and their "
            "sparsity, the degeneracy report, the modules of the interaction graph, and the LLC of its behaviour. "
            "This is the README's example, which the test suite runs as written.\n",
            "```python",
            code.group(1).rstrip(),
            "```\n",
            "What each step computes: [Gram matrices](maths.md#grams), [the interaction basis]"
            "(maths.md#interaction-basis), [edges](maths.md#edges) and [their sparsity](maths.md#sparsity), "
            "[degeneracy accounting](maths.md#degeneracy-accounting), [modules](maths.md#modularity), "
            "[the LLC](maths.md#llc) and [behavioural losses](maths.md#n-eff). The "
            "[command line](cli.md) runs the same analyses on your own model without writing code.\n",
        ]
    with mkdocs_gen_files.open("example.md", "w") as f:
        f.write("\n".join(lines))


write_reference()
write_cli()
write_example()
