"""Conversation adaptation for models whose chat template rejects some conversations. Pure: no I/O.

Gemma's templates raise "System role not supported"; Mistral-style templates
require strict user/assistant alternation. A model entry in the config says
which applies, and the messages are rewritten here before any backend sees them.

The rewriting is stable and documented (docs/adaptation.md):

- ``system_prompt`` is prepended as a system message.
- ``developer`` messages become ``system`` messages (few templates know the role).
- Without a system role, every system message's text is folded, in order, into
  the first user message as ``"<system text>\\n\\n<user text>"``.
- With alternation, consecutive user messages are merged (texts joined by a
  blank line), as are consecutive assistant messages without tool calls; a
  conversation whose first turn is the assistant's gets an empty user turn first.
"""

from __future__ import annotations

from .config import ModelConfig

_SEPARATOR = "\n\n"


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")


def _prefix(message: dict, text: str) -> dict:
    """``message`` with ``text`` put in front of its content, whatever form that content has."""
    content = message.get("content")
    if isinstance(content, list):
        return {**message, "content": [{"type": "text", "text": text}, *content]}
    rest = content or ""
    return {**message, "content": f"{text}{_SEPARATOR}{rest}" if rest else text}


def fold_system(messages: list[dict]) -> list[dict]:
    system = [_text(m.get("content")) for m in messages if m["role"] == "system"]
    others = [m for m in messages if m["role"] != "system"]
    if not system:
        return others
    text = _SEPARATOR.join(t for t in system if t)
    for i, message in enumerate(others):
        if message["role"] == "user":
            return [*others[:i], _prefix(message, text), *others[i + 1 :]]
    return [{"role": "user", "content": text}, *others]


def _mergeable(a: dict, b: dict) -> bool:
    if a["role"] != b["role"] or a["role"] not in ("user", "assistant", "system"):
        return False
    return not (a.get("tool_calls") or b.get("tool_calls"))


def _merge(a: dict, b: dict) -> dict:
    if isinstance(a.get("content"), list) or isinstance(b.get("content"), list):
        parts = []
        for m in (a, b):
            c = m.get("content")
            parts.extend(c if isinstance(c, list) else [{"type": "text", "text": c or ""}])
        return {**a, "content": parts}
    texts = [t for t in (a.get("content") or "", b.get("content") or "") if t]
    return {**a, "content": _SEPARATOR.join(texts)}


def alternate(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    for message in messages:
        if out and _mergeable(out[-1], message):
            out[-1] = _merge(out[-1], message)
        else:
            out.append(message)
    first = next((i for i, m in enumerate(out) if m["role"] != "system"), None)
    if first is not None and out[first]["role"] == "assistant":
        out.insert(first, {"role": "user", "content": ""})
    return out


def adapt_messages(messages: list[dict], model: ModelConfig) -> list[dict]:
    if model.system_prompt:
        messages = [{"role": "system", "content": model.system_prompt}, *messages]
    if any(m["role"] == "developer" for m in messages):
        messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    if not model.supports_system_role:
        messages = fold_system(messages)
    if model.alternating_roles:
        messages = alternate(messages)
    return messages


def needs_adapting(model: ModelConfig | None) -> bool:
    if model is None:
        return False
    return bool(model.system_prompt or not model.supports_system_role or model.alternating_roles or model.defaults)


def adapt_request(body: dict, model: ModelConfig) -> dict:
    """The request with the model's defaults filled in and, for chat, its messages adapted."""
    out = dict(body)
    if model.defaults is not None:
        for key, value in model.defaults.items():
            if value is not None and out.get(key) is None:
                out[key] = value
    if "messages" in out:
        out["messages"] = adapt_messages(out["messages"], model)
    return out
