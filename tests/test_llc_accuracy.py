"""benchmarks/llc_accuracy.py without running a case: the battery's design (sizes, depths, ranks), the multiplicity
and finite-n target columns, resume/ingest of another machine's rows, and the table."""

import json
import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import llc_accuracy as battery

from degenjax.theory import dln_learning_coefficient


def _num_params(widths):
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def test_battery_has_five_deep_linear_networks_from_1e2_to_1e5_parameters():
    dlns = {name: m for name, m in battery.MODELS.items() if m[0] == "dln" and len(m[1]) >= 4}
    sizes = {name: _num_params(m[1]) for name, m in dlns.items()}
    assert len(dlns) >= 5
    assert min(sizes.values()) <= 300 and max(sizes.values()) >= 100_000
    assert len({len(m[1]) for m in dlns.values()}) >= 3  # depths
    assert len({m[2] for m in dlns.values()}) >= 4  # ranks
    assert len({max(m[1]) for m in dlns.values()}) >= 4  # widths
    # the GPU group runs in float32 and holds every network of 800 parameters or more
    for name, (_, _, _, gpu) in battery.MODELS.items():
        if gpu:
            assert battery.CASES[name][2] is False
    assert {n for n, v in sizes.items() if v >= 800} <= {n for n, m in battery.MODELS.items() if m[3]}


def _check_generic_case(name):
    _, widths, rank, _ = battery.MODELS[name]
    ws = battery.generic_factors(widths, rank, np.random.default_rng(0))  # the case's w*, without its data
    assert np.linalg.matrix_rank(np.linalg.multi_dot(ws)) == rank, name
    if _num_params(widths) <= 5000:
        # the Jacobian itself: one block of columns per layer, kron(A_l, B_l^T)
        blocks = []
        for l in range(len(ws)):
            left = np.linalg.multi_dot([np.eye(widths[0])] + ws[:l] + [np.eye(widths[l])])
            right = np.linalg.multi_dot([np.eye(widths[l + 1])] + ws[l + 1:] + [np.eye(widths[-1])])
            blocks.append(np.kron(left, right.T))
        jac = np.concatenate(blocks, axis=1)
        assert np.linalg.matrix_rank(jac) == widths[0] * widths[-1], name
        assert np.allclose(jac @ jac.T, battery.end_to_end_gram(ws)), name
    else:
        ev = np.linalg.eigvalsh(battery.end_to_end_gram(ws))
        assert ev[0] > 1e-10 * ev[-1], (name, ev[0], ev[-1])  # full rank d_in d_out
    assert float(dln_learning_coefficient(list(widths), rank)) == pytest.approx(
        widths[0] * widths[-1] / 2, rel=5e-3), name


def _generic_cases():
    return [name for name in battery.MODELS if name.startswith("gdln-")]


def test_generic_point_networks_have_the_exact_value_they_claim():
    """At a generic point the end-to-end map ``w -> W_1 ... W_L`` is a submersion (its Jacobian, float64 NumPy, has
    full rank d_in d_out), so L_n is locally a non-degenerate quadratic in d_in d_out coordinates and the local
    learning coefficient is d_in d_out / 2; the case's exact value (Aoyagi's global one) must agree within 0.5%.
    Networks with d_in d_out <= 2500 here (up to 4 x 10^4 parameters); the 100-wide ones in the slow test."""
    generic = _generic_cases()
    assert len(generic) >= 4 and len({len(battery.MODELS[n][1]) for n in generic}) >= 3
    small = [n for n in generic if battery.MODELS[n][1][0] * battery.MODELS[n][1][-1] <= 2500]
    assert len(small) >= 7
    for name in small:
        _check_generic_case(name)


@pytest.mark.slow
def test_largest_generic_point_networks_have_the_exact_value_they_claim():
    """The same for d_in d_out = 10^4 (8 x 10^4 and 1.2 x 10^5 parameters): a 10^4-square eigenvalue problem each."""
    large = [n for n in _generic_cases() if battery.MODELS[n][1][0] * battery.MODELS[n][1][-1] > 2500]
    assert large
    for name in large:
        _check_generic_case(name)


def test_multiplicity_and_finite_n_target():
    assert battery.multiplicity("linreg50") == 1
    assert battery.multiplicity("rrr444") == 1  # 4 + 4 + 4 + 2 even
    assert battery.multiplicity("rrr534") == 2  # 5 + 3 + 4 + 1 odd, case 1 of Aoyagi & Watanabe (2005)
    assert battery.multiplicity("dln3333") is None  # deeper networks: not computed
    nbeta = 1e4 / math.log(1e4)  # 1085.7
    assert battery.finite_target(7.0, 2, nbeta) == pytest.approx(6.8569, abs=1e-4)
    assert battery.finite_target(7.5, 1, nbeta) == 7.5
    assert battery.finite_target(4.0, None, nbeta) is None


def _row(case, device, llc, trusted=True, date="2026-11-30T00:00Z"):
    plat = device.split(":")[0]
    return {"case": case, "num_params": 27, "n": 10_000, "batch_size": 100, "exact": 7.0, "llc_mean": llc,
            "llc_uncertainty": 0.1, "rel_error": llc / 7.0 - 1, "trustworthy": trusted, "step_size": 1e-5,
            "recipe_s": 60.0, "one_estimate_s": 30.0, "dtype": "float32", "load": 1.0, "message": "m",
            "device": device, "device_platform": plat, "date": date}


