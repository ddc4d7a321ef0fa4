"""Any one field of a valid body, at any depth, swapped for a value of another JSON type.

Property: the proxy answers a 4xx in OpenAI's error shape (a 2xx only when the swap is
legal per the API, as a small oracle here decides), never a 5xx, and the same keep-alive
connection then serves a valid request. Each endpoint, in front of an Ollama and a vLLM
simulator, over one raw ``http.client`` connection whose socket must never change.

The oracle below is written independently of ``proxy/validate``: per path of the test
bodies, which JSON types (and values) the API allows there. The checker is compared with
it in both directions, so an over-strict or over-lenient schema fails here too.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import validate
from proxy.errors import InvalidRequest
from proxy.sim import SimVLLM
from tests.support import backends_config, running_proxy

# Per endpoint and backend: the whole file runs in well under 20 s on a shared machine.
EXAMPLES = int(os.environ.get("BAD_BODIES_EXAMPLES", "80"))

_PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="


def _chat_bodies(model: str, vision_model: str, ollama: bool) -> list[dict]:
    tools_body = {
        "model": model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "tools": [{"type": "function", "function": {
            "name": "weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }}],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "temperature": 0.5, "max_tokens": 16, "stop": ["\n\n"], "seed": 7, "user": "u-1",
    }  # fmt: skip
    stream_body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}},
        "logprobs": True,
        "top_logprobs": 2,
        "top_k": 20,
    }
    image_body = {
        "model": vision_model,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": _PNG}},
        ]}],
        "metadata": {"k": "v"},
    }  # fmt: skip
    if ollama:
        stream_body.update({"options": {"num_ctx": 2048, "temperature": 0.1}, "keep_alive": "5m"})
    return [tools_body, stream_body, image_body]


def _completion_bodies(model: str, ollama: bool) -> list[dict]:
    plain = {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.2, "stop": ["."],
             "seed": 3, "logprobs": 1}  # fmt: skip
    streamed = {"model": model, "prompt": ["Say hi"], "stream": True, "stream_options": {"include_usage": True}}
    if ollama:  # (llama3.1 on Ollama does not support suffix: "does not support insert")
        plain.update({"raw": False, "system": "You write stories.", "options": {"num_predict": 8}})
    else:
        streamed["suffix"] = "The end."
    return [plain, streamed]


def _embedding_bodies(model: str, ollama: bool) -> list[dict]:
    body = {"model": model, "input": ["alpha", "beta"], "encoding_format": "float", "user": "u-1"}
    if ollama:
        body.update({"truncate": True, "keep_alive": "1m", "options": {"num_ctx": 512}})
    return [body, {"model": model, "input": "gamma"}]


BODIES = {
    "ollama": {
        "chat": _chat_bodies("chat", "llava:7b", ollama=True),
        "completion": _completion_bodies("chat", ollama=True),
        "embeddings": _embedding_bodies("embed", ollama=True),
    },
    "vllm": {
        "chat": _chat_bodies("qwen-chat", "qwen-chat", ollama=False),
        "completion": _completion_bodies("qwen-chat", ollama=False),
        "embeddings": _embedding_bodies("vllm-embed", ollama=False),
    },
}
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "embeddings": "/v1/embeddings"}
VALIDATORS = {"chat": validate.chat, "completion": validate.completion, "embeddings": validate.embeddings}

# --- the oracle: what the API allows at each path of the bodies above ---------------------------

Path = tuple  # of str keys and int indices


def kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "str", list: "list", dict: "dict"}[type(value)]


def _str(value, *, nonempty=False, one_of=None) -> bool:
    return isinstance(value, str) and (not nonempty or bool(value)) and (one_of is None or value in one_of)


def _int(value, low=None, high=None) -> bool:
    return kind(value) == "int" and (low is None or value >= low) and (high is None or value <= high)


def _num(value, low=None, high=None) -> bool:
    return kind(value) in ("int", "float") and (low is None or value >= low) and (high is None or value <= high)


def _homogeneous(items, *, nonempty_strings: bool) -> bool:
    """A prompt/input array: all strings, all token ids, or all arrays of token ids, and not empty."""
    if not isinstance(items, list) or not items:
        return False
    if all(isinstance(x, str) and (x or not nonempty_strings) for x in items):
        return True
    if all(kind(x) == "int" for x in items):
        return True
    return all(isinstance(x, list) and x and all(kind(t) == "int" for t in x) for x in items)


def _tool_call(value) -> bool:
    fn = value.get("function") if isinstance(value, dict) else None
    return isinstance(fn, dict) and isinstance(fn.get("name"), str)


# pattern -> (required, what a non-null value must satisfy); "*" stands for any array index
Rule = tuple[bool, Callable]
BOOL: Rule = (False, lambda v: kind(v) == "bool")
OPT_STR: Rule = (False, _str)
REQ_STR: Rule = (True, _str)
RULES: dict[tuple, Rule] = {
    ("model",): (True, lambda v: _str(v, nonempty=True)),
    ("messages",): (True, lambda v: isinstance(v, list) and v and all(isinstance(m, dict) for m in v)),
    ("messages", "*"): (True, lambda v: isinstance(v, dict)),
    ("messages", "*", "role"): (True, lambda v: _str(v, one_of={"system", "user", "assistant", "tool"})),
    # content: required except for assistants (see oracle()); a string, or a non-empty array of parts
    ("messages", "*", "content"): (True, lambda v: isinstance(v, str) or (
        isinstance(v, list) and v and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in v))),
    ("messages", "*", "content", "*"): (True, lambda v: isinstance(v, dict)),
    ("messages", "*", "content", "*", "type"): REQ_STR,
    ("messages", "*", "content", "*", "text"): REQ_STR,
    ("messages", "*", "content", "*", "image_url"): (True, lambda v: isinstance(v, (str, dict))),
    ("messages", "*", "content", "*", "image_url", "url"): REQ_STR,
    ("messages", "*", "tool_calls"): (False, lambda v: isinstance(v, list) and all(_tool_call(c) for c in v)),
    ("messages", "*", "tool_calls", "*"): (True, lambda v: isinstance(v, dict)),
    ("messages", "*", "tool_calls", "*", "id"): OPT_STR,
    ("messages", "*", "tool_calls", "*", "type"): OPT_STR,
    ("messages", "*", "tool_calls", "*", "function"): (True, lambda v: isinstance(v, dict)),
    ("messages", "*", "tool_calls", "*", "function", "name"): REQ_STR,
    ("messages", "*", "tool_calls", "*", "function", "arguments"): OPT_STR,
    ("messages", "*", "tool_call_id"): REQ_STR,
    ("tools",): (False, lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v)),
    ("tools", "*"): (True, lambda v: isinstance(v, dict)),
    ("tools", "*", "type"): OPT_STR,
    ("tools", "*", "function"): (True, lambda v: isinstance(v, dict)),
    ("tools", "*", "function", "name"): (True, lambda v: _str(v, nonempty=True)),
    ("tools", "*", "function", "description"): OPT_STR,
    ("tools", "*", "function", "parameters"): (False, lambda v: isinstance(v, dict)),
    ("tool_choice",): (False, lambda v: isinstance(v, dict) or _str(v, one_of={"none", "auto", "required"})),
    ("tool_choice", "type"): OPT_STR,
    ("tool_choice", "function"): (True, lambda v: isinstance(v, dict)),
    ("tool_choice", "function", "name"): REQ_STR,
    ("temperature",): (False, lambda v: _num(v, 0, 2)),
    ("max_tokens",): (False, lambda v: _int(v, 1)),
    ("stop",): (False, lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))),
    ("stop", "*"): REQ_STR,
    ("seed",): (False, _int),
    ("user",): OPT_STR,
    ("stream",): BOOL,
    ("stream_options",): (False, lambda v: isinstance(v, dict)),
    ("stream_options", "include_usage"): BOOL,
    ("response_format",): (False, lambda v: isinstance(v, dict)),
    ("response_format", "type"): (True, lambda v: _str(v, one_of={"text", "json_object", "json_schema"})),
    ("response_format", "json_schema"): (True, lambda v: isinstance(v, dict)),
    ("response_format", "json_schema", "name"): OPT_STR,
    ("response_format", "json_schema", "schema"): (False, lambda v: isinstance(v, dict)),
    ("logprobs",): BOOL,  # completions' logprobs: see oracle()
    ("top_logprobs",): (False, lambda v: _int(v, 0, 20)),
    ("top_k",): (False, _int),
    ("metadata",): (False, lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values())),
    ("metadata", "k"): REQ_STR,
    ("options",): (False, lambda v: isinstance(v, dict)),
    ("options", "num_ctx"): (False, _int),
    ("options", "num_predict"): (False, _int),
    ("options", "temperature"): (False, _num),
    ("keep_alive",): (False, lambda v: kind(v) in ("str", "int", "float")),
    ("prompt",): (True, lambda v: isinstance(v, str) or _homogeneous(v, nonempty_strings=False)),
    ("suffix",): OPT_STR,
    ("raw",): BOOL,
    ("system",): OPT_STR,
    ("input",): (True, lambda v: _str(v, nonempty=True) or _homogeneous(v, nonempty_strings=True)),
    ("encoding_format",): (False, lambda v: _str(v, one_of={"float", "base64"})),
    ("truncate",): BOOL,
}  # fmt: skip
# Below these, anything goes: JSON schemas are the client's own business.
FREE = {("tools", "*", "function", "parameters"), ("response_format", "json_schema", "schema")}


def _pattern(path: Path) -> tuple:
    return tuple("*" if isinstance(s, int) else s for s in path)


def _get(body, path: Path):
    for segment in path:
        body = body[segment]
    return body


def _dotted(path: Path) -> str:
    out = ""
    for segment in path:
        out += f"[{segment}]" if isinstance(segment, int) else (f".{segment}" if out else segment)
    return out


def oracle(operation: str, body: dict, path: Path) -> tuple[bool, set[str]]:
    """(legal, the params a refusal may name) for ``body`` after the value at ``path`` was swapped."""
    pattern = _pattern(path)
    blamed = {_dotted(path)}
    value = _get(body, path)
    if operation == "completion" and pattern == ("logprobs",):
        required, allowed = False, lambda v: _int(v, 0, 20)
    elif pattern[-1:] == ("*",) and pattern[:-1] in (("prompt",), ("input",)):
        # one item of a prompt/input array: legal when the whole array still is
        required, allowed = RULES[pattern[:-1]][0], RULES[pattern[:-1]][1]
        value, blamed = _get(body, path[:-1]), {_dotted(path[:-1])}
    else:
        assert pattern in RULES, f"the oracle has no rule for {pattern}: add one"
        required, allowed = RULES[pattern]
        if pattern == ("messages", "*", "content") and body["messages"][path[1]].get("role") == "assistant":
            required = False
    legal = (not required) if value is None else bool(allowed(value))
    # Checks across fields: stream_options needs stream, top_logprobs needs logprobs.
    if legal and body.get("stream_options") is not None and body.get("stream") is not True:
        legal, blamed = False, {"stream_options"}
    if legal and operation == "chat" and body.get("top_logprobs") is not None and body.get("logprobs") is not True:
        legal, blamed = False, {"top_logprobs"}
    return legal, blamed


def _inside_free(path: Path) -> bool:
    # What lies inside a JSON schema is the client's and the backend's business (the vLLM simulator
    # even fails with a 500 on {"type": {}}, which a real vLLM would refuse): swap the schema whole only.
    pattern = _pattern(path)
    return any(pattern[: len(free)] == free and len(pattern) > len(free) for free in FREE)


def names(param: str | None, blamed: set[str]) -> bool:
    """Whether a refusal's ``param`` is one of ``blamed`` or lies inside one of them."""
    return param is not None and any(param == b or param.startswith((b + ".", b + "[")) for b in blamed)


