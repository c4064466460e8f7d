"""The quickstart's analysis streams the data once per kind of statistic, and the precomputed statistics it shares
(``stats=``, ``jacobian_grams=``) give the same numbers as computing them again.

Passes are counted two independent ways: a Python counter on the first section (every pass over the data runs it
once per batch on concrete values; run eagerly under ``jax.disable_jit`` so calls are not hidden in compiled code),
and the names of the passes the streaming functions announce to their progress bars.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import degenjax as dj
from degenjax._src import degeneracy as degeneracy_mod
from degenjax._src import edges as edges_mod
from degenjax._src import grams as grams_mod
from degenjax._src.quickstart import analysis_stage, load_digits_split

NUM_BATCHES = 2


def _problem(sizes=(64, 6, 6, 4)):
    """A ReLU MLP (default 64 -> 6 -> 6 -> 4, the quickstart's shape) on 40 digits in two batches; plain functions
    (cheap eagerly)."""
    x, _, _, _ = load_digits_split(60, 0, dtype=np.float64)
    x = jnp.asarray(x[:40])
    n = len(sizes) - 1
    keys = jax.random.split(jax.random.key(0), n)
    params = {f"W{i}": jax.random.normal(keys[i], sizes[i:i + 2], jnp.float64) / np.sqrt(sizes[i]) for i in range(n)}
    params.update({f"b{i}": jnp.full((sizes[i + 1],), 0.1, jnp.float64) for i in range(n)})

    def section(i):
        def f(p, h):
            z = h @ p[f"W{i}"] + p[f"b{i}"][None, :]
            return jax.nn.relu(z) if i < n - 1 else z
        return f

    model = dj.Sections(tuple(section(i) for i in range(n)))
    return model, params, [x[:20], x[20:]]


def _counted(model):
    """The model with a counter of concrete calls of its first section (one per batch and pass)."""
    calls = []
    f0 = model.fns[0]

    def section0(p, h):
        if not isinstance(h, jax.core.Tracer):
            calls.append(int(h.shape[0]))
        return f0(p, h)

    return dataclasses.replace(model, fns=(section0,) + tuple(model.fns[1:])), calls


@pytest.fixture
def passes(monkeypatch):
    """Records the name of every streaming pass (the label each function gives its progress bar)."""
    names = []

    def track(batches, desc, enable):
        names.append(desc)
        return batches

    for mod in (grams_mod, edges_mod, degeneracy_mod):
        monkeypatch.setattr(mod, "track", track)
    return names


def test_quickstart_analysis_makes_one_pass_per_statistic(passes):
    # two node layers (eager runs compile every primitive; the quickstart's three give 8 passes, 11 before)
    model, params, batches = _problem((64, 6, 4))
    counted, calls = _counted(model)
    with jax.disable_jit():
        res = analysis_stage(counted, params, batches)
    L = len(model)
    expected = (["activation Grams"]  # shared by the LIB and PCA bases and the degeneracy report
                + [f"Jacobian Gram of node layer {l}" for l in reversed(range(L))]  # LIB: each needs the next basis
                + ["interaction edges"] * 2  # LIB and PCA edges
                + ["ReLU patterns", "Jacobian Grams"])  # the degeneracy report's own statistics
    assert passes == expected
    # every pass runs the first section once per batch, and no pass is hidden (2L + 3; before: 3L + 5 = 11 for L = 3)
    assert len(calls) == len(expected) * NUM_BATCHES == (2 * L + 3) * NUM_BATCHES
    assert sorted(set(calls)) == [20]
    assert res.bases["lib"].dims[0] >= 2 and len(res.edges["pca"]) == L - 1


def test_shared_statistics_give_the_same_numbers(passes):
    """stats= / jacobian_grams= reproduce what each function computes on its own (float64)."""
    model, params, batches = _problem()
    stats = dj.activation_stats(model, params, batches, center=True)
    for kind in ("lib", "pca"):
        own = dj.interaction_basis(model, params, batches, kind=kind)
        shared = dj.interaction_basis(model, params, batches, kind=kind, stats=stats)
        for a, b in zip(own.Lambda, shared.Lambda):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    own = dj.degeneracy_report(model, params, batches)
    del passes[:]
    again = dj.degeneracy_report(model, params, batches, stats=stats, jacobian_grams=own.jacobian_grams)
    assert passes == ["ReLU patterns"]  # neither Gram is streamed again
    for f in ("activation_rank", "jacobian_rank", "activation_free", "jacobian_free", "sync_free", "num_dead"):
        np.testing.assert_array_equal(np.asarray(getattr(own, f)), np.asarray(getattr(again, f)), err_msg=f)
    # the report's Grams against a NumPy float64 covariance of the first hidden layer (post-ReLU)
    h1 = np.maximum(np.concatenate([np.asarray(b) for b in batches]) @ np.asarray(params["W0"])
                    + np.asarray(params["b0"])[None, :], 0.0)
    np.testing.assert_allclose(np.asarray(own.grams[1])[:-1, :-1], np.cov(h1, rowvar=False, bias=True), atol=1e-12)
    with pytest.raises(ValueError, match="not centred"):
        dj.degeneracy_report(model, params, batches, stats=dj.activation_stats(model, params, batches, center=False))
    with pytest.raises(ValueError, match="jacobian_grams= needs 2 matrices"):
        dj.degeneracy_report(model, params, batches, jacobian_grams=own.jacobian_grams[:1])


def test_pass_names_of_the_three_layer_quickstart(passes):
    """The quickstart's shape (three node layers) with compiled steps: 8 named passes (11 before)."""
    model, params, batches = _problem()
    analysis_stage(model, params, batches)
    assert len(passes) == 8 and passes.count("interaction edges") == 2 and passes[0] == "activation Grams"


def test_progress_bars_are_off_by_default_and_on_when_asked(capsys):
    model, params, batches = _problem()
    dj.activation_stats(model, params, batches)
    assert "activation Grams" not in capsys.readouterr().err
    dj.activation_stats(model, params, batches, progress=True)
    err = capsys.readouterr().err
    assert "activation Grams" in err and f"/{NUM_BATCHES} " in err  # a bar over the batches
