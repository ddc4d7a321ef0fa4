"""Hugging Face provisioning end to end: a real proxy, the agent as a process supervising the vLLM
simulator, the real huggingface_hub client inside the agent against the fake Hub. Pulls run as
operations, the manifest is served, disk limits refuse before anything starts, activation restarts
the runtime with --model and --served-model-name, deletes refuse a model an alias uses."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from tests.hub_fake import FakeHub, Repo, tiny_repo  # first: the client's environment
from tests.node_support import free_port, running_agent, sim_command, wait_until  # noqa: E402
from tests.support import running_proxy  # noqa: E402
from tests.test_admin_pull import wait_op  # noqa: E402
from tests.test_node_agent import admin, node, proxy_config  # noqa: E402

NODE_CONFIG = """
heartbeat_interval: 0.5
supervisor: {backoff: 0.2, max_backoff: 1, stop_timeout: 5}
disk: {max_disk_gb: 0.0008, min_free_gb: 0, confirm_above_gb: 0.0004}
"""


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_pull_manifest_limits_activate_and_delete_through_the_agent(tmp_path):
    port = free_port()
    config = proxy_config(tmp_path, models=[{"name": "coder", "target": "base"}])
    with FakeHub() as hub, running_proxy(config) as proxy, admin(proxy) as http:
        hub.repos["acme/tiny"] = tiny_repo(300_000)
        hub.repos["acme/mid"] = tiny_repo(450_000)
        hub.repos["acme/big"] = Repo({"model.safetensors": b"\0" * 2_000_000}, lfs={"model.safetensors"})
        with running_agent(tmp_path, name="gpu-h", runtime="vllm", runtime_url=f"http://127.0.0.1:{port}",
                           proxy_url=proxy.url, run=sim_command(port, "--served-model-name", "base"),
                           config=NODE_CONFIG, env={"HF_ENDPOINT": hub.url}) as agent:  # fmt: skip
            assert wait_until(lambda: node(http, "gpu-h")["runtime"]["state"] == "running", 60), agent.log()

            answer = http.post("/admin/models/pull", json={"model": "acme/tiny", "source": "huggingface",
                                                           "nodes": ["gpu-h"]})  # fmt: skip
            assert answer.status_code == 202, answer.text
            (op,) = answer.json()["data"]
            assert (op["kind"], op["node"], op["params"]["source"]) == ("pull", "gpu-h", "huggingface")
            done = wait_op(http, op["id"], timeout=60)
            assert done["state"] == "succeeded", done
            assert done["completed"] == done["total"] == 300_088 and done["fraction"] == 1.0
            assert done["result"]["commit"] == hub.repos["acme/tiny"].commit and done["result"]["files"] == 3

            manifest = http.get("/admin/nodes/gpu-h/manifest").json()
            assert manifest["object"] == "list"
            (entry,) = manifest["data"]
            assert (entry["model"], entry["source"], entry["revision"], entry["size"]) == ("acme/tiny", "huggingface",
                                                                                           "main", 300_088)  # fmt: skip
            assert {f["name"] for f in entry["files"]} == {"config.json", "tokenizer.json", "model.safetensors"}
            assert (tmp_path / "models" / "models--acme--tiny" / "refs" / "main").read_text() == entry["commit"]

            # Over max_disk_gb: refused with the numbers, no operation started.
            before = len(http.get("/admin/operations").json()["data"])
            refused = http.post("/admin/models/pull", json={"model": "acme/big", "source": "huggingface",
                                                            "nodes": ["gpu-h"]})  # fmt: skip
            assert refused.status_code == 409, refused.text
            error = refused.json()["error"]
            assert error["code"] == "disk_limit" and "max_disk_gb is 0.0008 GB" in error["message"]
            assert error["disk"]["needed_bytes"] == 2_000_000 and error["disk"]["max_disk_bytes"] == 800_000
            # Above confirm_above_gb: asks for "confirm": true.
            ask = http.post("/admin/models/pull", json={"model": "acme/mid", "source": "huggingface",
                                                        "nodes": ["gpu-h"]})  # fmt: skip
            assert ask.status_code == 409 and ask.json()["error"]["code"] == "confirm_required", ask.text
            assert len(http.get("/admin/operations").json()["data"]) == before
            confirmed = http.post("/admin/models/pull", json={"model": "acme/mid", "source": "huggingface",
                                                              "nodes": "all", "confirm": True})  # fmt: skip
            assert confirmed.status_code == 202, confirmed.text
            assert wait_op(http, confirmed.json()["data"][0]["id"], timeout=60)["state"] == "succeeded"

            # Activation: the agent restarts its runtime on the model, the proxy checks the served name.
            old_pid = node(http, "gpu-h")["runtime"]["pid"]
            act = http.post("/admin/models/activate", json={"alias": "coder", "model": "acme/tiny",
                                                            "served_name": "tiny"})  # fmt: skip
            assert act.status_code == 202, act.text
            activated = wait_op(http, act.json()["id"], timeout=90)
            assert activated["state"] == "succeeded", activated
            assert activated["result"]["target"] == "tiny"
            runtime = node(http, "gpu-h")["runtime"]
            assert runtime["pid"] != old_pid and runtime["restarts"] == 0  # asked for, not a failure
            argv = _cmdline(runtime["pid"])
            assert argv[argv.index("--model") + 1] == "acme/tiny"
            assert argv[argv.index("--served-model-name") + 1] == "tiny"

            # acme/tiny is what coder serves now: not deleted without force.
            in_use = http.request("DELETE", "/admin/models/acme/tiny", json={"nodes": ["gpu-h"],
                                                                             "source": "huggingface"})  # fmt: skip
            assert in_use.status_code == 409 and "alias coder on gpu-h" in in_use.json()["error"]["message"]
            gone = http.request("DELETE", "/admin/models/acme/mid", json={"nodes": ["gpu-h"], "source": "huggingface"})
            assert gone.status_code == 200, gone.text
            assert gone.json()["data"][0]["result"] == {"removed": True}
            assert [m["model"] for m in http.get("/admin/nodes/gpu-h/manifest").json()["data"]] == ["acme/tiny"]
            assert not (tmp_path / "models" / "models--acme--mid").exists()


def test_hugging_face_pulls_need_a_vllm_node_with_an_agent(tmp_path):
    config = proxy_config(tmp_path, backends=[{"name": "plain", "kind": "vllm", "url": "http://127.0.0.1:9"}])
    with running_proxy(config) as proxy, admin(proxy) as http:
        no_agent = http.post("/admin/models/pull", json={"model": "acme/tiny", "source": "huggingface",
                                                         "nodes": ["plain"]})  # fmt: skip
        assert no_agent.status_code == 409 and "has no agent" in no_agent.json()["error"]["message"]
        bad = http.post("/admin/models/pull", json={"model": "tiny", "source": "huggingface", "nodes": ["plain"]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
        unknown = http.post("/admin/models/pull", json={"model": "acme/tiny", "source": "ftp"})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "source"
        assert http.get("/admin/nodes/plain/manifest").status_code == 409
        view = node(http, "plain")
        assert (view["agent"], view["hardware"], view["runtime"], view["alerts"]) == (False, None, None, [])


def test_a_hugging_face_pull_can_be_cancelled_and_retried_and_the_retry_resumes(tmp_path):
    port = free_port()
    with FakeHub() as hub, running_proxy(proxy_config(tmp_path)) as proxy, admin(proxy) as http:
        # Past the client's 10 MiB write chunk, so a whole chunk is on disk when the transfer is held.
        hub.repos["acme/slow"] = tiny_repo(11 * 1024 * 1024)
        weights = hub.repos["acme/slow"].files["model.safetensors"]
        release = threading.Event()
        hub.hold_once["model.safetensors"] = (10 * 1024 * 1024 + 4096, release)
        partial = (tmp_path / "models" / "models--acme--slow" / "blobs"
                   / f"{hashlib.sha256(weights).hexdigest()}.incomplete")  # fmt: skip
        try:
            with running_agent(tmp_path, name="gpu-c", runtime="vllm", runtime_url=f"http://127.0.0.1:{port}",
                               proxy_url=proxy.url, run=sim_command(port), config="heartbeat_interval: 0.5\n"
                               "disk: {min_free_gb: 0}\n", env={"HF_ENDPOINT": hub.url}) as agent:  # fmt: skip
                assert wait_until(lambda: node(http, "gpu-c"), 60), agent.log()
                started = http.post("/admin/models/pull", json={"model": "acme/slow", "source": "huggingface",
                                                                "nodes": ["gpu-c"]})  # fmt: skip
                op_id = started.json()["data"][0]["id"]
                assert wait_until(lambda: "model.safetensors" in http.get(f"/admin/operations/{op_id}").json()["status"],
                                  30)  # fmt: skip
                assert wait_until(lambda: node(http, "gpu-c")["downloading"], 10)
                assert wait_until(lambda: partial.exists() and partial.stat().st_size == 10 * 1024 * 1024, 30)
                cancelled = http.delete(f"/admin/operations/{op_id}").json()
                assert cancelled["state"] == "cancelled"
                release.set()  # the agent sees the cancel at its next chunk, keeping the bytes it wrote
                # It records nothing.
                assert http.get("/admin/nodes/gpu-c/manifest").json()["data"] == []
                retried = http.post(f"/admin/operations/{op_id}/retry")
                assert retried.status_code == 202, retried.text
                done = wait_op(http, op_id, timeout=60)
                assert done["state"] == "succeeded", done
                assert done["completed"] == done["total"] > len(weights)
                (entry,) = http.get("/admin/nodes/gpu-c/manifest").json()["data"]
        finally:
            release.set()
    assert entry["model"] == "acme/slow"
    files = {f["name"]: f["sha256"] for f in entry["files"]}
    assert files["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    # The retry asked only for what was missing.
    assert [r for _, _, r in hub.gets("/model.safetensors")] == [None, "bytes=10485760-"]
    assert not partial.exists()
