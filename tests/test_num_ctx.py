"""Ollama's context window is sized to the prompt instead of cutting it, or the request is refused."""

from __future__ import annotations

import httpx
import openai
import pytest

from proxy.config import ContextConfig
from proxy.errors import ContextLengthExceeded
from proxy.sim import Behavior, ModelSpec, SimOllama
from proxy.tokens import estimate_messages, estimate_prompt, estimate_text
from proxy.translate.model_info import ModelInfo, from_ollama_show
from proxy.translate.num_ctx import choose, fit
from tests.support import reset_health, running_proxy

# --- the pure decision --------------------------------------------------------------------------


def test_the_estimate_counts_words_punctuation_and_long_words():
    assert estimate_text("") == 0
    assert estimate_text("The quick brown fox jumps over the lazy dog.") == 11  # 10 for Llama 3's tokenizer
    assert estimate_text("a, b; c!") == 6
    assert estimate_text("antidisestablishmentarianism") == 7  # one word, 28 letters: split in pieces
    assert estimate_text("你好世界你好世界") == 6  # no spaces: the byte count (24 / 4) wins
    long = "lorem ipsum dolor sit amet " * 100
    assert 500 <= estimate_text(long) <= 700  # 500 words, 2,700 bytes


def test_a_conversation_counts_its_messages_tools_and_images():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{\"x\": 1}"}}]},
    ]  # fmt: skip
    without = estimate_messages(messages)
    assert without == 3 * 4 + estimate_text("Be brief.") + estimate_text("What is this?") + 768 + \
        estimate_text("look") + estimate_text('{"x": 1}')  # fmt: skip
    tools = [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}]
    assert estimate_messages(messages, tools) > without
    assert estimate_prompt(["one two", "one two three four"]) == estimate_text("one two three four")
    assert estimate_prompt([1, 2, 3]) == 3


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "expected"),
    [
        (500, None, None),  # 500 + 1,024 reserved fits the default 2,048: leave Ollama alone
        (1500, None, 4096),  # 2,524 needed: the next power of two
        (1500, 100, None),  # an explicit max_tokens replaces the reserve: 1,600 fits
        (5000, 2000, 8192),
        (9000, None, 16384),
        (15000, None, 16384),  # 16,024 needed
        (15500, None, 16384),  # the reserve does not fit, the prompt does: capped at the maximum
    ],
)
def test_choose_rounds_up_to_a_power_of_two_within_the_cap(prompt, max_tokens, expected):
    assert choose(prompt, max_tokens, default=2048, cap=16384, reserve=1024) == expected


@pytest.mark.parametrize(("prompt", "max_tokens"), [(16384, None), (20000, None), (15000, 2000)])
def test_choose_refuses_what_the_cap_cannot_hold(prompt, max_tokens):
    with pytest.raises(ValueError):
        choose(prompt, max_tokens, default=2048, cap=16384, reserve=1024)


def _chat(words: int, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "word " * words}], **extra}


def test_fit_sets_num_ctx_and_keeps_the_clients_options():
    body = _chat(3000, options={"temperature": 0.1})
    sized, sizing = fit(body, "chat", ModelInfo(context_length=131072), None, ContextConfig())
    assert sized["options"] == {"temperature": 0.1, "num_ctx": 8192}
    assert sizing.num_ctx == 8192 and sizing.prompt_estimate == estimate_messages(body["messages"])
    assert "num_ctx" not in body["options"]  # the original body is not changed
    assert sizing.headers() == [
        (b"x-proxy-num-ctx", b"8192"),
        (b"x-proxy-prompt-estimate", str(sizing.prompt_estimate).encode()),
    ]


def test_fit_leaves_alone_a_client_window_short_prompts_and_a_disabled_feature():
    info = ModelInfo(context_length=8192)
    own = _chat(3000, options={"num_ctx": 1024})
    assert fit(own, "chat", info, None, ContextConfig()) == (own, None)
    short = _chat(10)
    assert fit(short, "chat", info, None, ContextConfig()) == (short, None)
    off = _chat(3000)
    assert fit(off, "chat", info, None, ContextConfig(auto_num_ctx=False)) == (off, None)


def test_fit_uses_the_modelfile_window_and_the_ceilings():
    body = _chat(3000)
    # The Modelfile already gives 8,192: enough, so nothing is set.
    assert fit(body, "chat", ModelInfo(context_length=32768, num_ctx=8192), None, ContextConfig())[1] is None
    # The per-model ceiling wins over the global one ...
    with pytest.raises(ContextLengthExceeded) as info:
        fit(body, "chat", ModelInfo(context_length=32768), 2048, ContextConfig())
    assert "models[].max_num_ctx" in info.value.message and info.value.status == 400
    # ... and the global one applies without it.
    assert fit(body, "chat", ModelInfo(context_length=32768), None, ContextConfig(max_num_ctx=6000))[1].num_ctx == 6000
    # Without a known context length, only the ceiling bounds it.
    assert fit(body, "chat", None, None, ContextConfig())[1].num_ctx == 8192