def _paths(value, prefix: Path = ()) -> list[Path]:
    out: list[Path] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False,
                     allow_infinity=False), st.text(max_size=6))  # fmt: skip
VALUES = {
    "null": st.none(),
    "bool": st.booleans(),
    "int": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "str": st.text(max_size=8),
    "list": st.lists(_SCALARS, max_size=3),
    "dict": st.dictionaries(st.text(max_size=5), _SCALARS, max_size=3),
}


# --- the proxy and one kept-alive connection ----------------------------------------------------


@pytest.fixture(scope="module")
def vllm_embed():
    with SimVLLM(model="BAAI/bge-small-en", served_model_names=["bge-small"], embedding=True,
                 embedding_dim=8) as sim:  # fmt: skip
        yield sim


@pytest.fixture(scope="module")
def proxy_url(ollama, vllm, vllm_embed):
    config = backends_config(ollama, vllm)
    config["backends"].append({"name": "vllm-embed", "kind": "vllm", "url": vllm_embed.url})
    config["models"].append({"name": "vllm-embed", "target": "bge-small", "backends": ["vllm-embed"]})
    config["cache"] = {"mode": "off"}  # every request goes to a backend, none is answered from memory
    config["history"] = {"enabled": False}
    with running_proxy(config) as server:
        yield server.url


