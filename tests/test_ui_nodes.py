"""The dashboard's Nodes page in headless Chromium: what a node agent reports (hardware, runtime memory
and uptime, alerts) and a Hugging Face install started from the page, with its progress, then listed
as installed. The agent is a real process; its GPU comes from a fake nvidia-smi whose GPU name is HTML,
which must show as text."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.hub_fake import FakeHub, tiny_repo  # first: the client's environment
from tests.node_support import free_port, running_agent, sim_command, wait_until  # noqa: E402
from tests.support import running_proxy  # noqa: E402
from tests.ui_support import XSS, browser, need_browser, shoot, watched_tab  # noqa: E402

pytestmark = pytest.mark.browser


def test_the_nodes_page_shows_an_agents_report_and_an_install_with_progress(tmp_path):
    need_browser()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{XSS}, 81559, 70321, 97'\n")
    smi.chmod(0o755)
    port = free_port()
    config = {"storage": {"path": str(tmp_path / "proxy.db")}, "health": {"interval": 1},
              "timeouts": {"connect": 2, "first_byte": 10, "idle": 10},
              "distribution": {"manifest_path": str(tmp_path / "m.json")}}  # fmt: skip
    node_config = "heartbeat_interval: 0.5\ndisk: {min_free_gb: 0}\n"
    with FakeHub() as hub, running_proxy(config) as proxy:
        hub.repos["acme/tiny"] = tiny_repo(1_000_000)
        hub.slow["model.safetensors"] = 0.15  # about 2.5 s: long enough to see it running
        with running_agent(tmp_path, name="gpu-ui", runtime="vllm", runtime_url=f"http://127.0.0.1:{port}",
                           proxy_url=proxy.url, run=sim_command(port, "--served-model-name", "base"),
                           config=node_config, env={"HF_ENDPOINT": hub.url,
                                                    "PATH": f"{bin_dir}:{os.environ['PATH']}"}) as agent:  # fmt: skip
            import httpx

            assert wait_until(lambda: httpx.get(f"{proxy.url}/admin/nodes/gpu-ui").json()["runtime"]["state"]
                              == "running", 60), agent.log()  # fmt: skip
            with browser() as chromium, watched_tab(chromium, timeout_ms=20_000) as page:
                _check(page, proxy.url, tmp_path)


def _check(page, url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page.goto(f"{url}/ui/#nodes")
    card = page.get_by_role("article", name="Node gpu-ui")
    expect(card).to_be_visible()
    # The GPU name is HTML from nvidia-smi: shown as text, no element made from it.
    expect(card).to_contain_text(f"{XSS}: 73.7 GB of 85.5 GB (86%), 97% busy")
    assert page.locator("img").count() == 0
    expect(card.get_by_role("list", name="Alerts")).to_contain_text("memory 86.2% used (threshold 85%)")
    expect(card).to_contain_text("Restarts")
    expect(card.get_by_role("row", name=re.compile("^Memory"))).to_contain_text(re.compile(r"\d+\.\d MB"))
    expect(card.get_by_role("row", name=re.compile("^Uptime"))).to_contain_text(re.compile(r"\d"))
    expect(card).to_contain_text("No install running.")

    page.get_by_label("Model").fill("acme/tiny")
    page.get_by_role("button", name="Install").click()
    bar = card.get_by_role("progressbar", name="Installing acme/tiny on gpu-ui")
    expect(bar).to_be_visible()
    shoot(page, "nodes-installing")
    installed = card.get_by_role("table", name="Installed from Hugging Face")
    expect(installed).to_contain_text("acme/tiny", timeout=60_000)
    expect(installed).to_contain_text("1.0 MB")
    expect(card.get_by_role("list", name="Recent installs")).to_contain_text("succeeded")
    shoot(page, "nodes-installed")
