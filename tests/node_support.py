"""The node agent as a real process (``python -m proxy node ...``), for the tests of tests/test_node_*.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ADMIN_KEY = "sk-admin-node-tests"
NODE_TOKEN = "node-token-for-the-tests-0123456789"
START_TIMEOUT = 60.0  # a loaded 2-core machine takes its time to import and bind


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sim_command(port: int, *extra: str) -> str:
    return f"{sys.executable} -m proxy.sim vllm --port {port} " + " ".join(extra)


@dataclass
class AgentProcess:
    proc: subprocess.Popen
    url: str
    stderr: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=15, headers={"authorization": f"Bearer {NODE_TOKEN}"})

    def status(self) -> dict:
        with self.client() as http:
            answer = http.get("/status")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy (returned) or the deadline passes (None)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (httpx.HTTPError, AssertionError, KeyError, TypeError):
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def running_agent(tmp_path: Path, *, name: str, runtime: str, runtime_url: str, proxy_url: str | None,
                  run: str | None = None, config: str | None = None, env: dict | None = None,
                  models_dir: Path | None = None, systemd_unit: str | None = None):  # fmt: skip
    """The agent on a free port; stopped with SIGTERM at the end (SIGKILL if it hangs)."""
    models = models_dir or tmp_path / "models"
    argv = [sys.executable, "-m", "proxy", "node", "--name", name, "--runtime", runtime, "--runtime-url", runtime_url,
            "--listen", "127.0.0.1:0", "--models-dir", str(models), "--log-file", str(tmp_path / f"{name}-runtime.log")]  # fmt: skip
    if proxy_url:
        argv += ["--proxy", proxy_url]
    if run:
        argv += ["--run", run]
    if systemd_unit:
        argv += ["--systemd-unit", systemd_unit]
    if config:
        path = tmp_path / f"{name}-node.yaml"
        path.write_text(config)
        argv += ["--config", str(path)]
    stderr = tmp_path / f"{name}-agent.log"
    full_env = {**os.environ, "LLM_PROXY_ADMIN_KEY": ADMIN_KEY, "LLM_PROXY_NODE_TOKEN": NODE_TOKEN,
                "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}  # fmt: skip
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=full_env, text=True)
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT)
    try:
        line = first[0] if first else ""
        assert " listening on " in line, f"the agent did not start: {line!r}\n{stderr.read_text()}"
        yield AgentProcess(proc, line.rsplit(" ", 1)[1].strip(), stderr)
    finally:
        stop_agent(proc)


def stop_agent(proc: subprocess.Popen, timeout: float = 45.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout:
        proc.stdout.close()
    return proc.returncode
