"""Sync against the config: the plan (pure), ``llm-proxy sync`` talking to simulated nodes directly,
and ``POST /admin/models/sync`` through a running proxy; the manifest either way."""

from __future__ import annotations

import json

import yaml

from proxy.cli import main
from proxy.config import DistributionConfig, Tier
from proxy.operations.distribution import NodeState, fits, plan_sync, tier_for, wanted
from proxy.sim import ModelSpec, SimOllama, SimVLLM
from proxy.sim.behavior import PullBehavior
from tests.support import running_proxy
from tests.test_admin_pull import client, fleet_config, together, wait_op

TIERS = (Tier(0, ("gemma3:1b",)), Tier(4.5, ("qwen3:4b",)), Tier(8, ("llama3.1:8b",)), Tier(16, ("gpt-oss:20b",)))
DISTRIBUTION = {
    "tiers": [{"min_gpu_memory_gb": t.min_gpu_memory_gb, "models": list(t.models)} for t in TIERS],
    "baseline": ["gemma3:1b"],
    "fallback": ["qwen3:4b", "llama3.1:8b"],
}


def test_tiers_and_what_a_node_should_hold():
    assert tier_for(TIERS, 3).models == ("gemma3:1b",)
    assert tier_for(TIERS, 8).models == ("llama3.1:8b",)
    assert tier_for(TIERS, 80).models == ("gpt-oss:20b",)
    assert tier_for(TIERS, None) is None
    assert fits(TIERS, 6, "qwen3:4b") and not fits(TIERS, 6, "llama3.1:8b")
    assert fits(TIERS, 24, "qwen3:4b")  # a lower tier's model fits a bigger node
    assert not fits(TIERS, None, "qwen3:4b")  # unknown memory: nothing says it fits
    assert fits((), None, "anything")  # no tiers: every fallback fits
    distribution = DistributionConfig(tiers=TIERS, baseline=("gemma3:1b",), fallback=("qwen3:4b", "llama3.1:8b"))
    assert wanted(distribution, 6) == [("gemma3:1b", "baseline"), ("qwen3:4b", "fallback")]
    assert [m for m, _ in wanted(distribution, 12)] == ["gemma3:1b", "qwen3:4b", "llama3.1:8b"]
    assert wanted(distribution, None) == [("gemma3:1b", "baseline")]
    nodes = [
        NodeState("a", "ollama", "u", 6, models=[{"model": "gemma3:1b"}]),
        NodeState("down", "ollama", "u", 6, reachable=False, error="refused"),
        NodeState("v", "vllm", "u", 80, models=[{"model": "qwen2.5-7b"}]),
    ]
    plan = [(p.node, p.model, p.action) for p in plan_sync(distribution, nodes, skip_existing=False)]
    assert plan == [("a", "gemma3:1b", "update"), ("a", "qwen3:4b", "pull"),
                    ("down", "gemma3:1b", "unreachable"), ("down", "qwen3:4b", "unreachable")]  # fmt: skip
    plan = [(p.node, p.model, p.action) for p in plan_sync(distribution, nodes[:1], skip_existing=True)]
    assert plan == [("a", "gemma3:1b", "keep"), ("a", "qwen3:4b", "pull")]


