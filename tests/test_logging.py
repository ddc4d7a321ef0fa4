"""What the proxy logs about its backends: routine probes at DEBUG, each change of state once."""

from __future__ import annotations

import logging

import httpx

from proxy.sim import SimOllama
from tests.support import ollama_models, wait_for
from tests.test_timeouts import timed_proxy

MSG = [{"role": "user", "content": "hello"}]


def _ours(caplog, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("llm_proxy") and r.levelno >= level]


def _seen(caplog, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


def _probe_round(proxy) -> None:
    """A health round now: asking for a model nobody serves makes the proxy ask every backend again."""
    assert httpx.get(f"{proxy.url}/v1/models/nobody-serves-this", timeout=10).status_code == 404


def test_a_backend_that_fails_logs_one_warning_and_one_info_when_back(caplog):
    caplog.set_level(logging.DEBUG, logger="llm_proxy")
    with SimOllama(models=ollama_models()) as flaky, SimOllama(models=ollama_models()) as steady:
        config = {
            # No periodic rounds during the test: it starts each one itself, so nothing races.
            "health": {"interval": 600, "cooldown": 0.2, "max_cooldown": 0.4},
            "timeouts": {"connect": 0.5, "first_byte": 5, "idle": 5},
            "backends": [
                # Nearly all the weight on the one that will fail, so a request meets the failure first.
                {"name": "flaky", "kind": "ollama", "url": flaky.url, "weight": 1},
                {"name": "steady", "kind": "ollama", "url": steady.url, "weight": 0.001},
            ],
            "models": [{"name": "chat", "target": "llama3.1:8b"}],
        }
        with timed_proxy(config) as proxy:
            # The start-up round was a routine probe of both: DEBUG only.
            routine = [r for r in _ours(caplog, logging.INFO) if r.name in ("llm_proxy.health", "llm_proxy.catalog")]
            assert routine == [], [r.getMessage() for r in routine]
            assert any("flaky answers its health check" in r.getMessage() for r in _ours(caplog, logging.DEBUG))
            caplog.clear()

            flaky.stop()
            resp = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "chat", "messages": MSG},
                              timeout=10)  # fmt: skip
            assert resp.status_code == 200, resp.text  # served by "steady" after failing over
            # The probe fails too (on-demand rounds come at most every 2 s): the same outage, no second warning.
            assert wait_for(lambda: _probe_round(proxy) or _seen(caplog, "flaky fails its health check"), timeout=8)
            flaky.start()
            assert wait_for(lambda: _probe_round(proxy) or _seen(caplog, "is back"), timeout=8)

    messages = [(r.levelname, r.getMessage()) for r in _ours(caplog, logging.INFO)]
    warnings = [m for level, m in messages if level == "WARNING"]
    assert len(warnings) == 1, messages
    assert warnings[0].startswith("backend flaky is offline: backend 'flaky' is unreachable"), warnings
    assert [m for m in messages if "is back" in m[1]] == [("INFO", "backend flaky is back (degraded)")]
    failovers = [(level, m) for level, m in messages if "failing over" in m]
    assert failovers and all(level == "INFO" for level, _ in failovers)  # a request did meet the failure
