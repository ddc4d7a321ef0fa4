"""The agent's optional YAML file, parsed once into frozen objects, the way :mod:`proxy.config` does it.

The same walker reads it (so unknown keys, wrong types and bad values are all
reported at once, each with its key path) and the same :class:`ConfigError` says so.
Everything has a default: the agent runs without a file.
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError, _check, _non_negative, _positive, _Walker

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _percent(value: float) -> str | None:
    return None if 0 < value <= 100 else "expected a percentage above 0 and at most 100"


def _env_name(value: str) -> str | None:
    return None if _ENV_NAME.fullmatch(value) else "expected an environment variable name"


@dataclass(frozen=True)
class Thresholds:
    """Percent of use above which an alert is raised."""

    memory_percent: float = field(default=85.0, metadata=_check(_percent))
    gpu_memory_percent: float = field(default=85.0, metadata=_check(_percent))
    disk_percent: float = field(default=85.0, metadata=_check(_percent))


@dataclass(frozen=True)
class DiskLimits:
    # Most the Hugging Face cache under --models-dir may hold, in GB (10^9 bytes). 0: no limit.
    max_disk_gb: float = field(default=0.0, metadata=_check(_non_negative))
    # Free space a download must leave on the models' file system, in GB.
    min_free_gb: float = field(default=5.0, metadata=_check(_non_negative))
    # Downloads larger than this (GB) are refused unless the request says "confirm": true. 0: never asked.
    confirm_above_gb: float = field(default=20.0, metadata=_check(_non_negative))


@dataclass(frozen=True)
class SupervisorConfig:
    # Seconds before the first restart of a runtime that exited; doubled per failure up to max_backoff,
    # and back to this once a run lasted `stable_after` seconds.
    backoff: float = field(default=1.0, metadata=_check(_positive))
    max_backoff: float = field(default=60.0, metadata=_check(_positive))
    stable_after: float = field(default=60.0, metadata=_check(_positive))
    # Seconds between SIGTERM and SIGKILL to the runtime's process group.
    stop_timeout: float = field(default=15.0, metadata=_check(_positive))
    # The runtime's output: rotated past log_max_bytes, log_backups old files kept.
    log_max_bytes: int = field(default=10 * 1024 * 1024, metadata=_check(_positive))
    log_backups: int = field(default=3, metadata=_check(_non_negative))


def _absolute(value: str) -> str | None:
    return None if os.path.isabs(value) else "expected an absolute directory path"


@dataclass(frozen=True)
class SystemdConfig:
    # Where the agent writes `<unit>.env` (MODEL, SERVED_MODEL_NAME) before `systemctl restart <unit>`;
    # the runtime's unit reads it with EnvironmentFile=. The agent unit's StateDirectory by default.
    env_dir: str = field(default="/var/lib/llm-proxy-node", metadata=_check(_absolute))


@dataclass(frozen=True)
class NodeConfig:
    thresholds: Thresholds = Thresholds()
    disk: DiskLimits = DiskLimits()
    supervisor: SupervisorConfig = SupervisorConfig()
    systemd: SystemdConfig = SystemdConfig()
    # The environment variable holding the Hugging Face token (never written to the file itself).
    hf_token_env: str = field(default="HF_TOKEN", metadata=_check(_env_name))
    # Seconds between heartbeats to the proxy.
    heartbeat_interval: float = field(default=10.0, metadata=_check(_positive))
    # Attempts per file when its SHA-256 does not match the hub's (the bad copy is deleted in between).
    verify_attempts: int = field(default=3, metadata=_check(_positive))


def parse_node_config(data: typing.Any, env: typing.Mapping[str, str] | None = None,
                      source: str = "node config") -> NodeConfig:  # fmt: skip
    walker = _Walker(os.environ if env is None else env)
    config = walker.build_dataclass(NodeConfig, data, "")
    problems = walker.problems
    if config is not None and config.supervisor.max_backoff < config.supervisor.backoff:
        problems.append(f"supervisor.max_backoff: must be at least supervisor.backoff ({config.supervisor.backoff})")
    if problems:
        raise ConfigError(problems, source)
    return config


def load_node_config(path: str | os.PathLike | None) -> NodeConfig:
    if path is None:
        return NodeConfig()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    return parse_node_config(data, source=str(path))
