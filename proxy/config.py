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
from urllib.parse import urlsplit, urlunsplit

import yaml

from .cron import Cron, CronError

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


# One pattern for node names, so every name can be used in a URL path (/admin/nodes/{name}),
# a metric label and a log line as it is.
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _node_name(value: str) -> str | None:
    return (
        None
        if NODE_NAME.fullmatch(value)
        else "expected 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )


def _cron(value: str) -> str | None:
    if not value:
        return None
    try:
        Cron.parse(value)
    except CronError as exc:
        return f"not a cron expression: {exc}"
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
    # Seconds a client may take to send its request head, and then its body (proxy/server.py).
    header_timeout: float = field(default=10.0, metadata=_check(_positive))
    body_timeout: float = field(default=60.0, metadata=_check(_positive))


@dataclass(frozen=True)
class StorageConfig:
    # Relative paths are taken from the config file's directory.
    path: str = "./llm-proxy.db"
    # Instead of path: postgresql://user:${PGPASSWORD}@host:5432/db, shared by replicas on several
    # hosts (pip install 'llm-proxy[postgres]'). Never logged or shown with its password.
    url: str = field(default="", repr=False)
    # The key that encrypts secrets kept in the database (registered nodes' api_key); created at
    # first start, mode 0600. Empty: next to the database (llm-proxy.db -> llm-proxy.key).
    key_path: str = ""


@dataclass(frozen=True)
class RedisConfig:
    # redis://[:password@]host:6379/0 (optional, beside either storage): changes reach the other
    # replicas at once (pub/sub) instead of at their next poll (pip install 'llm-proxy[redis]').
    url: str = field(default="", repr=False)


@dataclass(frozen=True)
class TimeoutConfig:
    """Seconds. ``first_byte`` is generous because a cold node may load a model for minutes."""

    connect: float = field(default=5.0, metadata=_check(_positive))
    first_byte: float = field(default=300.0, metadata=_check(_positive))
    idle: float = field(default=60.0, metadata=_check(_positive))
    # Longest NDJSON line or SSE event a backend may send; the stream fails beyond it.
    max_line_bytes: int = field(default=16 * 1024 * 1024, metadata=_check(_positive))


@dataclass(frozen=True)
class BackendConfig:
    name: str = field(metadata=_check(_node_name))
    kind: BackendKind
    url: str = field(metadata=_check(_http_url))
    api_key: str = field(default="", repr=False)  # secrets never appear in a repr or a log line
    weight: float = field(default=1.0, metadata=_check(_non_negative))
    max_concurrent: int = field(default=0, metadata=_check(_non_negative))  # 0: no limit
    timeouts: TimeoutConfig | None = None  # overrides the global timeouts for this node
    # Used by automatic distribution (distribution.tiers) to pick the models that fit this node.
    gpu_memory_gb: float | None = field(default=None, metadata=_check(_non_negative))
    # vLLM serves one model per process. To switch it, the proxy runs this argv (no shell);
    # "{model}" in any argument is replaced by the model to serve. Example:
    # ["sudo", "/usr/local/bin/vllm-switch", "{model}"]
    activate_command: tuple[str, ...] = ()
    activate_timeout: float = field(default=600.0, metadata=_check(_positive))
    # Ollama activation preloads the new model with this keep_alive (a Go duration such as "30m",
    # or "-1" to keep it loaded until something unloads it), so the first request is not the one
    # that waits for the weights to load.
    preload_keep_alive: str = "30m"
    # Seconds to wait for requests in flight to finish once the node is drained (node removal,
    # and before a vLLM activation restarts the process under them).
    drain_timeout: float = field(default=30.0, metadata=_check(_non_negative))


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
    # Capability routing: what this model is good at, best first (code, reasoning, chat, ...).
    # Among models offering a capability, the one listing it earlier wins, then lower `preference`.
    capabilities: tuple[str, ...] = ()
    preference: int = 100
    # Other public names (aliases or served model names) tried in order when no backend for
    # this one can take the request.
    fallback: tuple[str, ...] = ()
    # Ollama: the largest num_ctx the proxy sets on its own for this model (context.max_num_ctx
    # when unset). Larger windows cost memory and a reload, so a small GPU wants a low ceiling.
    max_num_ctx: int | None = field(default=None, metadata=_check(_positive))


TASK_TYPES = ("code_generation", "code_analysis", "reasoning", "general_chat", "planning",
              "text_generation", "embedding")  # fmt: skip

_DEFAULT_TASK_CAPABILITIES = {
    "code_generation": "code",
    "code_analysis": "code",
    "reasoning": "reasoning",
    "planning": "reasoning",
    "general_chat": "chat",
    "text_generation": "chat",
    "embedding": "embedding",
}


@dataclass(frozen=True)
class RoutingConfig:
    # Public names that mean "pick a model for the task" rather than naming one.
    routers: tuple[str, ...] = ("auto",)
    # Task type (X-Task-Type header or task_type body field) -> capability models declare.
    # Entries here add to or override the defaults below.
    task_types: dict[str, str] = field(default_factory=dict)
    # The general model used when no model with the needed capability can take the request,
    # and for a router name sent without a task type.
    default_model: str = ""
    # Other backends tried after the first fails before sending anything to the client.
    retries: int = field(default=2, metadata=_check(_non_negative))
    # Seconds one request may spend across all its attempts (queueing included) before 504.
    deadline: float = field(default=600.0, metadata=_check(_positive))
    # Requests waiting for a slot on a backend at max_concurrent; beyond it: 429 + Retry-After.
    queue_size: int = field(default=64, metadata=_check(_non_negative))
    queue_timeout: float = field(default=30.0, metadata=_check(_positive))
    # With no other backend left to try, a transient failure (connection reset, 502/503, busy)
    # is retried on the same backend this many more times, after a jittered backoff that starts
    # at `retry_backoff` seconds and doubles. Single-node setups would otherwise fail at once.
    retry_same: int = field(default=2, metadata=_check(_non_negative))
    retry_backoff: float = field(default=0.25, metadata=_check(_non_negative))
    # A node that must first load the model (Ollama, by /api/ps) only gets requests while every
    # node where it is loaded has this many in flight (or no free max_concurrent slot).
    cold_after_in_flight: int = field(default=4, metadata=_check(_positive))
    # Prefix affinity: requests of one conversation (same `user`, else the same first messages)
    # go to the backend that answered it before, while it is healthy and not overloaded, so its
    # prefix cache is reused. Off by default; the table is an LRU of `affinity_size` entries,
    # each forgotten `affinity_ttl` seconds after its last use.
    affinity: bool = False
    affinity_size: int = field(default=10_000, metadata=_check(_positive))
    affinity_ttl: float = field(default=600.0, metadata=_check(_positive))


@dataclass(frozen=True)
class HealthConfig:
    # Seconds between active checks: a liveness probe (Ollama /api/version, vLLM /health), then
    # the model listing (Ollama /api/tags, OpenAI /v1/models).
    interval: float = field(default=10.0, metadata=_check(_positive))
    # A failing backend sits out `cooldown` seconds, doubling on each repeat up to `max_cooldown`.
    cooldown: float = field(default=5.0, metadata=_check(_positive))
    max_cooldown: float = field(default=120.0, metadata=_check(_positive))
    # Over this share of errors among recent requests, a backend is degraded (and gets less).
    degraded_error_rate: float = field(default=0.2, metadata=_check(_non_negative))
    # Load signals (vLLM /metrics, Ollama /api/ps) are read every round, and for a backend with
    # requests in flight also when a request finds them older than this many seconds.
    signals_interval: float = field(default=2.0, metadata=_check(_positive))


@dataclass(frozen=True)
class ContextConfig:
    """Ollama cuts prompts longer than its context window without a word; the proxy sizes num_ctx instead."""

    # Raise num_ctx to fit the estimated prompt and the answer when a request sets none.
    auto_num_ctx: bool = True
    # The window Ollama uses when a request sets no num_ctx (2048 before Ollama 0.6, 4096 since,
    # or OLLAMA_CONTEXT_LENGTH). Prompts that fit in it are sent untouched, so nothing reloads.
    # A model whose Modelfile sets num_ctx uses that instead.
    ollama_default: int = field(default=2048, metadata=_check(_positive))
    # The largest num_ctx the proxy sets for any model without its own models[].max_num_ctx.
    max_num_ctx: int = field(default=32768, metadata=_check(_positive))
    # Tokens kept free for the answer when a request sets no max_tokens.
    answer_reserve: int = field(default=1024, metadata=_check(_non_negative))


@dataclass(frozen=True)
class CacheConfig:
    # deterministic: only temperature 0 or a fixed seed; always: every request; off.
    mode: Literal["deterministic", "always", "off"] = "deterministic"
    ttl_hours: float = field(default=24.0, metadata=_check(_positive))
    max_entries: int = field(default=10_000, metadata=_check(_positive))  # in SQLite, LRU beyond it
    memory_entries: int = field(default=1_000, metadata=_check(_non_negative))  # hot entries in RAM


@dataclass(frozen=True)
class HistoryConfig:
    enabled: bool = True
    capture_bodies: bool = False
    max_body_bytes: int = field(default=65_536, metadata=_check(_positive))
    retention_days: float = field(default=30.0, metadata=_check(_positive))


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True


@dataclass(frozen=True)
class PullConfig:
    max_parallel: int = field(default=10, metadata=_check(_positive))  # pulls at once across nodes
    attempts: int = field(default=3, metadata=_check(_positive))
    backoff: float = field(default=5.0, metadata=_check(_non_negative))  # seconds, doubled per retry
    # Scheduled pulls (sync, auto-distribution) start only inside this local-time window,
    # "HH:MM-HH:MM" (may wrap midnight). Empty: any time. Explicit pulls ignore it.
    window: str = ""
    # Seconds without a progress line before a pull counts as stalled and is retried. Generous:
    # Ollama is silent while it verifies the digest of a large blob.
    idle_timeout: float = field(default=300.0, metadata=_check(_positive))


@dataclass(frozen=True)
class Tier:
    min_gpu_memory_gb: float = field(metadata=_check(_non_negative))
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class DistributionConfig:
    # Largest min_gpu_memory_gb not above a node's gpu_memory_gb picks its tier.
    tiers: tuple[Tier, ...] = ()
    baseline: tuple[str, ...] = ()  # every node holds these
    fallback: tuple[str, ...] = ()  # and these where its tier allows
    manifest_path: str = "./llm-proxy-manifest.json"
    # When to sync baseline and fallback models by itself: a five-field cron expression in local
    # time ("0 3 * * *": every day at 03:00), inside pulls.window if one is set. One process of the
    # fleet runs each firing. Empty: only on request (POST /admin/models/sync, llm-proxy sync).
    schedule: str = field(default="", metadata=_check(_cron))


def _optional_http_url(value: str) -> str | None:
    return None if not value else _http_url(value)


@dataclass(frozen=True)
class CatalogConfig:
    """Where GET /admin/catalog learns what can be installed (proxy/installable)."""

    # The Ollama library (its /search page) and the Hugging Face API (/api/models). Empty: that
    # source is not asked and the shipped file answers for it, as it does when the source fails.
    ollama_url: str = field(default="https://ollama.com", metadata=_check(_optional_http_url))
    huggingface_url: str = field(default="https://huggingface.co", metadata=_check(_optional_http_url))
    # The Hub's filter= (a pipeline tag or library); empty: no filter.
    huggingface_filter: str = "text-generation"
    # A catalog file in the shipped file's format, used instead of it. Empty: the shipped one.
    file: str = ""
    # Seconds an answer from a source is kept in memory, and an offline answer (the source failed)
    # before the source is asked again.
    ttl: float = field(default=3600.0, metadata=_check(_positive))
    offline_ttl: float = field(default=60.0, metadata=_check(_positive))
    # Seconds a source may take (connect and whole answer) before the shipped file answers instead.
    timeout: float = field(default=5.0, metadata=_check(_positive))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    routing: RoutingConfig = RoutingConfig()
    health: HealthConfig = HealthConfig()
    context: ContextConfig = ContextConfig()
    cache: CacheConfig = CacheConfig()
    history: HistoryConfig = HistoryConfig()
    metrics: MetricsConfig = MetricsConfig()
    pulls: PullConfig = PullConfig()
    distribution: DistributionConfig = DistributionConfig()
    redis: RedisConfig = RedisConfig()
    catalog: CatalogConfig = CatalogConfig()
    backends: tuple[BackendConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()

    def backend(self, name: str) -> BackendConfig:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    def timeouts_for(self, backend: BackendConfig) -> TimeoutConfig:
        return backend.timeouts or self.timeouts

    def task_capability(self, task: str) -> str | None:
        return {**_DEFAULT_TASK_CAPABILITIES, **self.routing.task_types}.get(task)


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
        if origin is dict:
            key_tp, item_tp = typing.get_args(tp)
            if not isinstance(value, dict):
                self.fail(path, f"expected a mapping, got {type(value).__name__}")
                return {}
            return {
                self.build(key_tp, k, f"{path}.{k}"): self.build(item_tp, v, f"{path}.{k}") for k, v in value.items()
            }
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
            problems.append(
                f"backends[{i}].name: duplicate name {backend.name!r} (also backends[{seen[backend.name]}])"
            )
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


def _check_routing(config: Config, problems: list[str]) -> None:
    aliases = {m.name for m in config.models if m is not None}
    for name in config.routing.routers:
        if name in aliases:
            problems.append(f"routing.routers: {name!r} is also a model name in models:; pick one meaning for it")
    for task, capability in config.routing.task_types.items():
        if not capability:
            problems.append(f"routing.task_types.{task}: must name a capability (e.g. code, reasoning, chat)")
    h = config.health
    if h.max_cooldown < h.cooldown:
        problems.append(f"health.max_cooldown: must be at least health.cooldown ({h.cooldown}), got {h.max_cooldown}")
    if config.pulls.window and not _WINDOW.fullmatch(config.pulls.window):
        problems.append(f"pulls.window: expected HH:MM-HH:MM (e.g. 01:00-05:00), got {config.pulls.window!r}")
    _check_schedule(config, problems)
    tiers = [t.min_gpu_memory_gb for t in config.distribution.tiers if t is not None]
    if len(set(tiers)) != len(tiers):
        problems.append("distribution.tiers: two tiers have the same min_gpu_memory_gb")


def _check_schedule(config: Config, problems: list[str]) -> None:
    """A schedule must fire inside pulls.window at least sometimes, or its pulls would always wait."""
    schedule, window = config.distribution.schedule, config.pulls.window
    if not schedule or not window or _cron(schedule) or not _WINDOW.fullmatch(window):
        return
    start, end = (int(t[:2]) * 60 + int(t[3:]) for t in window.split("-"))
    inside = [m for m in Cron.parse(schedule).times_of_day()
              if start == end or (start <= m < end if start < end else (m >= start or m < end))]  # fmt: skip
    if not inside:
        problems.append(f"distribution.schedule: {schedule!r} never fires inside pulls.window ({window}); "
                        "pick a time in the window")  # fmt: skip


_WINDOW = re.compile(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d")


def redact_url(url: str) -> str:
    """A URL without its password, for logs, errors and /admin."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(a URL that cannot be parsed)"
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _url_problem(url: str, schemes: tuple[str, ...]) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return True
    return parts.scheme not in schemes or not parts.hostname


def _check_shared_storage(config: Config, data: Any, problems: list[str]) -> None:
    raw = data.get("storage") if isinstance(data, dict) else None
    storage = config.storage
    if isinstance(raw, dict) and "path" in raw and "url" in raw:
        problems.append("storage: give either path (SQLite, one host) or url (PostgreSQL), not both")
    if storage.url:
        if _url_problem(storage.url, ("postgresql", "postgres")):
            problems.append(f"storage.url: expected postgresql://user:password@host:5432/database, got "
                            f"{redact_url(storage.url)!r}")  # fmt: skip
        if not storage.key_path:
            problems.append("storage.key_path: required with storage.url: every replica needs the same key file "
                            "to read the node keys kept in the database")  # fmt: skip
    if config.redis.url and _url_problem(config.redis.url, ("redis", "rediss")):
        problems.append(f"redis.url: expected redis://[:password@]host:6379/0, got {redact_url(config.redis.url)!r}")


def parse_config(data: Any, env: typing.Mapping[str, str] | None = None, source: str = "config") -> Config:
    """Validate plain data (as loaded from YAML) into a :class:`Config`, or raise :class:`ConfigError`."""
    walker = _Walker(os.environ if env is None else env)
    config = walker.build_dataclass(Config, data, "")
    problems = walker.problems
    if config is not None:
        _check_references(config, problems)
        _check_routing(config, problems)
        _check_shared_storage(config, data, problems)
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
    return anchor_paths(parse_config(data, env, source=str(path)), path.parent)


def _anchored(value: str, base: Path) -> str:
    if value == ":memory:" or value.startswith("file:"):
        return value
    candidate = Path(value).expanduser()
    return str(candidate if candidate.is_absolute() else (base / candidate).absolute())


def anchor_paths(config: Config, base: str | os.PathLike) -> Config:
    """File paths in the config, relative to the config file's directory rather than the current one.

    Started from another directory, a relative ``storage.path`` would otherwise open an empty
    database, and registered nodes and activations would seem gone.
    """
    base = Path(base)
    key_path = _anchored(config.storage.key_path, base) if config.storage.key_path else ""
    storage = dataclasses.replace(config.storage, path=_anchored(config.storage.path, base), key_path=key_path)
    distribution = dataclasses.replace(config.distribution,
                                       manifest_path=_anchored(config.distribution.manifest_path, base))  # fmt: skip
    catalog_file = _anchored(config.catalog.file, base) if config.catalog.file else ""
    catalog = dataclasses.replace(config.catalog, file=catalog_file)
    return dataclasses.replace(config, storage=storage, distribution=distribution, catalog=catalog)
