"""The systemd units in systemd/ are valid, and vllm-activate switches models without trusting its input."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
SCRIPT = SYSTEMD / "vllm-activate"
INSTALLED_SCRIPT = "/usr/local/libexec/llm-proxy/vllm-activate"

# The programs the units start are not installed where the tests run; verify reports each such
# ExecStart*= once. That complaint, for exactly the unit's own commands, is the only one expected.
_MISSING = re.compile(r"^\S+: Command (?P<path>/\S+) is not executable: No such file or directory$")


def directives(path: Path) -> dict[str, list[str]]:
    """``key -> values`` of a unit or drop-in (keys may repeat; sections are not told apart)."""
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def commands(path: Path) -> set[str]:
    """The executables a unit's Exec*= lines start (prefixes like ``-`` or ``+`` stripped)."""
    paths = set()
    for key, values in directives(path).items():
        if key.startswith("Exec"):
            paths |= {value.split()[0].lstrip("-@:+!") for value in values}
    return paths


def verify(unit: Path) -> list[str]:
    """What ``systemd-analyze verify`` objects to, less the expected missing executables."""
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    expected = commands(unit)
    problems, excused = [], 0
    for line in (result.stdout + result.stderr).splitlines():
        missing = _MISSING.match(line.strip())
        if missing and missing["path"] in expected:
            excused += 1
        elif line.strip():
            problems.append(line.strip())
    if result.returncode != 0 and not excused and not problems:
        problems.append(f"systemd-analyze exited with {result.returncode}")
    return problems


@pytest.fixture
def unit_dir(tmp_path):
    """A scratch copy of the units: verify names a template instance after its file."""
    target = tmp_path / "units"
    shutil.copytree(SYSTEMD, target)
    return target


# --------------------------------------------------------------------------- the units


@needs_analyze
@pytest.mark.parametrize("unit", ["llm-proxy.service", "ollama.service", "vllm@.service"])
def test_unit_passes_systemd_analyze_verify(unit_dir, unit):
    assert verify(unit_dir / unit) == []


@needs_analyze
def test_llm_proxy_with_its_sudo_drop_in_passes_verify(unit_dir):
    dropins = unit_dir / "llm-proxy.service.d"
    dropins.mkdir()
    shutil.copy(unit_dir / "llm-proxy-sudo.conf", dropins / "sudo.conf")
    assert verify(unit_dir / "llm-proxy.service") == []
    (dropins / "sudo.conf").write_text("[Service]\nNoNewPrivilegs=no\n")  # the drop-in is really read
    assert any("Unknown key 'NoNewPrivilegs'" in p for p in verify(unit_dir / "llm-proxy.service"))


@needs_analyze
@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("Restart=on-failure", "Restartt=on-failure"), "Unknown key 'Restartt'"),
        (("LimitCORE=0", "LimitCORE=lots"), "Failed to parse resource value"),
        (("ExecStart=/usr/local/bin/ollama serve", "ExecStart=ollama/bin serve"), "Neither a valid executable name"),
    ],
)
def test_verify_catches_a_broken_unit(unit_dir, change, complaint):
    unit = unit_dir / "ollama.service"
    text = unit.read_text()
    assert change[0] in text
    unit.write_text(text.replace(change[0], change[1]))
    assert any(complaint in problem for problem in verify(unit))


def test_units_restart_on_failure_without_core_dumps():
    for unit in ("llm-proxy.service", "ollama.service", "vllm@.service"):
        found = directives(SYSTEMD / unit)
        assert found["Restart"] == ["on-failure"], unit
        assert found["LimitCORE"] == ["0"], unit
        assert found["NoNewPrivileges"] == ["yes"], unit


