#!/usr/bin/env bash
# The GPU benchmarks of issues 4 and 5 in one call, on a CUDA machine whose python3 has jax[cuda], torch, flax,
# optax, numpyro and scikit-learn (devinterp can be put on PYTHONPATH from .whl/h5deps). Each part writes its own
# results file and log into $OUT (default /tmp/degenjax-gpu); add them with `python benchmarks/_results.py ingest
# $OUT/*.md` (records in benchmarks/results.jsonl; RESULTS.md and history.md are regenerated).
#
#   OUT=/tmp/out bash benchmarks/gpu.sh          # everything (about 8 minutes on an H200)
#   OUT=/tmp/out bash benchmarks/gpu.sh dln      # DLN vs devinterp only (about 2.5 minutes)
#   OUT=/tmp/out bash benchmarks/gpu.sh llc      # the LLC parts: SGLD-step throughput, then the DLN (about 3.5 minutes)
#   OUT=/tmp/out bash benchmarks/gpu.sh profile  # where the DLN program's first XLA compile goes (about 1.5 minutes)
#
# The DLN part times degenjax in fresh processes (3 under jax.jit, 1 eager; ratios use the medians) while devinterp
# runs on the host CPU (one torch thread, JAX kept off the GPU) in a process beside them: on this network devinterp
# is faster on the CPU than on cuda, so that is the baseline; `all` also times devinterp on cuda, last.
set -u
OUT=${OUT:-/tmp/degenjax-gpu}
mkdir -p "$OUT"
export PYTHONPATH=.whl/h5deps:. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
part=${1:-all}

if [ "$part" = profile ]; then
    P="python3 benchmarks/compile_profile.py --top 12"
    { $P; $P --warm-up; $P --mala-every 0; $P --eval-batch-size 500; $P --threefry-kernel;
      $P --compiler-options '{"xla_gpu_autotune_level": 0}'; $P --compiler-options '{"xla_gpu_enable_triton_gemm": false}';
    } 2>&1 | tee "$OUT/profile.log"
    exit 0
fi
if [ "$part" = llc ] || [ "$part" = all ]; then
    python3 benchmarks/llc.py --parts mlp --mlp-chains 16,64 --mlp-precision default,highest --mlp-grad-only \
        --matmul-size 8192 --repeats 5 --results "$OUT/llc-mlp.md" 2>&1 | tee "$OUT/llc-mlp.log"
fi
python3 benchmarks/llc.py --parts dln --dln-mode jit,jit,jit,eager --devinterp-beside --device cpu \
    --results "$OUT/llc-dln.md" 2>&1 | tee "$OUT/llc-dln.log"
if [ "$part" = all ]; then
    python3 benchmarks/basis.py --skip-sparsity --p 113 --steps 7000 --train-cache .cache/p113-train.msgpack \
        --mlp-n 10000 --batch 2000 --results "$OUT/basis.md" 2>&1 | tee "$OUT/basis.log"
    python3 benchmarks/llc.py --parts dln --skip-degenjax --device cuda --results "$OUT/llc-devinterp-cuda.md" 2>&1 \
        | tee "$OUT/llc-devinterp-cuda.log"
fi
