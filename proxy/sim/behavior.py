"""What a simulated node says and how it misbehaves, independent of wire protocol.

Both sims turn a request into a :class:`Reply` (thinking, content and tool-call
pieces plus token accounting) with :func:`compose_reply`, then render that
reply in their own wire format. Everything here is deterministic: the same
request always produces the same tokens, embeddings and logprobs, so tests can
assert exact values and a load test is reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

# Streams that never finish their line (NDJSON) or event (SSE), after fail_after_chunks good
# chunks: "trickle" sends a space every trickle_interval seconds, "endless_line" sends bytes
# without a newline as fast as the client reads. Streaming requests only; the others answer normally.
STALL_FAILURES = frozenset({"trickle", "endless_line"})
FAILURE_MODES = STALL_FAILURES | {"http_500", "busy", "hang", "die_mid_stream", "error_mid_stream", "not_found"}
# Failures that happen after some output went out; the others answer at once (or never).
MID_STREAM_FAILURES = frozenset({"die_mid_stream", "error_mid_stream"})

_TOKEN_RE = re.compile(r"\s*\S+|\s+$")
_WORD_RE = re.compile(r"\S+")

# Echoing a whole long prompt back would make slow-paced replies last minutes.
_ECHO_WORDS = 48
_PER_MESSAGE_TOKENS = 4


@dataclass
class ModelSpec:
    """One installed model (Ollama) or one served model (vLLM)."""

    name: str
    capabilities: tuple[str, ...] = ("completion",)
    context_length: int = 8192
    family: str = "llama"
    parameter_size: str = "8.0B"
    quantization: str = "Q4_K_M"
    size: int = 4_920_753_328
    digest: str = ""
    embedding_dim: int = 768
    supports_system_role: bool = True
    template: str | None = None
    root: str | None = None

    def __post_init__(self) -> None:
        self.capabilities = tuple(self.capabilities)
        if not self.digest:
            self.digest = hashlib.sha256(self.name.encode()).hexdigest()

    def has(self, capability: str) -> bool:
        return capability in self.capabilities


PULL_FAILURES = frozenset({"error", "drop"})
PULL_FAIL_MESSAGE = "max retries exceeded: unexpected EOF"


@dataclass
class PullBehavior:
    """How ``/api/pull`` on the simulated Ollama node behaves (see :mod:`.ollama_pull`).

    Fractions are of the model's total bytes across all its layers. The
    ``fail``/``fail_times`` countdown works like :class:`Behavior`'s: it lives on
    the object the sim holds and is consumed by each download that starts.
    """

    bytes_per_second: float | None = None  # None: as fast as it takes a fresh pull to last `seconds`
    seconds: float = 0.3
    interval: float = 0.06  # Ollama reports each layer's progress on a 60 ms ticker
    stall_at: float | None = None
    stall_seconds: float = 0.0
    stall_silent: bool = False  # True: no progress lines during the stall (a hung server, not a slow network)
    fail: str | None = None  # "error": an {"error"} line; "drop": the connection is cut
    fail_at: float = 0.5
    fail_times: int | None = None
    fail_message: str = PULL_FAIL_MESSAGE
    unknown_models: list[str] = field(default_factory=list)
    registry: list[str] | None = None  # None: every name is in the registry (except unknown_models)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        numbers = {
            "seconds": self.seconds,
            "interval": self.interval,
            "fail_at": self.fail_at,
            "stall_seconds": self.stall_seconds,
            "bytes_per_second": self.bytes_per_second,
            "stall_at": self.stall_at,
        }
        for name, value in numbers.items():
            if value is None and name in ("bytes_per_second", "stall_at"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"pull field {name!r} must be a non-negative number, not {value!r}")
        if self.interval <= 0 or (self.bytes_per_second is not None and self.bytes_per_second <= 0):
            raise ValueError("pull interval and bytes_per_second must be positive")
        for name in ("stall_at", "fail_at"):
            value = getattr(self, name)
            if value is not None and value > 1:
                raise ValueError(f"pull field {name!r} is a fraction between 0 and 1, not {value!r}")
        if self.fail is not None and self.fail not in PULL_FAILURES:
            raise ValueError(f"unknown pull failure {self.fail!r}; expected one of {sorted(PULL_FAILURES)}")
        if self.fail_times is not None and (isinstance(self.fail_times, bool) or not isinstance(self.fail_times, int)):
            raise TypeError(f"pull field 'fail_times' cannot be {self.fail_times!r}")
        if not isinstance(self.stall_silent, bool) or not isinstance(self.fail_message, str):
            raise TypeError("pull fields stall_silent and fail_message must be a bool and a string")
        for names in (self.unknown_models, self.registry or []):
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise TypeError("pull fields unknown_models and registry must be lists of model names")

    def merged(self, changes: dict[str, Any]) -> PullBehavior:
        """A copy with ``changes`` applied (the ``"pull"`` part of ``PATCH /_sim/behavior``)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown pull field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "reply": (str,),
    "ttft": (int, float),
    "tokens_per_second": (int, float),
    "tool_calls": (list,),
    "thinking": (str,),
    "fail": (str,),
    "fail_after_chunks": (int,),
    "fail_times": (int,),
    "json_reply": (dict,),
    "pull": (PullBehavior,),
    "trickle_interval": (int, float),
}
# The rest may be None.
_REQUIRED = frozenset({"ttft", "tokens_per_second", "fail_after_chunks", "pull", "trickle_interval"})


