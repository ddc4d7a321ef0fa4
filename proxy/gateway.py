"""The request chain for the OpenAI endpoints, in the order a request meets it.

read the body -> validate -> resolve the model -> adapt the conversation to the
model's template -> route to a backend (adapter and translation inside) ->
answer, as JSON or as an SSE stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import validate
from .adapt import adapt_request, needs_adapting
from .backends import Backend, Stream
from .catalog import Catalog
from .config import Config
from .errors import ModelNotFound
from .resolve import Resolver
from .routing import Operation, Outcome, Router
from .streaming import DisconnectWatch, SSEResponse, read_json

_VALIDATORS: dict[Operation, Callable[[dict], None]] = {
    "chat": validate.chat,
    "completion": validate.completion,
    "embeddings": validate.embeddings,
}


def _proxy_headers(outcome: Outcome) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-proxy-backend", outcome.candidate.backend.name.encode()),
        (b"x-proxy-model", outcome.candidate.model.encode()),
        (b"x-proxy-attempts", str(outcome.attempts).encode()),
    ]


@dataclass
class Gateway:
    config: Config
    backends: dict[str, Backend]
    catalog: Catalog
    resolver: Resolver
    router: Router

    async def generate(self, request: Request, operation: Operation) -> Response | SSEResponse:
        body = await read_json(request.receive, request.scope["headers"], self.config.server.max_body_bytes)
        _VALIDATORS[operation](body)
        route = await self.resolver.resolve(body["model"])
        if operation != "embeddings" and needs_adapting(route.alias):
            body = adapt_request(body, route.alias)
        with DisconnectWatch(request.receive) as watch:
            outcome = await self.router.dispatch(route, operation, body)
        if watch.disconnected:
            return Response(status_code=499)  # nobody is left to read it; uvicorn drops it
        extra = _proxy_headers(outcome)
        if isinstance(outcome.reply, Stream):
            return SSEResponse(outcome.reply.frames, extra)
        response = Response(outcome.reply, media_type="application/json")
        response.raw_headers.extend(extra)
        return response

    async def list_models(self) -> Response:
        data = [
            {"id": mid, "object": "model", "created": created, "owned_by": owner}
            for mid, created, owner in self.resolver.public_models()
        ]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def get_model(self, model_id: str) -> Response:
        for attempt in range(2):
            for mid, created, owner in self.resolver.public_models():
                if mid == model_id:
                    card = {"id": mid, "object": "model", "created": created, "owned_by": owner}
                    return Response(orjson.dumps(card), media_type="application/json")
            if attempt == 0 and not await self.catalog.refresh_if_stale():
                break
        raise ModelNotFound(f"The model {model_id!r} does not exist", param="model")

    async def ready(self) -> JSONResponse:
        if not self.catalog.any_reachable():
            await self.catalog.refresh_if_stale()
        states = {
            name: {"reachable": bool(view.reachable), "models": len(view.models), "error": view.error}
            for name, view in self.catalog.views.items()
        }
        ok = self.catalog.any_reachable()
        return JSONResponse({"status": "ready" if ok else "unavailable", "backends": states}, 200 if ok else 503)
