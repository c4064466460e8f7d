"""The entry point of the shipped sweep example: a small linen MLP regressing a teacher network.

``degenjax sweep examples/sweep.toml --out sweep-out`` imports `make_problem` from here (the config's folder is on
the import path). Run ``python examples/sweep_model.py`` to retrain and rewrite ``examples/checkpoints``.

Other entry points for the CLI:

- ``degenjax llc sweep_model:make_problem --checkpoint examples/checkpoints/step_03000.msgpack`` (from ``examples/``)
- ``degenjax basis sweep_model:make_basis_problem --out basis-out``
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import optax

from degenjax import models

D_IN, FEATURES, N = 4, (8, 8, 2), 512
CHECKPOINT_STEPS = (100, 300, 1000, 3000)


def _data():
    x = jax.random.normal(jax.random.key(1), (N, D_IN), jnp.float32)
    teacher = models.MLP(features=(3, 2))
    tv = teacher.init(jax.random.key(2), x)
    y = teacher.apply(tv, x) + 0.05 * jax.random.normal(jax.random.key(3), (N, 2), jnp.float32)
    return x, y


def _module_and_init():
    module = models.MLP(features=FEATURES)
    x, y = _data()
    return module, module.init(jax.random.key(0), x), x, y


def make_problem():
    """Returns ``(loss_fn, params, data)`` for `degenjax.estimate_llc` (params: the untrained initialisation)."""
    module, variables, x, y = _module_and_init()

    def loss_fn(params, batch):
        bx, by = batch
        return jnp.mean((module.apply(params, bx) - by) ** 2)

    return loss_fn, variables, (x, y)


def make_basis_problem():
    """Returns ``(model, params, batches)`` for `degenjax.interaction_basis` (the last checkpoint's parameters)."""
    from degenjax._src.checkpoints import load_checkpoint

    module, variables, x, _ = _module_and_init()
    here = pathlib.Path(__file__).parent / "checkpoints" / f"step_{CHECKPOINT_STEPS[-1]:05d}.msgpack"
    params = load_checkpoint(here, variables)
    return models.mlp_sections(module, x), params, [x]


def train_checkpoints(out_dir, steps=CHECKPOINT_STEPS, learning_rate=1e-2):
    """Trains with Adam on the full batch and writes ``step_XXXXX.msgpack`` at each of ``steps``."""
    from degenjax._src.checkpoints import save_msgpack

    loss_fn, params, data = make_problem()
    opt = optax.adam(learning_rate)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(loss_fn)(params, data)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    for t in range(1, max(steps) + 1):
        params, state, loss = step(params, state)
        if t in steps:
            save_msgpack(pathlib.Path(out_dir) / f"step_{t:05d}.msgpack", params)
            print(f"step {t}: loss {float(loss):.5f}")


if __name__ == "__main__":
    train_checkpoints(pathlib.Path(__file__).parent / "checkpoints")
