#!/usr/bin/env bash
# The GPU benchmarks of issues 4 and 5 in one call, on a CUDA machine whose python3 has jax[cuda], torch, flax,
# optax, numpyro and scikit-learn (devinterp can be put on PYTHONPATH from .whl/h5deps). Each part writes its own
# results file and log into $OUT (default /tmp/degenjax-gpu); merge the sections into benchmarks/RESULTS.md.
#
#   OUT=/tmp/out bash benchmarks/gpu.sh          # everything (about 7 minutes on an H200)
#   OUT=/tmp/out bash benchmarks/gpu.sh llc      # the LLC parts only, devinterp on the host CPU (about 2.5 minutes)
#
# Order: the most wanted numbers first, the long devinterp-on-cuda run last. devinterp on the host CPU (one torch
# thread, JAX kept off the GPU) runs beside the GPU parts, so that both devinterp devices are measured.
set -u
OUT=${OUT:-/tmp/degenjax-gpu}
mkdir -p "$OUT"
export PYTHONPATH=.whl/h5deps:. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"

JAX_PLATFORMS=cpu python3 benchmarks/llc.py --parts dln --skip-degenjax --device cpu \
    --results "$OUT/llc-devinterp-cpu.md" >"$OUT/devinterp-cpu.log" 2>&1 &
bg=$!

if [ "${1:-all}" = llc ]; then
    python3 benchmarks/llc.py --parts mlp --mlp-chains 16,64 --mlp-precision default,highest --mlp-grad-only \
        --matmul-size 8192 --repeats 5 --results "$OUT/llc-mlp.md" 2>&1 | tee "$OUT/llc-mlp.log"
    python3 benchmarks/llc.py --parts dln --skip-devinterp --results "$OUT/llc-dln.md" 2>&1 | tee "$OUT/llc-dln.log"
    wait $bg
    cat "$OUT/devinterp-cpu.log"
    exit 0
fi
python3 benchmarks/llc.py --parts mlp --mlp-chains 1,4,16,64 --mlp-prng threefry2x32,unsafe_rbg --mlp-grad-only \
    --matmul-size 8192 --repeats 5 --results "$OUT/llc-mlp.md" 2>&1 | tee "$OUT/llc-mlp.log"
python3 benchmarks/basis.py --skip-sparsity --p 113 --steps 7000 --train-cache .cache/p113-train.msgpack \
    --mlp-n 10000 --batch 2000 --results "$OUT/basis.md" 2>&1 | tee "$OUT/basis.log"
python3 benchmarks/llc.py --parts dln --device cuda --results "$OUT/llc-dln.md" 2>&1 | tee "$OUT/llc-dln.log"
wait $bg
cat "$OUT/devinterp-cpu.log"
