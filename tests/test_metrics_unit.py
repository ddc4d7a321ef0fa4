"""proxy/metrics.py: values after known calls (read back with prometheus-client's parser), multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proxy.config import MetricsConfig
from proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} from an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(data: dict, name: str, **labels) -> float | None:
    return data.get((name, tuple(sorted(labels.items()))))


def scrape(metrics: Metrics) -> dict:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return samples(body.decode())


def test_known_sequence_of_requests():
    m = Metrics(MetricsConfig())
    m.request("chat", "ollama-1", CHAT, 200, 0.8, ttft=0.12, prompt_tokens=10, completion_tokens=5, overhead=0.0004)
    m.request("chat", "ollama-1", CHAT, 200, 1.6, ttft=0.3, prompt_tokens=20, completion_tokens=7, overhead=0.0002)
    m.request("chat", "vllm-1", CHAT, 502, 0.05)
    m.request("embed", "", "/v1/embeddings", 200, 0.003, prompt_tokens=4)
    m.cache_lookup("chat", CHAT, hit=False)
    m.cache_lookup("chat", CHAT, hit=False)
    m.cache_lookup("chat", CHAT, hit=True)
    m.cache_evictions("memory", 3)
    m.failover("chat", "vllm-1", "unavailable")
    m.retry("chat", "ollama-1")
    m.backend_state("ollama-1", "degraded")
    m.backend_state("vllm-1", "offline")
    m.backend_in_flight("ollama-1", 1)
    m.backend_in_flight("ollama-1", 1)
    m.backend_in_flight("ollama-1", -1)
    m.set_backend_queue("ollama-1", 4)
    m.alias_mismatch("chat", "llama3.1:8b", "ollama-1", True)
    data = scrape(m)

    assert value(data, "llm_proxy_requests_total", model="chat", backend="ollama-1", endpoint=CHAT, status="200") == 2
    assert value(data, "llm_proxy_requests_total", model="chat", backend="vllm-1", endpoint=CHAT, status="502") == 1
    assert (
        value(data, "llm_proxy_requests_total", model="embed", backend="", endpoint="/v1/embeddings", status="200") == 1
    )
    labels = {"model": "chat", "backend": "ollama-1", "endpoint": CHAT}
    assert value(data, "llm_proxy_request_duration_seconds_count", **labels) == 2
    assert value(data, "llm_proxy_request_duration_seconds_sum", **labels) == 2.4000000000000004
    assert value(data, "llm_proxy_request_duration_seconds_bucket", **labels, le="1.0") == 1
    assert value(data, "llm_proxy_request_duration_seconds_bucket", **labels, le="2.5") == 2
    assert value(data, "llm_proxy_time_to_first_token_seconds_bucket", model="chat", backend="ollama-1", le="0.2") == 1
    assert value(data, "llm_proxy_time_to_first_token_seconds_count", model="chat", backend="ollama-1") == 2
    assert value(data, "llm_proxy_time_to_first_token_seconds_count", model="chat", backend="vllm-1") is None
    assert value(data, "llm_proxy_prompt_tokens_total", model="chat", backend="ollama-1") == 30
    assert value(data, "llm_proxy_completion_tokens_total", model="chat", backend="ollama-1") == 12
    assert value(data, "llm_proxy_prompt_tokens_total", model="embed", backend="") == 4
    assert value(data, "llm_proxy_cache_hits_total", model="chat", endpoint=CHAT) == 1
    assert value(data, "llm_proxy_cache_misses_total", model="chat", endpoint=CHAT) == 2
    assert value(data, "llm_proxy_cache_evictions_total", tier="memory") == 3
    assert value(data, "llm_proxy_failovers_total", model="chat", backend="vllm-1", reason="unavailable") == 1
    assert value(data, "llm_proxy_retries_total", model="chat", backend="ollama-1") == 1
    assert value(data, "llm_proxy_backend_up", backend="ollama-1") == 1
    assert value(data, "llm_proxy_backend_up", backend="vllm-1") == 0
    health = {
        s: value(data, "llm_proxy_backend_health", backend="ollama-1", state=s)
        for s in ("online", "degraded", "offline")
    }
    assert health == {"online": 0, "degraded": 1, "offline": 0}
    assert value(data, "llm_proxy_backend_in_flight", backend="ollama-1") == 1
    assert value(data, "llm_proxy_backend_queue_depth", backend="ollama-1") == 4
    assert value(data, "llm_proxy_alias_mismatch", alias="chat", target="llama3.1:8b", backend="ollama-1") == 1
    assert value(data, "llm_proxy_overhead_seconds_count", endpoint=CHAT) == 2
    assert value(data, "llm_proxy_overhead_seconds_bucket", endpoint=CHAT, le="0.00025") == 1
    assert value(data, "llm_proxy_overhead_seconds_bucket", endpoint=CHAT, le="0.0005") == 2


def test_each_instance_has_its_own_registry():
    a, b = Metrics(MetricsConfig()), Metrics(MetricsConfig())
    a.retry("chat", "x")
    assert value(scrape(a), "llm_proxy_retries_total", model="chat", backend="x") == 1
    assert value(scrape(b), "llm_proxy_retries_total", model="chat", backend="x") is None


def test_health_state_changes_move_the_one_hot():
    m = Metrics(MetricsConfig())
    m.backend_state("n", "offline")
    m.backend_state("n", "online")
    data = scrape(m)
    assert [
        value(data, "llm_proxy_backend_health", backend="n", state=s) for s in ("online", "degraded", "offline")
    ] == [1, 0, 0]
    assert value(data, "llm_proxy_backend_up", backend="n") == 1


def test_too_many_model_names_fold_into_other():
    m = Metrics(MetricsConfig(), max_label_sets=3)
    for i in range(10):
        m.request(f"m{i}", "b", CHAT, 404, 0.001)
    data = scrape(m)
    assert value(data, "llm_proxy_requests_total", model="other", backend="b", endpoint=CHAT, status="404") == 7
    assert value(data, "llm_proxy_requests_total", model="m0", backend="b", endpoint=CHAT, status="404") == 1


def test_disabled_metrics_are_no_ops():
    m = Metrics(MetricsConfig(enabled=False))
    m.request("chat", "b", CHAT, 200, 1.0, ttft=0.1, prompt_tokens=1, completion_tokens=1, overhead=0.001)
    m.cache_lookup("chat", CHAT, True)
    m.backend_state("b", "online")
    m.backend_in_flight("b", 1)
    m.alias_mismatch("a", "t", "b", True)
    assert m.render()[0] == b""


# --- several worker processes -------------------------------------------------------------------

_WORKER = """
import os, sys
from proxy.config import MetricsConfig
from proxy.metrics import Metrics
m = Metrics(MetricsConfig())
assert m.multiprocess
n = int(sys.argv[1])
for _ in range(n):
    m.request("chat", "ollama-1", "/v1/chat/completions", 200, 0.5, prompt_tokens=10, overhead=0.0003)
