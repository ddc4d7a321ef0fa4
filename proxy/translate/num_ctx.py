"""Size Ollama's context window for each request, instead of letting it cut the prompt. Pure: no I/O.

Ollama runs every request in a window of ``num_ctx`` tokens (2,048 or 4,096 by
default) and silently drops the start of any prompt that does not fit. The
proxy knows the model's trained context length from ``/api/show``, so when a
request sets no ``num_ctx`` of its own:

- it estimates the prompt (:mod:`proxy.tokens`) and adds the answer's room
  (``max_tokens``, else ``context.answer_reserve``);
- when that fits the window Ollama would use anyway, nothing changes (a new
  ``num_ctx`` makes Ollama reload the model, which is slow);
- otherwise ``num_ctx`` becomes the next power of two that holds it (few
  distinct sizes, so few reloads), capped at the model's context length and
  the ceiling (``models[].max_num_ctx``, else ``context.max_num_ctx``);
- when even the cap cannot hold the prompt (plus an explicit ``max_tokens``),
  the request is refused with OpenAI's 400 ``context_length_exceeded``.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from ..config import ContextConfig
from ..errors import ContextLengthExceeded
from ..tokens import estimate_messages, estimate_prompt, estimate_text
from .model_info import ModelInfo


@dataclass(frozen=True)
class Sizing:
    """What the proxy set: the response says it in ``X-Proxy-Num-Ctx`` and ``X-Proxy-Prompt-Estimate``."""

    prompt_estimate: int
    num_ctx: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-proxy-num-ctx", str(self.num_ctx).encode()),
                (b"x-proxy-prompt-estimate", str(self.prompt_estimate).encode())]  # fmt: skip


def _max_tokens(body: dict) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    value = (body.get("options") or {}).get("num_predict")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def estimate(body: dict, operation: str) -> int:
    if operation == "chat":
        return estimate_messages(body.get("messages") or [], body.get("tools"))
    return estimate_prompt(body.get("prompt")) + estimate_text(body.get("suffix") or "")


def _bound(body: dict, operation: str) -> int:
    """A cheap upper bound of :func:`estimate`: no estimate exceeds the UTF-8 size of the JSON it came from."""
    if operation != "chat":
        return len(orjson.dumps([body.get("prompt"), body.get("suffix")]))
    messages = orjson.dumps(body.get("messages") or [])
    if b"image" in messages:
        return 1 << 30  # an image counts for more than its URL's length
    return len(messages) + len(orjson.dumps(body.get("tools") or []))


def choose(prompt: int, max_tokens: int | None, *, default: int, cap: int, reserve: int) -> int | None:
    """The num_ctx to send, None to leave Ollama's own; raises when the cap cannot hold the prompt."""
    need = prompt + (max_tokens if max_tokens is not None else reserve)
    if need <= default:
        return None
    if prompt + (max_tokens or 0) >= cap:
        raise ValueError(need)
    size = 1 << (need - 1).bit_length()  # the next power of two
    size = min(size, cap)
    return size if size > default else None


def fit(body: dict, operation: str, info: ModelInfo | None, ceiling: int | None,
        config: ContextConfig) -> tuple[dict, Sizing | None]:  # fmt: skip
    """``body`` with ``options.num_ctx`` set when the prompt needs it, and what was decided."""
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    if not config.auto_num_ctx or options.get("num_ctx") is not None:
        return body, None  # the client chose its window
    max_tokens = _max_tokens(body)
    default = (info.num_ctx if info is not None else None) or config.ollama_default
    answer = max_tokens if max_tokens is not None else config.answer_reserve
    if _bound(body, operation) + answer <= default:
        return body, None  # short prompts, the common case, skip the estimate altogether
    prompt = estimate(body, operation)
    trained = info.context_length if info is not None else None
    limit = ceiling or config.max_num_ctx
    cap = min(trained, limit) if trained else limit
    try:
        num_ctx = choose(prompt, max_tokens, default=default, cap=cap, reserve=config.answer_reserve)
    except ValueError:
        where = "the model's maximum context length" if trained and trained <= limit else (
            "the largest context window the proxy may set for this model (models[].max_num_ctx or "
            "context.max_num_ctx)"
        )  # fmt: skip
        raise ContextLengthExceeded(
            f"This model's maximum context length is {cap} tokens ({where}). However, you requested about "
            f"{prompt + (max_tokens or 0)} tokens ({prompt} in the {'messages' if operation == 'chat' else 'prompt'}, "
            f"estimated; {max_tokens or 0} in the completion). Please reduce the length of the "
            f"{'messages' if operation == 'chat' else 'prompt'} or completion.",
            param="messages" if operation == "chat" else "prompt",
        ) from None
    if num_ctx is None:
        return body, None
    return {**body, "options": {**options, "num_ctx": num_ctx}}, Sizing(prompt, num_ctx)
