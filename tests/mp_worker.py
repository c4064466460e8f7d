"""One process of the multi-process tests (tests/test_multiprocess.py): ``python mp_worker.py PORT NPROC PID OUT``.

Starts ``jax.distributed`` with 2 simulated CPU devices in this process (gloo collectives), then, with every process
making the same calls: a batch of LLC cells whose chains are sharded over the devices of all processes
(`estimate_llc_batched`), and activation Grams, the interaction basis (from activation and Jacobian Grams) and
edges on data of which each process holds and streams only its own rows. Process 0 writes the results to ``OUT``
(npz). The problem is `problem()`, which the test imports to compute its single-process and NumPy references.
"""

import sys

import numpy as np

N, D, H, O = 256, 6, 8, 3
NUM_CELLS, NUM_CHAINS, NUM_DRAWS, BATCH = 3, 2, 40, 32
STEP_SIZES = (1e-4, 2e-4, 1e-4)
NBETAS = (10.0, 20.0, 30.0)


def problem():
    """``(loss_fn, sections, params (cells stacked), data (X, Y))`` in float64."""
    import jax.numpy as jnp

    import degenjax as dj

    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D))
    Y = X @ rng.normal(size=(D, O)) + 0.1 * rng.normal(size=(N, O))
    params = {"w1": 0.4 * rng.normal(size=(NUM_CELLS, D, H)), "w2": 0.4 * rng.normal(size=(NUM_CELLS, H, O))}
    sections = dj.Sections((lambda p, h: jnp.tanh(h @ p["w1"]), lambda p, h: h @ p["w2"]))

    def loss_fn(p, batch):
        x, y = batch
        return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

    return loss_fn, sections, params, (X, Y)


def main(port: str, nproc: int, pid: int, out: str) -> None:
    from degenjax._src import distributed

    distributed.initialize(f"127.0.0.1:{port}", nproc, pid, num_cpu_devices=2, timeout=120)
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import degenjax as dj

    loss_fn, sections, params, (X, Y) = problem()
    mesh = distributed.global_mesh("chains")
    res = dj.estimate_llc_batched(jax.random.split(jax.random.key(7), NUM_CELLS), loss_fn,
                                  jax.tree.map(jnp.asarray, params), (jnp.asarray(X), jnp.asarray(Y)),
                                  num_chains=NUM_CHAINS, num_draws=NUM_DRAWS, batch_size=BATCH,
                                  step_size=np.asarray(STEP_SIZES), nbeta=np.asarray(NBETAS), mesh=mesh, warn=False)
    # Grams / basis / edges: this process streams only its own half of the rows, in two batches
    rows = N // nproc
    local = X[pid * rows:(pid + 1) * rows]
    data_mesh = distributed.global_mesh("data")
    half = rows // 2
    batches = [distributed.global_batch(local[i:i + half], data_mesh, "data") for i in (0, half)]
    p0 = jax.tree.map(lambda x: jnp.asarray(x[0]), params)
    grams = dj.activation_grams(sections, p0, batches)
    basis = dj.interaction_basis(sections, p0, batches)
    edges = dj.interaction_edges(sections, p0, basis, batches)
    host = distributed.to_host({"llc_mean": res.llc_mean, "loss_trace": res.loss_trace, "init_loss": res.init_loss,
                                "grams": list(grams), "Lambda": list(basis.Lambda),
                                "edges": list(edges)})
    if jax.process_index() == 0:
        flat = {}
        for k, v in host.items():
            if isinstance(v, list):
                flat.update({f"{k}{i}": np.asarray(a) for i, a in enumerate(v)})
            else:
                flat[k] = np.asarray(v)
        flat["devices"] = np.asarray(jax.device_count())
        np.savez(out, **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
