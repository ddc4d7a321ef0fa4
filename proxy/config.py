"""The configuration: parsed once from YAML into frozen dataclasses.

The dataclasses below *are* the schema. :func:`parse_config` walks them with the
raw YAML, so adding a setting means adding a field: unknown keys, wrong types,
values outside a choice, duplicate names and dangling references are all
reported together, one message per problem, each naming its key path
(``backends[1].kind: expected one of ollama, vllm, openai``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

BackendKind = Literal["ollama", "vllm", "openai"]


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every reason, one per line."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def _http_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "expected an http:// or https:// URL"
    return None


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "expected a port number from 0 to 65535"


def _check(fn):
    """Attach a value check to a dataclass field (kept in the field's metadata)."""
    return {"check": fn}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata=_check(_port))
    # Keys clients send as "Authorization: Bearer <key>". Empty: /v1 is open.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # Keys for /admin (used by the admin API); separate from api_keys.
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    # Largest request body accepted; image data URLs make chat bodies large.
    max_body_bytes: int = field(default=32 * 1024 * 1024, metadata=_check(_positive))


@dataclass(frozen=True)
class StorageConfig:
    path: str = "./llm-proxy.db"


@dataclass(frozen=True)
class TimeoutConfig:
    """Seconds. ``first_byte`` is generous because a cold node may load a model for minutes."""

    connect: float = field(default=5.0, metadata=_check(_positive))
    first_byte: float = field(default=300.0, metadata=_check(_positive))
    idle: float = field(default=60.0, metadata=_check(_positive))


@dataclass(frozen=True)
class BackendConfig:
    name: str
    kind: BackendKind
    url: str = field(metadata=_check(_http_url))
    api_key: str = field(default="", repr=False)  # secrets never appear in a repr or a log line
    weight: float = field(default=1.0, metadata=_check(_non_negative))
    max_concurrent: int = field(default=0, metadata=_check(_non_negative))  # 0: no limit
    timeouts: TimeoutConfig | None = None  # overrides the global timeouts for this node


@dataclass(frozen=True)
class SamplingDefaults:
    """Values used when a request leaves them out."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def items(self):
        return ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))


@dataclass(frozen=True)
class ModelConfig:
    """A public name (alias) for a model a backend knows under ``target``."""

    name: str
    target: str
    backends: tuple[str, ...] = ()  # empty: every backend that serves the target
    # Chat-template adaptation (proxy/adapt.py): Gemma-style templates have no system role,
    # Mistral-style ones need strict user/assistant alternation.
    supports_system_role: bool = True
    alternating_roles: bool = False
    system_prompt: str = ""
    defaults: SamplingDefaults | None = None


@dataclass(frozen=True)
class DiscoveryConfig:
    # How often each backend is asked what it serves (Ollama /api/tags, OpenAI /v1/models).
    interval: float = field(default=30.0, metadata=_check(_positive))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    backends: tuple[BackendConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()

    def backend(self, name: str) -> BackendConfig:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    def timeouts_for(self, backend: BackendConfig) -> TimeoutConfig:
        return backend.timeouts or self.timeouts


# --- loading ------------------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: str, path: str, env: typing.Mapping[str, str], problems: list[str]) -> str:
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set (use ${{{name}:-default}} for a default)")
        return ""

    return _ENV_REF.sub(replace, value) if "$" in value else value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is str:
        return "a string"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if origin is tuple:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


class _Walker:
    """Builds frozen dataclasses from plain YAML data, collecting every problem."""

    def __init__(self, env: typing.Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def build(self, tp: Any, value: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            if value is None:
                return None
            return self.build(options[0], value, path)
        if origin is Literal:
            choices = typing.get_args(tp)
            if isinstance(value, str):
                value = _expand_env(value, path, self.env, self.problems)
            if value not in choices:
                self.fail(path, f"expected one of {', '.join(map(str, choices))}, got {value!r}")
            return value
        if origin is tuple:
            (item_tp, _) = typing.get_args(tp)
            if not isinstance(value, list):
                self.fail(path, f"expected a list, got {type(value).__name__}")
                return ()
            return tuple(self.build(item_tp, item, f"{path}[{i}]") for i, item in enumerate(value))
        if dataclasses.is_dataclass(tp):
            return self.build_dataclass(tp, value, path)
        return self.build_scalar(tp, value, path)

    def build_scalar(self, tp: type, value: Any, path: str) -> Any:
        if isinstance(value, str) and tp is not str:
            # "${PORT:-8080}" in a numeric field: expand, then read it as YAML would.
            expanded = _expand_env(value, path, self.env, self.problems)
            if expanded != value:
                value = yaml.safe_load(expanded) if expanded else None
        if tp is str:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # a numeric model tag like 7 or a port-like name is still a name
            if not isinstance(value, str):
                self.fail(path, f"expected a string, got {type(value).__name__}")
                return ""
            return _expand_env(value, path, self.env, self.problems)
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(path, f"expected true or false, got {value!r}")
                return False
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"expected an integer, got {value!r}")
                return 0
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"expected a number, got {value!r}")
                return 0.0
            return float(value)
        raise TypeError(f"unsupported config type {tp!r}")  # a bug in the schema, not in the file

    def build_dataclass(self, cls: type, value: Any, path: str) -> Any:
        prefix = f"{path}." if path else ""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(path or "config", f"expected a mapping, got {type(value).__name__}")
            value = {}
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in value:
            if key not in fields:
                self.fail(f"{prefix}{key}", f"unknown key (valid keys: {', '.join(fields)})")
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            key_path = f"{prefix}{name}"
            if name in value:
                built = self.build(hints[name], value[name], key_path)
                check = f.metadata.get("check")
                problem = check(built) if check and built is not None else None
                if problem:
                    self.fail(key_path, f"{problem}, got {value[name]!r}")
                kwargs[name] = built
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(key_path, f"required ({_type_name(hints[name])})")
                kwargs[name] = None
        if any(v is None and fields[k].default is dataclasses.MISSING for k, v in kwargs.items()):
            return None  # a required field is missing: the object cannot be built, the problem is recorded
        return cls(**kwargs)


def _check_references(config: Config, problems: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, backend in enumerate(config.backends):
        if backend is None:
            continue
        if backend.name in seen:
            problems.append(f"backends[{i}].name: duplicate name {backend.name!r} (also backends[{seen[backend.name]}])")
        seen.setdefault(backend.name, i)
    names = ", ".join(seen) or "none defined"
    aliases: dict[str, int] = {}
    for i, model in enumerate(config.models):
        if model is None:
            continue
        if model.name in aliases:
            problems.append(f"models[{i}].name: duplicate name {model.name!r} (also models[{aliases[model.name]}])")
        aliases.setdefault(model.name, i)
        if not model.name:
            problems.append(f"models[{i}].name: must not be empty")
        if not model.target:
            problems.append(f"models[{i}].target: must not be empty")
        for j, ref in enumerate(model.backends):
            if ref not in seen:
                problems.append(f"models[{i}].backends[{j}]: unknown backend {ref!r} (defined: {names})")


def parse_config(data: Any, env: typing.Mapping[str, str] | None = None, source: str = "config") -> Config:
    """Validate plain data (as loaded from YAML) into a :class:`Config`, or raise :class:`ConfigError`."""
    walker = _Walker(os.environ if env is None else env)
    config = walker.build_dataclass(Config, data, "")
    problems = walker.problems
    if config is not None:
        _check_references(config, problems)
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | os.PathLike, env: typing.Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    return parse_config(data, env, source=str(path))
