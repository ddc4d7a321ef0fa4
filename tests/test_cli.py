"""The command line, run as a user would: as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from proxy.sim import Behavior

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def test_check_config_on_the_shipped_file():
    result = run_cli("check-config", "--config", "config.yaml")
    assert result.returncode == 0, result.stderr
    assert "config.yaml: OK" in result.stdout
    assert (
        "chat   -> llama3.1:8b  @ any backend that serves it  capabilities=chat,tools  fallback=small" in result.stdout
    )
    assert "general_chat -> chat: chat > small" in result.stdout
    assert "local-ollama  ollama  http://127.0.0.1:11434" in result.stdout


def test_check_config_reports_errors_and_exits_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "backends:\n  - {name: a, kind: ollama, url: 'http://x'}\n  - {name: b, kind: tgi, url: 'http://y'}\n"
    )
    result = run_cli("check-config", "--config", str(bad))
    assert result.returncode == 1
    assert "backends[1].kind: expected one of ollama, vllm, openai, got 'tgi'" in result.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "llm-proxy"
    assert script.exists(), "pip install should have created the llm-proxy console script"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("llm-proxy ")


def test_serve_answers_and_stops_cleanly_on_sigterm(tmp_path, ollama):
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"backends:\n  - {{name: o, kind: ollama, url: '{ollama.url}'}}\n"
        "models:\n  - {name: chat, target: 'llama3.1:8b'}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "ping"}])
        assert reply.choices[0].message.content

        # A stream in flight when SIGTERM arrives is finished, not cut: shutdown is graceful.
        ollama.behavior = Behavior(reply="one two three four five six seven eight", tokens_per_second=10)
        stream = client.chat.completions.create(model="chat", stream=True, messages=[{"role": "user", "content": "x"}])
        chunks = iter(stream)
        text = next(chunks).choices[0].delta.content or ""
        proc.send_signal(signal.SIGTERM)
        text += "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "one two three four five six seven eight"
        # uvicorn re-raises the signal once it has shut down, so the exit reads as SIGTERM (clean for systemd).
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(os.name != "posix", reason="uses POSIX signals")
def test_demo_answers_curl_and_an_sdk_stream():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/ready", proc)
        resp = httpx.post(f"{base}/v1/chat/completions",
                          json={"model": "chat", "messages": [{"role": "user", "content": "Hello!"}]})  # fmt: skip
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="qwen", stream=True, messages=[{"role": "user", "content": "Stream please"}]
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert f"curl -s {base}/v1/models" in err  # it told the user what to curl
