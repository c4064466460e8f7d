"""`degenjax llc`: the recipe (--step-size auto), the record JSON and traces npz, and bad data caught (exit 1)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from degenjax.cli import app

runner = CliRunner()

PROBLEM = '''
import jax.numpy as jnp, numpy as np

_rng = np.random.default_rng(0)
X = _rng.normal(size=(2000, 3))
Y = X @ np.array([1.0, -2.0, 0.5]) + 0.5 * _rng.normal(size=2000)
W = np.linalg.lstsq(X, Y, rcond=None)[0]

def loss(p, batch):
    return jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2)

def make():
    return loss, {"w": jnp.asarray(W)}, (jnp.asarray(X), jnp.asarray(Y))

def make_nan():
    x = X.copy()
    x[1234, 1] = np.nan
    return loss, {"w": jnp.asarray(W)}, (jnp.asarray(x), jnp.asarray(Y))
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "llc_problem.py").write_text(PROBLEM)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_llc_auto_writes_record_and_traces(workdir):
    res = runner.invoke(app, ["llc", "llc_problem:make", "--step-size", "auto", "--batch-size", "100",
                              "--max-steps", "60000", "--seed", "1", "--out", "r.json", "--plot", "t.png",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    r = json.loads((workdir / "r.json").read_text())
    # a regular model with 3 parameters: lambda = 3/2, within the recipe's reported uncertainty
    assert abs(r["llc_mean"] - 1.5) <= 2.5 * r["llc_uncertainty"], r
    assert r["recipe_trustworthy"] is True and r["step_size_setting"] == "auto"
    assert r["localization_measured"] == r["localization"] == 1.0  # not escalated (a regular model)
    assert r["num_data"] == 2000 and r["num_params"] == 3 and r["batch_size"] == 100 and r["degenjax_version"]
    z = np.load(workdir / "r.npz")
    assert z["loss_trace"].shape == (r["num_chains"], r["num_draws"])
    assert "Recipe: lambda^ =" in res.output and "LLC =" in res.output
    assert (workdir / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_llc_bad_data_is_one_line_error(workdir):
    res = runner.invoke(app, ["llc", "llc_problem:make_nan", "--no-progress"])
    assert res.exit_code == 1
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "data leaf [0] has NaN or inf in row 1234" in lines[0], res.output


def test_llc_hand_set_step_says_its_bias_is_unmeasured(workdir):
    res = runner.invoke(app, ["llc", "llc_problem:make", "--step-size", "1e-4", "--num-draws", "50",
                              "--batch-size", "100", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "unmeasured step-size bias" in res.output
    assert ("Converged:" in res.output) != ("Warning: not converged" in res.output)
