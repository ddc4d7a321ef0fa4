"""A simulated Ollama node speaking the native ``/api/*`` protocol.

Field names, defaults, status codes and error texts follow the real server
(see docs/protocols reference, section A): streaming is on unless
``stream:false``, lines are NDJSON, metrics are integer nanoseconds with Go's
``omitempty`` semantics, and a model name without a tag means ``:latest``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any, Callable

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .behavior import (
    DEFAULT_THINKING,
    MID_STREAM_FAILURES,
    Behavior,
    ModelSpec,
    Reply,
    compose_reply,
    count_prompt_tokens,
    count_words,
    embedding,
    l2_normalize,
    token_ids,
    token_logprob,
)
from .core import Generation, ORJSONResponse, Output, SimBase, hang_forever, paced, request_json

NDJSON = "application/x-ndjson"
JSON = "application/json; charset=utf-8"
_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"
_KEEP_ALIVE_DEFAULT_S = 300.0
_FOREVER_S = 100 * 365 * 86400.0
_THINK_LEVELS = ("high", "medium", "low", "max")
_THINK_CHOICES = '("high", "medium", "low", "max", true, or false)'
_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_MID_STREAM_ERROR = "an error was encountered while running the model: unexpected EOF"
_IMAGES_UNSUPPORTED = "this model is missing data required for image input"
_CALL_ID_ALPHABET = string.ascii_lowercase + string.digits


def default_models() -> list[ModelSpec]:
    return [
        ModelSpec("llama3.1:8b", ("completion", "tools"), context_length=131072, family="llama",
                  parameter_size="8.0B", size=4_920_753_328),
        ModelSpec("qwen3:4b", ("completion", "tools", "thinking"), context_length=40960, family="qwen3",
                  parameter_size="4.0B", size=2_497_293_931),
        ModelSpec("gemma3:1b", ("completion", "vision"), context_length=32768, family="gemma3",
                  parameter_size="999.89M", size=815_319_791, supports_system_role=False),
        ModelSpec("nomic-embed-text:latest", ("embedding",), context_length=2048, family="nomic-bert",
                  parameter_size="137M", quantization="F16", size=274_302_450, embedding_dim=768),
    ]


def guess_spec(name: str) -> ModelSpec:
    """A plausible spec for a model known only by name (CLI ``--model`` and ``/api/pull``)."""
    lower = name.lower()
    if "embed" in lower or "minilm" in lower or "bge" in lower:
        return ModelSpec(name, ("embedding",), context_length=2048, family="bert", parameter_size="137M",
                         quantization="F16", size=274_302_450)
    families = (("qwen3", "qwen3", ("completion", "tools", "thinking")), ("deepseek-r1", "qwen2", ("completion", "thinking")),
                ("qwen", "qwen2", ("completion", "tools")), ("gemma", "gemma3", ("completion", "vision")),
                ("llava", "llama", ("completion", "vision")), ("mistral", "llama", ("completion", "tools")))
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


def _go_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool"}.get(type(value), "number")


def _bind_error(value: Any, struct: str) -> str:
    return f"json: cannot unmarshal {_go_kind(value)} into Go value of type api.{struct}"


def _field_error(body: dict, struct: str, expected: dict[str, tuple[tuple[type, ...], str]]) -> str | None:
    """The Go decoder's complaint for the first field of the wrong JSON type, if any."""
    for field_name, (kinds, go_type) in expected.items():
        value = body.get(field_name)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            return (f"json: cannot unmarshal {_go_kind(value)} into Go struct field {struct}.{field_name} "
                    f"of type {go_type}")
    return None


_STR = ((str,), "string")
_BOOL = ((bool,), "bool")
_INT = ((int,), "int")
_OPTIONS = ((dict,), "map[string]interface {}")
_FORMAT = ((str, dict), "string")
_CHAT_FIELDS = {"model": _STR, "messages": ((list,), "[]api.Message"), "stream": _BOOL, "options": _OPTIONS,
                "tools": ((list,), "api.Tools"), "logprobs": _BOOL, "top_logprobs": _INT, "format": _FORMAT}