def write_config(tmp_path, backends: list[dict]) -> str:
    config = {
        "storage": {"path": str(tmp_path / "proxy.db")},
        "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
        "pulls": {"backoff": 0.02},
        "distribution": {**DISTRIBUTION, "manifest_path": str(tmp_path / "manifest.json")},
        "backends": backends,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_cli_sync_plans_pulls_and_writes_the_manifest(tmp_path, capsys):
    sims = SimOllama(models=[ModelSpec("gemma3:1b")]), SimOllama(models=[]), \
        SimVLLM(model="Qwen/Qwen2.5-7B-Instruct", served_model_names=["qwen2.5-7b"])  # fmt: skip
    with together(*sims) as (small, big, vllm):
        for sim in (small, big):
            sim.behavior.pull = PullBehavior(seconds=0.05)
        config = write_config(tmp_path, [
            {"name": "small", "kind": "ollama", "url": small.url, "gpu_memory_gb": 6},
            {"name": "big", "kind": "ollama", "url": big.url, "gpu_memory_gb": 12},
            {"name": "vllm-1", "kind": "vllm", "url": vllm.url},
        ])  # fmt: skip
        manifest = tmp_path / "manifest.json"

        assert main(["sync", "--config", config, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "small  gemma3:1b    update" in out and "big    llama3.1:8b  pull" in out
        assert not manifest.exists() and small.pull_stats()["started"] == big.pull_stats()["started"] == 0

        assert main(["sync", "--config", config]) == 0
        out = capsys.readouterr().out
        assert "succeeded: success" in out and f"manifest: {manifest}" in out
        assert small.pull_stats()["started"] == 2  # qwen3:4b, and gemma3:1b checked for a newer version
        assert big.pull_stats()["started"] == 3
        assert small.find("llama3.1:8b") is None and big.find("llama3.1:8b") is not None
        data = json.loads(manifest.read_text())
        entries = {(e["node"], e["model"]): e for e in data["models"]}
        assert set(entries) == {("small", "gemma3:1b"), ("small", "qwen3:4b"), ("big", "gemma3:1b"),
                                ("big", "qwen3:4b"), ("big", "llama3.1:8b"), ("vllm-1", "qwen2.5-7b")}  # fmt: skip
        entry = entries[("big", "llama3.1:8b")]
        assert entry["digest"] == big.find("llama3.1:8b").digest and entry["size"] == big.find("llama3.1:8b").size
        assert entry["modified_at"] and entry["checked_at"] == data["generated_at"]
        assert [n["reachable"] for n in data["nodes"]] == [True, True, True]

        assert main(["sync", "--config", config, "--skip-existing"]) == 0
        assert "keep" in capsys.readouterr().out
        assert small.pull_stats()["started"] == 2 and big.pull_stats()["started"] == 3  # nothing pulled again

        other = tmp_path / "audit" / "fleet.json"
        small.stop()
        assert main(["sync", "--config", config, "--no-download", "--manifest", str(other)]) == 1
        out = capsys.readouterr().out
        assert "NOT ANSWERING" in out and "not answering: small" in out
        data = json.loads(other.read_text())
        assert {n["node"]: n["reachable"] for n in data["nodes"]} == {"small": False, "big": True, "vllm-1": True}
        assert big.pull_stats()["started"] == 3


def test_sync_through_the_admin_api(tmp_path, capsys):
    with SimOllama(models=[]) as node:
        node.behavior.pull = PullBehavior(seconds=0.05)
        config = fleet_config(tmp_path, {"gpu-1": node}, distribution={**DISTRIBUTION,
                              "manifest_path": str(tmp_path / "manifest.json")})  # fmt: skip
        config["backends"][0]["gpu_memory_gb"] = 6
        with running_proxy(config) as proxy, client(proxy) as http:
            dry = http.post("/admin/models/sync", json={"dry_run": True})
            assert dry.status_code == 200
            assert [(p["node"], p["model"], p["action"]) for p in dry.json()["plan"]] == [
                ("gpu-1", "gemma3:1b", "pull"), ("gpu-1", "qwen3:4b", "pull")]  # fmt: skip
            assert node.pull_stats()["started"] == 0 and not (tmp_path / "manifest.json").exists()
            outside = http.post("/admin/models/sync", json={"manifest_path": str(tmp_path.parent / "x.json")})
            assert outside.status_code == 400 and outside.json()["error"]["param"] == "manifest_path"
            started = http.post("/admin/models/sync", json={})
            assert started.status_code == 202
            body = started.json()
            assert len(body["operations"]) == 2 and body["operation"]["kind"] == "sync"
            final = wait_op(http, body["operation"]["id"])
            assert final["state"] == "succeeded", final
            assert final["result"]["entries"] == 2 and final["fraction"] == 1.0
            data = json.loads((tmp_path / "manifest.json").read_text())
            assert sorted(e["model"] for e in data["models"]) == ["gemma3:1b", "qwen3:4b"]
            # A node registered at run time is part of the fleet for the CLI too.
            assert http.post("/admin/nodes", json={"name": "late", "kind": "ollama", "url": node.url,
                                                   "gpu_memory_gb": 2}).status_code == 201  # fmt: skip
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["sync", "--config", str(path), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "late (ollama" in out and "late   gemma3:1b  update" in out
