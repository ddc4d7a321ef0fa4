"""Chat-template adaptation: the exact messages a backend receives, for each model flag."""

from __future__ import annotations

import openai
import pytest

from proxy.adapt import adapt_messages, alternate, fold_system
from proxy.config import ModelConfig, SamplingDefaults
from proxy.sim import SimVLLM
from tests.support import running_proxy


def model(**flags) -> ModelConfig:
    return ModelConfig(name="m", target="t", **flags)


def test_system_messages_fold_into_the_first_user_message_in_order():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "assistant", "content": "Salut"},
    ]
    assert fold_system(messages) == [
        {"role": "user", "content": "Be brief.\n\nAnswer in French.\n\nHi"},
        {"role": "assistant", "content": "Salut"},
    ]


def test_folding_keeps_content_parts_and_handles_no_user_message():
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]
    folded = fold_system([{"role": "system", "content": "S"}, {"role": "user", "content": parts}])
    assert folded == [{"role": "user", "content": [{"type": "text", "text": "S"}, *parts]}]
    assert fold_system([{"role": "system", "content": "S"}]) == [{"role": "user", "content": "S"}]


def test_alternation_merges_runs_and_fixes_a_leading_assistant_turn():
    messages = [
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "One"},
        {"role": "user", "content": "Two"},
        {"role": "assistant", "content": "A"},
        {"role": "assistant", "content": "B"},
    ]
    assert alternate(messages) == [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "One\n\nTwo"},
        {"role": "assistant", "content": "A\n\nB"},
    ]


def test_alternation_leaves_tool_turns_alone():
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f"}}]}
    messages = [{"role": "user", "content": "x"}, call, {"role": "tool", "tool_call_id": "c", "content": "r"},
                {"role": "tool", "tool_call_id": "d", "content": "s"}]  # fmt: skip
    assert alternate(messages) == messages


def test_developer_becomes_system_and_system_prompt_comes_first():
    out = adapt_messages([{"role": "developer", "content": "D"}, {"role": "user", "content": "U"}],
                         model(system_prompt="You are helpful."))  # fmt: skip
    assert out == [{"role": "system", "content": "You are helpful."}, {"role": "system", "content": "D"},
                   {"role": "user", "content": "U"}]  # fmt: skip


def test_nothing_changes_without_flags():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert adapt_messages(messages, model()) == messages


# --- end to end: what the backend receives ------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_setup(ollama):
    strict_vllm = SimVLLM(model="google/gemma-3-1b-it", served_model_names=["gemma-3"], supports_system_role=False)
    with strict_vllm:
        config = {
            "backends": [{"name": "o", "kind": "ollama", "url": ollama.url},
                         {"name": "v", "kind": "vllm", "url": strict_vllm.url}],  # fmt: skip
            "models": [
                {"name": "gemma-ollama", "target": "llama3.1:8b", "supports_system_role": False,
                 "alternating_roles": True, "defaults": {"temperature": 0.1, "max_tokens": 77}},
                {"name": "gemma-vllm", "target": "gemma-3", "supports_system_role": False},
                {"name": "gemma-vllm-raw", "target": "gemma-3"},
            ],
        }  # fmt: skip
        with running_proxy(config) as server:
            yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0), strict_vllm


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "First"},
    {"role": "user", "content": "Second"},
]


def test_ollama_backend_receives_the_adapted_conversation_and_defaults(gemma_setup, ollama):
    client, _ = gemma_setup
    client.chat.completions.create(model="gemma-ollama", messages=CONVERSATION, max_tokens=5)
    sent = [r for r in ollama.requests if r[1] == "/api/chat"][-1][2]
    assert sent["messages"] == [{"role": "user", "content": "Be brief.\n\nFirst\n\nSecond"}]
    assert sent["options"]["temperature"] == 0.1  # a default the request left out
    assert sent["options"]["num_predict"] == 5  # the request's own value wins over the default


def test_vllm_template_without_system_role_works_through_the_alias(gemma_setup):
    client, sim = gemma_setup
    reply = client.chat.completions.create(model="gemma-vllm", messages=CONVERSATION)
    assert reply.choices[0].message.content
    sent = [r for r in sim.requests if r[1] == "/v1/chat/completions"][-1][2]
    assert [m["role"] for m in sent["messages"]] == ["user", "user"]
    assert sent["messages"][0]["content"] == "Be brief.\n\nFirst"


def test_vllm_template_error_is_learned_adapted_and_retried_once(gemma_setup):
    client, sim = gemma_setup
    raw = client.chat.completions.with_raw_response.create(model="gemma-vllm-raw", messages=CONVERSATION)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-proxy-attempts"] == "2"
    first, second = [r[2] for r in sim.requests if r[1] == "/v1/chat/completions"][-2:]
    assert first["messages"][0]["role"] == "system"  # refused by the template ...
    assert [m["role"] for m in second["messages"]] == ["user", "user"]  # ... then folded and accepted
    sim.reset()
    again = client.chat.completions.with_raw_response.create(model="gemma-vllm-raw", messages=CONVERSATION)
    assert again.headers["x-proxy-attempts"] == "1"  # remembered: adapted from the start
    assert [r[2]["messages"][0]["role"] for r in sim.requests if r[1] == "/v1/chat/completions"] == ["user"]


def test_config_rejects_wrong_flag_types():
    from proxy.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "m", "target": "t", "supports_system_role": "no",
                                  "defaults": {"temperature": "hot", "colour": 1}}]}, env={})  # fmt: skip
    assert "models[0].supports_system_role: expected true or false, got 'no'" in info.value.problems
    assert "models[0].defaults.temperature: expected a number, got 'hot'" in info.value.problems
    assert any(p.startswith("models[0].defaults.colour: unknown key") for p in info.value.problems)
    assert SamplingDefaults().temperature is None
