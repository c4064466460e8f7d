"""`enable_compilation_cache`: a later process loads the programs an earlier one compiled (real processes)."""

import os
import subprocess
import sys

import pytest

import degenjax as dj

_PROGRAM = """
import sys, jax, jax.numpy as jnp
import degenjax as dj
dj.enable_compilation_cache(sys.argv[1], min_compile_seconds=0)
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name))
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 1.0)
print(float(f(jnp.ones((7, 5)))[0, 0]), sum(h == "/jax/compilation_cache/cache_hits" for h in hits))
"""


def _run(folder):
    out = subprocess.run([sys.executable, "-c", _PROGRAM, str(folder)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    value, hits = out.stdout.split()
    return float(value), int(hits)


def test_a_second_process_hits_the_cache(tmp_path):
    import numpy as np

    v1, hits1 = _run(tmp_path / "cache")
    assert hits1 == 0 and any((tmp_path / "cache").iterdir())  # compiled and written
    v2, hits2 = _run(tmp_path / "cache")
    assert hits2 >= 1  # loaded, not compiled
    x = np.ones((7, 5))
    assert v1 == v2 == pytest.approx(float((np.sin(x) @ np.cos(x).T + 1.0)[0, 0]), rel=1e-6)


def test_bad_arguments(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(ValueError, match="not a folder"):
        dj.enable_compilation_cache(blocker)
    with pytest.raises(ValueError, match="min_compile_seconds"):
        dj.enable_compilation_cache(tmp_path / "c", min_compile_seconds=-1)
