"""How the simulated vLLM node writes its answers: SSE chunks, full responses and failures.

Non-stream bodies are ``model_dump()``-style with every key present, stream
chunks are ``exclude_unset``-style with the finish reason on the chunk of the
last token, and errors are the nested ``{"error": {message, type, param,
code}}`` form (reference section C). :class:`SimVLLM` mixes this in; the
request side lives in :mod:`.vllm`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from .behavior import MID_STREAM_FAILURES, STALL_FAILURES, Behavior, Reply, token_logprob
from .core import Output, hang_forever, paced, stall
from .vllm_wire import ARG_PIECE, DONE, MID_STREAM_ERROR, SSE, error_info, sse


@dataclass
class VLLMJob:
    """Everything one completion needs, fixed when the request was accepted."""

    endpoint: str  # "chat" | "completion"
    model: str  # echoed in responses
    behavior: Behavior
    failure: str | None
    replies: list[Reply]  # one per choice
    stream: bool
    prompt_tokens: int = 0  # counted once per prompt, not per choice
    include_usage: bool = False
    continuous_usage: bool = False
    logprobs: int | None = None  # None: off; else top-k count
    finish_override: str | None = None  # "tool_calls" / "stop" when tools were called
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, completion_tokens: int | None = None) -> dict[str, int]:
        done = sum(r.completion_tokens for r in self.replies) if completion_tokens is None else completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + done,
            "completion_tokens": done,
        }

    def finish_reason(self, reply: Reply) -> str:
        if reply.tool_calls and self.finish_override:
            return self.finish_override
        return reply.finish_reason


class VLLMRendering:
    """The response side of :class:`SimVLLM`."""

    def _chunk(self, job: VLLMJob, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if job.endpoint == "chat" else "text_completion"
        prefix = "chatcmpl-" if job.endpoint == "chat" else "cmpl-"
        return {
            "id": prefix + job.request_id,
            "object": obj,
            "created": job.created,
            "model": job.model,
            "choices": choices,
        }

    def _deltas(self, job: VLLMJob, kind: str, value: Any) -> list[tuple[dict[str, Any], Any]]:
        """(delta, logprobs) pairs for one reply event; a tool call becomes header + argument pieces."""
        if kind == "thinking":
            return [({"reasoning_content": value}, None)]
        if kind == "content":
            logprobs = {"content": [token_logprob(value, job.logprobs)]} if job.logprobs is not None and value else None
            return [({"content": value}, logprobs)]
        index, call = value
        header = {
            "index": index,
            "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
            "type": "function",
            "function": {"name": call["name"], "arguments": ""},
        }
        pieces = ARG_PIECE.findall(orjson.dumps(call["arguments"]).decode())
        return [({"tool_calls": [header]}, None)] + [
            ({"tool_calls": [{"index": index, "function": {"arguments": p}}]}, None) for p in pieces
        ]

    def _completion_logprobs(self, tokens: list[str], top: int) -> dict[str, Any]:
        entries = [token_logprob(t, top) for t in tokens]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "text_offset": offsets,
            "token_logprobs": [e["logprob"] for e in entries],
            "tokens": tokens,
            "top_logprobs": [{alt["token"]: alt["logprob"] for alt in e["top_logprobs"]} for e in entries],
        }

    async def _stream(self, job: VLLMJob, out: Output) -> bool:
        if await self._fail_early(job, out):
            return False
        await out.start(200, SSE)  # FastAPI's StreamingResponse sends headers before the first token
        scripts = [list(reply.events()) for reply in job.replies]
        steps = max((len(script) for script in scripts), default=0)
        async for step, _last in paced(range(steps), job.behavior):
            if job.failure in MID_STREAM_FAILURES and step >= job.behavior.fail_after_chunks:
                return await self._fail_mid_stream(job, out)
            if job.failure in STALL_FAILURES and step >= job.behavior.fail_after_chunks:
                break
            frames = [self._role_chunks(job)] if step == 0 else []
            produced = sum(min(step + 1, len(script)) for script in scripts)
            for i, script in enumerate(scripts):
                if step < len(script):
                    kind, value = script[step]
                    frames.append(self._frames(job, i, kind, value, step == len(script) - 1, produced))
            await out.write(b"".join(frames))
        if job.failure in MID_STREAM_FAILURES:
            return await self._fail_mid_stream(job, out)
        if job.failure in STALL_FAILURES:  # after fail_after_chunks steps, or all of a short reply
            await stall(job.failure, job.behavior, out)
        closing = [self._role_chunks(job)] if steps == 0 else []
        for i, script in enumerate(scripts):
            if not script:  # nothing generated for this choice: close it with an empty final delta
                closing.append(self._frames(job, i, "content", "", True, 0))
        if job.include_usage:
            closing.append(sse({**self._chunk(job, []), "usage": job.usage()}))
        await out.finish(b"".join(closing) + DONE)
        return True

    def _role_chunks(self, job: VLLMJob) -> bytes:
        if job.endpoint != "chat":
            return b""
        return b"".join(
            sse(
                self._chunk(
                    job,
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                )
            )
            for i in range(len(job.replies))
        )

    def _frames(self, job: VLLMJob, index: int, kind: str, value: Any, final: bool, produced: int) -> bytes:
        """SSE frames for one event of choice ``index``; ``final`` marks its last event."""
        reply = job.replies[index]
        if job.endpoint == "chat":
            deltas = self._deltas(job, kind, value)
        else:
            logprobs = self._completion_logprobs([value], job.logprobs) if job.logprobs is not None and value else None
            deltas = [({"text": value}, logprobs)]
        frames = []
        for n, (delta, logprobs) in enumerate(deltas):
            last = final and n == len(deltas) - 1
            if job.endpoint == "chat":
                choice: dict[str, Any] = {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": job.finish_reason(reply) if last else None,
                }
                if last:
                    choice["stop_reason"] = reply.stop_reason
            else:
                choice = {
                    "index": index,
                    **delta,
                    "logprobs": logprobs,
                    "finish_reason": reply.finish_reason if last else None,
                    "stop_reason": reply.stop_reason if last else None,
                }
            chunk = self._chunk(job, [choice])
            if job.continuous_usage:
                chunk["usage"] = job.usage(produced)
            frames.append(sse(chunk))
        return b"".join(frames)

    async def _respond(self, job: VLLMJob, out: Output) -> bool:
        if await self._fail_early(job, out):
            return False
        sent = 0
        async for _event, _last in paced(job.replies[0].events(), job.behavior):
            if job.failure in MID_STREAM_FAILURES and sent >= job.behavior.fail_after_chunks:
                break
            sent += 1
        if job.failure in MID_STREAM_FAILURES:
            return await self._fail_mid_stream(job, out)
        await out.respond_json(200, self._full_response(job))
        return True

    def _full_response(self, job: VLLMJob) -> dict[str, Any]:
        usage = {**job.usage(), "prompt_tokens_details": None}
        if job.endpoint == "completion":
            choices = [
                {
                    "index": i,
                    "text": r.text,
                    "finish_reason": r.finish_reason,
                    "stop_reason": r.stop_reason,
                    "prompt_logprobs": None,
                    "logprobs": self._completion_logprobs(r.content, job.logprobs)
                    if job.logprobs is not None
                    else None,
                }
                for i, r in enumerate(job.replies)
            ]
            return {
                "id": f"cmpl-{job.request_id}",
                "object": "text_completion",
                "created": job.created,
                "model": job.model,
                "choices": choices,
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "kv_transfer_params": None,
            }
        choices = []
        for i, reply in enumerate(job.replies):
            calls = [
                {
                    "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": orjson.dumps(c["arguments"]).decode()},
                }
                for c in reply.tool_calls
            ]
            message = {
                "role": "assistant",
                "content": reply.text if (reply.content or not calls) else None,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": calls,
                "reasoning_content": reply.thinking_text or None,
            }
            logprobs = (
                {"content": [token_logprob(t, job.logprobs) for t in reply.content]}
                if job.logprobs is not None
                else None
            )
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": job.finish_reason(reply),
                    "stop_reason": reply.stop_reason,
                }
            )
        return {
            "id": f"chatcmpl-{job.request_id}",
            "object": "chat.completion",
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage,
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }

    # ----------------------------------------------------------- failures

    async def _fail_early(self, job: VLLMJob, out: Output) -> bool:
        failure = job.failure
        if failure == "http_500":
            await out.respond_json(500, {"error": error_info(500, MID_STREAM_ERROR, "InternalServerError")})
        elif failure == "busy":
            await out.respond_json(
                503,
                {
                    "error": error_info(
                        503, "The server is overloaded, please try again later.", "ServiceUnavailableError"
                    )
                },
            )
        elif failure == "not_found":
            await out.respond_json(
                404, {"error": error_info(404, f"The model `{job.model}` does not exist.", "NotFoundError", "model")}
            )
        elif failure == "hang":
            await hang_forever()
        else:
            return False
        return True

    async def _fail_mid_stream(self, job: VLLMJob, out: Output) -> bool:
        if job.failure == "die_mid_stream":
            out.abort()
        elif out.started:  # the 200 is out: the error becomes a data frame, then [DONE]
            await out.write(sse({"error": error_info(500, MID_STREAM_ERROR, "InternalServerError")}))
            await out.finish(DONE)
        else:
            await out.respond_json(500, {"error": error_info(500, MID_STREAM_ERROR, "InternalServerError")})
        return False
