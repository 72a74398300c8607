#!/usr/bin/env bash
# GPU benchmark on a bare machine with an NVIDIA GPU: installs JAX with CUDA, the
# CUDA build of PyTorch and diffusers into a fresh virtual environment, then runs
# benchmarks/gpu.py (bfloat16 and float32 encode/decode at 512 and 1024 px, eqx_vae
# against diffusers' PyTorch VAE with SDPA, and eqx_vae's compile times). Budget: under
# 8 minutes, most of it the installation. Output: the table on stdout and, when $OUT is
# set, $OUT/gpu.json and $OUT/gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m venv /tmp/gpu-venv
source /tmp/gpu-venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "jax[cuda12]" --index-url https://pypi.org/simple
python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cu128
python -m pip install --quiet -e . --no-deps
python -m pip install --quiet equinox jaxtyping "diffusers>=0.32" safetensors \
  huggingface_hub transformers accelerate
out="${OUT:-/tmp}"
timeout 360 python benchmarks/gpu.py --json "$out/gpu.json" | tee "$out/gpu.txt"
