"""The request chain for the OpenAI endpoints, in the order a request meets it.

read the body -> validate -> resolve the model -> adapt the conversation to the
model's template -> route to a backend (adapter and translation inside) ->
answer, as JSON or as an SSE stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import validate
from .adapt import adapt_request, needs_adapting
from .backends import Stream
from .catalog import Catalog
from .config import Config, ModelConfig
from .errors import InvalidRequest, ModelNotFound, TemplateRejected
from .resolve import Candidate, Resolver, Route
from .routing import Operation, Outcome, Router
from .streaming import DisconnectWatch, SSEResponse, read_json

_VALIDATORS: dict[Operation, Callable[[dict], None]] = {
    "chat": validate.chat,
    "completion": validate.completion,
    "embeddings": validate.embeddings,
}


def _proxy_headers(outcome: Outcome) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"x-proxy-backend", outcome.candidate.backend.name.encode()),
        (b"x-proxy-model", outcome.candidate.model.encode()),
        (b"x-proxy-attempts", str(outcome.attempts).encode()),
    ]
    if outcome.candidate.alias is not None:
        headers.append((b"x-proxy-alias", outcome.candidate.alias.name.encode()))
    return headers


def _task_type(request: Request, body: dict) -> str | None:
    """The task from the X-Task-Type header, else the body's task_type (taken out: no backend knows it)."""
    task = body.pop("task_type", None)
    header = request.headers.get("x-task-type")
    task = header if header else task
    if task is not None and not isinstance(task, str):
        raise InvalidRequest("Invalid type for 'task_type': expected a string.", param="task_type")
    return task or None


@dataclass
class Gateway:
    config: Config
    catalog: Catalog
    resolver: Resolver
    router: Router

    async def generate(self, request: Request, operation: Operation) -> Response | SSEResponse:
        body = await read_json(request.receive, request.scope["headers"], self.config.server.max_body_bytes)
        _VALIDATORS[operation](body)
        task = _task_type(request, body)
        route = await self.resolver.resolve(body["model"], operation, body, task)
        with DisconnectWatch(request.receive) as watch:
            outcome = await self._dispatch(route, operation, body)
        if watch.disconnected:
            return Response(status_code=499)  # nobody is left to read it; uvicorn drops it
        extra = _proxy_headers(outcome)
        if isinstance(outcome.reply, Stream):
            return SSEResponse(outcome.reply.frames, extra)
        response = Response(outcome.reply, media_type="application/json")
        response.raw_headers.extend(extra)
        return response

    async def _dispatch(self, route: Route, operation: Operation, body: dict) -> Outcome:
        try:
            return await self.router.dispatch(route, operation, self._preparer(body, operation))
        except TemplateRejected as exc:
            # The template refused the roles: remember it for this model, adapt, try once more.
            candidate = exc.candidate
            self.catalog.learn(candidate.backend.name, candidate.model, system_role=exc.system_role,
                               alternation=exc.alternation)  # fmt: skip
            outcome = await self.router.dispatch(route, operation, self._preparer(body, operation))
            outcome.attempts += 1
            return outcome

    def _preparer(self, body: dict, operation: Operation) -> Callable[[Candidate], dict]:
        """Per candidate, the body adapted to its model's template and defaults (computed once per model)."""
        if operation == "embeddings":
            return lambda candidate: body
        prepared: dict[ModelConfig | None, dict] = {}

        def prepare(candidate: Candidate) -> dict:
            model = self._effective_model(candidate)
            if model not in prepared:
                prepared[model] = adapt_request(body, model) if needs_adapting(model) else body
            return prepared[model]

        return prepare

    def _effective_model(self, candidate: Candidate) -> ModelConfig | None:
        """The configured flags, narrowed by what the catalog detected or learned about the template."""
        limits = self.catalog.limits(candidate.backend.name, candidate.model)
        base = candidate.alias
        if limits is None:
            return base
        if base is None:
            base = ModelConfig(name=candidate.model, target=candidate.model)
        return dataclasses.replace(
            base,
            supports_system_role=base.supports_system_role and limits.system_role,
            alternating_roles=base.alternating_roles or limits.alternating_roles,
        )

    async def list_models(self) -> Response:
        data = self.resolver.public_models()
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def get_model(self, model_id: str) -> Response:
        for attempt in range(2):
            for card in self.resolver.public_models():
                if card["id"] == model_id:
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
