"""Locust users for any OpenAI-compatible base URL: the proxy, or a backend directly.

    pip install -e '.[load]'
    llm-proxy demo &                      # or any proxy / vLLM / Ollama /v1 endpoint
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 --headless -u 16 -r 16 -t 30s

Pick user classes by name on the command line (ChatUser, StreamingChatUser, EmbeddingsUser).
Environment: LOAD_CHAT_MODEL (default "chat"), LOAD_EMBED_MODEL (default "embed"),
LOAD_API_KEY (sent as a Bearer token when set), LOAD_MAX_TOKENS (default 64).

Streaming users record time to first token ("TTFT"), the gap between tokens ("inter-token")
and the time to the end of the stream ("stream-total") as entries of their own.
"""

from __future__ import annotations

import os
import time

import orjson
from locust import FastHttpUser, HttpUser, constant, events, task

CHAT_MODEL = os.environ.get("LOAD_CHAT_MODEL", "chat")
EMBED_MODEL = os.environ.get("LOAD_EMBED_MODEL", "embed")
MAX_TOKENS = int(os.environ.get("LOAD_MAX_TOKENS", "64"))
HEADERS = {"content-type": "application/json"}
if os.environ.get("LOAD_API_KEY"):
    HEADERS["authorization"] = f"Bearer {os.environ['LOAD_API_KEY']}"

MESSAGES = [{"role": "user", "content": "Write two sentences about load testing."}]


def record(name: str, started: float, length: int = 0, exception: Exception | None = None) -> None:
    events.request.fire(
        request_type="SSE",
        name=name,
        response_time=(time.perf_counter() - started) * 1000,
        response_length=length,
        exception=exception,
        context={},
    )


class ChatUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def chat(self) -> None:
        body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        with self.client.post("/v1/chat/completions", data=orjson.dumps(body), headers=HEADERS,
                              name="chat", catch_response=True) as resp:  # fmt: skip
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
            elif not orjson.loads(resp.content)["choices"][0]["message"].get("content"):
                resp.failure("empty answer")


class StreamingChatUser(HttpUser):
    # HttpUser, not FastHttpUser: its stream yields bytes as they arrive, which timing tokens needs.
    wait_time = constant(0)

    @task
    def stream(self) -> None:
        body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True}
        started = time.perf_counter()
        first = last = None
        with self.client.post("/v1/chat/completions", data=orjson.dumps(body), headers=HEADERS,
                              name="chat-stream", stream=True, catch_response=True) as resp:  # fmt: skip
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            buffer = b""
            done = False
            for piece in resp.iter_content(chunk_size=None):
                buffer += piece
                *events_, buffer = buffer.split(b"\n\n")
                for event in events_:
                    if not event.startswith(b"data: "):
                        continue
                    data = event[6:]
                    if data == b"[DONE]":
                        done = True
                        continue
                    chunk = orjson.loads(data)
                    if "error" in chunk:
                        resp.failure(chunk["error"].get("message", "error event"))
                        return
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            record("TTFT", started)
                        elif last is not None:
                            record("inter-token", last)
                        last = now
            if not done:
                resp.failure("stream ended without [DONE]")
            else:
                record("stream-total", started)  # the request entry itself stops at the headers


class EmbeddingsUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def embed(self) -> None:
        body = {"model": EMBED_MODEL, "input": ["load testing embeddings", "a second document"],
                "encoding_format": "float"}  # fmt: skip
        with self.client.post("/v1/embeddings", data=orjson.dumps(body), headers=HEADERS,
                              name="embeddings", catch_response=True) as resp:  # fmt: skip
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
