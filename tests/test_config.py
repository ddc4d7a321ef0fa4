"""Configuration: one message per problem, each with its key path; environment substitution."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def problems(data, env=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env or {})
    return info.value.problems


def test_shipped_config_is_valid():
    config = load_config(ROOT / "config.yaml", env={})
    assert config.server.port == 8080
    assert config.backends[0].kind == "ollama"
    assert config.backends[0].url == "http://127.0.0.1:11434"
    assert {m.name for m in config.models} >= {"chat"}


def test_issue_example_shape_is_accepted():
    data = yaml.safe_load(
        """
        server: {host: 127.0.0.1, port: 8080, api_keys: [], admin_keys: []}
        storage: {path: ./llm-proxy.db}
        backends:
          - {name: local-ollama, kind: ollama, url: "http://127.0.0.1:11434", weight: 1, max_concurrent: 4}
          - {name: gpu-vllm, kind: vllm, url: "http://127.0.0.1:8000", api_key: "${VLLM_API_KEY:-}"}
        models:
          - {name: chat, target: "llama3.1:8b", backends: [local-ollama]}
        """
    )
    config = parse_config(data, env={"VLLM_API_KEY": "s3cret"})
    assert config.backend("gpu-vllm").api_key == "s3cret"
    assert config.backend("local-ollama").max_concurrent == 4
    assert "s3cret" not in repr(config)  # secrets stay out of reprs and so out of logs


def test_every_problem_is_reported_with_its_key_path():
    found = problems(
        {
            "server": {"port": "eighty", "colour": "blue"},
            "backends": [
                {"name": "a", "kind": "ollama", "url": "http://x"},
                {"name": "b", "kind": "tgi", "url": "http://y"},
                {"name": "a", "kind": "vllm", "url": "not a url"},
                {"kind": "vllm", "url": "http://z"},
            ],
            "models": [{"name": "chat", "target": "m", "backends": ["a", "ghost"]}, {"name": "chat", "target": "n"}],
            "extra": 1,
        }
    )
    assert "server.port: expected an integer, got 'eighty'" in found
    # The list of valid keys grows with ServerConfig; what matters is the path, the verdict and the list's start.
    assert any(
        p.startswith("server.colour: unknown key (valid keys: host, port, api_keys, admin_keys, ") for p in found
    )
    assert "backends[1].kind: expected one of ollama, vllm, openai, got 'tgi'" in found
    assert "backends[2].url: expected an http:// or https:// URL, got 'not a url'" in found
    assert "backends[3].name: required (a string)" in found
    assert "backends[2].name: duplicate name 'a' (also backends[0])" in found
    assert "models[0].backends[1]: unknown backend 'ghost' (defined: a, b)" in found
    assert "models[1].name: duplicate name 'chat' (also models[0])" in found
    assert any(p.startswith("extra: unknown key") for p in found)
    assert len(found) == 9


def test_environment_substitution():
    data = {
        "server": {"port": "${PORT:-9000}", "api_keys": ["${KEY}"]},
        "backends": [{"name": "o", "kind": "${KIND:-ollama}", "url": "http://${HOST}:11434", "api_key": "$${literal}"}],
    }
    config = parse_config(data, env={"KEY": "k1", "HOST": "10.0.0.5"})
    assert config.server.port == 9000
    assert config.server.api_keys == ("k1",)
    assert config.backends[0].kind == "ollama"
    assert config.backends[0].url == "http://10.0.0.5:11434"
    assert config.backends[0].api_key == "${literal}"


def test_missing_environment_variable_is_named():
    found = problems({"backends": [{"name": "v", "kind": "vllm", "url": "http://v", "api_key": "${VLLM_API_KEY}"}]})
    assert found == ["backends[0].api_key: environment variable VLLM_API_KEY is not set "
                     "(use ${VLLM_API_KEY:-default} for a default)"]  # fmt: skip


@pytest.mark.parametrize(
    "data,expected",
    [
        ({"timeouts": {"connect": 0}}, "timeouts.connect: must be greater than 0, got 0"),
        ({"server": {"port": 70000}}, "server.port: expected a port number from 0 to 65535, got 70000"),
        ({"backends": {"name": "x"}}, "backends: expected a list, got dict"),
        ({"server": []}, "server: expected a mapping, got list"),
        ({"server": {"api_keys": "k"}}, "server.api_keys: expected a list, got str"),
        ({"backends": [{"name": "x", "kind": "ollama", "url": "http://x", "weight": True}]},
         "backends[0].weight: expected a number, got True"),
    ],
)  # fmt: skip
def test_wrong_types_and_ranges(data, expected):
    assert expected in problems(data)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert "cannot read" in info.value.problems[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {host: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "not valid YAML" in info.value.problems[0]


def test_empty_file_gives_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    config = load_config(empty)
    assert config.backends == () and config.timeouts.first_byte == 300
