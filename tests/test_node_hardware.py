"""The node agent's pure parts: /proc and nvidia-smi parsing, alerts, its config file, the report,
the runtime command line on activation, the systemctl commands, and the rotated runtime log."""

from __future__ import annotations

import asyncio
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.config import ConfigError
from proxy.node import hardware
from proxy.node.config import NodeConfig, Thresholds, load_node_config, parse_node_config
from proxy.node.report import render
from proxy.node.supervisor import RotatingLog, parse_show, systemctl, with_model

FIXTURES = Path(__file__).parent / "fixtures"
MIB = 1024 * 1024


def test_nvidia_smi_output_becomes_one_entry_per_gpu_in_bytes():
    gpus = hardware.parse_nvidia_smi((FIXTURES / "nvidia-smi-two-gpus.csv").read_text())
    assert gpus == [
        {"name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 81559 * MIB, "memory_used_bytes": 70321 * MIB,
         "utilization": 97.0},
        {"name": "NVIDIA GeForce RTX 4090", "memory_total_bytes": 24564 * MIB, "memory_used_bytes": 1024 * MIB,
         "utilization": None},
    ]  # fmt: skip
    assert hardware.gpu_memory_gb({"gpus": gpus}) == round(81559 * MIB / 1e9, 1)
    assert hardware.gpu_memory_gb({"gpus": []}) is None


def test_a_gpu_name_with_commas_keeps_them_and_garbage_is_refused():
    assert hardware.parse_nvidia_smi("NVIDIA A100, PCIe, 40GB, 40960, 0, 3\n")[0]["name"] == "NVIDIA A100, PCIe, 40GB"
    with pytest.raises(ValueError):
        hardware.parse_nvidia_smi("No devices were found\n")
    gpus, note = hardware.read_gpus(lambda argv: "garbage\n")
    assert gpus == [] and note.startswith("nvidia-smi failed")


def test_read_gpus_runs_the_documented_query():
    seen = []
    gpus, note = hardware.read_gpus(lambda argv: seen.append(argv) or "T4, 15360, 0, 0\n")
    assert seen == [["nvidia-smi", "--query-gpu=name,memory.total,memory.used,utilization.gpu",
                     "--format=csv,noheader,nounits"]]  # fmt: skip
    assert note is None and gpus[0]["name"] == "T4"


def test_meminfo_used_is_total_minus_available():
    total, used = hardware.parse_meminfo((FIXTURES / "meminfo.txt").read_text())
    assert total == 32768000 * 1024 and used == (32768000 - 4096000) * 1024
    assert hardware.parse_loadavg("0.52 0.58 0.59 1/467 12345\n") == 0.52


def test_collect_matches_this_machines_own_figures(tmp_path):
    hw = hardware.collect([str(tmp_path)], smi=lambda argv: "")
    with open("/proc/meminfo") as f:
        total, _ = hardware.parse_meminfo(f.read())
    assert hw["memory_total_bytes"] == total
    assert 0 < hw["memory_used_bytes"] < total
    assert hw["cpu_count"] == os.cpu_count()
    usage = shutil.disk_usage(tmp_path)
    (disk,) = hw["disks"]
    assert disk["path"] == str(tmp_path) and disk["total_bytes"] == usage.total
    assert abs(disk["free_bytes"] - usage.free) < 64 * MIB  # other helpers write to the same disk meanwhile
    assert hw["gpus"] == []


def test_this_process_resident_memory_is_counted():
    rss = hardware.tree_rss(os.getpid())
    with open(f"/proc/{os.getpid()}/status") as f:
        vmrss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert rss >= vmrss * 0.5 and rss > 0


def _hw(ram_used=10, ram_total=100, gpu_used=10, disk_free=90):
    return {"memory_used_bytes": ram_used, "memory_total_bytes": ram_total,
            "gpus": [{"name": "T4", "memory_total_bytes": 100, "memory_used_bytes": gpu_used, "utilization": 5.0}],
            "disks": [{"path": "/models", "total_bytes": 100, "free_bytes": disk_free}], "cpu_count": 4,
            "load_1m": 0.5}  # fmt: skip


def test_alerts_fire_above_the_thresholds_only():
    assert hardware.alerts(_hw(), Thresholds()) == []
    found = hardware.alerts(_hw(ram_used=86, gpu_used=90, disk_free=10), Thresholds())
    assert [(a["kind"], a["value"], a["threshold"]) for a in found] == [
        ("memory", 86.0, 85.0), ("gpu_memory", 90.0, 85.0), ("disk", 90.0, 85.0)]  # fmt: skip
    assert "RAM 86% used" in found[0]["message"]
    assert hardware.alerts(_hw(ram_used=86), Thresholds(memory_percent=90)) == []
    stopped = hardware.alerts(_hw(), Thresholds(), {"kind": "vllm", "state": "backoff", "restarts": 3})
    assert [a["kind"] for a in stopped] == ["runtime"] and "backoff" in stopped[0]["message"]


