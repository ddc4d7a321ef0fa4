"""What routing and adaptation read from /api/show and /v1/models cards, against recorded shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.translate.model_info import ModelInfo, from_ollama_show, from_openai_card, renders_system

FIXTURES = Path(__file__).parent / "fixtures" / "model_info"


def show(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}_show.json").read_text())


@pytest.mark.parametrize(
    "name,system,caps,context",
    [
        ("llama31", True, ("completion", "tools"), 131072),  # reads .System
        ("gemma3", True, ("completion", "vision"), 131072),  # folds the system role into the user turn itself
        ("no_system", False, ("completion",), 32768),  # ranges over messages, never renders a system one
        ("embedding", None, ("embedding",), 2048),  # no template: nothing to decide
        ("old_server", False, None, None),  # an Ollama too old to list capabilities
    ],
)
def test_ollama_show_is_reduced_to_what_routing_needs(name, system, caps, context):
    info = from_ollama_show(show(name))
    assert info.system_role is system
    assert info.capabilities == caps
    assert info.context_length == context


def test_system_detection_looks_at_template_syntax_not_prose():
    assert renders_system('{{ if eq .Role "system" }}{{ .Content }}{{ end }}') is True
    assert renders_system("{{ .SystemPrompt }}") is False  # another variable, not .System
    assert renders_system("You are a system.{{ .Prompt }}") is False


def test_vllm_card_gives_the_context_length_only():
    assert from_openai_card({"id": "m", "max_model_len": 4096}) == ModelInfo(context_length=4096)
    assert from_openai_card({"id": "m"}) == ModelInfo()