class KeptConnection:
    """One HTTP/1.1 connection; every request must go over the same socket."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
        self.conn.connect()
        self.sock = self.conn.sock

    def post(self, path: str, body: dict) -> tuple[int, bytes, http.client.HTTPResponse]:
        self.conn.request("POST", path, body=json.dumps(body).encode(), headers={"content-type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        assert self.conn.sock is self.sock, "the proxy closed the keep-alive connection"
        return response.status, data, response

    def close(self) -> None:
        self.conn.close()


def assert_openai_error(status: int, data: bytes) -> dict:
    error = json.loads(data)["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    return error


@pytest.mark.parametrize("backend", ["ollama", "vllm"])
@pytest.mark.parametrize("operation", ["chat", "completion", "embeddings"])
def test_swapped_field_is_a_clean_4xx_on_a_connection_that_survives(proxy_url, ollama, vllm, backend, operation):
    bodies = BODIES[backend][operation]
    path = PATHS[operation]
    connection = KeptConnection(proxy_url)
    for valid in bodies:  # the starting points really are valid, for the checker and for the backend
        VALIDATORS[operation](copy.deepcopy(valid))
        status, data, _ = connection.post(path, valid)
        assert status == 200, data

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("BAD_BODIES_RANDOM"), database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(data=st.data())
    def swap_one_field(data):
        body = copy.deepcopy(data.draw(st.sampled_from(bodies), label="body"))
        where = data.draw(st.sampled_from([p for p in _paths(body) if not _inside_free(p)]), label="path")
        old = _get(body, where)
        new_kind = data.draw(st.sampled_from([k for k in VALUES if k != kind(old)]), label="kind")
        new = data.draw(VALUES[new_kind], label="value")
        _get(body, where[:-1])[where[-1]] = new
        legal, blamed = oracle(operation, body, where)

        # The checker agrees with the oracle, both ways.
        try:
            VALIDATORS[operation](copy.deepcopy(body))
            refused_by = None
        except InvalidRequest as exc:
            refused_by = exc.param
        if legal:
            assert refused_by is None, f"{_dotted(where)} = {new!r} is legal, yet refused at {refused_by}"
        else:
            assert names(refused_by, blamed), f"{_dotted(where)} = {new!r}: refused at {refused_by}, expected {blamed}"

        status, raw, _ = connection.post(path, body)
        assert status < 500, (status, raw)
        if 200 <= status < 300:
            assert legal, f"{_dotted(where)} = {new!r} is not legal, yet answered {status}"
        else:
            assert 400 <= status < 500, status
            error = assert_openai_error(status, raw)
            if not legal:
                assert status == 400
                assert names(error["param"], blamed), (error, blamed)
        # and the same connection still serves a valid request
        status, raw, _ = connection.post(path, bodies[0])
        assert status == 200, raw

    try:
        swap_one_field()
    finally:
        connection.close()


_IMAGE = {"type": "image_url", "image_url": "data:;base64,AA"}


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "options": "x"},
         "options"),
        ("/v1/embeddings", {"model": "embed", "input": [1, "a"]}, "input[1]"),
        ("/v1/chat/completions", {"model": "qwen-chat", "messages": [{"role": "user", "content": "hi"}],
                                  "options": {"num_ctx": "8k"}}, "options.num_ctx"),
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "tool_choice": {"type": "function", "function": "f"}}, "tool_choice.function"),
        ("/v1/chat/completions", {"model": "llava:7b", "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}, _IMAGE]}]},
         "messages[2].content[0].image_url.url"),
        ("/v1/completions", {"model": "qwen-chat", "prompt": "x", "stream_options": {"include_usage": 1},
                             "stream": True}, "stream_options.include_usage"),
        # parsed fine (orjson reads 1024 levels) but too deep to encode again (254): was a 500
        ("/v1/chat/completions", {"model": "qwen-chat", "messages": [{"role": "user", "content": "hi"}],
                                  "guided_json": json.loads("[" * 300 + "]" * 300)}, "guided_json"),
    ],
)  # fmt: skip
def test_the_issue_examples_are_400_on_a_connection_that_survives(proxy_url, path, body, param):
    connection = KeptConnection(proxy_url)
    try:
        status, raw, _ = connection.post(path, body)
        assert status == 400, raw
        assert assert_openai_error(status, raw)["param"] == param
        valid = BODIES["ollama"]["embeddings" if "embeddings" in path else "chat"][0]
        status, raw, _ = connection.post("/v1/embeddings" if "embeddings" in path else "/v1/chat/completions", valid)
        assert status == 200, raw
    finally:
        connection.close()
