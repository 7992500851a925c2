#!/usr/bin/env bash
# The moe_layer benchmark on an NVIDIA GPU, bf16: the dropless path with lax.ragged_dot (XLA's grouped matmul)
# and the capacity path, each ÷ a dense FFN of the same active FLOPs, E = 8, 16, 32, 64, timed in the same
# interleaved rounds (docs/performance.md). Needs an environment with jax[cuda12] and this package
# (pip install -e . "jax[cuda12]"). Writes runs/bench/gpu_moe_layer.json; prints the GPU's name first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
JAX_PLATFORMS=cuda "$PY" -m moe.bench moe_layer --set model.dtype=bfloat16 --set model.grouped_matmul=ragged \
    --json runs/bench/gpu_moe_layer.json
