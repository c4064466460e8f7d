"""Batched LLC cells (`estimate_llc_batched`): a cell's numbers are `estimate_llc`'s for the same key, bitwise on CPU,
whatever the grouping, the devices, or the caller's jit; lambda^ per chain is n beta (mean trace - L_n(w*)) from the
trace (NumPy); bad inputs fail with one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import degenjax as dj
from conftest import assert_trees_all_close

C, K, DRAWS, BATCH = 3, 2, 30, 16
STEPS = np.array([1e-4, 3e-4, 2e-4])
NBETAS = np.array([8.0, 15.0, 30.0])
GAMMAS = np.array([1.0, 10.0, 100.0])


def _problem(dtype):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(96, 4)).astype(dtype)
    Y = (X @ rng.normal(size=(4, 2))).astype(dtype)
    params = {"w1": (0.5 * rng.normal(size=(C, 4, 5))).astype(dtype),
              "w2": (0.5 * rng.normal(size=(C, 5, 2))).astype(dtype)}

    def loss_fn(p, batch):
        return jnp.mean((jnp.tanh(batch[0] @ p["w1"]) @ p["w2"] - batch[1]) ** 2)

    return loss_fn, jax.tree.map(jnp.asarray, params), (jnp.asarray(X), jnp.asarray(Y))


def _bitwise(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cells_are_estimate_llc_bitwise_in_any_grouping(dtype):
    loss_fn, params, data = _problem(dtype)
    keys = jax.random.split(jax.random.key(3), C)
    kw = dict(num_chains=K, num_draws=DRAWS, batch_size=BATCH, warn=False)
    groups = [dj.estimate_llc_batched(keys, loss_fn, params, data, step_size=STEPS, nbeta=NBETAS,
                                      localization=GAMMAS, cells_per_group=g, **kw) for g in (2, 3)]
    for c in range(C):
        one = dj.estimate_llc(keys[c], loss_fn, jax.tree.map(lambda x: x[c], params), data, step_size=STEPS[c],
                              nbeta=NBETAS[c], localization=GAMMAS[c], **kw)
        for res in groups:
            for field in ("loss_trace", "init_loss", "llc_per_chain", "llc_mean", "llc_std"):
                _bitwise(getattr(res, field)[c], getattr(one, field))
            # the MALA acceptance sums over parameters, a reduction that XLA:CPU may order differently in the eager
            # estimate_llc (compiled without bitwise_compiler_options)
            assert_trees_all_close(res.mala_acceptance[c], one.mala_acceptance,
                                   rtol=1e-5 if dtype == np.float32 else 1e-13)
    res = groups[0]
    trace = np.asarray(res.loss_trace, np.float64)
    want = NBETAS[:, None] * (trace.mean(axis=2) - np.asarray(res.init_loss, np.float64)[:, None])
    # float32: n beta x the rounding of a mean of losses near L_n(w*)
    assert_trees_all_close(res.llc_per_chain, want, rtol=1e-12, atol=3e-5 if dtype == np.float32 else 1e-12)
    for c in range(C):  # L_n(w*) in float64 NumPy
        X, Y = (np.asarray(d, np.float64) for d in data)
        p = jax.tree.map(lambda x: np.asarray(x[c], np.float64), params)
        ref = np.mean((np.tanh(X @ p["w1"]) @ p["w2"] - Y) ** 2)
        assert_trees_all_close(res.init_loss[c], ref, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_cells_under_jit_and_sharded_over_devices_equal_eager(num_devices):
    loss_fn, params, data = _problem(np.float64)
    keys = jax.random.split(jax.random.key(5), C)
    kw = dict(num_chains=K, num_draws=DRAWS, batch_size=BATCH)
    eager = dj.estimate_llc_batched(keys, loss_fn, params, data, step_size=STEPS, nbeta=NBETAS, warn=False, **kw)
    mesh = jax.make_mesh((4,), ("chains",))

    def run(k, p, s, b):
        return dj.estimate_llc_batched(k, loss_fn, p, data, step_size=s, nbeta=b, mesh=mesh, cells_per_group=2,
                                       **kw)

    jitted = jax.jit(run, compiler_options=dj.bitwise_compiler_options())(keys, params, jnp.asarray(STEPS),
                                                                          jnp.asarray(NBETAS))
    _bitwise(jitted.loss_trace, eager.loss_trace)
    _bitwise(jitted.init_loss, eager.init_loss)
    assert_trees_all_close(jitted.llc_mean, eager.llc_mean, rtol=1e-12)
    sharded = dj.estimate_llc_batched(keys, loss_fn, params, data, step_size=STEPS, nbeta=NBETAS, mesh=mesh,
                                      warn=False, **kw)
    _bitwise(sharded.loss_trace, eager.loss_trace)


def test_cells_bad_inputs_fail_with_one_line():
    loss_fn, params, data = _problem(np.float64)
    keys = jax.random.split(jax.random.key(0), C)
    kw = dict(num_chains=K, num_draws=5, batch_size=BATCH)
    cases = [
        (dict(rng_keys=keys[:2], params=params, step_size=1e-4), "leading cell axis of 2"),
        (dict(rng_keys=keys, params=params, step_size=np.ones(2) * 1e-4), "one value per cell"),
        (dict(rng_keys=keys, params=params, step_size=np.array([1e-4, -1.0, 1e-4])), "cell 1"),
        (dict(rng_keys=keys, params=params, step_size="auto"), "not supported for a batch"),
        (dict(rng_keys=keys[0], params=params, step_size=1e-4), "one key per cell"),
    ]
    for args, words in cases:
        with pytest.raises(ValueError, match=words) as err:
            dj.estimate_llc_batched(args["rng_keys"], loss_fn, args["params"], data, step_size=args["step_size"],
                                    **kw)
        assert "\n" not in str(err.value)
