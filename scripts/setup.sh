#!/usr/bin/env bash
# Set up mlx-dupq on a fresh Linux or macOS machine: a fast BLAS for MLX's CPU build, then the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(uname -s)" = "Linux" ] && [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] \
   && [ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing OpenBLAS (libopenblas0-pthread) for fast fp32 matmuls"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null) \
      || echo "setup: warning: could not install libopenblas0-pthread; everything works, only slower"
  else
    echo "setup: note: install libopenblas0-pthread (as root) to make MLX's CPU matmuls ~50x faster"
  fi
fi
PIP=("$PY" -m pip install -q --disable-pip-version-check)
# extras: test (pytest + eval, search, plots: everything the suite imports) unless MLX_DUPQ_EXTRAS says
# otherwise (MLX_DUPQ_EXTRAS= installs the library alone: convert, generate, eval ppl, bench)
EXTRAS=${MLX_DUPQ_EXTRAS-test}
if [ "$(uname -s)" = "Linux" ] && [ "${MLX_DUPQ_CUDA_CHECK:-1}" != 0 ]; then
  # + NVRTC and the CUDA headers (~95 MB, no GPU needed): the tests compile the CUDA kernel as mlx
  # would (tests/test_kernels_nvrtc.py). MLX_DUPQ_CUDA_CHECK=0 skips them (scripts/quickstart.sh does).
  "${PIP[@]}" -e ".[${EXTRAS:+$EXTRAS,}cuda-check]" || {
    echo "setup: warning: could not install NVRTC (nvidia-cuda-nvrtc-cu12); the CUDA compile tests will skip"
    "${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
  }
else
  "${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
fi
echo "setup: done ($("$PY" -c 'import mlx.core as mx, mlx_lm; print("mlx", mx.__version__, "mlx-lm", mlx_lm.__version__)'))"