_GENERATE_FIELDS = {"model": _STR, "prompt": _STR, "suffix": _STR, "system": _STR, "template": _STR, "stream": _BOOL,
                    "raw": _BOOL, "options": _OPTIONS, "images": ((list,), "[]api.ImageData"),
                    "context": ((list,), "[]int"), "logprobs": _BOOL, "top_logprobs": _INT, "format": _FORMAT}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to keep the model loaded; negative means forever. Raises ValueError like Go."""
    if value is None:
        return _KEEP_ALIVE_DEFAULT_S
    if isinstance(value, bool):
        raise ValueError(f"Unsupported type: '{_go_kind(value)}'")
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
    raise ValueError(f"Unsupported type: '{_go_kind(value)}'")


def parse_think(value: Any) -> tuple[bool | str | None, str | None]:
    if value is None or isinstance(value, bool):
        return value, None
    if isinstance(value, str):
        if value in _THINK_LEVELS:
            return value, None
        return None, f'invalid think value: "{value}" (must be "high", "medium", "low", "max", true, or false)'
    return None, f"think must be a boolean or string {_THINK_CHOICES}"


def _options(options: dict) -> tuple[int | None, list[str], str | None]:
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


def _template(spec: ModelSpec) -> str:
    if spec.template is not None:
        return spec.template
    if not spec.supports_system_role:  # Gemma-style: no .System, system text folds into the user turn
        return ("{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
                "{{- if or (eq .Role \"user\") (eq .Role \"system\") }}<start_of_turn>user\n{{ .Content }}<end_of_turn>\n"
                "{{ if $last }}<start_of_turn>model\n{{ end }}{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n"
                "{{ .Content }}{{ if not $last }}<end_of_turn>\n{{ end }}{{- end }}{{- end }}")
    tools = "{{- if .Tools }}Available tools: {{ range .Tools }}{{ . }}{{ end }}\n{{ end }}" if spec.has("tools") else ""
    think = "{{- if .Think }}<think>{{ end }}" if spec.has("thinking") else ""
    return ("{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}" + tools +
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n" + think)


def _details(spec: ModelSpec) -> dict[str, Any]:
    return {"parent_model": "", "format": "gguf", "family": spec.family, "families": [spec.family],
            "parameter_size": spec.parameter_size, "quantization_level": spec.quantization}


def _metrics(**values: int) -> dict[str, int]:
    return {k: v for k, v in values.items() if v}  # Go's omitempty drops zeros


def _tool_call(index: int, call: dict) -> dict[str, Any]:
    call_id = "call_" + "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(8))
    return {"id": call_id, "function": {"index": index, "name": call["name"], "arguments": call["arguments"]}}


@dataclass
class _Job:
    """Everything a generation needs, fixed when the request was accepted."""

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


class SimOllama(SimBase):
    """An Ollama node: ``SimOllama(models=[ModelSpec(...)]).start()``; see the package docs."""

    def __init__(self, models: list[ModelSpec] | None = None, behavior: Behavior | None = None,
                 host: str = "127.0.0.1", port: int = 0, version: str = "0.12.3") -> None:
        self.models: list[ModelSpec] = list(models) if models is not None else default_models()
        self.version = version
        self._loaded: dict[str, float] = {}  # canonical name -> expiry (epoch seconds)
        self._modified: dict[str, int] = {}  # canonical name -> modified_at (epoch ns)
        super().__init__(behavior, host, port)

    # ----------------------------------------------------------- routing

    def _routes(self) -> list[Route]:
        return [
            Route("/", self._root, methods=["GET", "HEAD"]),
            Route("/api/version", self._version, methods=["GET", "HEAD"]),
            Route("/api/tags", self._tags, methods=["GET", "HEAD"]),
            Route("/api/ps", self._ps, methods=["GET"]),
            Route("/api/show", self._show, methods=["POST"]),
            Route("/api/chat", self._chat, methods=["POST"]),
            Route("/api/generate", self._generate, methods=["POST"]),
            Route("/api/embed", self._embed, methods=["POST"]),
            Route("/api/embeddings", self._embeddings, methods=["POST"]),
            Route("/api/pull", self._pull, methods=["POST"]),
            Route("/api/delete", self._delete, methods=["DELETE"]),
            Route("/api/copy", self._copy, methods=["POST"]),
        ]

    def _exception_handlers(self) -> dict:
        async def not_found(request: Request, exc: Exception) -> Response:
            # gin answers unknown paths and wrong methods alike with this text.
            return PlainTextResponse("404 page not found", status_code=404)
        return {404: not_found, 405: not_found}

    # ----------------------------------------------------------- model registry

    def find(self, name: str) -> ModelSpec | None:
        """The installed model ``name`` resolves to (``x`` means ``x:latest``), or None."""
        wanted = canonical_name(name)
        return next((m for m in list(self.models) if canonical_name(m.name) == wanted), None)

    def _modified_ns(self, spec: ModelSpec) -> int:
        return self._modified.setdefault(canonical_name(spec.name), time.time_ns())

    def _mark_loaded(self, spec: ModelSpec, keep_alive: float | None) -> None:
        seconds = _KEEP_ALIVE_DEFAULT_S if keep_alive is None else keep_alive
        self._loaded[canonical_name(spec.name)] = time.time() + (_FOREVER_S if seconds < 0 else seconds)

    def _unload(self, spec: ModelSpec) -> None:
        self._loaded.pop(canonical_name(spec.name), None)

    def _read(self, request: Request, struct: str) -> tuple[dict | None, Response | None]:
        body, parse_error = request_json(request)
        if parse_error is not None:
            return None, error(400, parse_error)
        if body is None:
            return None, error(400, "missing request body")
        if not isinstance(body, dict):
            return None, error(400, _bind_error(body, struct))
        return body, None

    # ----------------------------------------------------------- simple endpoints

    async def _root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def _version(self, request: Request) -> Response:
        return ORJSONResponse({"version": self.version}, media_type=JSON)

    async def _tags(self, request: Request) -> Response:
        rows = []
        for spec in list(self.models):
            shown = display_name(spec.name)
            rows.append((self._modified_ns(spec), {
                "name": shown, "model": shown, "modified_at": rfc3339(self._modified_ns(spec)),
                "size": spec.size, "digest": spec.digest, "details": _details(spec)}))
        rows.sort(key=lambda row: row[0], reverse=True)  # most recently modified first, like Ollama
        return ORJSONResponse({"models": [row for _, row in rows]}, media_type=JSON)

    async def _ps(self, request: Request) -> Response:
        now = time.time()
        running = []
        for spec in list(self.models):
            expires = self._loaded.get(canonical_name(spec.name))
            if expires is None or expires <= now:
                continue
            shown = display_name(spec.name)
            running.append((expires, {
                "name": shown, "model": shown, "size": spec.size, "digest": spec.digest, "details": _details(spec),
                "expires_at": rfc3339(int(expires * 1e9)), "size_vram": spec.size, "context_length": spec.context_length}))
        running.sort(key=lambda row: row[0], reverse=True)
        return ORJSONResponse({"models": [row for _, row in running]}, media_type=JSON)

    async def _show(self, request: Request) -> Response:
        body, failure = self._read(request, "ShowRequest")
        if failure:
            return failure
        name = body.get("model") or body.get("name")
        if not name:
            return error(400, "model is required")
        spec = self.find(str(name))
        if spec is None:
            return error(404, f"model '{name}' not found")
        template = _template(spec)
        stops = '"<end_of_turn>"' if not spec.supports_system_role else '"<|eot_id|>"'
        parameters = f"{'stop':<30} {stops}\n{'temperature':<30} 0.6"
        modelfile = (f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace FROM with:\n'
                     f"# FROM {display_name(spec.name)}\n\nFROM /root/.ollama/models/blobs/sha256-{spec.digest}\n"
                     f'TEMPLATE """{template}"""\nPARAMETER stop {stops}\nPARAMETER temperature 0.6\n')
        width = spec.embedding_dim if spec.has("embedding") else 4096
        model_info = {"general.architecture": spec.family, "general.file_type": 15,
                      "general.parameter_count": _parameter_count(spec.parameter_size),
                      "general.quantization_version": 2, f"{spec.family}.context_length": spec.context_length,
                      f"{spec.family}.embedding_length": width, f"{spec.family}.block_count": 32}
        return ORJSONResponse({
            "license": "", "modelfile": modelfile, "parameters": parameters, "template": template,
            "details": _details(spec), "model_info": model_info, "capabilities": list(spec.capabilities),
            "modified_at": rfc3339(self._modified_ns(spec))}, media_type=JSON)

    async def _pull(self, request: Request) -> Response:
        body, failure = self._read(request, "PullRequest")
        if failure:
            return failure
        name = body.get("model") or body.get("name")
        if not name or not isinstance(name, str):
            return error(400, "invalid model name")
        spec = self.find(name) or guess_spec(display_name(name))
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        for layer, total in ((spec.digest, spec.size), (_layer_digest(spec, "template"), 1_481),
                             (_layer_digest(spec, "params"), 96)):
            progress = {"status": f"pulling {layer[:12]}", "digest": f"sha256:{layer}", "total": total}
            lines += [progress, {**progress, "completed": total // 2}, {**progress, "completed": total}]
        lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
        if self.find(name) is None:
            self.models.append(spec)
            self._modified[canonical_name(spec.name)] = time.time_ns()
        if body.get("stream") is False:
            return ORJSONResponse(lines[-1], media_type=JSON)
        return Response(b"".join(orjson.dumps(line) + b"\n" for line in lines), media_type=NDJSON)

    async def _delete(self, request: Request) -> Response:
        body, failure = self._read(request, "DeleteRequest")
        if failure:
            return failure
        name = body.get("model") or body.get("name") or ""
        if not name:
            return error(400, f'name "{name}" is invalid')
        spec = self.find(name)
        if spec is None:
            return error(404, f"model '{name}' not found")
        self.models[:] = [m for m in self.models if m is not spec]
        self._unload(spec)
        return Response(status_code=200)

    async def _copy(self, request: Request) -> Response:
        body, failure = self._read(request, "CopyRequest")
        if failure:
            return failure
        source, destination = body.get("source") or "", body.get("destination") or ""
        if not destination:
            return error(400, f'destination "{destination}" is invalid')
        spec = self.find(source) if source else None
        if spec is None:
            return error(404, f'model "{source}" not found')
        existing = self.find(destination)
        if existing is not None:
            self.models[:] = [m for m in self.models if m is not existing]
        self.models.append(dataclasses.replace(spec, name=display_name(destination)))
        self._modified[canonical_name(destination)] = time.time_ns()
        return Response(status_code=200)

    # ----------------------------------------------------------- chat / generate

    def _thinking(self, spec: ModelSpec, model: str, think: bool | str | None, behavior: Behavior) -> tuple[str | None, Response | None]:
        if spec.has("thinking"):
            enabled = True if think is None else bool(think)  # omitted means on, like Ollama
            return (behavior.thinking or DEFAULT_THINKING) if enabled else None, None
        if think:
            return None, error(400, f'"{model}" does not support thinking')
        return None, None

    async def _chat(self, request: Request) -> Response:
        started = time.time_ns()
        body, failure = self._read(request, "ChatRequest")
        if failure:
            return failure
        behavior = self._snapshot()
        type_error = _field_error(body, "ChatRequest", _CHAT_FIELDS)
        if type_error:
            return error(400, type_error)
        think, think_error = parse_think(body.get("think"))
        if think_error:
            return error(400, think_error)
        top_logprobs = body.get("top_logprobs") or 0
        if not 0 <= top_logprobs <= 20:
            return error(400, "top_logprobs must be between 0 and 20")
        model = body.get("model") or ""
        if not model:
            return error(400, "model is required")
        spec = self.find(model)
        if spec is None:
            return error(404, f"model '{model}' not found")
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            return error(400, str(exc))
        messages = body.get("messages") or []
        for message in messages:
            if not isinstance(message, dict):
                return error(400, f"json: cannot unmarshal {_go_kind(message)} into Go struct field ChatRequest.messages of type api.Message")
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                return error(400, f"json: cannot unmarshal {_go_kind(content)} into Go struct field Message.messages.content of type string")
        if not messages and keep_alive == 0:
            self._unload(spec)
            return self._control_reply("chat", model, "unload")
        thinking, think_failure = self._thinking(spec, model, think, behavior)
        if think_failure:
            return think_failure
        if not spec.has("completion"):
            return error(400, f'"{model}" does not support chat')
        tools = body.get("tools") or []
        if tools and not spec.has("tools"):
            return error(400, f"{full_name(spec.name)} does not support tools")
        options = body.get("options") or {}
        num_predict, stop, option_error = _options(options)
        if option_error:
            return error(500, option_error)  # Ollama reports option errors from its scheduler as 500
        self._mark_loaded(spec, keep_alive)
        if not messages:
            return self._control_reply("chat", model, "load")
        if any(m.get("images") for m in messages) and not spec.has("vision"):
            return error(400, _IMAGES_UNSUPPORTED)
        fmt = body.get("format")
        if isinstance(fmt, str) and fmt not in ("", "json"):
            return error(400, 'invalid format: expected "json" or a valid JSON schema')

        texts = [m.get("content") or "" for m in messages]
        user_texts = [m.get("content") or "" for m in messages if str(m.get("role", "")).lower() == "user"]
        reply = compose_reply(
            behavior, last_user=(user_texts or texts or [""])[-1], prompt_tokens=count_prompt_tokens(texts, len(messages)),
            thinking=thinking, tools_offered=bool(tools), json_mode=fmt == "json",
            json_schema=fmt if isinstance(fmt, dict) else None, max_tokens=num_predict, stop=stop)
        job = _Job("chat", model, behavior, self._take_failure(), reply, body.get("stream") is not False,
                   bool(body.get("logprobs")), top_logprobs, None, started)
        return Generation(self, lambda out: self._run(job, out))

    async def _generate(self, request: Request) -> Response:
        started = time.time_ns()
        body, failure = self._read(request, "GenerateRequest")
        if failure:
            return failure
        behavior = self._snapshot()
        type_error = _field_error(body, "GenerateRequest", _GENERATE_FIELDS)
        if type_error:
            return error(400, type_error)
        think, think_error = parse_think(body.get("think"))
        if think_error:
            return error(400, think_error)
        top_logprobs = body.get("top_logprobs") or 0
        if not 0 <= top_logprobs <= 20:
            return error(400, "top_logprobs must be between 0 and 20")
        model = body.get("model") or ""
        spec = self.find(model) if model else None
        if spec is None:
            return error(404, f"model '{model}' not found")
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            return error(400, str(exc))
        prompt, system, suffix = body.get("prompt") or "", body.get("system") or "", body.get("suffix") or ""
        raw = bool(body.get("raw"))
        if not prompt and keep_alive == 0:
            self._unload(spec)
            return self._control_reply("generate", model, "unload")
        if raw and (body.get("template") or system or body.get("context")):
            return error(400, "raw mode does not support template, system, or context")
        thinking, think_failure = self._thinking(spec, model, think, behavior)
        if think_failure:
            return think_failure
        if not spec.has("completion"):
            return error(400, f'"{model}" does not support generate')
        if suffix and not spec.has("insert"):
            return error(400, f"{full_name(spec.name)} does not support insert")
        num_predict, stop, option_error = _options(body.get("options") or {})
        if option_error:
            return error(500, option_error)
        self._mark_loaded(spec, keep_alive)
        if not prompt:
            return self._control_reply("generate", model, "load")
        if body.get("images") and not spec.has("vision"):
            return error(400, _IMAGES_UNSUPPORTED)
        fmt = body.get("format")
        if isinstance(fmt, str) and fmt not in ("", "json"):
            return error(400, 'invalid format: expected "json" or a valid JSON schema')

        reply = compose_reply(
            behavior, last_user=prompt, prompt_tokens=count_prompt_tokens([system, prompt, suffix], 2 if system else 1),
            thinking=thinking, json_mode=fmt == "json", json_schema=fmt if isinstance(fmt, dict) else None,
            max_tokens=num_predict, stop=stop)
        context = None if raw else token_ids(system + " " + prompt) + token_ids(reply.text)
        job = _Job("generate", model, behavior, self._take_failure(), reply, body.get("stream") is not False,
                   bool(body.get("logprobs")), top_logprobs, context, started)
        return Generation(self, lambda out: self._run(job, out))

    def _control_reply(self, endpoint: str, model: str, reason: str) -> Response:
        line: dict[str, Any] = {"model": model, "created_at": rfc3339()}
        if endpoint == "chat":
            line["message"] = {"role": "assistant", "content": ""}
        else:
            line["response"] = ""
        line.update(done=True, done_reason=reason)
        return ORJSONResponse(line, media_type=JSON)

    def _piece(self, job: _Job, kind: str, value: Any) -> dict[str, Any]:
        line: dict[str, Any] = {"model": job.model, "created_at": rfc3339()}
        if job.endpoint == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": value if kind == "content" else ""}
            if kind == "thinking":
                message["thinking"] = value
            elif kind == "tool_call":
                message["tool_calls"] = [_tool_call(*value)]
            line["message"] = message
        else:
            line["response"] = value if kind == "content" else ""
            if kind == "thinking":
                line["thinking"] = value
        line["done"] = False
        if job.logprobs and kind in ("content", "thinking"):
            entry = token_logprob(value, job.top_logprobs)
            if not entry["top_logprobs"]:
                del entry["top_logprobs"]  # omitempty
            line["logprobs"] = [entry]
        return line

    def _final(self, job: _Job, timings: tuple[int, int, int], logprobs: list[dict]) -> dict[str, Any]:
        loaded_ns, first_ns, now = timings
        reply = job.reply
        line: dict[str, Any] = {"model": job.model, "created_at": rfc3339()}
        if job.endpoint == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": "" if job.stream else reply.text}
            if not job.stream and reply.thinking:
                message["thinking"] = reply.thinking_text
            if not job.stream and reply.tool_calls:
                message["tool_calls"] = [_tool_call(i, c) for i, c in enumerate(reply.tool_calls)]
            line["message"] = message
        else:
            line["response"] = "" if job.stream else reply.text
            if not job.stream and reply.thinking:
                line["thinking"] = reply.thinking_text
        line.update(done=True, done_reason=reply.finish_reason)
        if job.context is not None:
            line["context"] = job.context
        eval_count = reply.completion_tokens
        line.update(_metrics(
            total_duration=max(now - job.started_ns, 1), load_duration=max(loaded_ns - job.started_ns, 1),
            prompt_eval_count=reply.prompt_tokens, prompt_eval_duration=max(first_ns - loaded_ns, 1),
            eval_count=eval_count, eval_duration=max(now - first_ns, 1) if eval_count else 0))
        if logprobs:
            line["logprobs"] = logprobs
        return line

    async def _run(self, job: _Job, out: Output) -> bool:
        if await self._fail_early(job.failure, job.model, out):
            return False
        loaded_ns = time.time_ns()
        first_ns: int | None = None
        sent = 0
        logprobs: list[dict] = []
        async for (kind, value), _last in paced(job.reply.events(), job.behavior):
            if job.failure in MID_STREAM_FAILURES and sent >= job.behavior.fail_after_chunks:
                return await self._fail_mid_stream(job, out)
            first_ns = first_ns or time.time_ns()
            line = self._piece(job, kind, value)
            if job.stream:
                if not out.started:
                    await out.start(200, NDJSON)
                await out.write(orjson.dumps(line) + b"\n")
            else:
                logprobs.extend(line.get("logprobs", ()))
            sent += 1
        if job.failure in MID_STREAM_FAILURES:
            return await self._fail_mid_stream(job, out)
        now = time.time_ns()
        final = self._final(job, (loaded_ns, first_ns or now, now), logprobs)
        if job.stream:
            if not out.started:
                await out.start(200, NDJSON)
            await out.finish(orjson.dumps(final) + b"\n")
        else:
            await out.respond_json(200, final, JSON)
        return True

    async def _fail_early(self, failure: str | None, model: str, out: Output) -> bool:
        """Failures that strike before any output; True when one did."""
        if failure == "http_500":
            await out.respond_json(500, {"error": "llama runner process has terminated: exit status 2"}, JSON)
        elif failure == "busy":
            await out.respond_json(503, {"error": "server busy, please try again.  maximum pending requests exceeded"}, JSON)
        elif failure == "not_found":
            await out.respond_json(404, {"error": f"model '{model}' not found"}, JSON)
        elif failure == "hang":
            await hang_forever()
        else:
            return False
        return True

    async def _fail_mid_stream(self, job: _Job, out: Output) -> bool:
        if job.failure == "die_mid_stream":
            out.abort()
        elif out.started:  # status already 200: the error travels as one last NDJSON line
            await out.finish(orjson.dumps({"error": _MID_STREAM_ERROR}) + b"\n")
        else:
            await out.respond_json(500, {"error": _MID_STREAM_ERROR}, JSON)
        return False

    # ----------------------------------------------------------- embeddings

    def _embedding_model(self, model: str) -> tuple[ModelSpec | None, Response | None]:
        if not model:
            return None, error(400, "model is required")
        spec = self.find(model)
        if spec is None:
            return None, error(404, f"model '{model}' not found")
        if not spec.has("embedding"):
            # The runner refuses with 501 (seen from real servers; the API layer does not pre-check).
            return None, error(501, "this model does not support embeddings")
        return spec, None

    async def _embed(self, request: Request) -> Response:
        started = time.time_ns()
        body, failure = self._read(request, "EmbedRequest")
        if failure:
            return failure
        behavior = self._snapshot()
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            inputs = [raw_input] if raw_input else []
        elif isinstance(raw_input, list):
            if not all(isinstance(item, str) for item in raw_input):
                return error(400, "invalid input type")
            inputs = list(raw_input)
        elif raw_input is None:
            inputs = []
        else:
            return error(400, "invalid input type")
        model = body.get("model") or ""
        spec, refusal = self._embedding_model(model)
        if refusal:
            return refusal
        self._mark_loaded(spec, _keep_alive_or_default(body.get("keep_alive")))
        if not inputs:
            return ORJSONResponse({"model": model, "embeddings": []}, media_type=JSON)
        counts = [count_words(text) + 2 for text in inputs]  # + BOS/EOS
        if body.get("truncate") is False and max(counts) > spec.context_length:
            return error(400, "the input length exceeds the context length")
        dimensions = body.get("dimensions") or 0

        def vector(text: str) -> list[float]:
            values = embedding(text, spec.embedding_dim)
            return l2_normalize(values[:dimensions]) if 0 < dimensions < len(values) else values

        def respond(loaded_ns: int) -> dict[str, Any]:
            return {"model": model, "embeddings": [vector(t) for t in inputs],
                    **_metrics(total_duration=max(time.time_ns() - started, 1),
                               load_duration=max(loaded_ns - started, 1), prompt_eval_count=sum(counts))}

        failure_mode = self._take_failure()
        return Generation(self, lambda out: self._run_single(model, behavior, failure_mode, out, respond))

    async def _embeddings(self, request: Request) -> Response:
        body, failure = self._read(request, "EmbeddingRequest")
        if failure:
            return failure
        behavior = self._snapshot()
        spec, refusal = self._embedding_model(body.get("model") or "")
        if refusal:
            return refusal
        self._mark_loaded(spec, _keep_alive_or_default(body.get("keep_alive")))
        prompt = body.get("prompt") or ""
        if not prompt:
            return ORJSONResponse({"embedding": []}, media_type=JSON)

        def respond(loaded_ns: int) -> dict[str, Any]:
            return {"embedding": embedding(prompt, spec.embedding_dim, normalize=False)}

        failure_mode = self._take_failure()
        return Generation(self, lambda out: self._run_single(body["model"], behavior, failure_mode, out, respond))

    async def _run_single(self, model: str, behavior: Behavior, failure: str | None, out: Output,
                          build: Callable[[int], dict[str, Any]]) -> bool:
        """A one-shot (non-streaming) generation: failures, then ttft, then the body."""
        if await self._fail_early(failure, model, out):
            return False
        loaded_ns = time.time_ns()
        async for _ in paced([None], behavior):
            pass
        if failure == "die_mid_stream":
            out.abort()
            return False
        if failure == "error_mid_stream":
            await out.respond_json(500, {"error": _MID_STREAM_ERROR}, JSON)
            return False
        await out.respond_json(200, build(loaded_ns), JSON)
        return True


def _keep_alive_or_default(value: Any) -> float:
    try:
        return parse_keep_alive(value)
    except ValueError:
        return _KEEP_ALIVE_DEFAULT_S


def _layer_digest(spec: ModelSpec, layer: str) -> str:
    return hashlib.sha256(f"{spec.digest}:{layer}".encode()).hexdigest()


def _parameter_count(size: str) -> int:
    match = re.fullmatch(r"([0-9.]+)\s*([KMB]?)", size.strip().upper())
    if not match:
        return 0
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[match.group(2)]
    return int(float(match.group(1)) * scale)
