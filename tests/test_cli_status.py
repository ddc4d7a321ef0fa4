"""``llm-proxy status`` and ``llm-proxy pull`` against a running proxy, and the progress rendering shared with
``sync``, on a terminal (redrawn in place, with rich) and off one (plain lines)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from proxy import cli_admin
from proxy.sim import ModelSpec, SimOllama
from proxy.sim.behavior import PullBehavior
from proxy.terminal import PullProgress, progress_line
from tests.support import running_proxy

KEY = "sk-admin-cli"


@pytest.fixture(scope="module")
def nodes():
    with SimOllama(models=[ModelSpec("llama3.1:8b"), ModelSpec("qwen3:4b")]) as a, \
            SimOllama(models=[ModelSpec("gemma3:1b")]) as b:  # fmt: skip
        yield a, b


@pytest.fixture(scope="module")
def proxy(nodes, tmp_path_factory):
    a, b = nodes
    config = {
        "server": {"admin_keys": [KEY]},
        "storage": {"path": str(tmp_path_factory.mktemp("cli") / "proxy.db")},
        "health": {"interval": 30},
        "distribution": {"tiers": [{"min_gpu_memory_gb": 16, "models": ["phi3:mini"]}]},
        "backends": [
            {"name": "node-a", "kind": "ollama", "url": a.url, "gpu_memory_gb": 24},
            {"name": "node-b", "kind": "ollama", "url": b.url, "gpu_memory_gb": 8},
        ],
        "models": [{"name": "chat", "target": "llama3.1:8b"}, {"name": "ghost", "target": "nothing:1b"}],
    }
    with running_proxy(config) as server:
        yield server


def run(*args: str, key: str | None = KEY) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("LLM_PROXY_ADMIN_KEY", None)
    if key:
        env["LLM_PROXY_ADMIN_KEY"] = key
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, env=env, timeout=60)


def test_status_prints_nodes_aliases_and_operations_as_tables(proxy):
    result = run("status", "--url", proxy.url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\x1b[" not in out  # not a terminal: no escape codes
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert "node-a" in rows and "node-b" in rows
    assert re.search(r"node-a\s*│\s*ollama\s*│\s*(online|degraded)\s*│\s*0\.12\.3\s*│\s*24 GB", rows["node-a"])
    assert "llama3.1:8b" in rows["node-a"] and "qwen3:4b" in rows["node-a"] and "gemma3:1b" in rows["node-b"]
    assert "Aliases" in out and re.search(r"ghost\s*│\s*nothing:1b\s*│\s*not_served", out)
    assert "no operations running" in out


def test_status_without_the_admin_key_says_what_to_do(proxy):
    result = run("status", "--url", proxy.url, key=None)
    assert result.returncode == 1
    assert "HTTP 401" in result.stderr and "LLM_PROXY_ADMIN_KEY" in result.stderr


def test_status_of_a_proxy_that_is_not_there():
    result = run("status", "--url", "http://127.0.0.1:9")
    assert result.returncode == 1 and "cannot reach the proxy at http://127.0.0.1:9" in result.stderr


def test_pull_prints_plain_progress_lines_when_not_a_terminal(proxy, nodes):
    a, b = nodes
    for sim in nodes:
        sim.behavior.pull = PullBehavior(seconds=0.6)
    result = run("pull", "mistral:7b", "--nodes", "node-a,node-b", "--url", proxy.url)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "\x1b[" not in result.stdout
    for node in ("node-a", "node-b"):
        mine = [line for line in lines if line.startswith(f"{node}  mistral:7b  ")]
        assert any("running: pulling" in line and "%" in line and " of " in line for line in mine), mine
        assert mine[-1].startswith(f"{node}  mistral:7b  succeeded: success")
    assert a.find("mistral:7b") and b.find("mistral:7b")


def test_pull_auto_picks_the_nodes_by_tier_and_reports_a_failure(proxy, nodes):
    a, b = nodes
    a.behavior.pull = PullBehavior(seconds=0.3, fail="error", fail_at=0.5)
    result = run("pull", "phi3:mini", "--nodes", "auto", "--url", proxy.url)
    assert result.returncode == 1
    assert "node-a  phi3:mini  failed" in result.stdout and "node-b" not in result.stdout  # only node-a's tier has it
    assert "max retries exceeded" in result.stdout
    a.behavior.pull = PullBehavior(seconds=0.3)


def test_pull_on_a_terminal_redraws_one_bar_per_node(proxy, nodes, monkeypatch):
    for sim in nodes:
        sim.behavior.pull = PullBehavior(seconds=0.8)
    monkeypatch.setenv("LLM_PROXY_ADMIN_KEY", KEY)
    out = io.StringIO()
    assert cli_admin.pull(proxy.url, "gemma3:27b", "all", out=out, tty=True) == 0
    text = out.getvalue()
    assert "\x1b[" in text  # drawn with cursor movement, in place
    assert "━" in text  # rich's bar
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert re.search(r"node-a\s+gemma3:27b\s+━+\s+100\.0%\s+succeeded", plain), plain[-600:]
    assert re.search(r"node-b\s+gemma3:27b\s+━+\s+100\.0%\s+succeeded", plain)


def test_progress_lines_off_a_terminal_repeat_only_on_change_or_after_a_while():
    out = io.StringIO()
    op = {"id": "op_1", "kind": "pull", "node": "gpu-1", "model": "llama3.1:8b", "state": "running",
          "status": "pulling 8eeb52dfb3bb", "completed": 1_204_000_000, "total": 4_920_753_328, "fraction": 0.2447,
          "speed": 52_428_800.0, "eta_seconds": 70.9, "error": None}  # fmt: skip
    with PullProgress(out, tty=False, every=3600) as view:
        view.update(op)
        view.update({**op, "completed": 1_300_000_000, "fraction": 0.26})  # same status, too soon: not printed
        view.update({**op, "state": "succeeded", "status": "success", "fraction": 1.0, "eta_seconds": None})
    assert out.getvalue().splitlines() == [
        "gpu-1  llama3.1:8b  running: pulling 8eeb52dfb3bb  24.5%  1.2 GB of 4.9 GB  52.4 MB/s  ETA 71s",
        "gpu-1  llama3.1:8b  succeeded: success  100.0%  1.2 GB of 4.9 GB  52.4 MB/s",
    ]
    assert view.done
    assert progress_line({**op, "total": 0, "state": "failed", "error": "boom"}).endswith("52.4 MB/s  boom")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_sync_on_a_terminal_draws_the_same_bars(tmp_path):
    import asyncio

    from proxy.config import parse_config
    from proxy.operations.cli_sync import run_sync

    with SimOllama(models=[]) as big, SimOllama(models=[]) as small:
        for sim in (big, small):
            sim.behavior.pull = PullBehavior(seconds=0.5)
        config = parse_config({
            "storage": {"path": ":memory:"},
            "distribution": {"tiers": [{"min_gpu_memory_gb": 16, "models": ["llama3.1:8b"]}],
                             "baseline": ["gemma3:1b"], "fallback": ["llama3.1:8b"],
                             "manifest_path": str(tmp_path / "manifest.json")},
            "backends": [{"name": "big", "kind": "ollama", "url": big.url, "gpu_memory_gb": 24},
                         {"name": "small", "kind": "ollama", "url": small.url, "gpu_memory_gb": 8}],
        }, env={})  # fmt: skip
        out = _Terminal()
        assert asyncio.run(run_sync(config, out=out)) == 0
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "\x1b[" in out.getvalue() and "━" in plain
    for node, model in (("big", "llama3.1:8b"), ("big", "gemma3:1b"), ("small", "gemma3:1b")):
        assert re.search(rf"{node}\s+{re.escape(model)}\s+━+\s+100\.0%\s+succeeded", plain), (node, model)
    assert not re.search(r"small\s+llama3\.1:8b", plain)  # not in the small node's tier
    for frame in out.getvalue().split("\r"):  # every redraw keeps its bars, however long the detail
        lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frame).splitlines()
        assert all("━" in line for line in lines if re.match(r"(big|small)\s+\S+:\S+\s", line)), frame
