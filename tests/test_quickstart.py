"""The quickstart end to end on the tiny setting, through the CLI; numbers checked against NumPy references."""

import json
import math

import numpy as np
from typer.testing import CliRunner

from degenjax.cli import app


def _numpy_forward(params, x):
    p = params["params"]
    acts = [x]
    h = x
    for i in range(3):
        z = h @ np.asarray(p[f"layers_{i}"]["kernel"], np.float64) + np.asarray(p[f"layers_{i}"]["bias"], np.float64)[None, :]
        h = np.maximum(z, 0.0) if i < 2 else z
        if i < 2:
            acts.append(h)
    return h, acts


def _rank(cov, rtol):
    ev = np.linalg.eigvalsh(cov)
    return int(np.sum(ev > rtol * ev.max()))


def test_quickstart_tiny_end_to_end(tmp_path):
    from flax import serialization
    from sklearn.datasets import load_digits

    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["quickstart", "--tiny", "--no-progress", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())

    # Data and trained parameters: recompute accuracies and L_n(w*) in float64 NumPy.
    digits = load_digits()
    order = np.random.default_rng(0).permutation(digits.data.shape[0])[:300]
    x = (digits.data[order] / 16.0).astype(np.float32).astype(np.float64)
    y = digits.target[order]
    x_tr, y_tr, x_te, y_te = x[:240], y[:240], x[240:], y[240:]
    assert r["data"] == {"name": "sklearn digits", "num_train": 240, "num_test": 60}
    params = serialization.msgpack_restore((out / "params.msgpack").read_bytes())
    logits, acts = _numpy_forward(params, x_tr)
    assert abs(r["train_accuracy"] - np.mean(np.argmax(logits, 1) == y_tr)) <= 1 / 240
    assert abs(r["test_accuracy"] - np.mean(np.argmax(_numpy_forward(params, x_te)[0], 1) == y_te)) <= 1 / 60
    z = logits - logits.max(1, keepdims=True)
    ce = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(240), y_tr])
    np.testing.assert_allclose(r["init_loss"], ce, rtol=1e-5)  # float32 forward pass vs float64
    assert r["model"]["num_params"] == 64 * 12 + 12 + 12 * 12 + 12 + 12 * 10 + 10

    # LLC summary: closed-form nbeta = n / log n, mean/std over chains, N_eff = 2 LLC.
    np.testing.assert_allclose(r["nbeta"], 240 / math.log(240), rtol=1e-6)
    per_chain = np.asarray(r["llc_per_chain"])
    assert per_chain.shape == (2,) and np.all(np.isfinite(per_chain))
    np.testing.assert_allclose(r["llc"], per_chain.mean(), rtol=1e-6)
    np.testing.assert_allclose(r["llc_std"], per_chain.std(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(r["n_eff"], 2 * r["llc"], rtol=1e-12)
    assert 0 < r["llc"] < r["model"]["num_params"] / 2  # a singular model's LLC is at most d/2

    # PCA dims: 1 (constant) + rank of each node layer's covariance, from NumPy; the ranks have a wide gap.
    for l, layer in enumerate(r["layers"]):
        a = acts[l]
        cov = np.cov(a, rowvar=False, bias=True)
        rank = _rank(cov, (a.shape[1] + 1) * np.finfo(np.float64).eps)
        assert rank == _rank(cov, 1e-9), "ambiguous rank: the check would depend on the cutoff"
        assert layer["pca_dim"] == rank + 1, (l, layer)
        assert 2 <= layer["lib_dim"] <= layer["pca_dim"]
    # Degeneracy: free directions of W^0 from the input's rank deficit, dead units (never > 0 on the data).
    deficit0 = 64 - _rank(np.cov(x_tr, rowvar=False, bias=True), 1e-9)
    assert r["degeneracy"]["activation_free"][0] == deficit0 * 12
    assert r["degeneracy"]["num_dead"][:2] == [int(np.sum(np.all(acts[l] <= 0, axis=0))) for l in (1, 2)]

    # Edges: shapes follow the dims, and the sparsity counts match a NumPy recount from edges.npz.
    edges = np.load(out / "edges.npz")
    for kind in ("lib", "pca"):
        dims = [layer[f"{kind}_dim"] for layer in r["layers"]]
        e = r["edges"][kind]
        assert e["shapes"] == [[dims[1], dims[0]], [dims[2], dims[1]]]
        for l in range(2):
            w = np.sort(edges[f"{kind}_{l}"][1:, 1:].ravel())[::-1]
            assert e["num_edges"][l] == w.size
            c = np.cumsum(w)
            want = [int(np.searchsorted(c, f * c[-1] * (1 - 1e-12)) + 1) for f in (0.5, 0.9, 0.99)]
            assert e["edges_for_fraction"][l] == want, (kind, l)
            np.testing.assert_allclose(e["total_weight"][l], c[-1], rtol=1e-10)

    # Modules cover every non-constant basis direction; figures and the summary exist.
    assert [len(a) for a in r["modules"]["assignment"]] == [r["layers"][0]["lib_dim"], r["layers"][1]["lib_dim"],
                                                            r["layers"][2]["lib_dim"]]
    for name in r["plots"].values():
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (out / "report.md").read_text()
    assert f"{r['llc']:.4g}" in md and "LIB" in md and "PCA" in md
    assert "LLC =" in res.output and "test accuracy" in res.output
    # a doubtful LLC is said on the terminal, not only in the report
    untrusted = r["recipe"] is not None and not r["recipe"]["trustworthy"]
    assert ("the LLC is not trustworthy" in res.output) == untrusted
    assert ("did not converge" in res.output) == (not r["converged"])