@dataclass
class Behavior:
    """Scriptable behaviour of a sim.

    The sim copies it at the start of every request, so a test may change it
    between requests (or assign a new one) without racing a request in flight.
    ``fail``/``fail_times`` are the exception: the countdown lives on the
    object the sim holds and is consumed once a request has passed validation.
    """

    reply: str | None = None
    ttft: float = 0.0
    tokens_per_second: float = 0.0
    tool_calls: list[dict] | None = None
    thinking: str | None = None
    fail: str | None = None
    fail_after_chunks: int = 2
    fail_times: int | None = None
    json_reply: dict | None = None
    pull: PullBehavior = field(default_factory=PullBehavior)
    trickle_interval: float = 0.2  # seconds between the spaces of the "trickle" failure

    def __post_init__(self) -> None:
        if isinstance(self.pull, dict):  # PUT /_sim/behavior and Behavior(**json) pass it as a plain object
            self.pull = PullBehavior(**self.pull)
        self.validate()

    def validate(self) -> None:
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if (value is not None or name in _REQUIRED) and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise TypeError(f"behavior field {name!r} cannot be {value!r}")
        if self.fail is not None and self.fail not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {self.fail!r}; expected one of {sorted(FAILURE_MODES)}")
        if self.ttft < 0 or self.tokens_per_second < 0:
            raise ValueError("ttft and tokens_per_second must not be negative")
        if self.fail_after_chunks < 0:
            raise ValueError("fail_after_chunks must not be negative")
        if self.trickle_interval <= 0:
            raise ValueError("trickle_interval must be greater than 0")
        for call in self.tool_calls or ():
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ValueError("each tool call needs a string 'name' and an 'arguments' object")
            if not isinstance(call.get("arguments", {}), dict):
                raise ValueError("tool call 'arguments' must be an object")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update (the ``PATCH /_sim/behavior`` body), all or nothing."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown behavior field(s): {', '.join(unknown)}")
        if isinstance(changes.get("pull"), dict):
            changes = {**changes, "pull": self.pull.merged(changes["pull"])}
        candidate = dataclasses.replace(self, **changes)  # runs validate() via __post_init__
        for name in changes:
            setattr(self, name, getattr(candidate, name))

    def token_delay(self) -> float:
        return 1.0 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0


# --------------------------------------------------------------------------- tokens


def split_tokens(text: str) -> list[str]:
    """Split text into word tokens that keep their whitespace: ``"".join(tokens) == text``."""
    return _TOKEN_RE.findall(text)


def count_words(text: str) -> int:
    return len(_WORD_RE.findall(text))


def count_prompt_tokens(texts: list[str], messages: int = 1) -> int:
    """A stable stand-in for a tokenizer: words plus a per-message template overhead."""
    return sum(count_words(t) for t in texts) + _PER_MESSAGE_TOKENS * max(messages, 1)


def token_ids(text: str) -> list[int]:
    """Deterministic fake token ids (for Ollama's ``context`` and vLLM's token arrays)."""
    return [_stable_int(tok) % 128_000 for tok in split_tokens(text)]


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def default_reply(last_user_text: str) -> str:
    words = _WORD_RE.findall(last_user_text)
    if not words:
        return "Hello! How can I help you today?"
    echo = " ".join(words[:_ECHO_WORDS]) + (" ..." if len(words) > _ECHO_WORDS else "")
    return f"You said: {echo}"


DEFAULT_THINKING = "Let me think about what the user is asking before I answer."

# --------------------------------------------------------------------------- logprobs

_ALTERNATIVES = (
    " the",
    " a",
    " and",
    " to",
    " of",
    ".",
    ",",
    " is",
    " it",
    " I",
    " you",
    " that",
    " in",
    " for",
    " on",
    " with",
    " as",
    " this",
    " be",
    " at",
    " not",
)


