"""A simulated vLLM node: the OpenAI-compatible server of ``vllm serve``.

Shapes follow vLLM ~0.10/0.11 (reference section C): non-stream bodies are
``model_dump()``-style with every key present, stream chunks are
``exclude_unset``-style, the finish reason rides on the chunk with the last
token, errors are the nested ``{"error": {message, type, param, code}}`` form
with an integer code, and validation failures are 400 rather than 422.
Rendering lives in :mod:`.vllm_render`, restarts in :mod:`.vllm_restart`.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from .behavior import (
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
)
from .core import Generation, ORJSONResponse, Output, SimBase, paced, request_json
from .vllm_render import VLLMJob, VLLMRendering
from .vllm_restart import Restartable
from .vllm_wire import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    check_types,
    embedding_inputs,
    json_request,
    parse_prompts,
    stops,
    text_of,
    validation_error,
    verror,
)


class SimVLLM(VLLMRendering, Restartable, SimBase):
    """A vLLM node serving one model under one or more names; ``restart()`` switches it to another."""

    def __init__(
        self,
        model: str = "Qwen/Qwen2.5-7B-Instruct",
        served_model_names: list[str] | None = None,
        behavior: Behavior | None = None,
        api_key: str | None = None,
        supports_system_role: bool = True,
        max_model_len: int = 32768,
        embedding: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        version: str = "0.11.0",
        embedding_dim: int = 768,
        stream_usage: bool = True,
        max_num_seqs: int = 256,
        llamacpp: bool = False,
    ) -> None:
        self.model = model
        # True: behave like llama.cpp's server where the proxy cares: no usage in streams, and its
        # /apply-template and {"content"} form of /tokenize.
        self.llamacpp = llamacpp
        stream_usage = stream_usage and not llamacpp
        # /metrics: generations beyond max_num_seqs count as waiting; `extra_waiting` and
        # `kv_cache_usage` (None: running / max_num_seqs) let a test script another client's load.
        self.max_num_seqs = max_num_seqs
        self.extra_waiting = 0
        self.kv_cache_usage: float | None = None
        # False: ignore stream_options.include_usage, as llama.cpp's server does (no usage chunk).
        self.stream_usage = stream_usage
        self.served_model_names = list(served_model_names or [model])
        self.api_key = api_key
        self.supports_system_role = supports_system_role
        self.max_model_len = max_model_len
        self.embedding = embedding
        self.embedding_dim = embedding_dim
        self.version = version
        self._init_restarts()
        super().__init__(behavior, host, port)

    @property
    def models(self) -> list[ModelSpec]:
        """The served names as specs (read-only view; vLLM cannot load models at runtime)."""
        caps = ("embedding",) if self.embedding else ("completion", "tools")
        return [
            ModelSpec(
                name,
                caps,
                context_length=self.max_model_len,
                root=self.model,
                supports_system_role=self.supports_system_role,
                embedding_dim=self.embedding_dim,
            )
            for name in self.served_model_names
        ]

    # ----------------------------------------------------------- routing

    def _control_routes(self) -> list[Route]:
        return [*super()._control_routes(), Route("/_sim/restart", self._post_restart, methods=["POST"])]

    def _routes(self) -> list[Route]:
        return [
            Route("/health", self._health, methods=["GET"]),
            Route("/ping", self._health, methods=["GET", "POST"]),
            Route("/version", self._version, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
            Route("/tokenize", self._tokenize, methods=["POST"]),
            *([Route("/apply-template", self._apply_template, methods=["POST"])] if self.llamacpp else []),
            Route("/v1/models", self._list_models, methods=["GET"]),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/embeddings", self._embeddings, methods=["POST"]),
        ]

    def _exception_handlers(self) -> dict:
        async def http_error(request: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 404)
            detail = "Method Not Allowed" if status == 405 else "Not Found"
            return ORJSONResponse({"detail": detail}, status_code=status)  # FastAPI's default body

        return {404: http_error, 405: http_error}

    def _gate(self, scope: Scope) -> Response | None:
        if not self.api_key or scope["method"] == "OPTIONS" or not scope["path"].startswith("/v1"):
            return None
        headers = {k.lower(): v for k, v in scope["headers"]}
        if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}":
            return ORJSONResponse({"error": "Unauthorized"}, status_code=401)
        return None

    # ----------------------------------------------------------- simple endpoints

    async def _health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def _metrics(self, request: Request) -> Response:
        """The load gauges of vLLM's Prometheus endpoint (v1 engine names and labels), live."""
        active = self.active
        running = min(active, self.max_num_seqs)
        waiting = max(0, active - self.max_num_seqs) + self.extra_waiting
        kv = self.kv_cache_usage if self.kv_cache_usage is not None else running / self.max_num_seqs
        labels = f'{{engine="0",model_name="{self.model}"}}'
        gauges = (
            ("num_requests_running", "Number of requests in model execution batches.", running),
            ("num_requests_waiting", "Number of requests waiting to be processed.", waiting),
            ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv),
        )
        lines = []
        for name, help_text, value in gauges:
            lines += [f"# HELP vllm:{name} {help_text}", f"# TYPE vllm:{name} gauge"]
            lines.append(f"vllm:{name}{labels} {float(value)}")
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _tokenize(self, request: Request) -> Response:
        """vLLM's ``{prompt | messages}`` form, or llama.cpp's ``{content}``; counts agree with the usage."""
        body, failure = self._read(request)
        if failure:
            return failure
        if self.llamacpp and isinstance(body.get("content"), str):
            return ORJSONResponse({"tokens": token_ids(body["content"].strip())})
        messages = body.get("messages")
        if isinstance(messages, list):
            count = count_prompt_tokens([text_of(m.get("content")) for m in messages if isinstance(m, dict)],
                                        len(messages))  # fmt: skip
        elif isinstance(body.get("prompt"), str):
            count = count_words(body["prompt"])
        else:
            return validation_error("missing", ("prompt",), "Field required", body)
        return ORJSONResponse({"count": count, "max_model_len": self.max_model_len, "tokens": list(range(count)),
                               "token_strs": None})  # fmt: skip

    async def _apply_template(self, request: Request) -> Response:
        """llama.cpp: the chat template applied; four marker tokens per message, as the sim's usage counts."""
        body, failure = self._read(request)
        if failure:
            return failure
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        prompt = "".join(
            f"<|start|> {m.get('role', 'user')} <|sep|> {text_of(m.get('content'))} <|end|>\n"
            for m in messages
            if isinstance(m, dict)
        )
        return ORJSONResponse({"prompt": prompt})

    async def _version(self, request: Request) -> Response:
        return ORJSONResponse({"version": self.version})

    async def _list_models(self, request: Request) -> Response:
        now = int(time.time())
        cards = [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": self.model,
                "parent": None,
                "max_model_len": self.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{uuid.uuid4().hex}",
                        "object": "model_permission",
                        "created": now,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in self.served_model_names
        ]
        return ORJSONResponse({"object": "list", "data": cards})

    # ----------------------------------------------------------- request checks

    def _read(self, request: Request) -> tuple[dict | None, Response | None]:
        body, parse_error = request_json(request)
        if parse_error is not None:
            return None, validation_error("json_invalid", (0,), "JSON decode error", {})
        if not isinstance(body, dict):
            return None, validation_error(
                "model_attributes_type", (), "Input should be a valid dictionary or object to extract fields from", body
            )
        return body, None

    def _resolve_model(self, body: dict) -> tuple[str, Response | None]:
        requested = body.get("model")
        if requested in (None, ""):
            return self.served_model_names[0], None
        if requested not in self.served_model_names:
            return "", verror(404, f"The model `{requested}` does not exist.", "NotFoundError", "model")
        return requested, None

    def _sampling_checks(self, body: dict, prompt_tokens: int, max_tokens: int | None) -> Response | None:
        if body.get("stream_options") is not None and not body.get("stream"):
            return verror(400, "Stream options can only be defined when `stream=True`.")
        if max_tokens is not None and max_tokens < 1:
            return verror(400, f"max_tokens must be at least 1, got {max_tokens}.")
        if body.get("n") is not None and body["n"] < 1:
            return verror(400, f"n must be at least 1, got {body['n']}.")
        requested = prompt_tokens + (max_tokens or 0)
        if prompt_tokens > self.max_model_len or requested > self.max_model_len:
            return verror(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {requested} tokens ({prompt_tokens} in the messages, {max_tokens or 0} in "
                "the completion). Please reduce the length of the messages or completion.",
            )
        return None

    def _usage_flags(self, body: dict) -> tuple[bool, bool]:
        options = body.get("stream_options")
        if not isinstance(options, dict) or not body.get("stream") or not self.stream_usage:
            return False, False
        include = options.get("include_usage", True) is not False  # defaults to true once the object is sent
        return include, include and bool(options.get("continuous_usage_stats"))

    # ----------------------------------------------------------- chat

    async def _chat(self, request: Request) -> Response:
        body, failure = self._read(request)
        if failure:
            return failure
        behavior = self._snapshot()
        if (bad := check_types(body, CHAT_FIELDS)) is not None:
            return bad
        messages = body.get("messages")
        if messages is None:
            return validation_error("missing", ("messages",), "Field required", body)
        if not isinstance(messages, list):
            return validation_error("list_type", ("messages",), "Input should be a valid list", messages)
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                return validation_error("missing", ("messages", i, "role"), "Field required", message)
        model, missing = self._resolve_model(body)
        if missing:
            return missing
        if self.embedding:
            return verror(400, "The model does not support Chat Completions API")
        top_logprobs = body.get("top_logprobs")
        if top_logprobs is not None:
            if top_logprobs < 0:
                return verror(400, "`top_logprobs` must be a positive value.")
            if top_logprobs > 0 and not body.get("logprobs"):
                return verror(400, "when using `top_logprobs`, `logprobs` must be set to true.")
        tools = body.get("tools") or []
        tool_choice = body.get("tool_choice")
        if tool_choice not in (None, "none") and not tools:
            return verror(400, "When using `tool_choice`, `tools` must be set.")
        if not self.supports_system_role and any(m.get("role") == "system" for m in messages):
            # Gemma-style chat templates raise this from Jinja; vLLM maps it to a 400.
            return verror(400, "System role not supported")
        texts = [text_of(m.get("content")) for m in messages]
        prompt_tokens = count_prompt_tokens(texts, len(messages))
        max_tokens = body.get("max_completion_tokens")
        max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
        if (bad := self._sampling_checks(body, prompt_tokens, max_tokens)) is not None:
            return bad

        kwargs = body.get("chat_template_kwargs")
        thinking_off = isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False
        thinking = None if thinking_off else behavior.thinking
        function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        named = function.get("name") if isinstance(function, dict) else None
        if named and behavior.tool_calls:
            calls = [c for c in behavior.tool_calls if c.get("name") == named]
            behavior.tool_calls = calls or [
                {"name": named, "arguments": dict(behavior.tool_calls[0].get("arguments") or {})}
            ]
        user_texts = [text_of(m.get("content")) for m in messages if m.get("role") == "user"]
        schema, json_mode = json_request(body)
        reply = compose_reply(
            behavior,
            last_user=(user_texts or texts or [""])[-1],
            prompt_tokens=prompt_tokens,
            thinking=thinking,
            tools_offered=bool(tools) and tool_choice != "none",
            json_mode=json_mode,
            json_schema=schema,
            max_tokens=max_tokens,
            stop=stops(body),
        )
        include_usage, continuous = self._usage_flags(body)
        job = VLLMJob(
            "chat",
            model,
            behavior,
            self._take_failure(),
            [reply] * (body.get("n") or 1),
            bool(body.get("stream")),
            prompt_tokens,
            include_usage,
            continuous,
            (top_logprobs or 0) if body.get("logprobs") else None,
            "stop" if named else "tool_calls",
        )
        runner = self._stream if job.stream else self._respond
        return Generation(self, lambda out: runner(job, out))

    # ----------------------------------------------------------- completions

    async def _completions(self, request: Request) -> Response:
        body, failure = self._read(request)
        if failure:
            return failure
        behavior = self._snapshot()
        if (bad := check_types(body, COMPLETION_FIELDS)) is not None:
            return bad
        prompts = parse_prompts(body.get("prompt"))
        if prompts is None:
            if "prompt" not in body:
                return validation_error("missing", ("prompt",), "Field required", body)
            return validation_error("string_type", ("prompt",), "Input should be a valid string", body.get("prompt"))
        model, missing = self._resolve_model(body)
        if missing:
            return missing
        if self.embedding:
            return verror(400, "The model does not support Completions API")
        max_tokens = body.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        schema, json_mode = json_request(body)
        replies: list[Reply] = []
        for text, tokens in prompts:
            if (bad := self._sampling_checks(body, tokens, max_tokens)) is not None:
                return bad
            reply = compose_reply(
                behavior,
                last_user=text,
                prompt_tokens=tokens,
                json_mode=json_mode,
                json_schema=schema,
                max_tokens=max_tokens,
                stop=stops(body),
            )
            replies += [reply] * (body.get("n") or 1)
        include_usage, continuous = self._usage_flags(body)
        job = VLLMJob(
            "completion",
            model,
            behavior,
            self._take_failure(),
            replies,
            bool(body.get("stream")),
            sum(tokens for _, tokens in prompts),
            include_usage,
            continuous,
            body.get("logprobs"),
        )
        runner = self._stream if job.stream else self._respond
        return Generation(self, lambda out: runner(job, out))

    # ----------------------------------------------------------- embeddings

    async def _embeddings(self, request: Request) -> Response:
        started = time.time()
        body, failure = self._read(request)
        if failure:
            return failure
        behavior = self._snapshot()
        model, missing = self._resolve_model(body)
        if missing:
            return missing
        if not self.embedding:
            return verror(400, "The model does not support Embeddings API")
        if "input" not in body:
            return validation_error("missing", ("input",), "Field required", body)
        inputs = embedding_inputs(body["input"])
        if inputs is None:
            return validation_error("string_type", ("input",), "Input should be a valid string", body["input"])
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            return validation_error(
                "literal_error", ("encoding_format",), "Input should be 'float' or 'base64'", encoding
            )
        dimensions = body.get("dimensions")
        if dimensions is not None and (
            isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
        ):
            return verror(400, "dimensions must be a positive integer")
        failure_mode = self._take_failure()

        def encode(vector: list[float]) -> Any:
            if encoding == "base64":
                return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            return vector

        async def run(out: Output) -> bool:
            job = VLLMJob("embedding", model, behavior, failure_mode, [], False)
            if await self._fail_early(job, out):
                return False
            async for _ in paced([None], behavior):
                pass
            if failure_mode in MID_STREAM_FAILURES:
                return await self._fail_mid_stream(job, out)
            data = []
            for index, (text, _tokens) in enumerate(inputs):
                vector = embedding(text, self.embedding_dim)
                if dimensions and dimensions < len(vector):
                    vector = l2_normalize(vector[:dimensions])
                data.append({"index": index, "object": "embedding", "embedding": encode(vector)})
            tokens = sum(t for _, t in inputs)
            await out.respond_json(
                200,
                {
                    "id": f"embd-{uuid.uuid4().hex}",
                    "object": "list",
                    "created": int(started),
                    "model": model,
                    "data": data,
                    "usage": {
                        "prompt_tokens": tokens,
                        "total_tokens": tokens,
                        "completion_tokens": 0,
                        "prompt_tokens_details": None,
                    },
                },
            )
            return True

        return Generation(self, run)