def test_llm_proxy_unit_is_sandboxed_with_a_writable_state_directory():
    found = directives(SYSTEMD / "llm-proxy.service")
    assert found["User"] == ["llm-proxy"] and found["StateDirectory"] == ["llm-proxy"]
    assert found["ProtectSystem"] == ["strict"] and found["WorkingDirectory"] == ["/var/lib/llm-proxy"]
    for key in ("PrivateTmp", "ProtectHome", "ProtectKernelTunables", "RestrictSUIDSGID", "LockPersonality"):
        assert found[key] == ["yes"], key
    assert found["CapabilityBoundingSet"] == [""]


def test_ollama_and_vllm_units_run_what_the_docs_say():
    ollama = directives(SYSTEMD / "ollama.service")
    assert ollama["ExecStart"] == ["/usr/local/bin/ollama serve"] and ollama["User"] == ["ollama"]
    assert "OLLAMA_HOST=127.0.0.1:11434" in ollama["Environment"]
    vllm = directives(SYSTEMD / "vllm@.service")
    # The operator's file, then the one the node agent writes when it switches models (optional).
    assert vllm["EnvironmentFile"] == ["/etc/llm-proxy/vllm-%i.env", "-/var/lib/llm-proxy-node/vllm@%i.env"]
    start = vllm["ExecStart"][0].split()
    assert start[:3] == ["/opt/vllm/bin/vllm", "serve", "${MODEL}"]
    assert {"${SERVED_MODEL_NAME}", "${PORT}", "$EXTRA_ARGS"} <= set(start)
    example = directives(SYSTEMD / "vllm-example.env")
    assert {"MODEL", "SERVED_MODEL_NAME", "PORT", "EXTRA_ARGS"} <= set(example)


def test_sudoers_example_grants_exactly_the_activation_script():
    text = (SYSTEMD / "sudoers.example").read_text()
    if visudo := shutil.which("visudo"):
        check = subprocess.run([visudo, "-cf", "-"], input=text, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    rules = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert rules == [
        f"Cmnd_Alias LLM_PROXY_ACTIVATE = {INSTALLED_SCRIPT}",
        "Defaults!LLM_PROXY_ACTIVATE env_reset, !requiretty",
        "llm-proxy ALL=(root) NOPASSWD: LLM_PROXY_ACTIVATE",
    ]
    assert INSTALLED_SCRIPT in SCRIPT.read_text()


# --------------------------------------------------------------------------- vllm-activate

ENV_TEXT = """# gpu1
MODEL=Qwen/Qwen2.5-7B-Instruct
SERVED_MODEL_NAME=qwen2.5-7b
PORT=8001
CUDA_VISIBLE_DEVICES=1
EXTRA_ARGS=--max-model-len 32768 --gpu-memory-utilization 0.90
"""


class Activation:
    """vllm-activate run against a scratch environment directory, with a systemctl that only takes notes."""

    def __init__(self, root: Path) -> None:
        self.env_dir = root / "etc"
        self.env_dir.mkdir()
        self.env_file = self.env_dir / "vllm-gpu1.env"
        self.env_file.write_text(ENV_TEXT)
        self.env_file.chmod(0o640)
        bin_dir = root / "bin"
        bin_dir.mkdir()
        self.log = root / "systemctl.log"
        fake = bin_dir / "systemctl"
        fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" >>"$SYSTEMCTL_LOG"\nexit "${SYSTEMCTL_STATUS:-0}"\n')
        fake.chmod(0o755)
        self.env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "VLLM_ACTIVATE_ENV_DIR": str(self.env_dir),
            "SYSTEMCTL_LOG": str(self.log),
            "LC_ALL": "C",
        }
        self.cwd = root

    def run(self, *args: str, systemctl_status: int = 0) -> subprocess.CompletedProcess:
        env = {**self.env, "SYSTEMCTL_STATUS": str(systemctl_status)}
        return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=self.cwd, timeout=30)

    def systemctl_calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.env_dir.iterdir() if p != self.env_file)


@pytest.fixture
def activation(tmp_path):
    assert os.access(SCRIPT, os.X_OK), "systemd/vllm-activate must be executable"
    return Activation(tmp_path)


