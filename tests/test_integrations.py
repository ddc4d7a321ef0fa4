"""LangChain and LlamaIndex, pointed at the proxy with nothing but a base URL and a key."""

from __future__ import annotations

import pytest

from proxy.sim import Behavior

langchain_openai = pytest.importorskip("langchain_openai")


def test_langchain_chat_invoke_and_stream(proxy, ollama):
    ollama.behavior = Behavior(reply="Bonjour le monde")
    llm = langchain_openai.ChatOpenAI(model="chat", base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
    assert llm.invoke("Say hello in French").content == "Bonjour le monde"
    assert "".join(chunk.content for chunk in llm.stream("Say hello in French")) == "Bonjour le monde"


def test_langchain_tool_binding(proxy, vllm):
    vllm.behavior = Behavior(tool_calls=[{"name": "multiply", "arguments": {"a": 6, "b": 7}}])

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    llm = langchain_openai.ChatOpenAI(model="qwen-chat", base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
    message = llm.bind_tools([multiply]).invoke("What is 6 times 7?")
    assert message.tool_calls[0]["name"] == "multiply"
    assert message.tool_calls[0]["args"] == {"a": 6, "b": 7}


def test_langchain_embeddings(proxy, ollama):
    # LangChain's advice for any non-OpenAI server: send text, not tiktoken ids. no-store: embed_query
    # must be answered by the backend, not by the cache embed_documents just filled.
    emb = langchain_openai.OpenAIEmbeddings(
        model="embed",
        base_url=f"{proxy.url}/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        default_headers={"Cache-Control": "no-store"},
    )
    vectors = emb.embed_documents(["alpha", "beta"])
    assert len(vectors) == 2 and len(vectors[0]) == 16 and vectors[0] != vectors[1]
    assert emb.embed_query("alpha") == pytest.approx(vectors[0], abs=1e-6)
    inputs = [body["input"] for method, path, body, _ in ollama.requests if path == "/api/embed"]
    assert inputs == [["alpha", "beta"], ["alpha"]]


def test_langchain_legacy_completions_llm(proxy, ollama):
    ollama.behavior = Behavior(reply="upon a time")
    llm = langchain_openai.OpenAI(model="chat", base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
    assert llm.invoke("Once") == "upon a time"


def test_llamaindex_openai_like(proxy, ollama):
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage

    ollama.behavior = Behavior(reply="Indexed answer")
    llm = openai_like.OpenAILike(model="chat", api_base=f"{proxy.url}/v1", api_key="unused",
                                 is_chat_model=True, max_retries=0)  # fmt: skip
    assert llm.chat([ChatMessage(role="user", content="hi")]).message.content == "Indexed answer"
    streamed = "".join(r.delta or "" for r in llm.stream_chat([ChatMessage(role="user", content="hi")]))
    assert streamed == "Indexed answer"
    assert llm.complete("hi").text == "Indexed answer"
