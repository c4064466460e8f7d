"""What the README promises about sharded runs: in float32 (JAX's default) an LLC estimate agrees to rounding
between 1 and 4 devices (chains sharded), with data-parallel minibatches, and eager vs jit.

The bound, 1e-5 relative on llc_mean and on every loss-trace entry, is about twice the largest difference seen
across these layouts (4.4e-6 relative on llc_mean, 1 vs 4 devices); rounding differences do not grow into
different trajectories over the 400 steps here. (float64 agreement, 1e-12, is tested in test_llc.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import degenjax as dj

RTOL = 1e-5


def _problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    w1, w2 = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)
    y = (np.tanh(x @ w1) @ w2 + 0.1 * rng.normal(size=(256, 2))).astype(np.float32)
    params = {"w1": jnp.asarray(w1), "w2": jnp.asarray(w2)}

    def loss(p, batch):
        return jnp.mean((jnp.tanh(batch[0] @ p["w1"]) @ p["w2"] - batch[1]) ** 2)

    return loss, params, (jnp.asarray(x), jnp.asarray(y))


def test_float32_llc_agrees_to_rounding_across_device_layouts_and_jit(num_devices):
    kw = dict(num_chains=4, num_draws=300, num_burnin=100, step_size=1e-3, batch_size=64, localization=30.0,
              num_chunks=1)
    with jax.enable_x64(False):
        loss, params, data = _problem()
        key = jax.random.key(0)
        runs = {"1 device, eager": dj.estimate_llc(key, loss, params, data, **kw)}
        chains4 = Mesh(np.asarray(jax.devices()[:4]), ("chains",))
        runs["4 devices, eager"] = dj.estimate_llc(key, loss, params, data, mesh=chains4, **kw)
        runs["4 devices, jit"] = jax.jit(lambda k: dj.estimate_llc(k, loss, params, data, mesh=chains4, **kw))(key)
        grid = jax.make_mesh((2, 4), ("chains", "data"))
        runs["2 x 4 devices, data-parallel"] = dj.estimate_llc(key, loss, params, data, mesh=grid, data_axis="data",
                                                              **kw)
    ref = runs.pop("1 device, eager")
    assert ref.loss_trace.dtype == jnp.float32 and np.isfinite(float(ref.llc_mean)) and float(ref.llc_mean) > 0
    for name, r in runs.items():
        np.testing.assert_allclose(float(r.llc_mean), float(ref.llc_mean), rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(np.asarray(r.loss_trace), np.asarray(ref.loss_trace), rtol=RTOL, err_msg=name)
    # Different keys give different estimates: the agreement above is not that of a constant.
    with jax.enable_x64(False):
        other = dj.estimate_llc(jax.random.key(1), loss, params, data, **kw)
    assert abs(float(other.llc_mean) - float(ref.llc_mean)) > 100 * RTOL * abs(float(ref.llc_mean))