def test_the_refusal_is_openais_context_length_exceeded():
    with pytest.raises(ContextLengthExceeded) as info:
        fit(_chat(9000), "chat", ModelInfo(context_length=8192), None, ContextConfig())
    body = info.value.body()["error"]
    assert body["code"] == "context_length_exceeded" and body["type"] == "invalid_request_error"
    assert body["param"] == "messages"
    assert body["message"].startswith("This model's maximum context length is 8192 tokens")
    with pytest.raises(ContextLengthExceeded) as info:
        fit(
            {"model": "m", "prompt": "word " * 9000},
            "completion",
            ModelInfo(context_length=8192),
            None,
            ContextConfig(),
        )
    assert info.value.param == "prompt"


def test_the_modelfile_num_ctx_is_read_from_api_show():
    show = {
        "parameters": 'stop                           "<|eot_id|>"\nnum_ctx                        8192',
        "model_info": {},
    }
    assert from_ollama_show(show).num_ctx == 8192
    assert from_ollama_show({"parameters": "temperature 0.7"}).num_ctx is None


# --- end to end, against the simulated Ollama (which cuts prompts the way Ollama does) -----------


@pytest.fixture(scope="module")
def node():
    models = [ModelSpec("llama3.1:8b", capabilities=("completion", "tools"), context_length=16384)]
    with SimOllama(models=models, num_ctx=2048) as sim:
        yield sim


def _config(url: str, **context) -> dict:
    return {
        "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
        "context": context,
        "backends": [{"name": "ollama", "kind": "ollama", "url": url}],
        "models": [
            {"name": "chat", "target": "llama3.1:8b"},
            {"name": "small", "target": "llama3.1:8b", "max_num_ctx": 4096},
        ],
    }


@pytest.fixture(scope="module")
def proxy(node):
    with running_proxy(_config(node.url)) as server:
        yield server


@pytest.fixture
def client(proxy, node):
    reset_health(proxy)
    node.behavior = Behavior(reply="read it all")
    node.reset()
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0) as c:
        yield c


def _sent_options(sim) -> list[dict]:
    return [r[2].get("options") or {} for r in sim.requests if r[1] in ("/api/chat", "/api/generate")]


LONG = [{"role": "user", "content": "word " * 3000}]  # the sim counts 3,004 prompt tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_long_prompt_gets_a_window_that_holds_it(client, node, stream):
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=LONG, stream=stream, stream_options={"include_usage": True} if stream else None
    )
    if stream:
        usage = [c.usage for c in raw.parse() if c.usage][-1]
    else:
        usage = raw.parse().usage
    assert raw.headers["x-proxy-num-ctx"] == "8192"
    assert int(raw.headers["x-proxy-prompt-estimate"]) >= 3004
    assert _sent_options(node) == [{"num_ctx": 8192}]
    assert usage.prompt_tokens == 3004  # every token was read
    assert node.truncations == []


def test_without_the_sizing_ollama_cuts_the_prompt_silently(node):
    node.behavior = Behavior(reply="read it all")
    node.reset()
    with running_proxy(_config(node.url, auto_num_ctx=False)) as server:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(model="chat", messages=LONG)
    assert raw.parse().usage.prompt_tokens == 2048  # a third of the prompt was dropped, no error said so
    assert node.truncations == [{"model": "llama3.1:8b", "prompt_tokens": 3004, "num_ctx": 2048}]
    assert "x-proxy-num-ctx" not in raw.headers


def test_a_prompt_larger_than_the_model_is_refused_before_it_reaches_ollama(client, node):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "word " * 17000}])
    error = info.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "maximum context length is 16384 tokens" in error["message"]
    assert _sent_options(node) == []


def test_the_models_ceiling_bounds_the_window(client, node):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="small", messages=LONG, max_tokens=2000)
    assert info.value.body["code"] == "context_length_exceeded"
    assert "max_num_ctx" in info.value.body["message"]
    raw = client.chat.completions.with_raw_response.create(model="small", messages=LONG)
    assert raw.headers["x-proxy-num-ctx"] == "4096"  # the prompt fits; the answer gets what is left


def test_a_clients_own_num_ctx_and_short_prompts_are_left_alone(client, node):
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=LONG, extra_body={"options": {"num_ctx": 4096}}
    )
    assert "x-proxy-num-ctx" not in raw.headers
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert "x-proxy-num-ctx" not in raw.headers
    assert _sent_options(node) == [{"num_ctx": 4096}, {}]


def test_completions_are_sized_too(proxy, node):
    node.reset()
    response = httpx.post(f"{proxy.url}/v1/completions", json={"model": "chat", "prompt": "word " * 3000}, timeout=10)
    assert response.status_code == 200
    assert response.headers["x-proxy-num-ctx"] == "8192"
    assert response.json()["usage"]["prompt_tokens"] == 3004  # the whole prompt was read
    assert node.truncations == []
