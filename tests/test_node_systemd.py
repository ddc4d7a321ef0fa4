"""The node agent's own unit (systemd/llm-proxy-node.service) is valid, runs the agent the way the
docs say, and leaves stopping the runtime to the agent; its env file names what the unit reads.
The agent's systemd mode runs against a fake ``systemctl`` on PATH (this machine runs no systemd):
the commands it runs, and a unit already active adopted rather than started twice."""

from __future__ import annotations

import shlex
import sys

from proxy.cli import build_parser
from tests.test_systemd import SYSTEMD, directives, needs_analyze, unit_dir, verify  # noqa: F401 (unit_dir: a fixture)

UNIT = SYSTEMD / "llm-proxy-node.service"


@needs_analyze
def test_the_agent_unit_passes_systemd_analyze_verify(unit_dir):  # noqa: F811 (the fixture)
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


FAKE_SYSTEMCTL = """#!/bin/sh
# Records each call; keeps the unit's state in a file, as systemd would.
echo "$*" >> "{calls}"
case "$1" in
  is-active) state=$(cat "{state}" 2>/dev/null || echo inactive); echo "$state"; [ "$state" = active ] ;;
  start|restart) echo active > "{state}"
                 # What the unit would read at this (re)start: the agent writes its file before.
                 for f in "{env_dir}"/*.env; do [ -f "$f" ] && {{ echo "$*"; cat "$f"; }} >> "{seen}"; done; true ;;
  stop) echo inactive > "{state}" ;;
  show) echo "MainPID={pid}"; echo "ActiveState=$(cat "{state}")"; echo "SubState=running"; echo "NRestarts=2"
        # CLOCK_MONOTONIC in microseconds, 5 s ago, as systemd reports it.
        echo "ActiveEnterTimestampMonotonic=$({python} -c 'import time; print(int(time.monotonic() * 1e6) - 5000000)')" ;;
esac
"""


def _fake_systemctl(tmp_path, pid: int):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls, state = tmp_path / "calls.txt", tmp_path / "state.txt"
    script = bin_dir / "systemctl"
    script.write_text(FAKE_SYSTEMCTL.format(calls=calls, state=state, pid=pid, python=sys.executable,
                                            env_dir=tmp_path / "unit-env", seen=tmp_path / "seen.txt"))  # fmt: skip
    script.chmod(0o755)
    return bin_dir, calls, state


def test_systemd_mode_drives_the_unit_with_systemctl_and_adopts_an_active_one(tmp_path):
    import os

    from proxy.sim import SimVLLM
    from tests.node_support import running_agent, wait_until

    with SimVLLM(model="acme/tiny") as sim:
        bin_dir, calls, state = _fake_systemctl(tmp_path, os.getpid())
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
        with running_agent(tmp_path, name="gpu-s", runtime="vllm", runtime_url=sim.url, proxy_url="http://127.0.0.1:1",
                           env=env, systemd_unit="vllm@gpu-s.service",
                           config=f"systemd: {{env_dir: {tmp_path / 'unit-env'}}}\n") as agent:  # fmt: skip
            runtime = wait_until(lambda: (r := agent.status()["runtime"]) and r["state"] == "running" and r, 30)
            assert runtime, agent.log()
            assert (runtime["mode"], runtime["pid"], runtime["restarts"]) == ("systemd", os.getpid(), 2)
            assert 4 <= runtime["uptime_seconds"] <= 7  # entered 5 s before "now", as the fake says
            with agent.client() as http:
                assert http.post("/runtime/restart").status_code == 200
                assert not (tmp_path / "seen.txt").exists()  # a plain restart writes no file
                switched = http.post("/runtime/activate", json={"model": "acme/other", "served_name": "other"})
                bad = http.post("/runtime/activate", json={"model": "acme/x\nEXTRA_ARGS=--evil"})
            assert switched.status_code == 200, switched.text
            assert bad.status_code == 400  # nothing that could add a line to the file
        env_file = tmp_path / "unit-env" / "vllm@gpu-s.env"
        assert switched.json()["env_file"] == str(env_file)
        assert env_file.stat().st_mode & 0o777 == 0o644
        written = [line for line in env_file.read_text().splitlines() if not line.startswith("#")]
        assert written == ["MODEL=acme/other", "SERVED_MODEL_NAME=other", f"HF_HUB_CACHE={tmp_path / 'models'}"]
        # The file was in place when the unit restarted, and the restart came after it.
        assert (tmp_path / "seen.txt").read_text().splitlines()[0] == "restart --no-ask-password vllm@gpu-s.service"
        assert "MODEL=acme/other" in (tmp_path / "seen.txt").read_text()
        assert [p.name for p in env_file.parent.iterdir()] == [env_file.name]  # no temporary file left
        lines = calls.read_text().splitlines()
        assert lines[:2] == ["is-active vllm@gpu-s.service", "start --no-ask-password vllm@gpu-s.service"]
        assert lines.count("restart --no-ask-password vllm@gpu-s.service") == 2
        assert any(line.startswith("show vllm@gpu-s.service --property=MainPID") for line in lines)
        assert not any(line.startswith("stop") for line in lines)  # the unit outlives the agent

        calls.write_text("")
        assert state.read_text().strip() == "active"
        with running_agent(tmp_path, name="gpu-s", runtime="vllm", runtime_url=sim.url, proxy_url="http://127.0.0.1:1",
                           env=env, systemd_unit="vllm@gpu-s.service") as agent:  # fmt: skip
            assert wait_until(lambda: agent.status()["runtime"]["state"] == "running", 30)
        lines = calls.read_text().splitlines()
        assert lines[0] == "is-active vllm@gpu-s.service" and not any(line.startswith("start") for line in lines)
