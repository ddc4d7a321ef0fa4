"""OpenAI ``/v1/completions`` <-> Ollama ``/api/generate``, and embeddings <-> ``/api/embed``. Pure."""

from __future__ import annotations

import base64
import sys
from array import array
from dataclasses import dataclass

from ..errors import InvalidRequest, UnsupportedParameter
from .common import (
    DONE,
    IGNORED_FIELDS,
    ChunkFramer,
    finish_reason,
    new_id,
    now,
    ollama_options,
    refuse_if,
    refuse_unknown,
    usage,
)

_KNOWN_COMPLETION = IGNORED_FIELDS | {
    "model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stream", "logprobs",
    "echo", "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "seed",
    # Ollama-native extras
    "options", "keep_alive", "raw", "system", "think", "top_k", "min_p", "typical_p", "repeat_penalty",
    "repetition_penalty",
}  # fmt: skip


@dataclass(frozen=True)
class TextShape:
    model: str
    include_usage: bool = False
    logprobs: int | None = None


def completion_request(body: dict, target: str) -> tuple[dict, TextShape]:
    refuse_unknown(body, _KNOWN_COMPLETION)
    refuse_if((body.get("n") or 1) > 1, "n", "Ollama returns one choice per request")
    refuse_if((body.get("best_of") or 1) > 1, "best_of", "Ollama returns one choice per request")
    refuse_if(bool(body.get("echo")), "echo", "Ollama does not echo the prompt")
    refuse_if(bool(body.get("logit_bias")), "logit_bias", "Ollama has no logit bias")
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise UnsupportedParameter(
                "Ollama backends take one prompt string per request (no batches or token arrays)", param="prompt"
            )
        prompt = prompt[0]
    native: dict = {"model": target, "prompt": prompt, "stream": True}
    for key in ("suffix", "system", "raw", "think", "keep_alive"):
        if body.get(key) is not None:
            native[key] = body[key]
    options = ollama_options(body, ("max_tokens",))
    if options:
        native["options"] = options
    top = body.get("logprobs")
    if top is not None:
        native["logprobs"] = True
        if top:
            native["top_logprobs"] = top
    shape = TextShape(
        model=body["model"],
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        logprobs=top,
    )
    return native, shape


def _legacy_logprobs(entries: list, offset: int) -> dict:
    """Ollama's per-token logprobs in the legacy completions shape."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in entries:
        tokens.append(entry.get("token", ""))
        token_logprobs.append(entry.get("logprob"))
        top.append({t.get("token", ""): t.get("logprob") for t in entry.get("top_logprobs") or ()})
        offsets.append(offset)
        offset += len(entry.get("token", ""))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


class TextStream:
    """Ollama ``/api/generate`` lines -> OpenAI ``text_completion`` SSE frames."""

    def __init__(self, shape: TextShape) -> None:
        self.shape = shape
        self.framer = ChunkFramer("cmpl-", "text_completion", shape.model, "text")
        self.offset = 0
        self.usage: dict | None = None
        self.finish_reason: str | None = None

    def feed(self, line: dict) -> bytes:
        out = b""
        text = line.get("response")
        if text:
            logprobs = _legacy_logprobs(line["logprobs"], self.offset) if line.get("logprobs") else None
            self.offset += len(text)
            out += self.framer.choice(text, logprobs)
        if line.get("done"):
            self.finish_reason = finish_reason(line.get("done_reason"), False)
            self.usage = usage(line)
            out += self.framer.choice("", None, self.finish_reason)
            if self.shape.include_usage:
                out += self.framer.usage(self.usage)
            out += DONE
        return out


class TextAggregate:
    def __init__(self, shape: TextShape) -> None:
        self.shape = shape
        self.parts: list[str] = []
        self.logprobs: list = []
        self.last: dict = {}

    def feed(self, line: dict) -> None:
        if line.get("response"):
            self.parts.append(line["response"])
        if line.get("logprobs"):
            self.logprobs.extend(line["logprobs"])
        if line.get("done"):
            self.last = line

    def result(self) -> dict:
        return {
            "id": new_id("cmpl-"),
            "object": "text_completion",
            "created": now(),
            "model": self.shape.model,
            "choices": [
                {
                    "index": 0,
                    "text": "".join(self.parts),
                    "logprobs": _legacy_logprobs(self.logprobs, 0) if self.shape.logprobs is not None else None,
                    "finish_reason": finish_reason(self.last.get("done_reason"), False),
                }
            ],
            "usage": usage(self.last),
        }


# --- embeddings ---------------------------------------------------------------------------------

_KNOWN_EMBEDDING = IGNORED_FIELDS | {"model", "input", "encoding_format", "dimensions",
                                     "truncate", "keep_alive", "options"}  # fmt: skip


def embed_request(body: dict, target: str) -> dict:
    refuse_unknown(body, _KNOWN_EMBEDDING)
    inputs = body["input"]
    if isinstance(inputs, list) and not all(isinstance(x, str) for x in inputs):
        raise UnsupportedParameter(
            "Ollama backends embed text only: input must be a string or a list of strings, not token ids "
            "(LangChain's OpenAIEmbeddings sends token ids unless check_embedding_ctx_length=False)",
            param="input",
        )
    native: dict = {"model": target, "input": inputs}
    for key in ("dimensions", "truncate", "keep_alive", "options"):
        if body.get(key) is not None:
            native[key] = body[key]
    return native


def float32_base64(vector: list[float]) -> str:
    """Little-endian float32 bytes, base64: what the openai SDK decodes by default."""
    packed = array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embed_response(native: dict, model: str, encoding_format: str | None) -> dict:
    vectors = native.get("embeddings")
    if not isinstance(vectors, list) or not vectors:
        raise InvalidRequest("the backend returned no embeddings for this input", param="input")
    encode = float32_base64 if encoding_format == "base64" else None
    tokens = native.get("prompt_eval_count") or 0
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v) if encode else v} for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
