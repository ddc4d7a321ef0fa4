"""A simulated Ollama node speaking the native ``/api/*`` protocol.

Field names, defaults, status codes and error texts follow the real server
(reference section A): streaming is on unless ``stream:false``, lines are
NDJSON, metrics are integer nanoseconds with Go's ``omitempty`` semantics, and
a model name without a tag means ``:latest``. Model management lives in
:mod:`.ollama_models`, pulls in :mod:`.ollama_pull`, the OpenAI-compatible
``/v1`` layer in :mod:`.ollama_openai` (built on the job builders here), wire
details in :mod:`.ollama_wire`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .behavior import (
    DEFAULT_THINKING,
    MID_STREAM_FAILURES,
    STALL_FAILURES,
    Behavior,
    ModelSpec,
    compose_reply,
    count_prompt_tokens,
    count_words,
    embedding,
    l2_normalize,
    token_ids,
    token_logprob,
)
from .core import Generation, ORJSONResponse, Output, SimBase, hang_forever, paced, stall
from .ollama_models import OllamaModels
from .ollama_openai import OllamaOpenAI
from .ollama_pull import OllamaPull
from .ollama_wire import (
    CHAT_FIELDS,
    GENERATE_FIELDS,
    IMAGES_UNSUPPORTED,
    JSON,
    MID_STREAM_ERROR,
    NDJSON,
    EmbedJob,
    GenerationJob,
    default_models,
    error,
    field_error,
    full_name,
    go_kind,
    guess_spec,
    metrics,
    native_error,
    parse_keep_alive,
    parse_think,
    rfc3339,
    sampling_options,
    tool_call,
)

__all__ = ["SimOllama", "default_models", "guess_spec"]


class SimOllama(OllamaOpenAI, OllamaPull, OllamaModels, SimBase):
    """An Ollama node: ``SimOllama(models=[ModelSpec(...)]).start()``; see the package docs.

    The native API is here; the OpenAI-compatible ``/v1`` layer, ``/api/pull``
    and model management are mixed in from their own modules.
    """

    def __init__(
        self,
        models: list[ModelSpec] | None = None,
        behavior: Behavior | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        version: str = "0.12.3",
    ) -> None:
        self.models: list[ModelSpec] = list(models) if models is not None else default_models()
        self.version = version
        self._loaded: dict[str, float] = {}  # canonical name -> expiry (epoch seconds)
        self._modified: dict[str, int] = {}  # canonical name -> modified_at (epoch ns)
        self._init_pulls()
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
            *self._openai_routes(),
        ]

    def _exception_handlers(self) -> dict:
        async def not_found(request: Request, exc: Exception) -> Response:
            # gin answers unknown paths and wrong methods alike with this text.
            return PlainTextResponse("404 page not found", status_code=404)

        return {404: not_found, 405: not_found}

    def reset(self) -> None:
        super().reset()
        self._reset_pull_stats()

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "pulls": self.pull_stats()}

    # ----------------------------------------------------------- simple endpoints

    async def _root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def _version(self, request: Request) -> Response:
        return ORJSONResponse({"version": self.version}, media_type=JSON)

    # ----------------------------------------------------------- chat / generate

    def _thinking(
        self, spec: ModelSpec, model: str, think: bool | str | None, behavior: Behavior
    ) -> tuple[str | None, Response | None]:
        if spec.has("thinking"):
            enabled = True if think is None else bool(think)  # omitted means on, like Ollama
            return (behavior.thinking or DEFAULT_THINKING) if enabled else None, None
        if think:
            return None, error(400, f'"{model}" does not support thinking')
        return None, None

    @staticmethod
    def _check_generation(body: dict, type_name: str, fields) -> tuple[Any, int, Response | None]:
        """The checks /api/chat and /api/generate share: field types, think, top_logprobs."""
        type_error = field_error(body, type_name, fields)
        if type_error:
            return None, 0, error(400, type_error)
        think, think_error = parse_think(body.get("think"))
        if think_error:
            return None, 0, error(400, think_error)
        top_logprobs = body.get("top_logprobs") or 0
        if not 0 <= top_logprobs <= 20:
            return None, 0, error(400, "top_logprobs must be between 0 and 20")
        return think, top_logprobs, None

    async def _chat(self, request: Request) -> Response:
        started = time.time_ns()
        body, failure = self._read(request, "ChatRequest")
        if failure:
            return failure
        job = self._chat_job(body, started)
        if isinstance(job, Response):
            return job
        return Generation(self, lambda out: self._run(job, out))

    def _chat_job(self, body: dict, started: int) -> GenerationJob | Response:
        """Validate a native chat body and compose its reply; a Response is an immediate answer."""
        behavior = self._snapshot()
        think, top_logprobs, invalid = self._check_generation(body, "ChatRequest", CHAT_FIELDS)
        if invalid:
            return invalid
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
                return error(
                    400,
                    f"json: cannot unmarshal {go_kind(message)} into Go struct field ChatRequest.messages of type api.Message",
                )
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                return error(
                    400,
                    f"json: cannot unmarshal {go_kind(content)} into Go struct field Message.messages.content of type string",
                )
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
        num_predict, stop, option_error = sampling_options(options)
        if option_error:
            return error(500, option_error)  # Ollama reports option errors from its scheduler as 500
        self._mark_loaded(spec, keep_alive)
        if not messages:
            return self._control_reply("chat", model, "load")
        if any(m.get("images") for m in messages) and not spec.has("vision"):
            return error(400, IMAGES_UNSUPPORTED)
        fmt = body.get("format")
        if isinstance(fmt, str) and fmt not in ("", "json"):
            return error(400, 'invalid format: expected "json" or a valid JSON schema')

        texts = [m.get("content") or "" for m in messages]
        user_texts = [m.get("content") or "" for m in messages if str(m.get("role", "")).lower() == "user"]
        reply = compose_reply(
            behavior,
            last_user=(user_texts or texts or [""])[-1],
            prompt_tokens=count_prompt_tokens(texts, len(messages)),
            thinking=thinking,
            tools_offered=bool(tools),
            json_mode=fmt == "json",
            json_schema=fmt if isinstance(fmt, dict) else None,
            max_tokens=num_predict,
            stop=stop,
        )
        return GenerationJob(
            "chat",
            model,
            behavior,
            self._take_failure(),
            reply,
            body.get("stream") is not False,
            bool(body.get("logprobs")),
            top_logprobs,
            None,
            started,
        )

    async def _generate(self, request: Request) -> Response:
        started = time.time_ns()
        body, failure = self._read(request, "GenerateRequest")
        if failure:
            return failure
        job = self._generate_job(body, started)
        if isinstance(job, Response):
            return job
        return Generation(self, lambda out: self._run(job, out))

    def _generate_job(self, body: dict, started: int) -> GenerationJob | Response:
        """Validate a native generate body and compose its reply; a Response is an immediate answer."""
        behavior = self._snapshot()
        think, top_logprobs, invalid = self._check_generation(body, "GenerateRequest", GENERATE_FIELDS)
        if invalid:
            return invalid
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
        num_predict, stop, option_error = sampling_options(body.get("options") or {})
        if option_error:
            return error(500, option_error)
        self._mark_loaded(spec, keep_alive)
        if not prompt:
            return self._control_reply("generate", model, "load")
        if body.get("images") and not spec.has("vision"):
            return error(400, IMAGES_UNSUPPORTED)
        fmt = body.get("format")
        if isinstance(fmt, str) and fmt not in ("", "json"):
            return error(400, 'invalid format: expected "json" or a valid JSON schema')

        reply = compose_reply(
            behavior,
            last_user=prompt,
            prompt_tokens=count_prompt_tokens([system, prompt, suffix], 2 if system else 1),
            thinking=thinking,
            json_mode=fmt == "json",
            json_schema=fmt if isinstance(fmt, dict) else None,
            max_tokens=num_predict,
            stop=stop,
        )
        context = None if raw else token_ids(system + " " + prompt) + token_ids(reply.text)
        return GenerationJob(
            "generate",
            model,
            behavior,
            self._take_failure(),
            reply,
            body.get("stream") is not False,
            bool(body.get("logprobs")),
            top_logprobs,
            context,
            started,
        )

    def _control_reply(self, endpoint: str, model: str, reason: str) -> Response:
        line: dict[str, Any] = {"model": model, "created_at": rfc3339()}
        if endpoint == "chat":
            line["message"] = {"role": "assistant", "content": ""}
        else:
            line["response"] = ""
        line.update(done=True, done_reason=reason)
        return ORJSONResponse(line, media_type=JSON)

    def _piece(self, job: GenerationJob, kind: str, value: Any) -> dict[str, Any]:
        line: dict[str, Any] = {"model": job.model, "created_at": rfc3339()}
        if job.endpoint == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": value if kind == "content" else ""}
            if kind == "thinking":
                message["thinking"] = value
            elif kind == "tool_call":
                message["tool_calls"] = [tool_call(*value)]
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

    def _final(self, job: GenerationJob, timings: tuple[int, int, int], logprobs: list[dict]) -> dict[str, Any]:
        loaded_ns, first_ns, now = timings
        reply = job.reply
        line: dict[str, Any] = {"model": job.model, "created_at": rfc3339()}
        if job.endpoint == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": "" if job.stream else reply.text}
            if not job.stream and reply.thinking:
                message["thinking"] = reply.thinking_text
            if not job.stream and reply.tool_calls:
                message["tool_calls"] = [tool_call(i, c) for i, c in enumerate(reply.tool_calls)]
            line["message"] = message
        else:
            line["response"] = "" if job.stream else reply.text
            if not job.stream and reply.thinking:
                line["thinking"] = reply.thinking_text
        line.update(done=True, done_reason=reply.finish_reason)
        if job.context is not None:
            line["context"] = job.context
        eval_count = reply.completion_tokens
        line.update(
            metrics(
                total_duration=max(now - job.started_ns, 1),
                load_duration=max(loaded_ns - job.started_ns, 1),
                prompt_eval_count=reply.prompt_tokens,
                prompt_eval_duration=max(first_ns - loaded_ns, 1),
                eval_count=eval_count,
                eval_duration=max(now - first_ns, 1) if eval_count else 0,
            )
        )
        if logprobs:
            line["logprobs"] = logprobs
        return line

    async def _run(self, job: GenerationJob, out: Output) -> bool:
        if await self._fail_early(job.failure, job.model, out):
            return False
        loaded_ns = time.time_ns()
        first_ns: int | None = None
        sent = 0
        logprobs: list[dict] = []
        async for (kind, value), _last in paced(job.reply.events(), job.behavior):
            if job.failure in MID_STREAM_FAILURES and sent >= job.behavior.fail_after_chunks:
                return await self._fail_mid_stream(job, out)
            if job.failure in STALL_FAILURES and job.stream and sent >= job.behavior.fail_after_chunks:
                break
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
        if job.failure in STALL_FAILURES and job.stream:  # after fail_after_chunks pieces, or all of a short reply
            if not out.started:
                await out.start(200, NDJSON)
            await stall(job.failure, job.behavior, out)
        now = time.time_ns()
        final = self._final(job, (loaded_ns, first_ns or now, now), logprobs)
        if job.stream:
            if not out.started:
                await out.start(200, NDJSON)
            await out.finish(orjson.dumps(final) + b"\n")
        else:
            await out.respond_json(200, final, JSON)
        return True

    async def _fail_early(
        self, failure: str | None, model: str, out: Output, shape: Callable[[int, str], dict] = native_error
    ) -> bool:
        """Failures that strike before any output; True when one did. ``shape`` renders the error body."""
        if failure == "http_500":
            await out.respond_json(500, shape(500, "llama runner process has terminated: exit status 2"), JSON)
        elif failure == "busy":
            await out.respond_json(
                503, shape(503, "server busy, please try again.  maximum pending requests exceeded"), JSON
            )
        elif failure == "not_found":
            await out.respond_json(404, shape(404, f"model '{model}' not found"), JSON)
        elif failure == "hang":
            await hang_forever()
        else:
            return False
        return True

    async def _fail_mid_stream(self, job: GenerationJob, out: Output) -> bool:
        if job.failure == "die_mid_stream":
            out.abort()
        elif out.started:  # status already 200: the error travels as one last NDJSON line
            await out.finish(orjson.dumps({"error": MID_STREAM_ERROR}) + b"\n")
        else:
            await out.respond_json(500, {"error": MID_STREAM_ERROR}, JSON)
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
        job = self._embed_job(body, started)
        if isinstance(job, Response):
            return job
        return Generation(self, lambda out: self._run_single(job.model, job.behavior, job.failure, out, job.build))

    def _embed_job(self, body: dict, started: int) -> EmbedJob | Response:
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
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            return error(400, str(exc))
        self._mark_loaded(spec, keep_alive)
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
            return {
                "model": model,
                "embeddings": [vector(t) for t in inputs],
                **metrics(
                    total_duration=max(time.time_ns() - started, 1),
                    load_duration=max(loaded_ns - started, 1),
                    prompt_eval_count=sum(counts),
                ),
            }

        return EmbedJob(model, behavior, self._take_failure(), respond)

    async def _embeddings(self, request: Request) -> Response:
        body, failure = self._read(request, "EmbeddingRequest")
        if failure:
            return failure
        behavior = self._snapshot()
        spec, refusal = self._embedding_model(body.get("model") or "")
        if refusal:
            return refusal
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            return error(400, str(exc))
        self._mark_loaded(spec, keep_alive)
        prompt = body.get("prompt") or ""
        if not prompt:
            return ORJSONResponse({"embedding": []}, media_type=JSON)

        def respond(loaded_ns: int) -> dict[str, Any]:
            return {"embedding": embedding(prompt, spec.embedding_dim, normalize=False)}

        failure_mode = self._take_failure()
        return Generation(self, lambda out: self._run_single(body["model"], behavior, failure_mode, out, respond))

    async def _run_single(
        self,
        model: str,
        behavior: Behavior,
        failure: str | None,
        out: Output,
        build: Callable[[int], dict[str, Any]],
        shape: Callable[[int, str], dict] = native_error,
    ) -> bool:
        """A one-shot (non-streaming) generation: failures, then ttft, then the body."""
        if await self._fail_early(failure, model, out, shape):
            return False
        loaded_ns = time.time_ns()
        async for _ in paced([None], behavior):
            pass
        if failure == "die_mid_stream":
            out.abort()
            return False
        if failure == "error_mid_stream":
            await out.respond_json(500, shape(500, MID_STREAM_ERROR), JSON)
            return False
        await out.respond_json(200, build(loaded_ns), JSON)
        return True