m.cache_lookup("chat", "/v1/chat/completions", hit=True)
m.set_backend_in_flight("ollama-1", n)
m.backend_state("ollama-1", sys.argv[2])
print(os.getpid(), flush=True)
sys.stdin.read()  # stay alive (a running worker) until the test closes stdin
"""

_SCRAPE = """
import sys
from proxy.config import MetricsConfig
from proxy.metrics import Metrics, mark_process_dead
for pid in sys.argv[1:]:
    mark_process_dead(int(pid))
sys.stdout.write(Metrics(MetricsConfig()).render()[0].decode())
"""


def _scrape(env: dict, *dead: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _SCRAPE, *dead], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return samples(done.stdout.decode())


def test_multiprocess_mode_merges_workers(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(n), state],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n, state in ((2, "online"), (3, "degraded"))
    ]
    try:
        for worker in workers:
            assert worker.stdout.readline().strip(), worker.stderr.read().decode()

        data = _scrape(env)  # both workers running
        labels = {"model": "chat", "backend": "ollama-1", "endpoint": CHAT}
        assert value(data, "llm_proxy_requests_total", **labels, status="200") == 5
        assert value(data, "llm_proxy_request_duration_seconds_count", **labels) == 5
        assert value(data, "llm_proxy_request_duration_seconds_bucket", **labels, le="0.5") == 5
        assert value(data, "llm_proxy_prompt_tokens_total", model="chat", backend="ollama-1") == 50
        assert value(data, "llm_proxy_cache_hits_total", model="chat", endpoint=CHAT) == 2
        assert value(data, "llm_proxy_overhead_seconds_count", endpoint=CHAT) == 5
        assert value(data, "llm_proxy_backend_in_flight", backend="ollama-1") == 5  # livesum over both workers
        # livemostrecent: whichever worker set it last (they ran at the same time), one-hot either way
        states = {
            s: value(data, "llm_proxy_backend_health", backend="ollama-1", state=s) for s in ("online", "degraded")
        }
        assert sorted(states.values()) == [0, 1]

        workers[1].kill()  # dies without any clean-up: the next scrape notices its pid is gone
        workers[1].wait(timeout=30)
        data = _scrape(env)
        assert value(data, "llm_proxy_backend_in_flight", backend="ollama-1") == 2
        assert value(data, "llm_proxy_backend_health", backend="ollama-1", state="online") == 1
        assert value(data, "llm_proxy_requests_total", **labels, status="200") == 5  # counters keep their history

        data = _scrape(env, str(workers[0].pid))  # an explicit mark_process_dead (e.g. a supervisor hook)
        assert value(data, "llm_proxy_backend_in_flight", backend="ollama-1") is None
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.communicate(b"", timeout=30)
            else:
                worker.communicate(timeout=30)
