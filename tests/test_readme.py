"""The README's 20-line example runs against the current API (documentation cannot drift from the code).

It runs in a fresh interpreter with JAX's default settings, as a user would run it (the test suite itself uses
strict dtype promotion and 8 simulated devices).
"""

import math
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    start = text.index("## A 20-line example")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    assert len(code.strip().splitlines()) <= 22, "the README example should stay about 20 lines"
    code += "\nprint('dims-edges', len(basis.dims) - 1, len(edges))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    llc, n_eff = (float(v) for v in lines[-2].split())
    assert math.isfinite(llc) and llc > 0
    assert math.isclose(n_eff, 2 * llc, rel_tol=1e-12)
    _, pairs, num_edges = lines[-1].split()
    assert pairs == num_edges  # one edge matrix per pair of consecutive node layers
