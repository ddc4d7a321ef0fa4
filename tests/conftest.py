"""Shared fixtures: simulated backends and the proxy, each a real HTTP server on loopback."""

from __future__ import annotations

import ipaddress
import logging
import socket

import httpx
import openai
import pytest

from proxy.sim import Behavior, SimOllama, SimVLLM
from tests.support import VLLM_KEY, backends_config, ollama_models, reset_health, running_proxy


@pytest.fixture(scope="session")
def ollama():
    with SimOllama(models=ollama_models()) as sim:
        yield sim


@pytest.fixture(scope="session")
def vllm():
    with SimVLLM(model="Qwen/Qwen2.5-7B-Instruct", served_model_names=["qwen2.5-7b"], api_key=VLLM_KEY) as sim:
        yield sim


@pytest.fixture(autouse=True)
def _fresh_backends(request):
    """Each test starts with well-behaved backends and empty request logs, and leaves them well-behaved
    whether it passed or not (a failure it injected must not leak into the next test)."""
    sims = [request.getfixturevalue(name) for name in ("ollama", "vllm") if name in request.fixturenames]
    for sim in sims:
        sim.behavior = Behavior()
        sim.reset()
    yield
    for sim in sims:
        sim.behavior = Behavior()


@pytest.fixture(scope="session")
def _shared_proxy(ollama, vllm):
    with running_proxy(backends_config(ollama, vllm)) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(_shared_proxy):
    """The proxy in front of both shared sims: one server for the session (fast), but each test module
    gets it with an empty cache and no learned health, so one file's answers and failures don't
    decide what the next file sees."""
    response = httpx.delete(f"{_shared_proxy.url}/admin/cache", timeout=10)
    assert response.status_code == 200, response.text
    reset_health(_shared_proxy)
    return _shared_proxy


@pytest.fixture
def client(proxy) -> openai.OpenAI:
    # max_retries=0: the SDK's own retries would hide the proxy's status codes.
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def aclient(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)


_LOGGERS = ("", "llm_proxy", "httpx", "httpcore", "aiosqlite", "uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(autouse=True)
def _logging_left_as_found():
    """CLI commands run in-process configure logging for the whole process (dictConfig): undo it after
    each test, so a later test's caplog still sees every level and no handler writes to a closed stream."""
    saved = {name: (lg.level, list(lg.handlers), lg.propagate) for name in _LOGGERS for lg in [logging.getLogger(name)]}
    yield
    for name, (level, handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _is_loopback(host) -> bool:
    if host is None:  # a passive (listening) lookup
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").lower()
    if host in _LOOPBACK_NAMES or host in ("", "0.0.0.0", "::"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="session", autouse=True)
def _nothing_leaves_loopback():
    """The suite never reaches beyond this machine: a name lookup of anything but loopback fails at once
    (as it would offline), and the session fails at its end, naming what was asked for."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if not _is_loopback(host):
            asked.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, f"tests stay on loopback; refused lookup of {host}")
        return real(host, *args, **kwargs)

    socket.getaddrinfo = guarded
    yield
    socket.getaddrinfo = real
    assert not asked, f"the tests tried to reach beyond loopback: {sorted(set(asked))}"
