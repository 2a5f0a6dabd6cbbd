"""Setup shared by the product's tests (tests/) and the lab's (lab/tests/)."""

from __future__ import annotations

import os

THREAD_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
bound_here = False  # whether pytest_configure chose this process's binding (not the user)


def worker_core(worker: str, cpus: list[int]) -> int:
    """The core a pytest-xdist worker (``gw0``, ``gw1``, ...) gives its vLLM engines: one each, in turn."""
    return cpus[int(worker.removeprefix("gw")) % len(cpus)]


def pytest_configure(config) -> None:  # noqa: ANN001 - pytest's Config
    # vLLM-CPU's "auto" binding reserves a core for the frontend and pins every one-worker engine to the first of
    # the rest, so the engines of two parallel test workers would share that core while the other idles. Each test
    # worker's engines get a core of their own instead (tests that start a multi-worker engine set their own).
    global bound_here
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and THREAD_BIND_ENV not in os.environ:
        os.environ[THREAD_BIND_ENV] = str(worker_core(worker, sorted(os.sched_getaffinity(0))))
        bound_here = True
