"""Requests and replies for OpenAI-compatible backends (vLLM, llama.cpp server, ...). Pure.

Bodies pass through untouched except for the model name: the backend's name on
the way in, the client's name on the way out. Replies are rewritten at the byte
level where that is safe, because re-encoding every stream chunk would cost more
than the rest of the proxy.
"""

from __future__ import annotations

import orjson

# Fields that exist only for the proxy and must not reach a backend.
PROXY_FIELDS = frozenset({"task_type"})


def request_body(body: dict, target: str) -> bytes:
    if body.get("model") == target and not PROXY_FIELDS.intersection(body):
        return orjson.dumps(body)
    out = {k: v for k, v in body.items() if k not in PROXY_FIELDS}
    out["model"] = target
    return orjson.dumps(out)


class ModelRenamer:
    """Rewrites ``"model":"<backend name>"`` to the public name in JSON bodies and SSE streams.

    The byte pattern cannot occur inside a JSON string value (its quotes would be
    escaped there), so replacing it is exact for compact JSON; when a backend
    formats differently or answers under another name, the slower parse-and-dump
    path takes over.
    """

    def __init__(self, backend_name: str, public_name: str) -> None:
        self.public = public_name
        self.noop = backend_name == public_name
        old, new = orjson.dumps(backend_name), orjson.dumps(public_name)
        # Compact JSON (vLLM, pydantic) and Python's json.dumps style (llama.cpp server).
        self._patterns = ((b'"model":' + old, b'"model":' + new), (b'"model": ' + old, b'"model": ' + new))
        self._pending: list[bytes] = []

    def body(self, raw: bytes) -> bytes:
        if self.noop:
            return raw
        for old, new in self._patterns:
            if old in raw:
                return raw.replace(old, new, 1)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        if isinstance(obj, dict) and "model" in obj:
            obj["model"] = self.public
            return orjson.dumps(obj)
        return raw

    def stream(self, chunk: bytes) -> bytes:
        """Rewrite whole SSE events; a partial event waits for the rest of its bytes."""
        if self.noop:
            return chunk
        # find() rather than `in` below: this runs on every chunk, and CPython 3.11's bytes `in` formats
        # and drops a TypeError each time (it tries the needle as an integer first).
        if chunk.find(b"\r") >= 0:  # some servers frame events with CRLF; the event split below wants LF
            chunk = chunk.replace(b"\r\n", b"\n")
        if self._pending:
            # Kept in pieces until the event ends: joining on every chunk would copy a long
            # event over and over (the backend adapter caps its length at max_line_bytes).
            ends = b"\n\n" in chunk or (chunk[:1] == b"\n" and self._pending[-1].endswith(b"\n"))
            self._pending.append(chunk)
            if not ends:
                return b""
            chunk = b"".join(self._pending)
            self._pending = []
        if not chunk.endswith(b"\n\n"):
            cut = chunk.rfind(b"\n\n")
            if cut < 0:
                self._pending = [chunk]
                return b""
            chunk, rest = chunk[: cut + 2], chunk[cut + 2 :]
            self._pending = [rest]
        for old, new in self._patterns:
            if chunk.find(old) >= 0:
                return chunk.replace(old, new)
        if chunk.find(b'"model":') < 0:
            return chunk
        return b"".join(self._event(e) for e in chunk.split(b"\n\n") if e)

    def _event(self, event: bytes) -> bytes:
        if event.startswith(b"data: {"):
            return b"data: " + self.body(event[6:]) + b"\n\n"
        return event + b"\n\n"

    def flush(self) -> bytes:
        """Whatever partial event the backend left when it closed the stream."""
        rest, self._pending = b"".join(self._pending), []
        return rest
