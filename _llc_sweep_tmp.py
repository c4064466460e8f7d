import sys, time
sys.path.insert(0, "tests")
import conftest  # noqa
import jax, numpy as np, warnings
warnings.simplefilter("ignore")
from test_llc import _dln, _dln_loss
import degenjax as dj
cfg = [((4,4,4), 2, 7.5, 10.0, 5e-5, 4, 4000)]
for w, r, exact, g, eps, ch, dr in cfg:
    for seed in range(4):
        data, params = _dln(w, r, n=10_000, seed=seed)
        t = time.time()
        res = dj.estimate_llc(jax.random.key(seed + 1), _dln_loss, params, data, num_chains=ch, num_draws=dr,
                              step_size=eps, batch_size=100, localization=g, num_burnin=500, warn=False)
        pc = np.asarray(res.llc_per_chain)
        print(w, eps, seed, f"{float(res.llc_mean):.3f} se={pc.std(ddof=1)/np.sqrt(ch):.3f} rel={float(res.llc_mean)/exact-1:+.3f} mala={float(res.mala_acceptance):.3f} t={time.time()-t:.1f}", flush=True)
