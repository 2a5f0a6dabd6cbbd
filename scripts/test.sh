#!/usr/bin/env bash
# The test suite: the product's tests (tests/) and the lab's (lab/tests/, pyproject's testpaths), fast unit tests
# plus the slow end-to-end tests against real vLLM. Pass pytest arguments through, e.g. `scripts/test.sh -m "not slow"`
# for the fast part only, `scripts/test.sh tests` for the product's tests only.
#
# The tests run in two pytest-xdist workers where the machine has two cores or more (TOKCOMP_TEST_WORKERS=N to
# choose, 1 for one process), each test file in one worker (its module-scoped engine or server is started once);
# each worker's vLLM engines are pinned to a core of their own (conftest.py).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TOKCOMP_VENV:-$repo/.venv}"
cd "$repo"
"$venv/bin/ruff" check .
cores=$("$venv/bin/python" -c "import os; print(len(os.sched_getaffinity(0)))")
workers="${TOKCOMP_TEST_WORKERS:-$(( cores < 2 ? 1 : 2 ))}"
parallel=()
if [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers" --dist loadfile)
fi
exec "$venv/bin/python" -m pytest -q --durations 20 "${parallel[@]}" "$@"
