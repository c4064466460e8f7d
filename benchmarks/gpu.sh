#!/usr/bin/env bash
# The GPU benchmarks in one call, on a CUDA machine whose python3 has jax[cuda], flax, optax, numpyro and
# scikit-learn (torch and devinterp for the baselines; devinterp can be put on PYTHONPATH from .whl/h5deps). Each
# benchmark records its run in this checkout's benchmarks/results.jsonl; the new records are also copied to
# $OUT/records.jsonl (default OUT=/tmp/degenjax-gpu), with a log per part. On the machine you keep the results
# from: `python benchmarks/_results.py ingest $OUT/records.jsonl` (RESULTS.md and history.md are regenerated).
#
#   OUT=/tmp/out bash benchmarks/gpu.sh          # llc, dln, lib, sweep (about 12 minutes on an H200)
#   OUT=/tmp/out bash benchmarks/gpu.sh dln      # DLN vs devinterp only (about 2.5 minutes)
#   OUT=/tmp/out bash benchmarks/gpu.sh llc      # SGLD-step throughput, then the DLN (about 3.5 minutes)
#   OUT=/tmp/out bash benchmarks/gpu.sh lib      # p=113 LIB + edges (reference convention, vs jacrev) and the
#                                                # GPT-2-small-shaped rows (12 blocks, context 8; about 4 minutes)
#   OUT=/tmp/out bash benchmarks/gpu.sh sweep    # the batched LLC sweep vs cell by cell (about 1 minute)
#   OUT=/tmp/out bash benchmarks/gpu.sh battery  # the LLC accuracy battery's GPU-sized networks (about 4 minutes)
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
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
part=${1:-all}
start=$(wc -l < benchmarks/results.jsonl)
keep() { tail -n +"$((start + 1))" benchmarks/results.jsonl > "$OUT/records.jsonl"; }
trap keep EXIT

if [ "$part" = profile ]; then
    P="python3 benchmarks/compile_profile.py --top 12"
    { $P; $P --warm-up; $P --mala-every 0; $P --eval-batch-size 500; $P --threefry-kernel;
      $P --compiler-options '{"xla_gpu_autotune_level": 0}'; $P --compiler-options '{"xla_gpu_enable_triton_gemm": false}';
    } 2>&1 | tee "$OUT/profile.log"
    exit 0
fi
if [ "$part" = llc ] || [ "$part" = all ]; then
    python3 benchmarks/llc.py --parts mlp --mlp-chains 16,64 --mlp-precision default,highest --mlp-grad-only \
        --matmul-size 8192 --repeats 5 2>&1 | tee "$OUT/llc-mlp.log"
fi
if [ "$part" = llc ] || [ "$part" = dln ] || [ "$part" = all ]; then
    python3 benchmarks/llc.py --parts dln --dln-mode jit,jit,jit,eager --devinterp-beside --device cpu 2>&1 \
        | tee "$OUT/llc-dln.log"
fi
if [ "$part" = lib ] || [ "$part" = all ]; then
    # --train-cache: the p=113 model of the CPU rows (train it once with the same command on any machine)
    python3 benchmarks/basis.py --p 113 --steps 2500 --train-cache .cache/p113-bias-train.msgpack --skip-sparsity \
        --baselines jacrev --repeats 2 --mlp-n 2000 2>&1 | tee "$OUT/basis-p113.log"
    JAX_COMPILATION_CACHE_DIR=/tmp/degenjax-gpt2-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
    python3 benchmarks/basis.py --skip-sparsity --skip-timing --skip-reference --gpt2-ns 2,8 --gpt2-context 8 \
        --gpt2-layers 12 --gpt2-batch 2 --gpt2-warm 2>&1 | tee "$OUT/basis-gpt2.log"
fi
if [ "$part" = sweep ] || [ "$part" = all ]; then
    python3 benchmarks/sweep.py --modes batched,cells 2>&1 | tee "$OUT/sweep.log"
fi
if [ "$part" = battery ]; then
    python3 benchmarks/llc_accuracy.py --cases gpu --jobs 7 --max-steps 400000 --case-timeout 220 \
        --out "$OUT/llc_gpu.jsonl" --no-results 2>&1 | tee "$OUT/battery.log"
fi
if [ "$part" = all ]; then
    python3 benchmarks/llc.py --parts dln --skip-degenjax --device cuda 2>&1 | tee "$OUT/llc-devinterp-cuda.log"
fi
