"""Ollama wire details shared by the simulated node's handlers.

Names (``x`` means ``registry.ollama.ai/library/x:latest``), Go-style decode
errors, ``keep_alive`` and ``think`` parsing, ``omitempty`` metrics, and the
metadata ``/api/show`` and ``/api/tags`` report.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from .behavior import Behavior, ModelSpec, Reply
from .core import ORJSONResponse

NDJSON = "application/x-ndjson"
JSON = "application/json; charset=utf-8"
_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"
KEEP_ALIVE_DEFAULT_S = 300.0
FOREVER_S = 100 * 365 * 86400.0
_THINK_LEVELS = ("high", "medium", "low", "max")
_THINK_CHOICES = '("high", "medium", "low", "max", true, or false)'
_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MID_STREAM_ERROR = "an error was encountered while running the model: unexpected EOF"
IMAGES_UNSUPPORTED = "this model is missing data required for image input"
_CALL_ID_ALPHABET = string.ascii_lowercase + string.digits


@dataclass
class GenerationJob:
    """Everything a chat or generate run needs, fixed when the request was accepted."""

    endpoint: str  # "chat" | "generate"
    model: str  # as the client spelled it; Ollama echoes it back
    behavior: Behavior
    failure: str | None
    reply: Reply
    stream: bool
    logprobs: bool
    top_logprobs: int
    context: list[int] | None  # /api/generate only, None when raw
    started_ns: int


@dataclass
class EmbedJob:
    """An accepted /api/embed request: ``build(loaded_ns)`` makes the native response body."""

    model: str
    behavior: Behavior
    failure: str | None
    build: Callable[[int], dict[str, Any]]


def native_error(status: int, message: str) -> dict[str, Any]:
    return {"error": message}


def default_models() -> list[ModelSpec]:
    return [
        ModelSpec(
            "llama3.1:8b",
            ("completion", "tools"),
            context_length=131072,
            family="llama",
            parameter_size="8.0B",
            size=4_920_753_328,
        ),
        ModelSpec(
            "qwen3:4b",
            ("completion", "tools", "thinking"),
            context_length=40960,
            family="qwen3",
            parameter_size="4.0B",
            size=2_497_293_931,
        ),
        ModelSpec(
            "gemma3:1b",
            ("completion", "vision"),
            context_length=32768,
            family="gemma3",
            parameter_size="999.89M",
            size=815_319_791,
            supports_system_role=False,
        ),
        ModelSpec(
            "nomic-embed-text:latest",
            ("embedding",),
            context_length=2048,
            family="nomic-bert",
            parameter_size="137M",
            quantization="F16",
            size=274_302_450,
            embedding_dim=768,
        ),
    ]


def guess_spec(name: str) -> ModelSpec:
    """A plausible spec for a model known only by name (CLI ``--model`` and ``/api/pull``)."""
    lower = name.lower()
    if "embed" in lower or "minilm" in lower or "bge" in lower:
        return ModelSpec(
            name,
            ("embedding",),
            context_length=2048,
            family="bert",
            parameter_size="137M",
            quantization="F16",
            size=274_302_450,
        )
    families = (
        ("qwen3", "qwen3", ("completion", "tools", "thinking")),
        ("deepseek-r1", "qwen2", ("completion", "thinking")),
        ("qwen", "qwen2", ("completion", "tools")),
        ("gemma", "gemma3", ("completion", "vision")),
        ("llava", "llama", ("completion", "vision")),
        ("mistral", "llama", ("completion", "tools")),
    )
    for marker, family, caps in families:
        if marker in lower:
            return ModelSpec(name, caps, family=family, supports_system_role=family != "gemma3")
    return ModelSpec(name, ("completion", "tools"))


# --------------------------------------------------------------------------- names


def _name_parts(name: str) -> tuple[str, str, str]:
    parts = name.strip().split("/")
    host, namespace = _DEFAULT_HOST, _DEFAULT_NAMESPACE
    if len(parts) >= 3:
        host, namespace, rest = parts[-3], parts[-2], parts[-1]
    elif len(parts) == 2:
        namespace, rest = parts
    else:
        rest = parts[0]
    if ":" not in rest:
        rest += ":latest"
    return host, namespace, rest


def full_name(name: str) -> str:
    """Ollama's fully qualified rendering, as used in capability errors."""
    return "/".join(_name_parts(name))


def canonical_name(name: str) -> str:
    return full_name(name).lower()  # Ollama resolves names case-insensitively


def namespace_of(name: str) -> str:
    """The namespace part (``library`` unless given), which /v1/models reports as ``owned_by``."""
    return _name_parts(name)[1]


def display_name(name: str) -> str:
    host, namespace, rest = _name_parts(name)
    if host == _DEFAULT_HOST:
        return rest if namespace == _DEFAULT_NAMESPACE else f"{namespace}/{rest}"
    return f"{host}/{namespace}/{rest}"


# --------------------------------------------------------------------------- helpers


def rfc3339(epoch_ns: int | None = None) -> str:
    """Go's RFC3339Nano in UTC: nanoseconds with trailing zeros trimmed."""
    epoch_ns = time.time_ns() if epoch_ns is None else epoch_ns
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


