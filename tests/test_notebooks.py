"""Every notebook in notebooks/ runs top to bottom (nbclient, the .venv's ipykernel) with DEGENJAX_FAST=1.

The notebooks assert their own numbers against closed forms or independent computations (diagonal edges of a
linear network, sum of edges = sum of Lambda, synchronized groups by construction, modules by construction,
lambda = d/2 for a regular model), so a failing assertion fails the test.
"""

import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _kernel_spec(tmp_path):
    """A kernelspec pointing at this interpreter (the .venv), so no global Jupyter install is needed."""
    spec = tmp_path / "kernels" / "degenjax-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        '{"argv": ["%s", "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "degenjax", '
        '"language": "python"}' % sys.executable)
    return tmp_path


def test_notebooks_found():
    names = {p.name for p in NOTEBOOKS}
    assert {"seed_linear_diagonal.ipynb", "seed_synchronized_relu.ipynb", "seed_modular_network.ipynb",
            "llc_quickstart.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert all(c.get("outputs", []) == [] for c in nb.cells if c.cell_type == "code"), "strip outputs before committing"
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec(tmp_path)))
    monkeypatch.setenv("DEGENJAX_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("XLA_FLAGS", " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                             if "force_host_platform_device_count" not in f))
    client = NotebookClient(nb, timeout=300, kernel_name="degenjax-test", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    # Figures render inline (each notebook starts with %matplotlib inline): a Figure shown as a result carries a
    # PNG, not only its text form "<Figure size ...>".
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if o.output_type in ("execute_result", "display_data")
               and str(o.get("data", {}).get("text/plain", "")).startswith("<Figure")]
    assert all("image/png" in o["data"] for o in figures), "a figure printed as text: add %matplotlib inline"
    # No warnings on import or use (e.g. tqdm's "IProgress not found" TqdmWarning in a kernel without ipywidgets).
    stderr = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.output_type == "stream" and o.name == "stderr")
    assert "Warning" not in stderr, stderr[-3000:]
