"""The node agent's own unit (systemd/llm-proxy-node.service) is valid, runs the agent the way the
docs say, and leaves stopping the runtime to the agent; its env file names what the unit reads."""

from __future__ import annotations

import shlex
import shutil

import pytest

from proxy.cli import build_parser
from tests.test_systemd import SYSTEMD, directives, needs_analyze, verify

UNIT = SYSTEMD / "llm-proxy-node.service"


@pytest.fixture
def unit_dir(tmp_path):
    target = tmp_path / "units"
    shutil.copytree(SYSTEMD, target)
    return target


@needs_analyze
def test_the_agent_unit_passes_systemd_analyze_verify(unit_dir):
    assert verify(unit_dir / "llm-proxy-node.service") == []
    unit = unit_dir / "llm-proxy-node.service"
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=gentle"))
    assert any("kill mode" in problem for problem in verify(unit))


def test_the_agent_unit_starts_the_documented_command_line():
    found = directives(UNIT)
    (start,) = found["ExecStart"]
    argv = shlex.split(start)
    assert argv[:2] == ["/opt/llm-proxy/bin/llm-proxy", "node"]
    # The same options the CLI accepts (with the env file's values in place of ${...}).
    env = directives(SYSTEMD / "llm-proxy-node.env")
    values = {f"${{{k}}}": v[0] for k, v in env.items()}
    args = build_parser().parse_args([values.get(a, a) for a in argv[1:]])
    assert (args.proxy, args.name, args.runtime) == ("http://proxy.internal:8080", "gpu-1", "vllm")
    assert args.run.startswith("/opt/vllm/bin/vllm serve ") and args.listen == ("0.0.0.0", 8090)
    assert args.models_dir == "/var/lib/llm-proxy-node/models"
    assert env["HF_HUB_CACHE"] == ["/var/lib/llm-proxy-node/models"]  # vLLM reads what the agent downloaded
    assert {"LLM_PROXY_ADMIN_KEY", "PROXY_URL", "NODE_NAME", "RUNTIME", "RUNTIME_URL", "RUN"} <= set(env)


def test_the_agent_stops_its_runtime_itself_and_is_sandboxed():
    found = directives(UNIT)
    assert found["KillMode"] == ["mixed"]  # SIGTERM to the agent only: it stops the runtime's group
    assert int(found["TimeoutStopSec"][0]) > 15  # beyond the agent's default stop_timeout
    assert found["Restart"] == ["on-failure"] and found["LimitCORE"] == ["0"]
    assert found["NoNewPrivileges"] == ["yes"] and found["ProtectSystem"] == ["strict"]
    assert found["StateDirectory"] == ["llm-proxy-node"] and "PrivateDevices" not in found  # GPUs stay visible
    assert found["EnvironmentFile"] == ["/etc/llm-proxy-node/env"]
