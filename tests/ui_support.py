"""What the browser tests share: a simulated fleet behind the proxy, and headless Chromium driven by Playwright.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``scripts/test``), not
Playwright's download, which needs the internet. Screenshots go to
``$LLM_PROXY_SCREENSHOTS`` (default: a fresh temporary folder, printed at the end).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest

from proxy.sim import Behavior, ModelSpec, SimOllama, SimVLLM
from proxy.sim.behavior import PullBehavior
from tests.support import running_proxy

XSS = "<img src=x onerror=alert(1)>"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--metrics-recording-only",
                 "--disable-dev-shm-usage"]  # fmt: skip
WIDE = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str | None:
    for candidate in (os.environ.get("LLM_PROXY_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                      shutil.which("chromium"), shutil.which("chromium-browser")):  # fmt: skip
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def need_browser():
    """The sync Playwright API, or a skip that says what is missing."""
    path = chromium_path()
    if path is None:
        pytest.skip("browser tests need Chromium: apt-get install chromium (scripts/test does it when run as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need playwright: pip install -e '.[test]'")
    return sync_playwright, path


@contextlib.contextmanager
def browser():
    sync_playwright, path = need_browser()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def watched_tab(chromium, viewport: dict = WIDE, timeout_ms: int = 10_000):
    """A fresh tab that fails the test if the page throws, logs an error or opens any dialog box
    (a dialog would mean API data ran as script)."""
    context = chromium.new_context(viewport=viewport)
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # The browser logs every 4xx answer as an error ("Failed to load resource"); those are tested for, not faults.
    tab.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
           if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)  # fmt: skip
    tab.on("dialog", lambda dialog: (problems.append(f"a script opened a {dialog.type}: {dialog.message}"),
                                     dialog.dismiss()))  # fmt: skip
    tab.set_default_timeout(timeout_ms)
    try:
        yield tab
    finally:
        context.close()
    assert not problems, problems


def screenshot_dir() -> str:
    path = os.environ.get("LLM_PROXY_SCREENSHOTS") or os.path.join(tempfile.gettempdir(), "llm-proxy-screenshots")
    os.makedirs(path, exist_ok=True)
    return path


def shoot(page, name: str) -> str:
    path = os.path.join(screenshot_dir(), f"{name}.png")
    page.screenshot(path=path, full_page=True)
    return path


def fleet_models() -> tuple[list[ModelSpec], list[ModelSpec]]:
    big = [
        ModelSpec("llama3.1:8b", capabilities=("completion", "tools")),
        ModelSpec("qwen3:4b", capabilities=("completion", "tools", "thinking"), size=2_500_000_000),
        ModelSpec("nomic-embed-text:latest", capabilities=("embedding",), embedding_dim=16, size=274_000_000),
    ]
    small = [ModelSpec("gemma3:1b", size=815_000_000), ModelSpec("llama3.1:8b")]
    return big, small


@contextlib.contextmanager
def fleet(tmp_path, *, admin_keys: tuple[str, ...] = ()):
    """Two Ollama nodes with GPU tiers and a vLLM node behind a proxy that checks health often."""
    big_models, small_models = fleet_models()
    with (SimOllama(models=big_models) as big, SimOllama(models=small_models) as small,
          SimVLLM(model="Qwen/Qwen2.5-7B-Instruct", served_model_names=["qwen2.5-7b"]) as vllm):  # fmt: skip
        for sim in (big, small):
            sim.behavior = Behavior(pull=PullBehavior(seconds=1.5))
        config = {
            "server": {"admin_keys": list(admin_keys)},
            "storage": {"path": str(tmp_path / "proxy.db")},
            "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
            "health": {"interval": 0.3, "cooldown": 0.5, "max_cooldown": 1},
            "pulls": {"backoff": 0.05},
            "distribution": {
                "tiers": [
                    {"min_gpu_memory_gb": 16, "models": ["llama3.1:8b", "qwen3:4b"]},
                    {"min_gpu_memory_gb": 0, "models": ["gemma3:1b"]},
                ],
                "baseline": ["nomic-embed-text"],
                "manifest_path": str(tmp_path / "manifest.json"),
            },  # fmt: skip
            "routing": {"default_model": "chat"},
            "backends": [
                {"name": "gpu-big", "kind": "ollama", "url": big.url, "gpu_memory_gb": 24},
                {"name": "gpu-small", "kind": "ollama", "url": small.url, "gpu_memory_gb": 8},
                {"name": "vllm-1", "kind": "vllm", "url": vllm.url},
            ],
            "models": [
                {"name": "chat", "target": "llama3.1:8b", "backends": ["gpu-big"]},
                {"name": "qwen", "target": "qwen2.5-7b", "backends": ["vllm-1"]},
                # Points to a model nobody has: the overview must show the mismatch and a fix.
                {"name": "writer", "target": "mistral:7b", "backends": ["gpu-small"]},
            ],
        }
        with running_proxy(config) as server:
            yield server, big, small, vllm