def error(status: int, message: str) -> Response:
    return ORJSONResponse({"error": message}, status_code=status, media_type=JSON)


def go_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool"}.get(type(value), "number")


def bind_error(value: Any, struct: str) -> str:
    return f"json: cannot unmarshal {go_kind(value)} into Go value of type api.{struct}"


def field_error(body: dict, struct: str, expected: dict[str, tuple[tuple[type, ...], str]]) -> str | None:
    """The Go decoder's complaint for the first field of the wrong JSON type, if any."""
    for field_name, (kinds, go_type) in expected.items():
        value = body.get(field_name)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            return (
                f"json: cannot unmarshal {go_kind(value)} into Go struct field {struct}.{field_name} of type {go_type}"
            )
    return None


_STR = ((str,), "string")
_BOOL = ((bool,), "bool")
_INT = ((int,), "int")
_OPTIONS = ((dict,), "map[string]interface {}")
_FORMAT = ((str, dict), "string")
CHAT_FIELDS = {
    "model": _STR,
    "messages": ((list,), "[]api.Message"),
    "stream": _BOOL,
    "options": _OPTIONS,
    "tools": ((list,), "api.Tools"),
    "logprobs": _BOOL,
    "top_logprobs": _INT,
    "format": _FORMAT,
}
GENERATE_FIELDS = {
    "model": _STR,
    "prompt": _STR,
    "suffix": _STR,
    "system": _STR,
    "template": _STR,
    "stream": _BOOL,
    "raw": _BOOL,
    "options": _OPTIONS,
    "images": ((list,), "[]api.ImageData"),
    "context": ((list,), "[]int"),
    "logprobs": _BOOL,
    "top_logprobs": _INT,
    "format": _FORMAT,
}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to keep the model loaded; negative means forever. Raises ValueError like Go."""
    if value is None:
        return KEEP_ALIVE_DEFAULT_S
    if isinstance(value, bool):
        raise ValueError(f"Unsupported type: '{go_kind(value)}'")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if body == "0":
            return 0.0
        pieces = _GO_DURATION.findall(body)
        if not body or "".join(n + u for n, u in pieces) != body:
            raise ValueError(f'time: invalid duration "{value}"')
        return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in pieces)
    raise ValueError(f"Unsupported type: '{go_kind(value)}'")


def parse_think(value: Any) -> tuple[bool | str | None, str | None]:
    if value is None or isinstance(value, bool):
        return value, None
    if isinstance(value, str):
        if value in _THINK_LEVELS:
            return value, None
        return None, f'invalid think value: "{value}" (must be "high", "medium", "low", "max", true, or false)'
    return None, f"think must be a boolean or string {_THINK_CHOICES}"


def sampling_options(options: dict) -> tuple[int | None, list[str], str | None]:
    """(num_predict, stop, error) from the request options, with Go's type errors."""
    num_predict = options.get("num_predict")
    if num_predict is not None and (isinstance(num_predict, bool) or not isinstance(num_predict, (int, float))):
        return None, [], 'option "num_predict" must be of type integer'
    stop = options.get("stop")
    if stop is not None:
        if not isinstance(stop, list):
            return None, [], 'option "stop" must be of type array'
        if not all(isinstance(s, str) for s in stop):
            return None, [], 'option "stop" must be of an array of strings'
    cap = int(num_predict) if num_predict is not None and num_predict > 0 else None
    return cap, list(stop or []), None


def show_template(spec: ModelSpec) -> str:
    if spec.template is not None:
        return spec.template
    if not spec.supports_system_role:  # Gemma-style: no .System, system text folds into the user turn
        return (
            "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
            '{{- if or (eq .Role "user") (eq .Role "system") }}<start_of_turn>user\n{{ .Content }}<end_of_turn>\n'
            '{{ if $last }}<start_of_turn>model\n{{ end }}{{- else if eq .Role "assistant" }}<start_of_turn>model\n'
            "{{ .Content }}{{ if not $last }}<end_of_turn>\n{{ end }}{{- end }}{{- end }}"
        )
    tools = (
        "{{- if .Tools }}Available tools: {{ range .Tools }}{{ . }}{{ end }}\n{{ end }}" if spec.has("tools") else ""
    )
    think = "{{- if .Think }}<think>{{ end }}" if spec.has("thinking") else ""
    return (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        + tools
        + "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + think
    )


def details(spec: ModelSpec) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": spec.family,
        "families": [spec.family],
        "parameter_size": spec.parameter_size,
        "quantization_level": spec.quantization,
    }


def metrics(**values: int) -> dict[str, int]:
    return {k: v for k, v in values.items() if v}  # Go's omitempty drops zeros


def tool_call(index: int, call: dict) -> dict[str, Any]:
    call_id = "call_" + "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(8))
    return {"id": call_id, "function": {"index": index, "name": call["name"], "arguments": call["arguments"]}}


def layer_digest(spec: ModelSpec, layer: str) -> str:
    return hashlib.sha256(f"{spec.digest}:{layer}".encode()).hexdigest()


def parameter_count(size: str) -> int:
    match = re.fullmatch(r"([0-9.]+)\s*([KMB]?)", size.strip().upper())
    if not match:
        return 0
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[match.group(2)]
    return int(float(match.group(1)) * scale)
