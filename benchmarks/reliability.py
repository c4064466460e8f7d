"""Reliability battery: realistic bad (and good) inputs through degenjax's API and CLI, each outcome classified.

Every case feeds one input (a malformed matrix, an empty batch, a damaged checkpoint, a nonsense cutoff, a sweep
resumed after something changed, a bad command-line option, ...) and classifies what happened:

    clear error    a ValueError / FloatingPointError raised by degenjax's own code (CLI: exit status 1 with one
                   "Error: ..." line, or a usage error, and no traceback) for an input that is wrong
    correct        a valid input gave the right result, checked against NumPy or a fresh run
    traceback      any other exception (TypeError, KeyError, an error raised inside NumPy or JAX), a CLI
                   traceback, or a valid input refused
    silent wrong   a wrong input accepted, or a wrong / NaN result
    mixed data     a resumed sweep reused results of a different run

Flipped checkpoint bytes are tried outside the arrays' raw data only: a changed byte inside raw data is a valid
file holding other numbers (msgpack has no checksum), which no loader can tell.

    .venv/bin/python benchmarks/reliability.py                 # full battery; records the table (benchmarks/results.jsonl -> RESULTS.md)
    .venv/bin/python benchmarks/reliability.py --only eigen     # one area; --list prints the cases; --no-append
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import inspect
import io
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTCOMES = ("clear error", "correct", "traceback", "silent wrong", "mixed data")


@dataclass
class Case:
    area: str
    name: str
    fn: Callable[[], Any]
    expect: str = "error"  # "error": a wrong input; "ok": a valid one; "either": both are acceptable
    check: Callable[[Any], bool] | None = None  # for "ok"/"either": is the result right?


def _raised_by_degenjax(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and f"{os.sep}degenjax{os.sep}" in last


def classify(case: Case) -> tuple[str, str]:
    """Runs a case; returns (outcome, detail)."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            res = case.fn()
    except (ValueError, FloatingPointError) as err:
        msg = " ".join(str(err).split())[:160]
        if not _raised_by_degenjax(err):
            return "traceback", f"{type(err).__name__} from a library: {msg}"
        if case.expect == "ok":
            return "traceback", f"valid input refused: {msg}"
        return "clear error", msg
    except Exception as err:  # noqa: BLE001 - classifying is the point
        return "traceback", f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
    if isinstance(res, CliOutcome):
        return res.outcome, res.detail
    if isinstance(res, str) and res in OUTCOMES:
        return res, ""
    if case.check is not None:
        try:
            ok = bool(case.check(res))
        except Exception as err:  # noqa: BLE001
            return "silent wrong", f"check failed: {type(err).__name__}: {err}"
        if ok:
            return "correct", ""
        return "silent wrong", "result differs from the reference"
    if case.expect == "error":
        return "silent wrong", "accepted a wrong input"
    return "correct", ""


# ---------------------------------------------------------------------------------------------------------------
# helpers


TMP = pathlib.Path(tempfile.mkdtemp(prefix="degenjax-reliability-"))
_counter = [0]


def tmpdir() -> pathlib.Path:
    _counter[0] += 1
    d = TMP / f"c{_counter[0]:04d}"
    d.mkdir()
    return d


def finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


def close(a, b, rtol, atol=0.0) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.all(np.isfinite(a))) and np.allclose(a, b, rtol=rtol, atol=atol)


def rotated(spectrum, seed=0):
    rng = np.random.default_rng(seed)
    d = len(spectrum)
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = (u * np.asarray(spectrum)[None, :]) @ u.T
    return 0.5 * (a + a.T)


# ---------------------------------------------------------------------------------------------------------------
# eigensolvers


