"""``llm-proxy serve`` and ``llm-proxy demo`` as processes: bind first, fail fast, log alike in every worker."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import yaml

from tests.support import wait_for

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")


@contextlib.contextmanager
def busy_port():
    """A port something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port() -> int:
    return free_port()  # nothing listens there once the probe socket is closed


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.Popen([sys.executable, "-m", "proxy", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # fmt: skip


def _write_config(tmp_path: Path, **extra) -> Path:
    config = {"storage": {"path": str(tmp_path / "proxy.db")}, "metrics": {"enabled": False}, **extra}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_serve_on_a_port_in_use_fails_at_once_before_the_database(tmp_path):
    config = _write_config(tmp_path)
    with busy_port() as port:
        proc = _cli("serve", "--config", str(config), "--port", str(port))
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, (out, err)
    assert err.strip() == f"llm-proxy: cannot listen on 127.0.0.1:{port}: address already in use"
    assert out == ""
    assert not (tmp_path / "proxy.db").exists()  # failed before migrations (and probes)


def test_demo_on_a_port_in_use_fails_without_the_banner():
    with busy_port() as port:
        proc = _cli("demo", "--port", str(port))
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, (out, err)
    assert err.strip() == f"llm-proxy demo: cannot listen on 127.0.0.1:{port}: address already in use"
    assert "running" not in out + err and "curl" not in out + err


class _Lines:
    """A subprocess's stderr, read in a thread so the test can wait for a line without blocking."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def matching(self, text: str) -> list[str]:
        return [line for line in list(self.lines) if text in line]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_demo_listens_before_it_prints_the_banner():
    port = free_port()
    proc = _cli("demo", "--port", str(port))
    try:
        lines = _Lines(proc)
        assert wait_for(lambda: lines.matching("llm-proxy demo is running on"), timeout=30), lines.lines
        # The moment the banner is out, the port takes connections (the answer may wait for start-up).
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=20).status_code == 200
    finally:
        _stop(proc)


def test_every_worker_logs_with_timestamp_level_and_logger(tmp_path):
    dead = closed_port()
    config = _write_config(
        tmp_path,
        backends=[{"name": "gone", "kind": "ollama", "url": f"http://127.0.0.1:{dead}"}],
        timeouts={"connect": 0.5},
    )
    port = free_port()
    proc = _cli("serve", "--config", str(config), "--port", str(port), "--workers", "2", "--log-level", "info")
    try:
        lines = _Lines(proc)
        # Each worker probes the unreachable backend and warns about it once.
        offline = "WARNING llm_proxy.health: backend gone is offline"
        assert wait_for(lambda: len(lines.matching(offline)) >= 2, timeout=60), "\n".join(lines.lines)
        assert wait_for(lambda: len(lines.matching("Application startup complete")) >= 2, timeout=30)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        _stop(proc)
    logged = [line for line in lines.lines if line.strip()]
    ours = [line for line in logged if " llm_proxy" in line]
    assert all(LINE.match(line) for line in ours), "\n".join(line for line in ours if not LINE.match(line))
    assert len([line for line in ours if " INFO llm_proxy" in line]) >= 2  # --log-level info reaches the workers
    uvicorn_lines = [line for line in logged if " uvicorn.error: " in line]
    assert uvicorn_lines and all(LINE.match(line) for line in uvicorn_lines)
    assert not [line for line in logged if "HTTP Request:" in line]  # httpx's per-request lines stay quiet
    unformatted = [line for line in logged if not LINE.match(line) and not line.startswith((" ", "Traceback"))]
    assert unformatted == [], "\n".join(unformatted)
