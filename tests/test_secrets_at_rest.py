"""Secrets and state at rest: node keys sealed or kept as environment references, private files,
names that can be addressed, a database deleted under a running proxy, paths relative to the config."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat

import httpx
import pytest
from cryptography.fernet import Fernet

from proxy.config import load_config
from proxy.sim import SimVLLM
from tests.support import running_proxy, wait_for

SECRET = "sk-node-secret-5f3a9c"
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def keyed_vllm():
    with SimVLLM(model="org/m1", served_model_names=["m1"], api_key=SECRET) as sim:
        yield sim


def _config(tmp_path) -> dict:
    return {"storage": {"path": str(tmp_path / "proxy.db")}, "health": {"interval": 60}}


def _files_bytes(tmp_path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("proxy.db"))


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_registered_key_is_sealed_never_logged_and_survives_restarts(tmp_path, keyed_vllm, caplog):
    caplog.set_level(logging.DEBUG)  # aiosqlite logs every SQL parameter at DEBUG
    config = _config(tmp_path)
    spec = {"name": "gpu-k", "kind": "vllm", "url": keyed_vllm.url, "api_key": SECRET}
    with running_proxy(config) as proxy:
        created = httpx.post(f"{proxy.url}/admin/nodes", json=spec)
        assert created.status_code == 201, created.text
        assert SECRET not in created.text and SECRET not in httpx.get(f"{proxy.url}/admin/nodes/gpu-k").text
        assert wait_for(lambda: httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT).status_code == 200, 5)
    assert SECRET.encode() not in _files_bytes(tmp_path)
    assert SECRET not in caplog.text
    key_file = tmp_path / "proxy.key"
    assert _mode(key_file) == 0o600 and _mode(tmp_path / "proxy.db") == 0o600
    stored = sqlite3.connect(tmp_path / "proxy.db").execute("SELECT spec FROM nodes").fetchone()[0]
    assert '"sealed":"sealed:v1:' in stored
    with running_proxy(config) as proxy:  # restored with its key: the node still accepts the proxy
        assert httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT).headers["x-proxy-backend"] == "gpu-k"
    # Another installation's key cannot open it: the node is reported, not restored with garbage.
    key_file.write_bytes(Fernet.generate_key())
    with running_proxy(config) as proxy:
        assert httpx.get(f"{proxy.url}/admin/nodes/gpu-k").status_code == 404
    assert "gpu-k cannot be restored" in caplog.text


def test_a_key_can_stay_in_the_environment(tmp_path, keyed_vllm, monkeypatch):
    monkeypatch.setenv("LLM_PROXY_NODE_KEY_K2", SECRET)
    config = _config(tmp_path)
    spec = {"name": "k2", "kind": "vllm", "url": keyed_vllm.url, "api_key": "${LLM_PROXY_NODE_KEY_K2}"}
    with running_proxy(config) as proxy:
        assert httpx.post(f"{proxy.url}/admin/nodes", json=spec).status_code == 201
        assert wait_for(lambda: httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT).status_code == 200, 5)
    stored = sqlite3.connect(tmp_path / "proxy.db").execute("SELECT spec FROM nodes").fetchone()[0]
    assert '"env":"LLM_PROXY_NODE_KEY_K2"' in stored and SECRET not in stored
    with running_proxy(config) as proxy:
        assert httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_what_registration_accepts_survives_a_restart_and_what_it_cannot_keep_is_refused(tmp_path):
    config = _config(tmp_path)
    with running_proxy(config) as proxy:
        nodes = f"{proxy.url}/admin/nodes"
        # Not a variable the proxy lends out: refused with the rule, rather than accepted and lost later.
        home = httpx.post(
            nodes, json={"name": "h", "kind": "ollama", "url": "http://127.0.0.1:9", "api_key": "${HOME}"}
        )
        assert home.status_code == 400 and home.json()["error"]["param"] == "api_key"
        assert "LLM_PROXY_" in home.json()["error"]["message"]
        unset = httpx.post(nodes, json={"name": "u", "kind": "ollama", "url": "http://127.0.0.1:9",
                                        "api_key": "${LLM_PROXY_NOT_SET_ANYWHERE}"})  # fmt: skip
        assert unset.status_code == 400 and "not set" in unset.json()["error"]["message"]
        odd = {"name": "odd", "kind": "ollama", "url": "http://127.0.0.1:9/$x", "api_key": "a$$b${c"}
        assert httpx.post(nodes, json=odd).status_code == 201
        for name in ("", "a/../b", "has space", "-x", "x" * 65):
            bad = httpx.post(nodes, json={"name": name, "kind": "ollama", "url": "http://127.0.0.1:9"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "name", name
    with running_proxy(config) as proxy:
        restored = proxy.app.state.services.catalog.backends["odd"].config
        assert (restored.url, restored.api_key) == ("http://127.0.0.1:9/$x", "a$$b${c")
        assert httpx.delete(f"{proxy.url}/admin/nodes/odd").status_code == 200


def test_a_key_stored_in_the_clear_by_an_older_release_is_sealed_at_start(tmp_path, keyed_vllm):
    config = _config(tmp_path)
    with running_proxy(config):
        pass  # creates the schema
    db = sqlite3.connect(tmp_path / "proxy.db")
    spec = f'{{"name": "old", "kind": "vllm", "url": "{keyed_vllm.url}", "api_key": "{SECRET}"}}'
    db.execute("INSERT INTO nodes (name, kind, url, spec, created_at) VALUES ('old', 'vllm', ?, ?, 0)",
               (keyed_vllm.url, spec))  # fmt: skip
    db.commit()
    db.close()
    with running_proxy(config) as proxy:
        assert wait_for(lambda: httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT).status_code == 200, 5)
    stored = sqlite3.connect(tmp_path / "proxy.db").execute("SELECT spec FROM nodes").fetchone()[0]
    assert SECRET not in stored and "sealed:v1:" in stored


def test_a_removed_node_leaves_metrics(tmp_path, keyed_vllm):
    with running_proxy(_config(tmp_path)) as proxy:
        spec = {"name": "gone-1", "kind": "vllm", "url": keyed_vllm.url, "api_key": SECRET}
        assert httpx.post(f"{proxy.url}/admin/nodes", json=spec).status_code == 201
        assert wait_for(lambda: httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT).status_code == 200, 5)
        assert 'backend="gone-1"' in httpx.get(f"{proxy.url}/metrics").text
        assert httpx.delete(f"{proxy.url}/admin/nodes/gone-1").status_code == 200
        assert 'backend="gone-1"' not in httpx.get(f"{proxy.url}/metrics").text


def test_a_database_deleted_under_the_proxy_turns_ready_to_503(tmp_path, keyed_vllm, caplog):
    config = {**_config(tmp_path), "backends": [{"name": "v", "kind": "vllm", "url": keyed_vllm.url,
                                                 "api_key": SECRET}]}  # fmt: skip
    with running_proxy(config) as proxy:
        assert httpx.get(f"{proxy.url}/ready").status_code == 200
        for path in tmp_path.glob("proxy.db*"):
            path.unlink()
        assert wait_for(lambda: httpx.get(f"{proxy.url}/ready").status_code == 503, 8)
        storage = httpx.get(f"{proxy.url}/ready").json()["storage"]
        assert storage["ok"] is False and "deleted" in storage["error"]
    assert "was deleted while the proxy runs" in caplog.text


def test_storage_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "proxy.yaml").write_text("storage: {path: state/proxy.db}\ndistribution: {manifest_path: m.json}\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/proxy.yaml")
    assert config.storage.path == str(folder / "state" / "proxy.db")
    assert config.distribution.manifest_path == str(folder / "m.json")
    absolute = tmp_path / "abs.yaml"
    absolute.write_text("storage: {path: /var/lib/llm-proxy/p.db, key_path: keys/p.key}\n")
    config = load_config(absolute)
    assert config.storage.path == "/var/lib/llm-proxy/p.db" and config.storage.key_path == str(tmp_path / "keys/p.key")