def token_logprob(token: str, top: int) -> dict[str, Any]:
    """An OpenAI/Ollama-shaped logprob entry: the token itself ranks first among ``top`` alternatives."""
    logprob = -round((_stable_int(token) % 2000) / 1000.0, 4)
    entry: dict[str, Any] = {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    alternatives = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
    for i, alt in enumerate(a for a in _ALTERNATIVES if a != token):
        if len(alternatives) >= top:
            break
        alt_lp = round(logprob - 0.75 * (i + 1), 4)
        alternatives.append({"token": alt, "logprob": alt_lp, "bytes": list(alt.encode())})
    entry["top_logprobs"] = alternatives[:top]
    return entry


# --------------------------------------------------------------------------- embeddings


def embedding(text: str, dim: int, *, normalize: bool = True) -> list[float]:
    """A deterministic pseudo-embedding; equal inputs give equal vectors, float32 precision."""
    rng = random.Random(_stable_int(text))
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    if normalize:
        vector = l2_normalize(vector)
    return array("f", vector).tolist()


def l2_normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return array("f", (x / norm for x in vector)).tolist()


# --------------------------------------------------------------------------- JSON output


def example_for_schema(schema: Any, root: dict | None = None, depth: int = 0) -> Any:
    """A small document that validates against common JSON schemas.

    Structured-output clients (pydantic, ``with_structured_output``) parse the
    reply against their schema, so a fixed ``{"ok": true}`` would fail them.
    """
    root = root if root is not None else (schema if isinstance(schema, dict) else {})
    if not isinstance(schema, dict) or depth > 8:
        return None
    if "$ref" in schema:
        target: Any = root
        for part in str(schema["$ref"]).lstrip("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return example_for_schema(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [s for s in schema[key] if not (isinstance(s, dict) and s.get("type") == "null")]
            return example_for_schema((options or schema[key])[0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {name: example_for_schema(sub, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        return [example_for_schema(schema.get("items", {"type": "string"}), root, depth + 1)]
    return {"string": "example", "integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, "example")


def json_document(behavior: Behavior, schema: dict | None, fallback_text: str) -> str:
    if behavior.json_reply is not None:
        return orjson.dumps(behavior.json_reply).decode()
    if schema:
        return orjson.dumps(example_for_schema(schema)).decode()
    return orjson.dumps({"ok": True, "answer": fallback_text}).decode()


# --------------------------------------------------------------------------- replies


@dataclass
class Reply:
    """A protocol-neutral reply: the pieces each sim renders, plus accounting."""

    thinking: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop" | "length"
    stop_reason: str | None = None  # the stop string that ended the reply
    prompt_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def thinking_text(self) -> str:
        return "".join(self.thinking)

    @property
    def completion_tokens(self) -> int:
        # Roughly four characters per token, the usual rule of thumb for BPE vocabularies.
        tool_tokens = sum(max(1, len(orjson.dumps(c)) // 4) for c in self.tool_calls)
        return len(self.thinking) + len(self.content) + tool_tokens

    def events(self) -> Iterator[tuple[str, Any]]:
        """Pieces in emission order: ("thinking", str), ("content", str), ("tool_call", (index, call))."""
        for piece in self.thinking:
            yield "thinking", piece
        for piece in self.content:
            yield "content", piece
        for index, call in enumerate(self.tool_calls):
            yield "tool_call", (index, call)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Cut ``text`` before the earliest stop string, like a sampler that hit it."""
    best: tuple[int, str] | None = None
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
    return (text, None) if best is None else (text[: best[0]], best[1])


def compose_reply(
    behavior: Behavior,
    *,
    last_user: str,
    prompt_tokens: int,
    thinking: str | None = None,
    tools_offered: bool = False,
    json_mode: bool = False,
    json_schema: dict | None = None,
    max_tokens: int | None = None,
    stop: list[str] | None = None,
) -> Reply:
    """Decide what the model "generates" for one request.

    ``thinking`` is the reasoning text to emit (the caller decides whether
    thinking is on and which default applies). Tool calls replace content when
    the request offered tools and the behaviour scripts some.
    """
    reply = Reply(prompt_tokens=prompt_tokens)
    if tools_offered and behavior.tool_calls:
        reply.thinking = split_tokens(thinking) if thinking else []
        reply.tool_calls = [
            {"name": c["name"], "arguments": dict(c.get("arguments") or {})} for c in behavior.tool_calls
        ]
        return reply

    base = behavior.reply if behavior.reply is not None else default_reply(last_user)
    text = json_document(behavior, json_schema, base) if (json_mode or json_schema) else base
    text, reply.stop_reason = cut_at_stop(text, stop or [])
    thinking_tokens = split_tokens(thinking) if thinking else []
    content_tokens = split_tokens(text)
    if max_tokens is not None and max_tokens >= 0 and len(thinking_tokens) + len(content_tokens) > max_tokens:
        reply.finish_reason = "length"
        reply.stop_reason = None
        thinking_tokens = thinking_tokens[:max_tokens]
        content_tokens = content_tokens[: max_tokens - len(thinking_tokens)]
    reply.thinking, reply.content = thinking_tokens, content_tokens
    return reply