def test_the_config_file_is_optional_and_every_problem_names_its_key(tmp_path):
    assert load_node_config(None) == NodeConfig()
    path = tmp_path / "node.yaml"
    path.write_text("thresholds:\n  memory_percent: 90\ndisk:\n  max_disk_gb: 500\nhf_token_env: MY_HF\n")
    config = load_node_config(path)
    assert (config.thresholds.memory_percent, config.disk.max_disk_gb, config.hf_token_env) == (90, 500, "MY_HF")
    with pytest.raises(ConfigError) as caught:
        parse_node_config({"thresholds": {"memory_percent": 150, "vram": 1}, "disk": {"max_disk_gb": -1},
                           "hf_token_env": "not a name", "supervisor": {"backoff": 10, "max_backoff": 5}})  # fmt: skip
    problems = caught.value.problems
    assert any(p.startswith("thresholds.memory_percent:") for p in problems)
    assert any(p.startswith("thresholds.vram: unknown key") for p in problems)
    assert any(p.startswith("disk.max_disk_gb:") for p in problems)
    assert any(p.startswith("hf_token_env:") for p in problems)
    assert any(p.startswith("supervisor.max_backoff:") for p in problems)


def test_activation_rewrites_the_model_arguments_of_the_command():
    base = ["python", "-m", "proxy.sim", "vllm", "--port", "8000", "--model", "old/one", "--served-model-name",
            "a", "b", "--max-model-len", "4096"]  # fmt: skip
    assert with_model(base, "acme/tiny", "tiny") == [
        "python", "-m", "proxy.sim", "vllm", "--port", "8000", "--max-model-len", "4096",
        "--model", "acme/tiny", "--served-model-name", "tiny"]  # fmt: skip
    assert with_model(["vllm", "serve", "old/one", "--port", "8000"], "acme/tiny", "t") == [
        "vllm", "serve", "--port", "8000", "--model", "acme/tiny", "--served-model-name", "t"]  # fmt: skip


def test_systemd_mode_runs_these_commands():
    assert systemctl("start", "ollama.service") == ["systemctl", "start", "--no-ask-password", "ollama.service"]
    assert systemctl("restart", "vllm@qwen.service") == ["systemctl", "restart", "--no-ask-password",
                                                         "vllm@qwen.service"]  # fmt: skip
    assert systemctl("is-active", "ollama.service") == ["systemctl", "is-active", "ollama.service"]
    assert systemctl("show", "ollama.service")[:3] == ["systemctl", "show", "ollama.service"]
    with pytest.raises(ValueError):
        systemctl("mask", "ollama.service")
    shown = parse_show("MainPID=4242\nActiveState=active\nSubState=running\nNRestarts=2\n"
                       "ActiveEnterTimestampMonotonic=100000000\n", now_monotonic=160.0)  # fmt: skip
    assert shown == {"pid": 4242, "state": "running", "restarts": 2, "uptime_seconds": 60.0,
                     "unit_state": "active/running"}  # fmt: skip
    assert parse_show("MainPID=0\nActiveState=failed\nNRestarts=5\n", 1.0)["state"] == "failed"


def test_an_active_unit_is_adopted_not_started_twice():
    from proxy.node.supervisor import SystemdUnit

    ran = []

    def unit(state: str) -> SystemdUnit:
        async def runner(argv):
            ran.append(argv)
            return (0, f"{state}\n") if argv[1] == "is-active" else (0, "")

        return SystemdUnit("ollama.service", runner)

    asyncio.run(unit("active").start())
    assert ran == [["systemctl", "is-active", "ollama.service"]]
    ran.clear()
    asyncio.run(unit("inactive").start())
    assert ran == [["systemctl", "is-active", "ollama.service"],
                   ["systemctl", "start", "--no-ask-password", "ollama.service"]]  # fmt: skip


def test_the_runtime_log_rotates_past_its_size(tmp_path):
    log = RotatingLog(tmp_path / "runtime.log", max_bytes=100, backups=2)
    for i in range(5):
        log.write(b"x" * 60 + b"%d\n" % i)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["runtime.log", "runtime.log.1", "runtime.log.2"]
    assert (tmp_path / "runtime.log.1").read_bytes().endswith(b"3\n")


def test_the_report_shows_hardware_thresholds_alerts_and_models():
    models = [{"model": "acme/tiny", "revision": "main", "commit": "a" * 40, "size": 3_000_000_000, "files": [{}] * 3,
               "installed_at": "2026-01-01T00:00:00Z"}]  # fmt: skip
    hw = {**_hw(ram_used=90), "gpus": hardware.parse_nvidia_smi((FIXTURES / "nvidia-smi-two-gpus.csv").read_text())}
    text = render(hw, NodeConfig(), models, host="gpu|1", when=datetime(2026, 1, 2, tzinfo=UTC))
    assert text.startswith("# Hardware check report: gpu\\|1\n")
    assert "| 0 | NVIDIA H100 80GB HBM3 | 73.7 GB | 85.5 GB | 97% |" in text
    assert "| RAM alert above | 85% |" in text
    assert "- **memory**: RAM 90% used" in text and "- **gpu_memory**: GPU 0" in text
    assert "| acme/tiny | main | aaaaaaaaaaaa | 3.0 GB | 3 | 2026-01-01T00:00:00Z |" in text
    no_gpu = render({**_hw(), "gpus": [], "gpu_note": "no GPU (nvidia-smi not found)"}, NodeConfig(), [], host="h",
                    when=datetime(2026, 1, 2, tzinfo=UTC))  # fmt: skip
    assert "no GPU (nvidia-smi not found)" in no_gpu and "None recorded in the manifest." in no_gpu
