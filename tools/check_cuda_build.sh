#!/usr/bin/env bash
# make check-cuda-build: on a CPU machine (no GPU, not in CI), build what the GPU
# machines build: the full C++/CUDA extension against torch 2.11.0+cu130 for sm_90,
# and every Triton kernel launch configuration to an sm_90 cubin with triton 3.6.0.
# Run it whenever csrc/ or kernels/ change.
#
# The virtualenv (.venv-cuda, git-ignored) is created once and reused: the first run
# downloads a few GB (torch's CUDA 13 wheel and its nvidia-* libraries) from PyPI.
# Needs nvcc (CUDA 13) somewhere fastmeta finds it (nvcc on PATH, wrappers included,
# or /usr/local/cuda); CUDA_HOME and CUDA_PATH are unset on purpose, as on a machine
# where nobody set them.  Overrides: CUDA_VENV, CUDA_TORCH_SPEC, CUDA_TRITON_SPEC,
# CUDA_ARCH_LIST (default 9.0), PYTHON; arguments go to tools/check_cuda_build.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${CUDA_VENV:-.venv-cuda}"
TORCH_SPEC="${CUDA_TORCH_SPEC:-torch==2.11.0}"
TRITON_SPEC="${CUDA_TRITON_SPEC:-triton==3.6.0}"
ARCH_LIST="${CUDA_ARCH_LIST:-9.0}"
stamp="$VENV/.installed-$(printf '%s+%s' "$TORCH_SPEC" "$TRITON_SPEC" | tr -c 'A-Za-z0-9.+' '_')"
if [ ! -f "$stamp" ]; then
  echo "check-cuda-build: setting up $VENV ($TORCH_SPEC, $TRITON_SPEC; a few GB on first use)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade "pip>=23" setuptools wheel
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC" "$TRITON_SPEC" numpy ninja
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
# fastmeta itself from this checkout (PYTHONPATH, no install): kernels/ mounts as fastmeta.kernels
exec env -u CUDA_HOME -u CUDA_PATH -u TRITON_INTERPRET \
  PATH="$PWD/$VENV/bin:$PATH" \
  PYTHONPATH="$PWD" \
  TORCH_CUDA_ARCH_LIST="$ARCH_LIST" \
  FASTMETA_EXTENSION_DIR="$PWD/$VENV/fastmeta-extension" \
  FASTMETA_REQUIRE_CUDA_EXTENSION=1 \
  "$VENV/bin/python" tools/check_cuda_build.py "$@"
