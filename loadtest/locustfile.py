"""Locust users for any OpenAI-compatible base URL: the proxy, or a backend directly.

    pip install -e '.[load]'
    llm-proxy demo &                      # or any proxy / vLLM / Ollama /v1 endpoint
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 --headless -u 16 -r 16 -t 30s ChatUser

Pick user classes by name on the command line: ChatUser (non-streaming chat),
StreamingChatUser (the same request with ``stream: true``), EmbeddingsUser. Naming none runs all
three. ``python -m loadtest.parity`` drives this file through Locust's library API.

Environment:

- ``LOAD_CHAT_MODEL`` (default ``chat``), ``LOAD_EMBED_MODEL`` (default ``embed``)
- ``LOAD_API_KEY``: sent as a Bearer token when set
- ``LOAD_MAX_TOKENS`` (default 64; 0 leaves ``max_tokens`` out of the request)
- ``LOAD_PROMPT``: the user message (default: a short request for two sentences)
- ``LOAD_UNIQUE=1``: end every prompt with a unique number, so no response cache can answer
- ``LOAD_TIMEOUT``: seconds before a request counts as failed (default 60)

Entries: ``chat``, ``embeddings``; for streams ``chat-stream`` (until the response headers, as
Locust times any streamed request), ``TTFT`` (time to the first content token), ``inter-token``
(the gap between two content tokens) and ``stream-total`` (until ``data: [DONE]``).
"""

from __future__ import annotations

import itertools
import os
import time

import orjson
from locust import FastHttpUser, HttpUser, constant, task

CHAT_MODEL = os.environ.get("LOAD_CHAT_MODEL", "chat")
EMBED_MODEL = os.environ.get("LOAD_EMBED_MODEL", "embed")
MAX_TOKENS = int(os.environ.get("LOAD_MAX_TOKENS", "64"))
PROMPT = os.environ.get("LOAD_PROMPT", "Write two sentences about load testing.")
UNIQUE = os.environ.get("LOAD_UNIQUE", "") not in ("", "0")
TIMEOUT = float(os.environ.get("LOAD_TIMEOUT", "60"))
HEADERS = {"content-type": "application/json"}
if os.environ.get("LOAD_API_KEY"):
    HEADERS["authorization"] = f"Bearer {os.environ['LOAD_API_KEY']}"


def chat_body(stream: bool, serial: int) -> bytes:
    # The pid keeps prompts unique across load-generator processes, not only within one.
    content = f"{PROMPT} [{os.getpid()}-{serial}]" if UNIQUE else PROMPT
    body: dict = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": content}]}
    if MAX_TOKENS > 0:
        body["max_tokens"] = MAX_TOKENS
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


class ChatUser(FastHttpUser):
    wait_time = constant(0)
    network_timeout = connection_timeout = TIMEOUT

    def on_start(self) -> None:
        self.serials = itertools.count()

    @task
    def chat(self) -> None:
        with self.client.post("/v1/chat/completions", data=chat_body(False, next(self.serials)), headers=HEADERS,
                              name="chat", catch_response=True) as resp:  # fmt: skip
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {(resp.text or '')[:200]}")
            elif not orjson.loads(resp.content)["choices"][0]["message"].get("content"):
                resp.failure("empty answer")


class StreamingChatUser(HttpUser):
    # HttpUser, not FastHttpUser: requests hands over each HTTP chunk the moment it arrives, while
    # FastHttpUser reads fixed-size blocks, which would merge tokens and hide the first one.
    wait_time = constant(0)

    def on_start(self) -> None:
        self.serials = itertools.count()

    def record(self, name: str, since: float, until: float, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="SSE",
            name=name,
            response_time=(until - since) * 1000,
            response_length=0,
            exception=exception,
            context={},
        )

    @task
    def stream(self) -> None:
        started = time.perf_counter()
        error = None
        with self.client.post("/v1/chat/completions", data=chat_body(True, next(self.serials)), headers=HEADERS,
                              name="chat-stream", stream=True, catch_response=True, timeout=TIMEOUT) as resp:  # fmt: skip
            error = f"status {resp.status_code}" if resp.status_code != 200 else self.read_stream(resp, started)
            if error:
                resp.failure(error)
        # Every attempt ends in one stream-total sample, so failures can be counted per stream.
        self.record("stream-total", started, time.perf_counter(), RuntimeError(error) if error else None)

    def read_stream(self, resp, started: float) -> str | None:
        """Time each content token of an SSE stream; the reason it failed, or None."""
        last = None
        buffer = b""
        done = False
        # Read to the end even after [DONE]: a connection left with unread bytes is not reused.
        for piece in resp.iter_content(chunk_size=None):
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: "):
                    continue
                data = event[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                chunk = orjson.loads(data)
                if "error" in chunk:
                    return str(chunk["error"].get("message", "error event"))
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    self.record("TTFT" if last is None else "inter-token", started if last is None else last, now)
                    last = now
        return None if done else "stream ended without [DONE]"


class EmbeddingsUser(FastHttpUser):
    wait_time = constant(0)
    network_timeout = connection_timeout = TIMEOUT

    @task
    def embed(self) -> None:
        body = {"model": EMBED_MODEL, "input": ["load testing embeddings", "a second document"],
                "encoding_format": "float"}  # fmt: skip
        with self.client.post("/v1/embeddings", data=orjson.dumps(body), headers=HEADERS,
                              name="embeddings", catch_response=True) as resp:  # fmt: skip
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
            elif not orjson.loads(resp.content)["data"]:
                resp.failure("no vectors")
