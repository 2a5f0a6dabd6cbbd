#!/usr/bin/env bash
# The test suite: the product's tests (tests/) and the lab's (lab/tests/, pyproject's testpaths), fast unit tests
# plus the slow end-to-end tests against real vLLM. Pass pytest arguments through, e.g. `scripts/test.sh -m "not slow"`
# for the fast part only, `scripts/test.sh tests` for the product's tests only.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TOKCOMP_VENV:-$repo/.venv}"
cd "$repo"
"$venv/bin/ruff" check .
exec "$venv/bin/python" -m pytest -q "$@"
