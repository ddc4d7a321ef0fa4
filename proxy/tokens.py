"""Fast token estimates for text the proxy has no tokenizer for. Pure: no I/O.

The estimate is the larger of two cheap counts:

- words and punctuation: each run of letters or digits is a token, plus one
  more per six characters beyond the first (long words split into pieces),
  and each other non-space character is a token of its own;
- UTF-8 bytes / 4, the usual rule of thumb for BPE vocabularies, which keeps
  scripts without spaces (Chinese, Japanese) from being counted as one word.

A rough count, meant to lean high: "The quick brown fox jumps over the lazy
dog." is 11 here and 10 for Llama 3's tokenizer; code and JSON (punctuation
that a tokenizer merges) come out higher still. Good enough to size a context
window; where an exact count matters the backend's own figures are used.
"""

from __future__ import annotations

import re

import orjson

_PIECES = re.compile(r"\w+|[^\w\s]")
_MESSAGE_OVERHEAD = 4  # role markers and separators a chat template adds per message
_IMAGE_TOKENS = 768  # a typical vision encoder's share of the context for one image


def estimate_text(text: str) -> int:
    if not text:
        return 0
    pieces = 0
    for match in _PIECES.finditer(text):
        length = match.end() - match.start()
        pieces += 1 + (length - 1) // 6
    return max(pieces, (len(text.encode("utf-8", "replace")) + 3) // 4)


def _content(content: object) -> int:
    if isinstance(content, str):
        return estimate_text(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                total += estimate_text(part["text"])
            elif part.get("type") in ("image_url", "input_image", "image"):
                total += _IMAGE_TOKENS
    return total


def estimate_messages(messages: list, tools: list | None = None) -> int:
    """A chat request's prompt: every message's text and tool calls, the tool definitions, template overhead."""
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += _MESSAGE_OVERHEAD + _content(message.get("content"))
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict):
                function = call.get("function") or {}
                total += estimate_text(str(function.get("name") or "")) + estimate_text(
                    str(function.get("arguments") or "")
                )
    for tool in tools or ():
        total += estimate_text(orjson.dumps(tool).decode())
    return total


def estimate_prompt(prompt: object) -> int:
    """A completions request's prompt (a string or a list of strings; token-id lists count as given)."""
    if isinstance(prompt, str):
        return estimate_text(prompt)
    if isinstance(prompt, list):
        if all(isinstance(p, int) for p in prompt):
            return len(prompt)
        return max((estimate_prompt(p) for p in prompt), default=0)
    return 0