def test_activate_rewrites_the_env_file_atomically_and_restarts_the_instance(activation):
    inode = activation.env_file.stat().st_ino
    done = activation.run("gpu1", "meta-llama/Llama-3.1-8B-Instruct")
    assert (done.returncode, done.stderr) == (0, "")
    assert activation.env_file.read_text() == ENV_TEXT.replace(
        "MODEL=Qwen/Qwen2.5-7B-Instruct", "MODEL=meta-llama/Llama-3.1-8B-Instruct"
    ).replace("SERVED_MODEL_NAME=qwen2.5-7b", "SERVED_MODEL_NAME=meta-llama/Llama-3.1-8B-Instruct")
    assert activation.env_file.stat().st_ino != inode  # a new file renamed into place, not rewritten in place
    assert stat.S_IMODE(activation.env_file.stat().st_mode) == 0o640
    assert activation.leftovers() == []
    assert activation.systemctl_calls() == ["restart", "vllm@gpu1.service"]


def test_activate_takes_a_served_name_and_adds_missing_lines(activation):
    activation.env_file.write_text("PORT=8001\nEXTRA_ARGS=--enforce-eager")  # no MODEL lines, no final newline
    done = activation.run("gpu1", "/models/gemma-3-12b-it", "gemma3:12b@q4")
    assert done.returncode == 0, done.stderr
    assert activation.env_file.read_text() == (
        "PORT=8001\nEXTRA_ARGS=--enforce-eager\nMODEL=/models/gemma-3-12b-it\nSERVED_MODEL_NAME=gemma3:12b@q4\n"
    )


@pytest.mark.parametrize(
    "model",
    [
        "x; rm -rf /",
        "$(id)",
        "`id`",
        "$HOME",
        "a b",
        "name|cat",
        "x'y",
        'x"y',
        "*",
        "a\nMODEL=evil",
        "",
        "-h",
        "--trust-remote-code",
        "../../etc/shadow",
        "m" * 257,
        "caf\u00e9",
    ],
)
def test_activate_refuses_unsafe_model_names(activation, model):
    before = activation.env_file.read_bytes()
    done = activation.run("gpu1", model)
    assert done.returncode == 2 and "refusing model name" in done.stderr
    assert activation.env_file.read_bytes() == before and activation.leftovers() == []
    assert activation.systemctl_calls() == []


def test_activate_refuses_an_unsafe_served_name_too(activation):
    done = activation.run("gpu1", "ok/model", "$(touch pwned)")
    assert done.returncode == 2 and activation.systemctl_calls() == []
    assert not (activation.cwd / "pwned").exists()


@pytest.mark.parametrize("instance", ["../gpu1", "gpu1/../x", "gpu 1", "-gpu", ".hidden", "gpu1;id", "gpu@1", ""])
def test_activate_refuses_unsafe_instance_names(activation, instance):
    done = activation.run(instance, "ok/model")
    assert done.returncode == 2 and "refusing instance name" in done.stderr
    assert activation.env_file.read_text() == ENV_TEXT and activation.systemctl_calls() == []


def test_activate_needs_an_existing_env_file_and_the_right_arguments(activation):
    missing = activation.run("gpu2", "ok/model")
    assert missing.returncode == 1 and "no environment file" in missing.stderr
    assert not (activation.env_dir / "vllm-gpu2.env").exists() and activation.systemctl_calls() == []
    for args in (("gpu1",), ("gpu1", "a", "b", "c")):
        usage = activation.run(*args)
        assert usage.returncode == 2 and "usage:" in usage.stderr


def test_activate_reports_a_failed_restart(activation):
    done = activation.run("gpu1", "ok/model", systemctl_status=5)
    assert done.returncode == 5
    assert "MODEL=ok/model\n" in activation.env_file.read_text()  # written before the restart was attempted