def test_ingest_adds_another_machines_rows_once_and_the_table_shows_both(tmp_path, capsys):
    out, gpu = tmp_path / "rows.jsonl", tmp_path / "gpu.jsonl"
    out.write_text(json.dumps(_row("rrr534", "cpu:cpu", 6.866)) + "\n")
    gpu.write_text(json.dumps(_row("rrr534", "gpu:NVIDIA H200", 6.80, trusted=False)) + "\n")
    for _ in range(2):  # a second ingest of the same file adds nothing
        capsys.readouterr()
        battery.main(["--ingest", str(gpu), "--out", str(out), "--no-results"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["device"] for r in rows] == ["cpu:cpu", "gpu:NVIDIA H200"]
    text = capsys.readouterr().out
    lines = [x for x in text.splitlines() if x.startswith("| rrr534 |")]
    assert len(lines) == 2
    cpu_line = next(x for x in lines if "cpu:cpu" in x)
    cells = [c.strip() for c in cpu_line.strip("|").split("|")]
    cols = [c.strip() for c in battery.COLUMNS.strip("|").split("|")]
    assert cells[cols.index("m")] == "2"
    assert cells[cols.index("error vs lambda")] == "-1.9%"
    assert cells[cols.index("vs target")] == f"{100 * (6.866 / (7 - 1 / math.log(1e4 / math.log(1e4))) - 1):+.1f}%"
    assert "- rrr534 (gpu:NVIDIA H200): m" in text  # the untrusted row's reason is listed


def test_unknown_case_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit):
        battery.main(["--cases", "nope", "--out", str(tmp_path / "x.jsonl"), "--no-results"])


def test_exact_sampler_column_reads_the_ground_truth_rows(tmp_path):
    truth = tmp_path / "truth.jsonl"
    rows = [{"case": "rrr534", "n": 10_000, "gamma": 10.0, "lambda_ideal": 6.2, "se": 0.05},
            {"case": "rrr534", "n": 10_000, "gamma": 1.0, "lambda_ideal": 6.80, "se": 0.04},
            {"case": "rrr534", "n": 20_000, "gamma": 1.0, "lambda_ideal": 6.9, "se": 0.04}]
    truth.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the latest row at the case's n and localization 1, else None
    assert battery.ideal_value("rrr534", 10_000, path=truth) == (6.80, 0.04)
    assert battery.ideal_value("rrr444", 10_000, path=truth) is None
    assert battery.ideal_value("rrr534", 10_000, path=tmp_path / "missing.jsonl") is None
    text = battery.table([_row("rrr534", "cpu:cpu", 6.866)], ["rrr534"], ideal_path=truth)
    line = next(x for x in text.splitlines() if x.startswith("| rrr534 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    cols = [c.strip() for c in battery.COLUMNS.strip("|").split("|")]
    assert len(cells) == len(cols)
    assert cells[cols.index("exact sampler n beta E[L]")] == "6.8 +- 0.04"
    assert cells[cols.index("vs exact sampler")] == f"{100 * (6.866 / 6.80 - 1):+.1f}%"
    assert cells[cols.index("error vs lambda")] == "-1.9%"
    # an escalated row (measured at localization 10, same n beta) is compared with the exact sampler there
    esc = dict(_row("rrr534", "cpu:cpu", 6.1), escalation={"stage": "localization", "localization": 10.0,
                                                           "nbeta": 1085.7, "from_llc": 9.0, "from_uncertainty": 1.0,
                                                           "from_problems": ["stiff"]})
    line = next(x for x in battery.table([esc], ["rrr534"], ideal_path=truth).splitlines()
                if x.startswith("| rrr534 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[cols.index("exact sampler n beta E[L]")] == "6.2 +- 0.05 (at localization 10)"
    assert cells[cols.index("vs exact sampler")] == f"{100 * (6.1 / 6.2 - 1):+.1f}%"
    # same_x (another n beta): no exact-sampler row to compare with
    esc["escalation"] = dict(esc["escalation"], stage="same_x", nbeta=108570.0)
    line = next(x for x in battery.table([esc], ["rrr534"], ideal_path=truth).splitlines()
                if x.startswith("| rrr534 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[cols.index("exact sampler n beta E[L]")] == ""


def _diverging_case():
    # a regression whose loss is NaN everywhere but at w* itself: every rung of the recipe diverges
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3))
    y = x @ np.ones(3)
    w0 = jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0])

    def loss(w, batch):
        bx, by = batch
        return jnp.mean((bx @ w - by) ** 2) + jnp.where(jnp.sum((w - w0) ** 2) > 1e-12, jnp.nan, 0.0)

    return loss, w0, (jnp.asarray(x), jnp.asarray(y)), 1.5


def test_a_case_whose_every_rung_diverges_is_a_row_marked_in_the_table(monkeypatch):
    import argparse

    monkeypatch.setitem(battery.CASES, "trap3", (_diverging_case, 50, True))
    monkeypatch.setitem(battery.MODELS, "trap3", ("regular", (3,), None, False))
    args = argparse.Namespace(dtype="case", seed=0, chains=2, verbose=False, max_steps=20_000)
    row = battery.run_case("trap3", args)
    assert row["trustworthy"] is False and math.isnan(row["llc_mean"]) and row["n"] == 500
    assert "no estimate" in row["message"] and "diverged" in row["message"]
    json.dumps(row)  # a jsonl row like any other
    text = battery.table([row], ["trap3"])
    line = next(x for x in text.splitlines() if x.startswith("| trap3 "))
    assert "| nan +- nan |" in line and "| NO |" in line
    assert "- trap3 (" in text and "no estimate" in text
