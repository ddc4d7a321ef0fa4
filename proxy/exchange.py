"""One request as the operators see it afterwards: its history row, its metrics, its overhead.

The gateway opens an :class:`Exchange` when a request arrives and closes it
exactly once, when the answer is complete (or failed, or the client left).
Time spent waiting on backends (queueing included) is counted separately, so
what remains is the proxy's own overhead: the ``X-Proxy-Overhead-Ms`` header
and the overhead histogram. For a stream the header can only cover the time up
to the first chunk; the histogram gets the same figure, so the two agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson

from .errors import ProxyError
from .history import History, RequestRecord, key_id
from .metrics import Metrics
from .routing import Outcome
from .usage import UsageTap

_ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "embeddings": "/v1/embeddings"}


def _usage(usage: object) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


class Exchange:
    __slots__ = ("history", "metrics", "record", "endpoint", "model", "t0", "waited", "overhead", "_closed", "_tap", "_kept")  # fmt: skip

    def __init__(self, history: History, metrics: Metrics, operation: str, token: bytes | None) -> None:
        self.history = history
        self.metrics = metrics
        self.endpoint = _ENDPOINTS.get(operation, operation)
        self.record = RequestRecord(self.endpoint, key_id=key_id(token.decode("latin-1")) if token else None)
        self.model = "unknown"  # the metrics label: the public name once it is known to resolve
        self.t0 = time.perf_counter()
        self.waited = 0.0  # seconds spent waiting on backends
        self.overhead: float | None = None
        self._closed = False
        self._tap: UsageTap | None = None
        self._kept: bytearray | None = None

    @property
    def id(self) -> str:
        return self.record.id

    def started(self, body: dict) -> None:
        record = self.record
        record.requested_model = body.get("model") if isinstance(body.get("model"), str) else None
        record.stream = bool(body.get("stream"))
        if self.history.capture_bodies:  # history.capture_bodies: off by default, bodies may hold personal data
            record.request_body = orjson.dumps(body)
        self.history.begin(record)

    def answered(self, outcome: Outcome, waited: float) -> None:
        """A backend is answering: note who, and how long the proxy spent so far on its own."""
        record = self.record
        record.resolved_model = outcome.candidate.model
        record.backend = outcome.candidate.backend.name
        record.attempts = outcome.attempts
        self.waited += waited
        if record.stream:
            record.ttft_seconds = time.perf_counter() - self.t0
        for failure in outcome.failures:
            self.metrics.failover(self.model, failure.split(":", 1)[0], "error")
        if outcome.attempts > 1:
            self.metrics.retry(self.model, record.backend)

    def cache_hit(self) -> None:
        self.record.cache_hit = True

    def headers(self) -> list[tuple[bytes, bytes]]:
        """X-Request-Id and X-Proxy-Overhead-Ms, computed now, as the response starts."""
        self.overhead = max(0.0, time.perf_counter() - self.t0 - self.waited)
        return [
            (b"x-request-id", self.record.id.encode()),
            (b"x-proxy-overhead-ms", f"{self.overhead * 1000:.3f}".encode()),
        ]

    def tokens_from_body(self, body: bytes) -> None:
        """Token counts from a whole answer (a backend's, or the cache's); also kept as the response body."""
        if self.history.capture_bodies:
            self.record.response_body = body
        try:
            usage = orjson.loads(body).get("usage")
        except (orjson.JSONDecodeError, AttributeError):
            return
        self.record.prompt_tokens, self.record.completion_tokens = _usage(usage)

    def count_with(self, tap: UsageTap) -> None:
        """Take the token counts of a stream from ``tap`` (proxy/usage.py) when the exchange closes.

        The tap sees the backend's usage even when it keeps it from the client, and counts when the
        backend sent none. Read at close rather than by one more generator around the stream: the
        stream is over by then (the SSE response closes it before it reports), and a layer fewer
        is a step fewer for every chunk.
        """
        self._tap = tap

    def keeper(self) -> Callable[[bytes], None] | None:
        """With ``history.capture_bodies``, what keeps a stream's frames as sent (up to ``max_body_bytes``)
        for the history row, which gets them when the exchange closes; otherwise None."""
        if not self.history.capture_bodies:
            return None
        kept = self._kept = bytearray()
        limit = self.history.max_body_bytes

        def keep(frame: bytes) -> None:
            if len(kept) < limit:
                kept.extend(frame[: limit - len(kept)])

        return keep

    def close(self, status: str, http_status: int, error: ProxyError | str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        record = self.record
        if self._tap is not None:
            prompt, completion = self._tap.tokens
            if prompt is not None:
                record.prompt_tokens, record.completion_tokens = prompt, completion
        if self._kept is not None:  # the SSE frames as sent, up to max_body_bytes
            record.response_body = bytes(self._kept)
        record.status = status  # type: ignore[assignment]
        record.http_status = http_status
        if error is not None:
            record.error = error.message if isinstance(error, ProxyError) else error
        self.history.finish(record)
        if self.overhead is None:
            self.overhead = max(0.0, time.perf_counter() - self.t0 - self.waited)
        self.metrics.request(
            self.model,
            record.backend or "",
            self.endpoint,
            http_status,
            time.perf_counter() - self.t0,
            ttft=record.ttft_seconds,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            overhead=self.overhead,
        )
