import time
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import warnings; warnings.simplefilter("ignore")
from degenjax._src.llc import estimate_llc
def linreg(d, n, noise, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)); y = X @ rng.normal(size=d) + noise * rng.normal(size=n)
    return (jnp.asarray(X), jnp.asarray(y)), jnp.asarray(np.linalg.lstsq(X, y, rcond=None)[0])
def lrloss(w, b):
    x, y = b
    return jnp.mean((x @ w - y) ** 2)
data, w = linreg(4, 2000, 0.1)
for s, eps, kw, burn, dr in [("rmsprop_sgld", 1e-2, {}, 300, 3000), ("sgnht", 3e-3, {"diffusion_factor": 1.0}, 2000, 5000), ("sgnht", 1e-3, {}, 3000, 5000)]:
    t = time.time()
    r = estimate_llc(jax.random.key(0), lrloss, w, data, num_chains=4, num_draws=dr, step_size=eps, batch_size=100, sampler=s, num_burnin=burn, sampler_kwargs=kw)
    print(s, eps, kw, float(r.llc_mean), float(r.llc_std)/2, float(r.mala_acceptance), float(r.ess), float(r.rhat), time.time()-t, flush=True)
