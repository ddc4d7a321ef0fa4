"""How the dashboard is served (headers, redirects, packaging), and the two read-only feeds it uses:
``GET /admin/events`` (SSE) and ``GET /admin/stats``. Plain HTTP against the proxy; no browser."""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib

import httpx
import orjson

from proxy.ui import STATIC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_root_redirects_to_the_dashboard_and_its_files_carry_strict_headers(proxy):
    with httpx.Client(base_url=proxy.url) as http:
        root = http.get("/")
        assert root.status_code == 307 and root.headers["location"] == "/ui/"
        assert http.get("/ui").status_code in (301, 307) and http.get("/ui", follow_redirects=True).status_code == 200
        page = http.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                          "frame-ancestors 'none'", "base-uri 'none'", "form-action 'none'"):  # fmt: skip
            assert directive in csp
        assert "unsafe" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "etag" in page.headers and page.headers["cache-control"] == "no-cache"
        again = http.get("/ui/", headers={"if-none-match": page.headers["etag"]})
        assert again.status_code == 304
        script = http.get("/ui/js/main.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert http.get("/ui/vendor/uplot/uPlot.esm.js").status_code == 200
        missing = http.get("/ui/nothing-here.js")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_the_page_has_no_inline_script_or_style_and_never_parses_data_as_html():
    html = open(os.path.join(STATIC, "index.html")).read()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert "<style" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)
    ours = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(STATIC, "js")) for f in files]
    assert len(ours) >= 6
    for path in ours:
        code = open(path).read()
        for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert risky not in code, f"{risky} in {path}"


def test_every_static_file_ships_in_the_wheel():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["proxy.ui"]
    package = os.path.dirname(STATIC)
    files = [os.path.relpath(os.path.join(d, f), package) for d, _, fs in os.walk(STATIC) for f in fs]
    assert "static/vendor/uplot/LICENSE" in files
    for path in files:
        assert any(fnmatch.fnmatch(path, p) and path.count("/") == p.count("/") for p in patterns), path


def test_events_stream_sends_the_fleet_then_new_requests(proxy, client):
    answer = client.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "x"}])
    request_id = answer.headers["x-request-id"]
    frames: dict[str, dict] = {}
    with httpx.Client(base_url=proxy.url, timeout=10) as http, http.stream("GET", "/admin/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                frames[event] = orjson.loads(line[6:])
                if {"fleet", "requests"} <= set(frames):
                    break
    fleet = frames["fleet"]
    assert {b["name"] for b in fleet["backends"]} == {"ollama-1", "vllm-1"}
    assert {"state", "latency_ms", "error_rate", "in_flight", "queue_depth", "kind", "version"} <= set(
        fleet["backends"][0]
    )
    assert "aliases" in fleet and "alias_mismatches" in fleet and isinstance(fleet["operations"], list)
    assert request_id in [row["id"] for row in frames["requests"]["data"]]


def test_events_stream_rejects_unknown_parameters(proxy):
    answer = httpx.get(f"{proxy.url}/admin/events?poll=1")
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "poll"


def test_stats_aggregates_the_history_per_model_and_per_backend(proxy, client):
    for i in range(6):
        client.chat.completions.create(model="chat", temperature=0, messages=[{"role": "user", "content": f"s{i % 2}"}])
    client.chat.completions.create(model="qwen-chat", messages=[{"role": "user", "content": "other"}])
    with httpx.Client(base_url=proxy.url) as http:
        total = http.get("/admin/stats", params={"window": 600, "step": 60}).json()
        assert total["by"] == "none" and len(total["t"]) == 10 and len(total["series"]) == 1
        everything = total["series"][0]
        assert everything["key"] == "all" and sum(everything["requests"]) >= 7
        busy = [i for i, n in enumerate(everything["requests"]) if n]
        assert all(everything["p50_ms"][i] is not None and everything["p95_ms"][i] >= everything["p50_ms"][i]
                   for i in busy)  # fmt: skip
        assert all(everything["p50_ms"][i] is None for i, n in enumerate(everything["requests"]) if not n)
        assert sum(everything["tokens_per_second"]) > 0
        assert any(rate and rate > 0 for rate in everything["cache_hit_rate"])  # the repeated temperature-0 prompts

        per_model = http.get("/admin/stats", params={"window": 600, "step": 60, "by": "model"}).json()
        keys = {s["key"]: sum(s["requests"]) for s in per_model["series"][1:]}
        assert keys["chat"] >= 6 and keys["qwen-chat"] >= 1
        per_backend = http.get("/admin/stats", params={"window": 600, "by": "backend"}).json()
        assert {"ollama-1", "vllm-1"} <= {s["key"] for s in per_backend["series"]}

        for params, param in (({"by": "colour"}, "by"), ({"step": "x"}, "step"), ({"window": 10}, "window"),
                              ({"window": 86400, "step": 1}, "step"), ({"limit": 3}, "limit")):  # fmt: skip
            bad = http.get("/admin/stats", params=params)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, params


def test_the_demo_shows_a_tiered_fleet_and_stops_on_ctrl_c_with_a_dashboard_open():
    import signal
    import subprocess
    import sys
    import threading

    from tests.test_cli import ROOT as CLI_ROOT
    from tests.test_cli import free_port, wait_until_up

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--port", str(port)], cwd=CLI_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    streaming = threading.Event()

    def watch() -> None:  # a dashboard left open: its live feed never ends by itself
        try:
            with httpx.stream("GET", f"{base}/admin/events", timeout=60) as response:
                for _ in response.iter_lines():
                    streaming.set()
        except httpx.HTTPError:
            pass

    try:
        wait_until_up(f"{base}/ready", proc)
        nodes = {n["name"]: n for n in httpx.get(f"{base}/admin/nodes").json()["data"]}
        assert nodes["sim-ollama"]["gpu_memory_gb"] == 24 and nodes["sim-ollama-small"]["gpu_memory_gb"] == 8
        assert nodes["sim-ollama"]["tier_models"] == ["llama3.1:8b", "qwen3:4b"]
        assert nodes["sim-ollama-small"]["tier_models"] == ["gemma3:1b"] and nodes["sim-vllm"]["kind"] == "vllm"
        auto = httpx.post(f"{base}/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user",
                                                                                                "content": "hi"}]})  # fmt: skip
        assert auto.status_code == 200 and auto.headers["x-proxy-alias"] == "chat"  # routing.default_model
        assert httpx.get(f"{base}/ui/").status_code == 200
        viewer = threading.Thread(target=watch, daemon=True)
        viewer.start()
        assert streaming.wait(10)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError("the demo did not stop on Ctrl-C while a dashboard was connected") from None
    assert f"Dashboard: {base}/ui/" in err
