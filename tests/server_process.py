"""Start a real server process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator, Optional

LOOPBACK = "127.0.0.1"
STARTUP_POLL_INTERVAL_S = 0.25
STARTUP_MAX_POLLS = 1200  # five minutes: loading a model on a busy shared CPU can be slow
STOP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: str

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def terminate(self) -> int:
        """SIGTERM, then wait for the drain to finish; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


@contextlib.contextmanager
def running_server(*extra_args: str, env: Optional[dict[str, str]] = None) -> Iterator[ServerProcess]:
    """`python -m server.cli` on a free loopback port, stopped (SIGTERM) on exit. Its state
    (datasets, jobs, memory banks) goes to a fresh temporary directory unless ``--state-dir``
    or ``env`` names one."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="llama-engine-server-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "server.cli", "--host", LOOPBACK, "--port", str(port), *extra_args]
    state = {} if "--state-dir" in extra_args else {
        "LLAMA_ENGINE_STATE_DIR": tempfile.mkdtemp(prefix="llama-engine-state-")}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **state, **(env or {})})
    server = ServerProcess(process, port, log.name)
    try:
        for _ in range(STARTUP_MAX_POLLS):
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            if _healthy(server.base_url):
                break
            time.sleep(STARTUP_POLL_INTERVAL_S)
        else:
            raise RuntimeError(f"server did not become healthy:\n{server.log()}")
        yield server
    finally:
        server.terminate()
        log.close()
        if state:
            shutil.rmtree(state["LLAMA_ENGINE_STATE_DIR"], ignore_errors=True)
