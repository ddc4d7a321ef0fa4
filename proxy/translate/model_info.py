"""What a backend tells about a model, reduced to what routing and adaptation need. Pure: no I/O.

Ollama's ``/api/show`` gives the chat template, the capabilities (completion,
tools, vision, embedding, thinking, insert) and the context length. vLLM's
``/v1/models`` card gives ``max_model_len`` and nothing about capabilities.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    capabilities: tuple[str, ...] | None = None  # None: the backend does not say
    context_length: int | None = None
    system_role: bool | None = None  # does the chat template render system messages? None: unknown
    family: str | None = None
    num_ctx: int | None = None  # the Modelfile's own num_ctx (Ollama), which replaces the server default

    def as_dict(self) -> dict:
        return {
            "capabilities": list(self.capabilities) if self.capabilities is not None else None,
            "context_length": self.context_length,
            "system_role": self.system_role,
            "family": self.family,
            "num_ctx": self.num_ctx,
        }


# A Go template renders system text when it reads .System (the legacy single system prompt) or
# branches on the "system" role while ranging over .Messages. One that does neither drops
# system messages without a word, which is worse than an error: fold them into the user turn.
_SYSTEM_IN_TEMPLATE = re.compile(r"\.System\b|\"system\"")


def renders_system(template: str | None) -> bool | None:
    if not template:
        return None  # no template (embedding models, raw GGUF): nothing to decide
    return bool(_SYSTEM_IN_TEMPLATE.search(template))


def from_ollama_show(show: dict) -> ModelInfo:
    info = show.get("model_info") or {}
    context = None
    for key, value in info.items():
        if key.endswith(".context_length") and isinstance(value, int):
            context = value
            break
    caps = show.get("capabilities")
    details = show.get("details") or {}
    return ModelInfo(
        capabilities=tuple(c for c in caps if isinstance(c, str)) if isinstance(caps, list) else None,
        context_length=context,
        system_role=renders_system(show.get("template")),
        family=details.get("family") or info.get("general.architecture"),
        num_ctx=_modelfile_num_ctx(show.get("parameters")),
    )


_NUM_CTX = re.compile(r"^\s*num_ctx\s+(\d+)\s*$", re.MULTILINE)


def _modelfile_num_ctx(parameters: object) -> int | None:
    """``num_ctx 8192`` in ``/api/show``'s ``parameters`` (one ``name value`` per line)."""
    match = _NUM_CTX.search(parameters) if isinstance(parameters, str) else None
    return int(match.group(1)) if match else None


def from_openai_card(card: dict) -> ModelInfo:
    length = card.get("max_model_len")
    return ModelInfo(context_length=length if isinstance(length, int) else None)
