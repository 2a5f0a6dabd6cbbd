"""Start ``tokcomp serve`` (or plain ``vllm serve``) in a subprocess and wait until it answers.

Used by the demo, the end-to-end tests and the serving benchmark, so all three
exercise exactly the server a user runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A running OpenAI-compatible vLLM server; use as a context manager.

    ``args`` are ``tokcomp serve`` arguments (``plain=False``) or ``vllm serve``
    arguments (``plain=True``, plugin filtered out with ``VLLM_PLUGINS``).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        plain: bool = False,
        env: dict[str, str] | None = None,
        startup_timeout: float = 600.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.port = free_port()
        self.args = [*args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.plain = plain
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        if log_path is None:
            log_path = tempfile.mkstemp(prefix="tokcomp-server-", suffix=".log")[1]
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.plain:
            return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *self.args]
        return [sys.executable, "-m", "vllm_tokcomp.cli", "serve", *self.args]

    def start(self) -> ServerProcess:
        env = dict(self.env)
        if self.plain:
            env["VLLM_PLUGINS"] = ""  # an empty allow-list loads no general plugin
        self._log = open(self.log_path, "wb")
        # Own process group: stopping the server also stops vLLM's engine-core and worker processes.
        self.process = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} during startup:\n{self.log_tail()}")
            if self.is_healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.base_url}{path}", timeout=10) as response:
            return response.read().decode()

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        if self.process is not None:
            self._signal_group(signal.SIGKILL)  # leftovers of a server that died on its own
        if getattr(self, "_log", None):
            self._log.close()

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