def eigen_cases():
    import degenjax as dj

    key = jax.random.key(0)
    a = rotated(np.linspace(1.0, 2.0, 16), 1)
    out = []
    bad_mats = {
        "non-square": np.ones((3, 4)), "vector": np.ones(5), "scalar": np.float64(3.0), "3-d": np.ones((2, 3, 4)),
        "NaN entry": np.where(np.eye(16) > 0, np.nan, a), "inf entry": np.where(np.eye(16) > 0, np.inf, a),
        "asymmetric": a + np.triu(a, 1), "complex": a * (1 + 1j), "empty 0x0": np.zeros((0, 0)),
        "string": "matrix", "None": None, "ragged list": [[1.0, 2.0], [3.0]],
    }
    for name, m in bad_mats.items():
        if name == "empty 0x0":  # a valid (empty) eigendecomposition for eigh
            out.append(Case("eigen", "eigh: empty 0x0", lambda m=m: dj.eigh(m), "either",
                            lambda r: r[0].shape == (0,) and r[1].shape == (0, 0)))
        else:
            out.append(Case("eigen", f"eigh: {name}", lambda m=m: dj.eigh(m)))
        if name != "3-d":
            out.append(Case("eigen", f"eigh_topk: {name}", lambda m=m: dj.eigh_topk(m, 2, key=key)))
    out.append(Case("eigen", "eigh: 3-d batch of non-square", lambda: dj.eigh(np.ones((2, 3, 4)))))
    for k in (0, -1, 16, 17, 2.5, "3", True, None):
        out.append(Case("eigen", f"eigh_topk: k={k!r}", lambda k=k: dj.eigh_topk(a, k, key=key)))
    for kw in ({"num_iters": 0}, {"num_iters": -5}, {"oversample": -1}, {"tol": 0.0}, {"tol": -1e-3},
               {"tol": float("nan")}, {"dim": 15}):
        out.append(Case("eigen", f"eigh_topk: {kw}", lambda kw=kw: dj.eigh_topk(a, 2, key=key, **kw)))
    out.append(Case("eigen", "eigh_topk: matvec without dim", lambda: dj.eigh_topk(lambda x: a @ x, 2, key=key)))
    out.append(Case("eigen", "eigh_topk: matvec of wrong shape",
                    lambda: dj.eigh_topk(lambda x: (a @ x)[:-1], 2, key=key, dim=16)))
    out.append(Case("eigen", "eigh_topk: matvec returning NaN",
                    lambda: dj.eigh_topk(lambda x: x * jnp.nan, 2, key=key, dim=16)))
    out.append(Case("eigen", "eigh_topk: mesh not dividing d",
                    lambda: dj.eigh_topk(rotated(np.linspace(1, 2, 15)), 2, key=key,
                                         mesh=jax.make_mesh((4,), ("x",)))))
    for name, m in bad_mats.items():
        if name in ("3-d",):
            continue
        out.append(Case("eigen", f"spectral_density: {name}",
                        lambda m=m: dj.spectral_density(m, key=key, num_probes=2, num_lanczos=3)))
    for kw in ({"num_probes": 0}, {"num_lanczos": 0}, {"num_lanczos": 17}, {"num_probes": 1.5}):
        kw = {"num_probes": 2, "num_lanczos": 4, **kw}
        out.append(Case("eigen", f"spectral_density: {kw}", lambda kw=kw: dj.spectral_density(a, key=key, **kw)))

    # valid inputs at extreme scales and degenerate spectra: right values, honest residuals
    g = rotated(np.linspace(0.5, 3.0, 24), 2)
    ref = np.linalg.eigvalsh(g)[::-1]
    for dtype, scales in ((np.float32, (1e-30, 1e-20, 1e-10, 1e10, 1e20, 1e30)),
                          (np.float64, (1e-300, 1e-200, 1e-100, 1e100, 1e200, 1e300))):
        for s in scales:
            def topk(s=s, dtype=dtype):
                with jax.enable_x64(dtype == np.float64):
                    r = dj.eigh_topk(jnp.asarray((g * s).astype(dtype)), 3, key=key)
                    return [np.asarray(x, np.float64) for x in r[:3]]

            def ok_topk(r, s=s, dtype=dtype):
                vals, vecs, res = r
                true = np.linalg.norm(g @ vecs - vecs * (vals / s)[None, :], axis=0) * s
                tol = 1e-4 if dtype == np.float32 else 1e-6
                return (close(vals / s, ref[:3], 30 * tol) and np.all(res > 0)
                        and close(res, true, 0.1 if dtype == np.float32 else 1e-5))

            out.append(Case("eigen", f"eigh_topk: {np.dtype(dtype).name} Gram x {s:g}", topk, "ok", ok_topk))

            def slq(s=s, dtype=dtype):
                with jax.enable_x64(dtype == np.float64):
                    sd = dj.spectral_density(jnp.asarray((g * s).astype(dtype)), key=key, num_probes=4,
                                             num_lanczos=12)
                    return np.asarray(sd.nodes, np.float64) / s, np.asarray(sd.weights, np.float64)

            def ok_slq(r):
                nodes, w = r
                return finite(nodes) and nodes.min() >= 0.5 - 1e-3 and nodes.max() <= 3.0 + 1e-3 and close(
                    w.sum(1), np.ones(4), 1e-4)

            out.append(Case("eigen", f"spectral_density: {np.dtype(dtype).name} x {s:g}", slq, "ok", ok_slq))
    for name, m, want in (("zero matrix", np.zeros((16, 16)), np.zeros(3)),
                          ("identity", np.eye(16), np.ones(3)),
                          ("rank one", np.outer(np.arange(16.0), np.arange(16.0)), [np.sum(np.arange(16.0) ** 2), 0, 0]),
                          ("negative definite", -np.eye(16) * np.arange(1, 17), [-14.0, -15.0, -16.0])):
        scale = max(1.0, float(np.max(np.abs(want))))  # float32 (JAX's default): errors ~ 1e-6 of the scale
        out.append(Case("eigen", f"eigh_topk: {name}",
                        lambda m=m: np.asarray(dj.eigh_topk(m, 3, key=key).values), "ok",
                        lambda r, want=want, scale=scale: close(r, want, 1e-5, 1e-5 * scale)))
        out.append(Case("eigen", f"eigh: {name}", lambda m=m: np.asarray(dj.eigh(m)[0]), "ok",
                        lambda r, m=m, scale=scale: close(r, np.linalg.eigvalsh(m)[::-1], 1e-5, 1e-5 * scale)))
    out.append(Case("eigen", "eigh: 1x1", lambda: np.asarray(dj.eigh(np.array([[2.0]]))[0]), "ok",
                    lambda r: close(r, [2.0], 1e-12)))
    out.append(Case("eigen", "eigh: integer matrix", lambda: np.asarray(dj.eigh(np.eye(3, dtype=np.int32) * 2)[0]),
                    "ok", lambda r: close(r, [2, 2, 2], 1e-6)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Grams, bases, edges, degeneracy


def basis_cases():
    import degenjax as dj

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    params = {"W1": rng.normal(size=(4, 5)).astype(np.float32), "W2": rng.normal(size=(5, 3)).astype(np.float32)}
    model = dj.Sections((lambda p, h: jnp.tanh(h @ p["W1"]), lambda p, h: h @ p["W2"]))
    basis = dj.interaction_basis(model, params, [x])

    def gen():
        for i in range(4):
            yield x[16 * i:16 * (i + 1)]

    spent = gen()
    list(spent)
    fns = {"activation_grams": lambda b, **k: dj.activation_grams(model, params, b, **k),
           "jacobian_grams": lambda b, **k: dj.jacobian_grams(model, params, b, **k),
           "interaction_basis": lambda b, **k: dj.interaction_basis(model, params, b, **k),
           "interaction_edges": lambda b, **k: dj.interaction_edges(model, params, basis, b, **k),
           "degeneracy_report": lambda b, **k: dj.degeneracy_report(model, params, b, **k)}
    nan_x = x.copy()
    nan_x[3, 1] = np.nan
    inf_x = x.copy()
    inf_x[0, 0] = np.inf
    bad_batches = {
        "zero-row batch": [x[:0]], "zero-row batch after a good one": [x, x[:0]], "single zero-row array": x[:0],
        "empty list": [], "spent generator": spent, "None": None, "a string": "data.npy", "an int": 3,
        "wrong feature size": [rng.normal(size=(8, 7)).astype(np.float32)],
        "mixed feature sizes": [x, rng.normal(size=(8, 3)).astype(np.float32)],
        "mixed dtypes": [x, x.astype(np.float16)], "NaN in data": [nan_x], "inf in data": [inf_x],
        "NaN in a later batch": [x, nan_x], "1-d batch": [x[:, 0]], "extra leading axis": [x[None]],
        "integer data": [x.astype(np.int32)], "complex data": [x.astype(np.complex64)],
        "bool data": [x > 0],
    }
    def np_gram(a):  # float64 NumPy reference of the centred Gram of node layer 0 (blockdiag(Cov, 1))
        a = np.asarray(a, np.float64)
        g = np.zeros((a.shape[1] + 1,) * 2)
        g[:-1, :-1], g[-1, -1] = np.cov(a, rowvar=False, bias=True), 1.0
        return g

    out = []
    for fname, f in fns.items():
        for bname, b in bad_batches.items():
            expect, check = "error", None
            if bname == "extra leading axis":  # (1, 64, 4): one batch of 64 positions, a valid layout
                expect, check = "either", finite
            if fname == "activation_grams" and bname in ("integer data", "bool data"):
                # Grams of integer inputs are well defined (of the values cast to float)
                expect, check = "either", lambda r, b=b: close(r[0], np_gram(b[0]), 1e-4, 1e-5)
            out.append(Case("basis", f"{fname}: {bname}", lambda f=f, b=b: f(b), expect, check))

    g_ref = np.zeros((5, 5))
    g_ref[:4, :4], g_ref[4, 4] = np.cov(x.astype(np.float64), rowvar=False, bias=True), 1.0
    out.append(Case("basis", "activation_grams: generator of batches",
                    lambda: np.asarray(dj.activation_grams(model, params, gen())[0]), "ok",
                    lambda r: close(r, g_ref, 1e-4, 1e-5)))
    out.append(Case("basis", "activation_grams: tuple of batches",
                    lambda: np.asarray(dj.activation_grams(model, params, (x[:32], x[32:]))[0]), "ok",
                    lambda r: close(r, g_ref, 1e-4, 1e-5)))
    out.append(Case("basis", "activation_grams: one array",
                    lambda: np.asarray(dj.activation_grams(model, params, x)[0]), "ok",
                    lambda r: close(r, g_ref, 1e-4, 1e-5)))
    out.append(Case("basis", "activation_grams: batches of one row",
                    lambda: np.asarray(dj.activation_grams(model, params, [x[i:i + 1] for i in range(64)])[0]),
                    "ok", lambda r: close(r, g_ref, 1e-4, 1e-5)))
    out.append(Case("basis", "interaction_basis: generator", lambda: dj.interaction_basis(model, params, gen()).dims,
                    "ok", lambda r: tuple(r) == tuple(basis.dims)))
    out.append(Case("basis", "interaction_edges: generator",
                    lambda: np.asarray(dj.interaction_edges(model, params, basis, gen())[0]), "ok",
                    lambda r: close(r, dj.interaction_edges(model, params, basis, [x])[0], 1e-4, 1e-6)))
    out.append(Case("basis", "degeneracy_report: generator",
                    lambda: dj.degeneracy_report(model, params, gen()).names, "ok", lambda r: len(r) == 2))

    for rtol in (-1e-9, -1.0, 1.0, 1.5, 1e9, float("nan"), float("inf"), "small", [1e-6, 2.0]):
        out.append(Case("basis", f"interaction_basis: rtol={rtol!r}",
                        lambda rtol=rtol: dj.interaction_basis(model, params, [x], rtol=rtol)))
        out.append(Case("basis", f"degeneracy_report: rtol={rtol!r}",
                        lambda rtol=rtol: dj.degeneracy_report(model, params, [x], rtol=rtol)))
    for rtol in (-0.5, 1.0, float("nan")):
        out.append(Case("basis", f"layer_basis: rtol={rtol!r}",
                        lambda rtol=rtol: dj.layer_basis(np.eye(3), np.zeros(3), None, rtol=rtol)))
    for dims in ((10, 3), (0, 3), (-1, 3), (2.5, 3), (2,), (2, 3, 4), (4, 6), ("2", 3)):
        out.append(Case("basis", f"interaction_basis: dims={dims!r}",
                        lambda dims=dims: dj.interaction_basis(model, params, [x], dims=dims)))
    out.append(Case("basis", "interaction_basis: dims=(4, 5) (full)",
                    lambda: dj.interaction_basis(model, params, [x], dims=(4, 5)).dims, "ok",
                    lambda r: tuple(r) == (5, 6)))
    for cs in (0, -1, 2.5, None, "64"):
        out.append(Case("basis", f"interaction_edges: chunk_size={cs!r}",
                        lambda cs=cs: dj.interaction_edges(model, params, basis, [x], chunk_size=cs)))
        out.append(Case("basis", f"activation_grams: chunk_size={cs!r}",
                        lambda cs=cs: dj.activation_grams(model, params, [x], chunk_size=cs)))
        out.append(Case("basis", f"ablated_output: chunk_size={cs!r}",
                        lambda cs=cs: dj.ablated_output(model, params, basis, x, 0, np.ones((4, 5)), chunk_size=cs)))
    for cs in (0, -3, 1.5):
        out.append(Case("basis", f"jacobian_grams: chunk_size={cs!r}",
                        lambda cs=cs: dj.jacobian_grams(model, params, [x], chunk_size=cs)))
    out.append(Case("basis", "interaction_basis: unknown kind", lambda: dj.interaction_basis(model, params, [x],
                                                                                          kind="lob")))
    out.append(Case("basis", "interaction_basis: random without key",
                    lambda: dj.interaction_basis(model, params, [x], kind="random")))
    nan_params = {"W1": params["W1"].copy(), "W2": params["W2"]}
    nan_params["W1"][0, 0] = np.nan
    out.append(Case("basis", "interaction_basis: NaN params", lambda: dj.interaction_basis(model, nan_params, [x])))
    out.append(Case("basis", "interaction_edges: NaN params",
                    lambda: dj.interaction_edges(model, nan_params, basis, [x])))
    dead = {"W1": np.zeros_like(params["W1"]), "W2": params["W2"]}
    out.append(Case("basis", "interaction_basis: dead layer (constant activations)",
                    lambda: dj.interaction_basis(model, dead, [x])))
    other = dj.Sections((lambda p, h: h @ p["W1"],))
    out.append(Case("basis", "interaction_edges: basis of another model",
                    lambda: dj.interaction_edges(other, params, basis, [x])))
    out.append(Case("basis", "jacobian_grams: num_sources=0",
                    lambda: dj.jacobian_grams(model, params, [x], num_sources=0)))
    out.append(Case("basis", "jacobian_grams: num_sources without key",
                    lambda: dj.jacobian_grams(model, params, [x], num_sources=4)))
    out.append(Case("basis", "jacobian_gram: layer out of range",
                    lambda: dj.jacobian_gram(model, params, [x], 5)))
    out.append(Case("basis", "jacobian_grams: target='input'",
                    lambda: dj.jacobian_grams(model, params, [x], target="input")))
    out.append(Case("basis", "interaction_edges: mode='fast'",
                    lambda: dj.interaction_edges(model, params, basis, [x], mode="fast")))
    out.append(Case("basis", "edge_sparsity: NaN edges",
                    lambda: dj.edge_sparsity([np.full((3, 3), np.nan)])))
    out.append(Case("basis", "edge_sparsity: fraction 1.5",
                    lambda: dj.edge_sparsity([np.ones((3, 3))], fractions=(1.5,))))
    return out


# ---------------------------------------------------------------------------------------------------------------
# LLC (estimate_llc), a small regression whose regular learning coefficient is d/2 = 2


def llc_cases():
    import degenjax as dj

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = (x @ rng.normal(size=(4,)) + 0.1 * rng.normal(size=256)).astype(np.float32)
    w = np.linalg.lstsq(x, y, rcond=None)[0].astype(np.float32)
    params = {"w": jnp.asarray(w)}

    def loss(p, b):
        return jnp.mean((b[0] @ p["w"] - b[1]) ** 2)

    data = (jnp.asarray(x), jnp.asarray(y))
    base = dict(num_chains=2, num_draws=200, step_size=1e-4, batch_size=32, localization=1.0)
    key = jax.random.key(0)

    def run(p=params, d=data, lf=loss, k=key, **kw):
        return dj.estimate_llc(k, lf, p, d, **{**base, **kw})

    out = []
    for k, v in (("batch_size", 0), ("batch_size", -1), ("batch_size", 257), ("batch_size", 2.5),
                 ("num_chains", 0), ("num_chains", -2), ("num_chains", 1.5), ("num_draws", 0), ("num_draws", -1),
                 ("num_burnin", -1), ("step_size", 0.0), ("step_size", -1e-4), ("step_size", float("nan")),
                 ("step_size", float("inf")), ("step_size", "1e-4"), ("nbeta", -1.0), ("nbeta", 0.0),
                 ("nbeta", float("nan")), ("localization", -1.0), ("localization", float("inf")),
                 ("sampler", "sgdl"), ("sampler", None), ("mala_every", -1), ("num_chunks", 0)):
        out.append(Case("llc", f"estimate_llc: {k}={v!r}", lambda k=k, v=v: run(**{k: v})))
    nan_data = (data[0].at[5, 1].set(jnp.nan), data[1])
    out.append(Case("llc", "estimate_llc: NaN in the data", lambda: run(d=nan_data)))
    out.append(Case("llc", "estimate_llc: inf in the targets", lambda: run(d=(data[0], data[1].at[0].set(jnp.inf)))))
    out.append(Case("llc", "estimate_llc: NaN params", lambda: run(p={"w": params["w"].at[0].set(jnp.nan)})))
    out.append(Case("llc", "estimate_llc: data leaves of different n", lambda: run(d=(data[0], data[1][:100]))))
    out.append(Case("llc", "estimate_llc: empty data", lambda: run(d=(data[0][:0], data[1][:0]))))
    out.append(Case("llc", "estimate_llc: data = None", lambda: run(d=None)))
    out.append(Case("llc", "estimate_llc: loss returns a vector",
                    lambda: run(lf=lambda p, b: (b[0] @ p["w"] - b[1]) ** 2)))
    out.append(Case("llc", "estimate_llc: integer parameter leaf",
                    lambda: run(p={"w": params["w"], "steps": jnp.asarray(3, jnp.int32)})))
    out.append(Case("llc", "estimate_llc: params = None", lambda: run(p=None)))
    out.append(Case("llc", "estimate_llc: key is an int", lambda: run(k=0)))
    out.append(Case("llc", "estimate_llc: loss not callable", lambda: run(lf=3)))
    out.append(Case("llc", "estimate_llc: mesh not dividing chains",
                    lambda: run(num_chains=3, mesh=jax.make_mesh((2,), ("chains",)))))

    def ok_llc(r):
        return finite((r.llc_mean, r.loss_trace)) and 0.5 < float(r.llc_mean) < 6.0

    out.append(Case("llc", "estimate_llc: valid (regular model, lambda = 2)", lambda: run(num_draws=400), "ok", ok_llc))
    out.append(Case("llc", "estimate_llc: batch_size = n", lambda: run(batch_size=256), "ok", ok_llc))
    out.append(Case("llc", "estimate_llc: one chain", lambda: run(num_chains=1, num_draws=400), "ok", ok_llc))
    out.append(Case("llc", "estimate_llc: numpy data", lambda: run(d=(x, y)), "ok", ok_llc))
    out.append(Case("llc", "estimate_llc: under jax.jit",
                    lambda: jax.jit(lambda k: dj.estimate_llc(k, loss, params, data, **base))(key), "ok", ok_llc))
    return out


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_cases():
    from degenjax._src import checkpoints

    rng = np.random.default_rng(1)
    p = {"params": {"dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                              "bias": rng.normal(size=(3,)).astype(np.float32)}, "step": np.int32(7)}}
    template = jax.tree.map(np.zeros_like, p)
    d = tmpdir()
    good = d / "good.msgpack"
    checkpoints.save_msgpack(good, p)
    raw = good.read_bytes()
    payload = set()
    for leaf in jax.tree.leaves(p):
        b = np.asarray(leaf).tobytes()
        s = raw.find(b)
        payload.update(range(s, s + len(b)))

    def load_bytes(data, tmpl=template, name="x.msgpack"):
        path = tmpdir() / name
        path.write_bytes(data)
        return checkpoints.load_checkpoint(path, tmpl)

    def identical(r):
        return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(p)))

    out = []
    positions = [i for i in range(len(raw)) if i not in payload]
    for i in positions:
        for bit in (0x01, 0x80):
            flipped = bytearray(raw)
            flipped[i] ^= bit
            out.append(Case("checkpoints", f"flip bit {bit:#04x} of byte {i} (of {len(raw)}, outside raw data)",
                            lambda b=bytes(flipped): load_bytes(b), "either", identical))
    for n in (0, 1, 5, len(raw) // 3, len(raw) // 2, len(raw) - 1):
        out.append(Case("checkpoints", f"truncated to {n} bytes", lambda n=n: load_bytes(raw[:n])))
    out.append(Case("checkpoints", "trailing garbage", lambda: load_bytes(raw + b"\x00garbage")))
    out.append(Case("checkpoints", "a text file", lambda: load_bytes(b"hello, I am not a checkpoint\n")))
    out.append(Case("checkpoints", "a JSON file", lambda: load_bytes(json.dumps({"w": [1, 2]}).encode())))
    out.append(Case("checkpoints", "a .npz file", lambda: load_bytes(_npz_bytes(p))))
    nan = jax.tree.map(np.copy, p)
    nan["params"]["dense"]["bias"][0] = np.nan
    out.append(Case("checkpoints", "NaN leaf", lambda: load_bytes(_msgpack(nan))))
    inf = jax.tree.map(np.copy, p)
    inf["params"]["dense"]["kernel"][1, 1] = -np.inf
    out.append(Case("checkpoints", "inf leaf", lambda: load_bytes(_msgpack(inf))))
    kind = jax.tree.map(np.copy, p)
    kind["params"]["step"] = np.float32(7.0)
    out.append(Case("checkpoints", "integer leaf stored as float", lambda: load_bytes(_msgpack(kind))))
    kind2 = jax.tree.map(np.copy, p)
    kind2["params"]["dense"]["bias"] = np.arange(3, dtype=np.int32)
    out.append(Case("checkpoints", "float leaf stored as int", lambda: load_bytes(_msgpack(kind2))))
    shape = jax.tree.map(np.copy, p)
    shape["params"]["dense"]["kernel"] = np.zeros((3, 4), np.float32)
    out.append(Case("checkpoints", "transposed kernel", lambda: load_bytes(_msgpack(shape))))
    extra = jax.tree.map(np.copy, p)
    extra["params"]["dense2"] = {"kernel": np.zeros((3, 3), np.float32)}
    out.append(Case("checkpoints", "extra layer", lambda: load_bytes(_msgpack(extra))))
    missing = {"params": {"dense": {"kernel": p["params"]["dense"]["kernel"]}, "step": np.int32(7)}}
    out.append(Case("checkpoints", "missing leaf", lambda: load_bytes(_msgpack(missing))))
    out.append(Case("checkpoints", "float64 into a float32 template", lambda: load_bytes(
        _msgpack(jax.tree.map(lambda a: np.asarray(a, np.float64) if a.dtype == np.float32 else a, p))),
        "ok", lambda r: r["params"]["dense"]["kernel"].dtype == np.float32 and close(
            r["params"]["dense"]["kernel"], p["params"]["dense"]["kernel"], 1e-7)))
    out.append(Case("checkpoints", "{'params': p} into a template p", lambda: load_bytes(raw, template["params"]),
                    "ok", lambda r: close(r["dense"]["bias"], p["params"]["dense"]["bias"], 0)))
    out.append(Case("checkpoints", "valid checkpoint", lambda: load_bytes(raw), "ok", identical))
    out.append(Case("checkpoints", "missing file", lambda: checkpoints.load_checkpoint(d / "none.msgpack")))
    (d / "folder").mkdir()
    out.append(Case("checkpoints", "empty folder", lambda: checkpoints.load_checkpoint(d / "folder")))
    out.append(Case("checkpoints", "digest of a missing file", lambda: checkpoints.checkpoint_digest(d / "none")))
    return out


def _msgpack(tree) -> bytes:
    from flax import serialization

    return serialization.to_bytes(tree)


def _npz_bytes(tree) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{str(i): np.asarray(a) for i, a in enumerate(jax.tree.leaves(tree))})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# sweeps: configs, runtime, resume identity


PROBLEM = '''
import jax.numpy as jnp
import numpy as np

_rng = np.random.default_rng(0)
X = _rng.normal(size=(128, 3)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5], np.float32) + 0.1 * _rng.normal(size=128)).astype(np.float32)
SCALE = 1.0


def make():
    params = {"w": jnp.zeros((3,), jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def loss(p, batch):
        return SCALE * jnp.mean((batch[0] @ p["w"] + p["b"] - batch[1]) ** 2)

    return loss, params, (jnp.asarray(X), jnp.asarray(Y))


def not_a_tuple():
    return 3
'''

CONFIG = '''entry = "rel_problem:make"
checkpoints = ["ck/*.msgpack"]
seed = 0
[sampler]
num_chains = 2
num_draws = 20
batch_size = 16
[grid]
step_size = [1e-4, 1e-3]
localization = [10.0]
'''


def _sweep_dir(config=CONFIG, ckpt_scale=1.0, problem=PROBLEM):
    from degenjax._src.checkpoints import save_msgpack

    d = tmpdir()
    (d / "rel_problem.py").write_text(problem)
    for i, w in enumerate((1.0, 1.5)):
        save_msgpack(d / "ck" / f"step_{100 * (i + 1)}.msgpack",
                     {"w": np.array([w, -2.0, 0.5], np.float32) * ckpt_scale, "b": np.float32(0.0)})
    (d / "sweep.toml").write_text(config)
    return d


def _new_process():
    """Forgets the cases' entry modules, as a new process would (each case's module lives in its own folder)."""
    for name in ("rel_problem", "helpers"):
        sys.modules.pop(name, None)


def _run_sweep(d, out=None, cfg="sweep.toml"):
    from degenjax._src import sweep

    _new_process()
    kw = {"progress": False, "plots": False}
    if "log" in inspect.signature(sweep.run_sweep).parameters:
        kw["log"] = None
    return sweep.run_sweep(sweep.load_sweep_config(d / cfg), out or d / "out", **kw)


_VOLATILE = ("seconds", "pid", "finished_at")


def _rows_equal(a, b) -> bool:
    ka = {r["cell"]: {k: v for k, v in r.items() if k not in _VOLATILE} for r in a}
    kb = {r["cell"]: {k: v for k, v in r.items() if k not in _VOLATILE} for r in b}
    if ka.keys() != kb.keys():
        return False
    for c in ka:
        for k in ("llc_mean", "init_loss", "llc_per_chain"):
            x, y = ka[c].get(k), kb[c].get(k)
            if (x is None) != (y is None) or (x is not None and not np.allclose(x, y, rtol=1e-12, atol=0)):
                return False
    return True


def _resume_case(change: Callable[[pathlib.Path], Any], *, legit: bool = False, x64_second: bool | None = None):
    """Runs a sweep, applies ``change``, resumes into the same folder and compares with a fresh run."""

    def fn():
        d = _sweep_dir()
        _run_sweep(d)
        change(d)
        ctx = jax.enable_x64(x64_second) if x64_second is not None else contextlib.nullcontext()
        with ctx:
            resumed = _run_sweep(d)  # may raise (refused: a clear error)
            fresh = _run_sweep(d, out=d / "fresh")
        if _rows_equal(resumed, fresh):
            return "correct"
        return "mixed data"

    return fn


def _write(path, text):
    pathlib.Path(path).write_text(text)


def sweep_cases():
    from degenjax._src import sweep
    from degenjax._src.checkpoints import save_msgpack

    out = []
    # configs
    bad_configs = {
        "malformed TOML": "entry = [",
        "missing entry": CONFIG.replace('entry = "rel_problem:make"\n', ""),
        "entry without colon": CONFIG.replace("rel_problem:make", "rel_problem.make"),
        "entry with empty function": CONFIG.replace("rel_problem:make", "rel_problem:"),
        "entry is a number": CONFIG.replace('"rel_problem:make"', "3"),
        "unknown top-level key": "chekpoints = []\n" + CONFIG,
        "unknown sampler key": CONFIG.replace("batch_size = 16", "batch_size = 16\nstep_size = 1"),
        "missing num_chains": CONFIG.replace("num_chains = 2\n", ""),
        "num_chains = 0": CONFIG.replace("num_chains = 2", "num_chains = 0"),
        "num_chains = -1": CONFIG.replace("num_chains = 2", "num_chains = -1"),
        "num_chains = 2.5": CONFIG.replace("num_chains = 2", "num_chains = 2.5"),
        "num_chains = true": CONFIG.replace("num_chains = 2", "num_chains = true"),
        "num_draws = 0": CONFIG.replace("num_draws = 20", "num_draws = 0"),
        "batch_size = \"16\"": CONFIG.replace("batch_size = 16", 'batch_size = "16"'),
        "num_burnin = -1": CONFIG.replace("batch_size = 16", "batch_size = 16\nnum_burnin = -1"),
        "unknown sampler": CONFIG.replace("batch_size = 16", 'batch_size = 16\nsampler = "sgdl"'),
        "sampler = 3": CONFIG.replace("batch_size = 16", "batch_size = 16\nsampler = 3"),
        "no [grid]": CONFIG[:CONFIG.index("[grid]")],
        "grid without step_size": CONFIG.replace("step_size = [1e-4, 1e-3]\n", ""),
        "negative step size": CONFIG.replace("[1e-4, 1e-3]", "[-1e-4]"),
        "zero step size": CONFIG.replace("[1e-4, 1e-3]", "[0.0]"),
        "NaN step size": CONFIG.replace("[1e-4, 1e-3]", "[nan]"),
        "inf step size": CONFIG.replace("[1e-4, 1e-3]", "[inf]"),
        "string step size": CONFIG.replace("[1e-4, 1e-3]", '["big"]'),
        "empty step sizes": CONFIG.replace("[1e-4, 1e-3]", "[]"),
        "repeated step sizes": CONFIG.replace("[1e-4, 1e-3]", "[1e-4, 1e-4]"),
        "negative localization": CONFIG.replace("[10.0]", "[-1.0]"),
        "nbeta = 'auto'": CONFIG.replace("localization = [10.0]", 'localization = [10.0]\nnbeta = ["auto"]'),
        "nbeta = 0": CONFIG.replace("localization = [10.0]", "localization = [10.0]\nnbeta = [0.0]"),
        "unknown grid axis": CONFIG.replace("localization = [10.0]", "localization = [10.0]\ntemperature = [1.0]"),
        "seed = 2**63": CONFIG.replace("seed = 0", f"seed = {2**63}"),
        "seed = -2**63 - 1": CONFIG.replace("seed = 0", f"seed = {-2**63 - 1}"),
        "seed = 1.5": CONFIG.replace("seed = 0", "seed = 1.5"),
        "seed = \"0\"": CONFIG.replace("seed = 0", 'seed = "0"'),
        "checkpoint glob matching nothing": CONFIG.replace("ck/*.msgpack", "nope/*.msgpack"),
        "checkpoints = []": CONFIG.replace('["ck/*.msgpack"]', "[]"),
        "checkpoints = 3": CONFIG.replace('["ck/*.msgpack"]', "3"),
        "checkpoint listed twice": CONFIG.replace('["ck/*.msgpack"]', '["ck/*.msgpack", "ck/step_100.msgpack"]'),
        "entry_version = \"\"": 'entry_version = ""\n' + CONFIG,
        "entry_version = 2": "entry_version = 2\n" + CONFIG,
        "binary garbage": "\x00\x01\x02 = \xff",
    }
    for name, text in bad_configs.items():
        def fn(text=text):
            d = _sweep_dir(config=text)
            _new_process()
            return sweep.load_sweep_config(d / "sweep.toml")

        out.append(Case("sweep config", name, fn))
    out.append(Case("sweep config", "missing config file", lambda: sweep.load_sweep_config(TMP / "none.toml")))
    out.append(Case("sweep config", "config is a folder", lambda: sweep.load_sweep_config(TMP)))
    out.append(Case("sweep config", "valid config with explicit defaults",
                    lambda: len(sweep.load_sweep_config(_sweep_dir(config=CONFIG.replace(
                        "batch_size = 16", 'batch_size = 16\nnum_burnin = 0\nsampler = "sgld"')) / "sweep.toml")
                                .cells()), "ok", lambda r: r == 4))

    # runtime: entry point and sampler problems found before anything is written
    def start_fail(config=CONFIG, problem=PROBLEM):
        def fn():
            d = _sweep_dir(config=config, problem=problem)
            try:
                _run_sweep(d)
            except ValueError:
                if (d / "out" / "sweep.json").exists():
                    return "silent wrong"  # a failed start poisoned --out (the rerun would be refused)
                raise
            return "silent wrong"

        return fn

    for name, cfg, prob in (
            ("entry module missing", CONFIG.replace("rel_problem:make", "no_such_module_xyz:make"), PROBLEM),
            ("entry function missing", CONFIG.replace("rel_problem:make", "rel_problem:mkae"), PROBLEM),
            ("entry returns a non-tuple", CONFIG.replace("rel_problem:make", "rel_problem:not_a_tuple"), PROBLEM),
            ("entry module has a syntax error", CONFIG, PROBLEM + "\ndef broken(:\n"),
            ("batch_size larger than the data", CONFIG.replace("batch_size = 16", "batch_size = 1000"), PROBLEM),
            ("entry raises at import", CONFIG, "raise RuntimeError('no GPU here')\n" + PROBLEM),
    ):
        out.append(Case("sweep runtime", f"failed start leaves --out clean: {name}", start_fail(cfg, prob)))

    def fixed_rerun():
        d = _sweep_dir(config=CONFIG.replace("rel_problem:make", "rel_problem:mkae"))
        with contextlib.suppress(ValueError):
            _run_sweep(d)
        _write(d / "sweep.toml", CONFIG)
        return len(_run_sweep(d))

    out.append(Case("sweep runtime", "rerun after fixing a typo in entry", fixed_rerun, "ok", lambda r: r == 4))

    def bad_checkpoint():
        d = _sweep_dir()
        (d / "ck" / "step_200.msgpack").write_bytes(b"\xc1 junk")
        rows = _run_sweep(d)
        bad = [r for r in rows if r.get("error")]
        good = [r for r in rows if not r.get("error")]
        return len(bad), len(good), all("msgpack" in r["error"] for r in bad)

    out.append(Case("sweep runtime", "one damaged checkpoint among two", bad_checkpoint, "ok",
                    lambda r: r == (2, 2, True)))

    def nan_checkpoint():
        d = _sweep_dir()
        save_msgpack(d / "ck" / "step_200.msgpack", {"w": np.array([np.nan, 1, 1], np.float32), "b": np.float32(0)})
        rows = _run_sweep(d)
        return sum(bool(r.get("error")) and "NaN" in r["error"] for r in rows)

    out.append(Case("sweep runtime", "checkpoint with a NaN weight", nan_checkpoint, "ok", lambda r: r == 2))

    def damaged(edit, *, expect_rows=None):
        def fn():
            d = _sweep_dir()
            _run_sweep(d)
            edit(d / "out")
            rows = _run_sweep(d)
            return rows if expect_rows is None else len(rows)

        return fn

    out.append(Case("sweep runtime", "a {} line in results.jsonl",
                    damaged(lambda o: (o / "results.jsonl").open("a").write("{}\n"))))
    out.append(Case("sweep runtime", "a non-JSON line in results.jsonl",
                    damaged(lambda o: (o / "results.jsonl").write_text("garbage\n" + (o / "results.jsonl").read_text()))))
    out.append(Case("sweep runtime", "a JSON list line in results.jsonl",
                    damaged(lambda o: (o / "results.jsonl").open("a").write("[1, 2]\n"))))
    out.append(Case("sweep runtime", "a torn last line in results.jsonl (a crash mid-write)",
                    damaged(lambda o: (o / "results.jsonl").open("a").write('{"cell": "x", "llc'), expect_rows=1),
                    "ok", lambda r: r == 4))
    out.append(Case("sweep runtime", "truncated sweep.json",
                    damaged(lambda o: (o / "sweep.json").write_text((o / "sweep.json").read_text()[:20]))))
    out.append(Case("sweep runtime", "sweep.json holding a list",
                    damaged(lambda o: (o / "sweep.json").write_text("[1, 2, 3]"))))
    out.append(Case("sweep runtime", "empty sweep.json", damaged(lambda o: (o / "sweep.json").write_text(""))))

    def out_is_file():
        d = _sweep_dir()
        (d / "blocker").write_text("x")
        return _run_sweep(d, out=d / "blocker")

    def out_under_file():
        d = _sweep_dir()
        (d / "blocker").write_text("x")
        return _run_sweep(d, out=d / "blocker" / "out")

    out.append(Case("sweep runtime", "--out is a file", out_is_file))
    out.append(Case("sweep runtime", "--out under a file", out_under_file))

    def locked():
        import fcntl

        d = _sweep_dir()
        (d / "out").mkdir()
        fd = os.open(d / "out" / ".lock", os.O_WRONLY | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            return _run_sweep(d)
        finally:
            os.close(fd)

    out.append(Case("sweep runtime", "another sweep is writing to --out", locked))

    # resume identity
    def retrain(d):
        save_msgpack(d / "ck" / "step_200.msgpack", {"w": np.array([3.0, 0.0, 0.0], np.float32), "b": np.float32(1)})

    def edit_entry(d):
        _write(d / "rel_problem.py", PROBLEM.replace("SCALE = 1.0", "SCALE = 2.0"))

    def add_helper(d):
        _write(d / "helpers.py", "X = 1\n")

    def sampler_change(d):
        _write(d / "sweep.toml", CONFIG.replace("num_draws = 20", "num_draws = 30"))

    def seed_change(d):
        _write(d / "sweep.toml", CONFIG.replace("seed = 0", "seed = 1"))

    def explicit_defaults(d):
        _write(d / "sweep.toml", CONFIG.replace("batch_size = 16", 'batch_size = 16\nnum_burnin = 0\nsampler = "sgld"'))

    def grow_grid(d):
        _write(d / "sweep.toml", CONFIG.replace("[1e-4, 1e-3]", "[1e-4, 1e-3, 3e-3]"))

    def add_checkpoint(d):
        save_msgpack(d / "ck" / "step_300.msgpack", {"w": np.array([2.0, -2.0, 0.5], np.float32), "b": np.float32(0)})

    def rename_checkpoint(d):
        (d / "ck" / "step_200.msgpack").rename(d / "ck" / "step_250.msgpack")

    def touch_checkpoint(d):
        os.utime(d / "ck" / "step_200.msgpack")

    def swap_checkpoints(d):
        a, b = d / "ck" / "step_100.msgpack", d / "ck" / "step_200.msgpack"
        da, db = a.read_bytes(), b.read_bytes()
        a.write_bytes(db)
        b.write_bytes(da)

    def change_batch(d):
        _write(d / "sweep.toml", CONFIG.replace("batch_size = 16", "batch_size = 32"))

    def version_entry(d):
        _write(d / "sweep.toml", 'entry_version = "v2"\n' + CONFIG)

    out += [
        Case("sweep resume", "retrained checkpoint under the same file name", _resume_case(retrain)),
        Case("sweep resume", "edited entry module (loss scaled)", _resume_case(edit_entry)),
        Case("sweep resume", "new helper module next to the entry", _resume_case(add_helper)),
        Case("sweep resume", "num_draws changed", _resume_case(sampler_change)),
        Case("sweep resume", "batch_size changed", _resume_case(change_batch)),
        Case("sweep resume", "seed changed", _resume_case(seed_change)),
        Case("sweep resume", "--x64 toggled on", _resume_case(lambda d: None, x64_second=True)),
        Case("sweep resume", "entry_version added", _resume_case(version_entry)),
        Case("sweep resume", "two checkpoints' contents swapped", _resume_case(swap_checkpoints)),
        Case("sweep resume", "defaults written explicitly", _resume_case(explicit_defaults), "ok",
             lambda r: r == "correct"),
        Case("sweep resume", "grid grows", _resume_case(grow_grid), "ok", lambda r: r == "correct"),
        Case("sweep resume", "checkpoint added", _resume_case(add_checkpoint), "ok", lambda r: r == "correct"),
        Case("sweep resume", "checkpoint renamed (same content)", _resume_case(rename_checkpoint), "ok",
             lambda r: r == "correct"),
        Case("sweep resume", "checkpoint touched (same content)", _resume_case(touch_checkpoint), "ok",
             lambda r: r == "correct"),
        Case("sweep resume", "nothing changed", _resume_case(lambda d: None), "ok", lambda r: r == "correct"),
    ]

    def other_folder(same: bool):
        def fn():
            d = _sweep_dir()
            _run_sweep(d)
            e = _sweep_dir(ckpt_scale=1.0 if same else 2.0)
            resumed = _run_sweep(e, out=d / "out")
            fresh = _run_sweep(e, out=e / "fresh")
            return "correct" if _rows_equal(resumed, fresh) else "mixed data"

        return fn

    out.append(Case("sweep resume", "config in another folder, same layout, other checkpoints", other_folder(False)))
    out.append(Case("sweep resume", "config in another folder, identical files", other_folder(True), "ok",
                    lambda r: r == "correct"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLI (in-process with typer's CliRunner; a few through the installed executable)


@dataclass
class CliOutcome:
    outcome: str
    detail: str


def _cli(args, cwd, expect="error", check=None):
    from typer.testing import CliRunner

    from degenjax.cli import app

    x64 = jax.config.jax_enable_x64
    _new_process()
    old = os.getcwd()
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))
    try:
        res = CliRunner().invoke(app, args)
    finally:
        os.chdir(old)
        sys.path.remove(str(cwd))
        jax.config.update("jax_enable_x64", x64)
        jax.config.update("jax_compilation_cache_dir", None)
    text = res.output
    lines = [l for l in text.strip().splitlines() if l.strip()]
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        return CliOutcome("traceback", f"{type(res.exception).__name__}: {res.exception}"[:160])
    if "Traceback" in text:
        return CliOutcome("traceback", "traceback printed")
    if res.exit_code == 0:
        if expect == "error":
            return CliOutcome("silent wrong", "exit 0 for a wrong input: " + (lines[-1][:120] if lines else ""))
        if check is not None and not check(cwd, text):
            return CliOutcome("silent wrong", "wrong output")
        return CliOutcome("correct", "")
    errors = [l for l in lines if l.startswith("Error")]
    if res.exit_code == 1 and len(errors) == 1 and lines[-1].startswith("Error: "):
        return CliOutcome("clear error" if expect != "ok" else "traceback", lines[-1][:160])
    if res.exit_code == 2 and any("Error" in l or "Invalid" in l or "Missing" in l for l in lines):
        return CliOutcome("clear error" if expect != "ok" else "traceback", "usage error: " + lines[-1][:140])
    return CliOutcome("traceback", f"exit {res.exit_code}: {(lines[-1] if lines else '')[:140]}")


CLI_PROBLEM = PROBLEM + '''

def make_marked():
    open("entry_called.marker", "w").close()
    return make()

def make_basis():
    import degenjax as dj
    model = dj.Sections((lambda p, h: jnp.tanh(h @ p["W1"]), lambda p, h: h @ p["W2"]))
    r = np.random.default_rng(1)
    return model, {"W1": r.normal(size=(3, 4)), "W2": r.normal(size=(4, 2))}, [X]

def make_basis_generator():
    model, params, batches = make_basis()
    return model, params, (X[i:i + 32] for i in range(0, 128, 32))
'''


def cli_cases():
    out = []

    def workdir():
        d = _sweep_dir(problem=CLI_PROBLEM)
        (d / "blocker").write_text("a file")
        return d

    def case(name, args, expect="error", check=None, no_compute=False):
        def fn():
            d = workdir()
            res = _cli(args, d, expect, check)
            if no_compute and (d / "entry_called.marker").exists() and res.outcome == "clear error":
                return CliOutcome("silent wrong", "the error came after the computation started")
            return res

        out.append(Case("cli", name, fn))

    llc = ["llc", "rel_problem:make_marked", "--num-draws", "20", "--batch-size", "16", "--no-progress"]
    case("--compile-cache under a file", ["--compile-cache", "blocker/c"] + llc, no_compute=True)
    case("--compile-cache is a file", ["--compile-cache", "blocker"] + llc, no_compute=True)
    case("llc --seed 2**63", llc + ["--seed", str(2**63)], no_compute=True)
    case("llc --seed -2**63-1", llc + ["--seed", str(-2**63 - 1)], no_compute=True)
    case("llc --seed 1e3", llc + ["--seed", "1e3"])
    case("llc --out under a file", llc + ["--out", "blocker/r.json"], no_compute=True)
    case("llc --out is a folder", llc + ["--out", "ck"], no_compute=True)
    case("llc --plot under a file", llc + ["--plot", "blocker/p.png"], no_compute=True)
    case("llc --num-chains 0", llc + ["--num-chains", "0"])
    case("llc --num-draws -5", llc + ["--num-draws", "-5"])
    case("llc --batch-size 0", llc + ["--batch-size", "0"])
    case("llc --batch-size larger than n", llc + ["--batch-size", "1000"])
    case("llc --step-size 0", llc + ["--step-size", "0"])
    case("llc --step-size -1e-4", llc + ["--step-size", "-1e-4"])
    case("llc --step-size nan", llc + ["--step-size", "nan"])
    case("llc --nbeta -3", llc + ["--nbeta", "-3"])
    case("llc --localization -1", llc + ["--localization", "-1"])
    case("llc --sampler sgdl", llc + ["--sampler", "sgdl"])
    case("llc missing checkpoint", llc + ["--checkpoint", "none.msgpack"])
    case("llc damaged checkpoint", llc + ["--checkpoint", "blocker"])
    case("llc checkpoint of another model", llc + ["--checkpoint", "ck/../ck"])
    case("llc entry not found", ["llc", "nope_xyz:make"])
    case("llc entry attribute missing", ["llc", "rel_problem:nope"])
    case("llc entry without colon", ["llc", "rel_problem"])
    case("llc entry returns a non-tuple", ["llc", "rel_problem:not_a_tuple"])
    case("llc entry returns a basis problem", ["llc", "rel_problem:make_basis"])
    case("llc unknown option", llc + ["--stepsize", "1e-4"])
    case("llc valid run", llc + ["--out", "r.json"], "ok",
         check=lambda d, t: np.isfinite(json.loads((d / "r.json").read_text())["llc_mean"]))
    basis = ["basis", "rel_problem:make_basis", "--kind", "pca"]
    case("basis --rtol -1", basis + ["--rtol", "-1"])
    case("basis --rtol 1.5", basis + ["--rtol", "1.5"])
    case("basis --kind lob", basis[:2] + ["--kind", "lob"])
    case("basis --out under a file", basis + ["--out", "blocker/b"])
    case("basis --out is a file", basis + ["--out", "blocker"])
    case("basis --seed 2**64", basis + ["--seed", str(2**64)])
    case("basis entry returns an llc problem", ["basis", "rel_problem:make"])
    case("basis with a generator of batches", ["basis", "rel_problem:make_basis_generator", "--kind", "pca"], "ok",
         check=lambda d, t: "dims per node layer: [4, 5]" in t)
    sw = ["sweep", "sweep.toml", "--no-progress", "--no-plots"]
    case("sweep --out under a file", sw + ["--out", "blocker/o"])
    case("sweep --out is a file", sw + ["--out", "blocker"])
    case("sweep missing config", ["sweep", "none.toml", "--out", "o"])
    case("sweep config is a folder", ["sweep", "ck", "--out", "o"])
    case("sweep without --out", ["sweep", "sweep.toml"])

    def sweep_damaged(edit, name):
        def fn():
            d = workdir()
            (d / "o").mkdir()
            edit(d / "o")
            return _cli(sw + ["--out", "o"], d)

        out.append(Case("cli", name, fn))

    sweep_damaged(lambda o: (o / "results.jsonl").write_text("{}\n"), "sweep with a {} line in results.jsonl")
    sweep_damaged(lambda o: (o / "sweep.json").write_text('{"format": 2, "ent'), "sweep with a truncated sweep.json")
    sweep_damaged(lambda o: (o / "results.jsonl").write_text("\x00\x01\n"), "sweep with binary results.jsonl")

    def sweep_seed():
        d = workdir()
        _write(d / "sweep.toml", CONFIG.replace("seed = 0", f"seed = {2**63}"))
        return _cli(sw + ["--out", "o"], d)

    out.append(Case("cli", "sweep config seed = 2**63", sweep_seed))

    def sweep_bad_ckpt():
        d = workdir()
        (d / "ck" / "step_200.msgpack").write_bytes(b"junk")
        res = _cli(sw + ["--out", "o"], d)
        rows = [json.loads(l) for l in (d / "o" / "results.jsonl").read_text().splitlines()]
        if res.outcome == "clear error" and sum(not r.get("error") for r in rows) == 2:
            return CliOutcome("clear error", res.detail)
        return res if res.outcome != "clear error" else CliOutcome("silent wrong", "good cells missing")

    out.append(Case("cli", "sweep with one damaged checkpoint (the others computed, exit 1)", sweep_bad_ckpt))

    def sweep_ok():
        d = workdir()
        return _cli(sw + ["--out", "o"], d, "ok",
                    check=lambda d, t: len((d / "o" / "results.jsonl").read_text().splitlines()) == 4)

    out.append(Case("cli", "sweep valid run", sweep_ok))

    # the installed executable (its own process): one line on stderr, no traceback
    exe = str(pathlib.Path(sys.executable).with_name("degenjax"))

    def proc(args):
        def fn():
            d = workdir()
            p = subprocess.run([exe] + args, cwd=d, capture_output=True, text=True, timeout=300)
            err = [l for l in p.stderr.strip().splitlines() if l.strip()]
            if p.returncode == 1 and len(err) == 1 and err[0].startswith("Error: ") and "Traceback" not in p.stderr:
                return CliOutcome("clear error", err[0][:160])
            if p.returncode == 0:
                return CliOutcome("silent wrong", "exit 0")
            return CliOutcome("traceback", (err[-1] if err else "")[:160])

        return fn

    for name, args in (("installed: --compile-cache under a file", ["--compile-cache", "blocker/c", "llc",
                                                                    "rel_problem:make"]),
                       ("installed: llc --seed 2**63", ["llc", "rel_problem:make", "--seed", str(2**63)]),
                       ("installed: sweep --out is a file", ["sweep", "sweep.toml", "--out", "blocker"])):
        out.append(Case("cli", name, proc(args)))
    return out


AREAS = {"eigen": eigen_cases, "basis": basis_cases, "llc": llc_cases, "checkpoints": checkpoint_cases,
         "sweep": sweep_cases, "cli": cli_cases}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=list(AREAS), help="areas to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--no-append", action="store_true", help="do not record the table in benchmarks/results.jsonl (and RESULTS.md)")
    p.add_argument("--details", type=pathlib.Path, help="write every case's outcome as JSON lines here")
    args = p.parse_args()
    areas = args.only or list(AREAS)
    t0 = time.time()
    cases = []
    for a in areas:
        cases += AREAS[a]()
    if args.list:
        for c in cases:
            print(f"{c.area:14s} {c.expect:6s} {c.name}")
        return
    results = []
    for i, c in enumerate(cases):
        outcome, detail = classify(c)
        results.append((c, outcome, detail))
        if outcome not in ("clear error", "correct"):
            print(f"[{outcome}] {c.area}: {c.name}: {detail}", flush=True)
    by_area = collections.OrderedDict()
    for c, o, _ in results:
        by_area.setdefault(c.area, collections.Counter())[o] += 1
    header = "| area | inputs | " + " | ".join(OUTCOMES) + " |"
    lines = [header, "|" + "---|" * (len(OUTCOMES) + 2)]
    total = collections.Counter()
    for area, cnt in by_area.items():
        total.update(cnt)
        lines.append(f"| {area} | {sum(cnt.values())} | " + " | ".join(str(cnt[o]) for o in OUTCOMES) + " |")
    lines.append(f"| **all** | **{sum(total.values())}** | " + " | ".join(f"**{total[o]}**" for o in OUTCOMES)
                 + " |")
    table = "\n".join(lines)
    print()
    print(table)
    elapsed = time.time() - t0
    print(f"\n{len(results)} inputs in {elapsed:.0f} s")
    if args.details:
        with open(args.details, "w") as f:
            for c, o, d in results:
                f.write(json.dumps({"area": c.area, "case": c.name, "expect": c.expect, "outcome": o,
                                    "detail": d}) + "\n")
    if not args.no_append:
        import degenjax

        load = os.getloadavg()
        out = []  # the section, recorded through the shared writer
        out.append(f"\n## reliability: bad inputs through the API and the CLI "
                   f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n")
        out.append(f"Command: `.venv/bin/python benchmarks/reliability.py"
                   f"{' --only ' + ' '.join(areas) if args.only else ''}`; degenjax {degenjax.__version__}, "
                   f"jax {jax.__version__}, {platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
                   f"load average {load[0]:.1f}; {len(results)} inputs in {elapsed:.0f} s. Outcomes as defined in "
                   "the script's docstring (goal: zero in the last three columns).\n\n")
        out.append(table + "\n")
        bad = [(c, o, d) for c, o, d in results if o not in ("clear error", "correct")]
        if bad:
            out.append("\nNot clear or correct:\n\n")
            for c, o, d in bad:
                out.append(f"- [{o}] {c.area}: {c.name}: {d}\n")
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _results import append_section  # benchmarks/_results.py: results.jsonl, RESULTS.md, history.md

        append_section("".join(out), benchmark="reliability")
    shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
