"""conftest.py's binding of parallel test workers' vLLM engines to cores."""

import os
from pathlib import Path

import pytest

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


@pytest.fixture
def root_conftest(pytestconfig):
    """The repository's conftest.py as pytest loaded it (``import conftest`` may find lab/tests' or e2e's)."""
    for plugin in pytestconfig.pluginmanager.get_plugins():
        if Path(getattr(plugin, "__file__", "") or "").resolve() == ROOT_CONFTEST:
            return plugin
    raise AssertionError(f"{ROOT_CONFTEST} is not loaded")


def test_each_worker_gets_its_own_core_in_turn(root_conftest):
    assert [root_conftest.worker_core(f"gw{n}", [0, 1]) for n in range(4)] == [0, 1, 0, 1]
    assert root_conftest.worker_core("gw1", [4, 9, 12]) == 9


def test_a_parallel_worker_binds_the_engines_it_starts_to_its_core(root_conftest):
    """Under pytest-xdist (``scripts/test.sh``'s default on two cores) this process's environment, which every
    engine and server a test starts inherits, names the worker's core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or not root_conftest.bound_here:
        pytest.skip("one test process, or a binding the user chose: vLLM's or the user's binding applies")
    expected = root_conftest.worker_core(worker, sorted(os.sched_getaffinity(0)))
    assert os.environ[root_conftest.THREAD_BIND_ENV] == str(expected)
