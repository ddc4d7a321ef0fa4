"""Ollama's OpenAI-compatible layer (``/v1/*``) on the simulated Ollama node.

Real Ollama serves /v1 through a gin middleware (``middleware/openai.go``): the
request is rewritten into a native one, the native handler runs, and a writer
rewrites each NDJSON line the handler produces into an SSE chunk. The sim does
the same without the JSON round trip: the /v1 body is translated into a native
body, validated and composed by the code /api/chat and /api/generate use (so
errors, model loading, scripted failures and counters are the same), and the
reply is rendered as chunks from the same paced event loop. A benchmark of
"client -> Ollama /v1" against "client -> proxy -> Ollama /api/chat" then
measures the proxy, not two different simulators.

Shapes follow Ollama >= 0.32.10 (reference section B): ids ``chatcmpl-<0..998>``
and ``cmpl-<n>``, the role only on the first chunk, a separate ``delta: {}``
chunk with the finish reason, a ``choices: []`` usage chunk when
``stream_options.include_usage`` is set, and errors as ``{"error": {message,
type, param: null, code: null}}`` with the native handler's status.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .behavior import MID_STREAM_FAILURES, Behavior, Reply
from .core import Generation, ORJSONResponse, Output, paced, request_json
from .ollama_openai_wire import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    EMBED_FIELDS,
    OpenAIRequestError,
    chat_to_native,
    completion_to_native,
    float32_le,
    logprob_entry,
    openai_call,
    openai_error,
    openai_error_body,
)
from .ollama_wire import (
    MID_STREAM_ERROR,
    GenerationJob,
    bind_error,
    display_name,
    field_error,
    go_kind,
    namespace_of,
    tool_call,
)

if TYPE_CHECKING:
    from .ollama_wire import EmbedJob

SSE = "text/event-stream"
DONE = b"data: [DONE]\n\n"
_FINGERPRINT = "fp_ollama"


@dataclass
class _V1:
    """What the /v1 writer adds to a native job: the response id, its timestamp and the usage switch."""

    endpoint: str  # "chat" | "completion"
    id: str
    created: int
    include_usage: bool


# --------------------------------------------------------------------------- the mixin


class OllamaOpenAI:
    """The /v1 routes of :class:`SimOllama` (which provides the native job builders and runners)."""

    def _openai_routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self._v1_chat, methods=["POST"]),
            Route("/v1/completions", self._v1_completions, methods=["POST"]),
            Route("/v1/embeddings", self._v1_embeddings, methods=["POST"]),
            Route("/v1/models", self._v1_models, methods=["GET"]),
            Route("/v1/models/{model}", self._v1_model, methods=["GET"]),
        ]

    # ----------------------------------------------------------- chat and completions

    @staticmethod
    def _v1_read(request: Request, struct: str, fields: dict) -> tuple[dict | None, Response | None]:
        body, parse_error = request_json(request)
        if parse_error is not None:
            return None, openai_error(400, parse_error)
        if body is None:
            return None, openai_error(400, "EOF")  # gin's ShouldBindJSON on an empty body
        if not isinstance(body, dict):
            return None, openai_error(400, bind_error(body, struct).replace("api.", "openai."))
        if (problem := field_error(body, struct, fields)) is not None:
            return None, openai_error(400, problem)
        return body, None

    async def _v1_chat(self, request: Request) -> Response:
        started = time.time_ns()
        body, failure = self._v1_read(request, "ChatCompletionRequest", CHAT_FIELDS)
        if failure:
            return failure
        messages = body.get("messages") or []
        if not messages:
            return openai_error(400, "[] is too short - 'messages'")
        for message in messages:
            if not isinstance(message, dict):
                return openai_error(
                    400,
                    f"json: cannot unmarshal {go_kind(message)} into Go struct field "
                    "ChatCompletionRequest.messages of type openai.Message",
                )
        try:
            native = chat_to_native(body)
        except OpenAIRequestError as exc:
            return openai_error(400, str(exc))
        return self._v1_start("chat", self._chat_job(native, started), body, native)

    async def _v1_completions(self, request: Request) -> Response:
        started = time.time_ns()
        body, failure = self._v1_read(request, "CompletionRequest", COMPLETION_FIELDS)
        if failure:
            return failure
        try:
            native = completion_to_native(body)
        except OpenAIRequestError as exc:
            return openai_error(400, str(exc))
        return self._v1_start("completion", self._generate_job(native, started), body, native)

    def _v1_start(self, endpoint: str, job: GenerationJob | Response, body: dict, native: dict) -> Response:
        options = body.get("stream_options")
        include_usage = bool(body.get("stream")) and isinstance(options, dict) and bool(options.get("include_usage"))
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        v1 = _V1(endpoint, f"{prefix}-{secrets.randbelow(999)}", int(time.time()), include_usage)
        if isinstance(job, Response):
            if job.status_code != 200:
                return openai_error(job.status_code, orjson.loads(job.body).get("error", ""))
            # A load/unload answer: the writer turns the native done line into an (empty) completion.
            reason = orjson.loads(job.body).get("done_reason") or "stop"
            empty = GenerationJob(
                "chat" if endpoint == "chat" else "generate",
                native["model"],
                Behavior(),
                None,
                Reply(finish_reason=reason),
                native["stream"],
                False,
                0,
                None,
                time.time_ns(),
            )
            return Generation(self, lambda out: self._v1_run(empty, v1, out), counted=False)
        return Generation(self, lambda out: self._v1_run(job, v1, out))

    async def _v1_run(self, job: GenerationJob, v1: _V1, out: Output) -> bool:
        if await self._fail_early(job.failure, job.model, out, openai_error_body):
            return False
        sent = 0
        tools_sent = False
        # The same loop, pacing and failure points as the native runner (SimOllama._run).
        async for (kind, value), _last in paced(job.reply.events(), job.behavior):
            if job.failure in MID_STREAM_FAILURES and sent >= job.behavior.fail_after_chunks:
                return await self._v1_fail_mid_stream(job, v1, out)
            if job.stream:
                if not out.started:
                    await out.start(200, SSE)
                await out.write(self._v1_piece(job, v1, kind, value, first=sent == 0))
            tools_sent = tools_sent or kind == "tool_call"
            sent += 1
        if job.failure in MID_STREAM_FAILURES:
            return await self._v1_fail_mid_stream(job, v1, out)
        if not job.stream:
            await out.respond_json(200, self._v1_whole(job, v1), "application/json")
            return True
        reply = job.reply
        closing = []
        if sent == 0 and v1.endpoint == "chat":  # an empty completion still opens with the role
            closing.append(self._v1_piece(job, v1, "content", "", first=True))
        reason = "tool_calls" if tools_sent and reply.finish_reason == "stop" else reply.finish_reason
        if v1.endpoint == "chat":
            closing.append(self._v1_chunk(job, v1, [{"index": 0, "delta": {}, "finish_reason": reason}]))
        else:
            closing.append(self._v1_chunk(job, v1, [{"text": "", "index": 0, "finish_reason": reason}]))
        if v1.include_usage:
            usage = {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            }
            closing.append(self._v1_chunk(job, v1, [], usage))
        if not out.started:
            await out.start(200, SSE)
        await out.finish(b"".join(closing) + DONE)
        return True

    @staticmethod
    def _v1_chunk(job: GenerationJob, v1: _V1, choices: list, usage: dict | None = None) -> bytes:
        if v1.endpoint == "chat":
            chunk: dict[str, Any] = {
                "id": v1.id,
                "object": "chat.completion.chunk",
                "created": v1.created,
                "model": job.model,
                "system_fingerprint": _FINGERPRINT,
                "choices": choices,
            }
        else:
            chunk = {
                "id": v1.id,
                "object": "text_completion",
                "created": v1.created,
                "choices": choices,
                "model": job.model,
                "system_fingerprint": _FINGERPRINT,
            }
            if v1.include_usage and usage is None:  # every completion chunk carries zero usage
                usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        if usage is not None:
            chunk["usage"] = usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _v1_piece(self, job: GenerationJob, v1: _V1, kind: str, value: Any, first: bool) -> bytes:
        if v1.endpoint != "chat":  # /v1/completions drops thinking: those lines carry an empty text
            return self._v1_chunk(
                job, v1, [{"text": value if kind == "content" else "", "index": 0, "finish_reason": None}]
            )
        delta: dict[str, Any] = {}
        if first:
            delta.update(role="assistant", content=value if kind == "content" else "")
        elif kind == "content":
            delta["content"] = value
        if kind == "thinking":
            delta["reasoning"] = value
        elif kind == "tool_call":
            delta["tool_calls"] = [openai_call(tool_call(*value))]
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        if job.logprobs and kind == "content" and value:
            choice["logprobs"] = {"content": [logprob_entry(value, job.top_logprobs)]}
        return self._v1_chunk(job, v1, [choice])

    @staticmethod
    def _v1_whole(job: GenerationJob, v1: _V1) -> dict[str, Any]:
        reply = job.reply
        usage = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        }
        created = int(time.time())  # the native done line's created_at
        if v1.endpoint != "chat":
            return {
                "id": v1.id,
                "object": "text_completion",
                "created": created,
                "model": job.model,
                "system_fingerprint": _FINGERPRINT,
                "choices": [{"text": reply.text, "index": 0, "finish_reason": reply.finish_reason}],
                "usage": usage,
            }
        calls = [openai_call(tool_call(i, c)) for i, c in enumerate(reply.tool_calls)]
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}  # "" rather than null with tools
        if reply.thinking:
            message["reasoning"] = reply.thinking_text
        if calls:
            message["tool_calls"] = calls
        reason = "tool_calls" if calls and reply.finish_reason == "stop" else reply.finish_reason
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reason}
        if job.logprobs:
            choice["logprobs"] = {"content": [logprob_entry(t, job.top_logprobs) for t in reply.content]}
        return {
            "id": v1.id,
            "object": "chat.completion",
            "created": created,
            "model": job.model,
            "system_fingerprint": _FINGERPRINT,
            "choices": [choice],
            "usage": usage,
        }

    async def _v1_fail_mid_stream(self, job: GenerationJob, v1: _V1, out: Output) -> bool:
        if job.failure == "die_mid_stream":
            out.abort()
        elif out.started:
            # The native {"error"} line decodes as an empty response: one empty chunk, then the
            # stream ends with neither a finish chunk nor [DONE] (reference B, inferred from the code).
            empty = (
                {"index": 0, "delta": {"content": ""}, "finish_reason": None}
                if v1.endpoint == "chat"
                else {"text": "", "index": 0, "finish_reason": None}
            )
            await out.finish(self._v1_chunk(job, v1, [empty]))
        else:
            await out.respond_json(500, openai_error_body(500, MID_STREAM_ERROR), "application/json")
        return False

    # ----------------------------------------------------------- embeddings

    async def _v1_embeddings(self, request: Request) -> Response:
        started = time.time_ns()
        body, failure = self._v1_read(request, "EmbedRequest", EMBED_FIELDS)
        if failure:
            return failure
        encoding = body.get("encoding_format") or ""
        if encoding and encoding.lower() not in ("float", "base64"):
            return openai_error(
                400, f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64']."
            )
        raw = body.get("input")
        if raw == "":
            raw = [""]
        if raw is None or raw == []:
            return openai_error(400, "invalid input")
        model = body.get("model") or ""
        native: dict[str, Any] = {"model": model, "input": raw}
        if body.get("dimensions"):
            native["dimensions"] = body["dimensions"]
        job: EmbedJob | Response = self._embed_job(native, started)
        if isinstance(job, Response):
            payload = orjson.loads(job.body)
            if job.status_code != 200:
                return openai_error(job.status_code, payload.get("error", ""))
            return ORJSONResponse(
                {"object": "list", "data": None, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}}
            )
        as_base64 = encoding.lower() == "base64"

        def build(loaded_ns: int) -> dict[str, Any]:
            result = job.build(loaded_ns)
            data = [
                {
                    "object": "embedding",
                    "embedding": base64.b64encode(float32_le(vector)).decode() if as_base64 else vector,
                    "index": i,
                }
                for i, vector in enumerate(result["embeddings"])
            ]
            tokens = result.get("prompt_eval_count", 0)
            return {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }

        return Generation(
            self, lambda out: self._run_single(job.model, job.behavior, job.failure, out, build, openai_error_body)
        )

    # ----------------------------------------------------------- models

    async def _v1_models(self, request: Request) -> Response:
        rows = sorted(((self._modified_ns(spec), spec) for spec in list(self.models)), key=lambda r: r[0], reverse=True)
        data = [
            {
                "id": display_name(spec.name),
                "object": "model",
                "created": modified // 1_000_000_000,
                "owned_by": namespace_of(spec.name),
            }
            for modified, spec in rows
        ]
        return ORJSONResponse({"object": "list", "data": data or None})  # Go marshals an empty slice as null

    async def _v1_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        spec = self.find(name)
        if spec is None:
            return openai_error(404, f"model '{name}' not found")
        return ORJSONResponse(
            {
                "id": name,
                "object": "model",
                "created": self._modified_ns(spec) // 1_000_000_000,
                "owned_by": namespace_of(name),
            }
        )
