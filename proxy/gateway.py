"""The request chain for the OpenAI endpoints, in the order a request meets it.

read the body -> validate -> resolve the model -> adapt the conversation to the
model's template -> route to a backend (adapter and translation inside) ->
answer, as JSON or as an SSE stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from starlette.responses import JSONResponse, Response

from . import usage, validate
from .adapt import adapt_request, needs_adapting
from .affinity import conversation_key
from .backends import Stream
from .caching import Caching
from .catalog import Catalog
from .config import Config, ModelConfig
from .errors import ClientGone, InvalidRequest, ModelNotFound, ProxyError, TemplateRejected
from .exchange import Exchange
from .history import History
from .metrics import Metrics
from .middleware import bearer_token, header
from .resolve import Candidate, Resolver, Route
from .routing import Operation, Outcome, Router
from .streaming import DisconnectWatch, SSEResponse, read_json
from .translate import num_ctx
from .translate.num_ctx import Sizing
from .usage import UsageTap

if TYPE_CHECKING:
    from .ingress import Ingress

_VALIDATORS: dict[Operation, Callable[[dict], None]] = {
    "chat": validate.chat,
    "completion": validate.completion,
    "embeddings": validate.embeddings,
}


_MISS = (b"x-cache", b"MISS")
_TOKENIZE_WAIT = 0.5  # seconds the end of a stream may wait for the server's count of the prompt


def _proxy_headers(outcome: Outcome) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"x-proxy-backend", outcome.candidate.backend.name.encode()),
        (b"x-proxy-model", outcome.candidate.model.encode()),
        (b"x-proxy-attempts", str(outcome.attempts).encode()),
        (b"x-proxy-route-reason", outcome.reason.encode()),
    ]
    if outcome.candidate.alias is not None:
        headers.append((b"x-proxy-alias", outcome.candidate.alias.name.encode()))
    headers += outcome.headers
    return headers


def _task_type(scope, body: dict) -> str | None:
    """The task from the X-Task-Type header, else the body's task_type (taken out: no backend knows it)."""
    task = body.pop("task_type", None)
    named = header(scope, b"x-task-type")
    task = named if named else task
    if task is not None and not isinstance(task, str):
        raise InvalidRequest("Invalid type for 'task_type': expected a string.", param="task_type")
    return task or None


def _sse(frames: AsyncIterator[bytes], headers: list[tuple[bytes, bytes]], exchange: Exchange,
         ingress: Ingress | None) -> SSEResponse:  # fmt: skip
    if ingress is None:
        return SSEResponse(frames, headers, on_done=exchange.close)
    headers.extend(ingress.headers(exchange.id))
    return SSEResponse(ingress.frames(frames), headers, on_done=exchange.close, error_event=ingress.error_event)


def _json(body: bytes, headers: list[tuple[bytes, bytes]], exchange: Exchange, ingress: Ingress | None) -> Response:
    if ingress is not None:
        body = ingress.reply(body)
        headers.extend(ingress.headers(exchange.id))
    response = Response(body, media_type="application/json")
    response.raw_headers.extend(headers)
    return response


@dataclass
class Gateway:
    config: Config
    catalog: Catalog
    resolver: Resolver
    router: Router
    history: History
    metrics: Metrics
    caching: Caching
    # Per OpenAI-compatible backend: did its last complete stream carry usage? (X-Proxy-Usage)
    usage_sources: dict[str, bool] = field(default_factory=dict)

    async def generate(self, scope, receive, operation: Operation,
                       ingress: Ingress | None = None) -> Response | SSEResponse:  # fmt: skip
        """One request, from its ASGI ``scope`` and ``receive``; ``ingress`` translates another client
        API (Anthropic) to and from OpenAI's.

        Without one (the OpenAI endpoints) nothing is translated and nothing extra runs.
        """
        if ingress is None:
            exchange = Exchange(self.history, self.metrics, operation, bearer_token(scope))
        else:  # an endpoint path passes through Exchange's operation -> endpoint map as itself
            exchange = Exchange(self.history, self.metrics, ingress.endpoint, ingress.key(scope))
        # For UnexpectedErrors' log line and its 500 (scope["state"] is what Starlette's request.state reads).
        scope.setdefault("state", {})["request_id"] = exchange.id
        try:
            return await self._generate(scope, receive, operation, exchange, ingress)
        except ProxyError as exc:
            exc.headers = {**(exc.headers or {}), "x-request-id": exchange.id}
            exchange.close("cancelled" if isinstance(exc, ClientGone) else "error", exc.status, exc)
            raise
        except BaseException as exc:
            exchange.close("cancelled" if isinstance(exc, asyncio.CancelledError) else "error", 500, "internal error")
            raise

    async def _generate(self, scope, receive, operation: Operation, exchange: Exchange,
                        ingress: Ingress | None) -> Response | SSEResponse:  # fmt: skip
        body = await read_json(receive, scope["headers"], self.config.server.max_body_bytes)
        if ingress is not None:
            body = ingress.request(body)  # from here on the chain sees an OpenAI body: same cache keys
        _VALIDATORS[operation](body)
        exchange.started(body)
        task = _task_type(scope, body)
        route = await self.resolver.resolve(body["model"], operation, body, task)
        exchange.model = route.public
        cache_control = header(scope, b"cache-control")
        if operation == "embeddings":
            return await self._embeddings(receive, route, body, cache_control, exchange)
        lookup = self.caching.lookup(operation, route, body, cache_control) if self.caching.enabled else None
        if lookup is not None and lookup.read:
            stored = await self.caching.get(lookup)
            self.metrics.cache_lookup(route.public, exchange.endpoint, stored is not None)
            if stored is not None:
                return self._from_cache(stored, operation, route, body, exchange, ingress)
        started = time.perf_counter()
        outcome: Outcome | None = None  # stays None when the client left while we waited
        with DisconnectWatch(receive) as watch:
            outcome = await self._dispatch(route, operation, body)
        if outcome is not None:
            exchange.answered(outcome, time.perf_counter() - started)
        if watch.disconnected:
            if outcome is not None and isinstance(outcome.reply, Stream):
                await outcome.reply.aclose()  # frees the backend's slot and connection
            exchange.close("cancelled", 499)
            return Response(status_code=499)  # nobody is left to read it; uvicorn drops it
        headers = [*_proxy_headers(outcome), _MISS, *exchange.headers()]
        store = lookup is not None and self.caching.storable(lookup, route, outcome)
        if isinstance(outcome.reply, Stream):
            stored = self.caching.storing(lookup, route) if store else None  # type: ignore[arg-type]
            frames, tap, usage_source = self._relayed(outcome.reply.frames, outcome.candidate, operation, body,
                                                      stored, exchange.keeper())  # fmt: skip
            headers.append((b"x-proxy-usage", usage_source))
            exchange.count_with(tap)
            return _sse(frames, headers, exchange, ingress)
        exchange.tokens_from_body(outcome.reply)
        if store:
            self.caching.store_body(lookup, route, outcome.reply)  # type: ignore[arg-type]
        response = _json(outcome.reply, headers, exchange, ingress)  # type: ignore[arg-type]
        exchange.close("ok", 200)
        return response

    def _relayed(self, frames, candidate: Candidate, operation: Operation, body: dict, stored: usage.Store | None,
                 keep: Callable[[bytes], None] | None) -> tuple[AsyncIterator[bytes], UsageTap, bytes]:  # fmt: skip
        """The stream as the client gets it (usage guaranteed to the tap and the cache, to the client
        only if it asked), its tap, and where the numbers come from."""
        config = getattr(candidate.backend, "config", None)
        kind = config.kind if config is not None else "openai"
        name = candidate.backend.name
        count = kind not in ("ollama", "vllm")  # those always send usage when asked
        counter = getattr(candidate.backend, "count_prompt", None)
        exact: asyncio.Future | None = None
        if count and counter is not None and self.usage_sources.get(name) is False:
            exact = asyncio.ensure_future(counter(body))  # the server's tokenizer, while it generates

        def prompt_tokens() -> int:
            if exact is not None and exact.done() and not exact.cancelled() and exact.exception() is None:
                if exact.result():
                    return exact.result()
            return num_ctx.estimate(body, operation)

        async def tokenized() -> None:
            if exact is not None and not exact.done():
                await asyncio.wait([exact], timeout=_TOKENIZE_WAIT)

        def learn(tap: UsageTap) -> None:
            if exact is not None and not exact.done():
                exact.cancel()
            if tap.count and tap.finished:
                self.usage_sources[name] = tap.usage is not None

        tap = UsageTap(count=count, prompt_estimate=prompt_tokens)
        drop_usage = not (body.get("stream_options") or {}).get("include_usage")
        frames = usage.relayed(frames, tap, drop_usage=drop_usage, store=stored, keep=keep, on_end=learn,
                               before_end=tokenized if exact is not None else None)  # fmt: skip
        return frames, tap, usage.source(kind, self.usage_sources.get(name))

    def _from_cache(self, stored: bytes, operation: Operation, route: Route, body: dict,
                    exchange: Exchange, ingress: Ingress | None) -> Response | SSEResponse:  # fmt: skip
        exchange.cache_hit()
        exchange.record.resolved_model = route.target
        exchange.tokens_from_body(stored)
        headers = [(b"x-cache", b"HIT"), *exchange.headers()]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            frames = self.caching.replay_frames(stored, operation, body["model"], include_usage)
            return _sse(frames, headers, exchange, ingress)
        response = _json(self.caching.replay_body(stored, operation, body["model"]), headers, exchange, ingress)
        exchange.close("ok", 200)
        return response

    async def _embeddings(self, receive, route: Route, body: dict, cache_control: str | None,
                          exchange: Exchange) -> Response:  # fmt: skip
        outcomes: list[Outcome] = []

        async def fetch(request_body: dict) -> tuple[bytes, Outcome]:
            started = time.perf_counter()
            outcome = await self._dispatch(route, "embeddings", request_body)
            exchange.answered(outcome, time.perf_counter() - started)
            outcomes.append(outcome)
            return outcome.reply, outcome  # type: ignore[return-value]

        with DisconnectWatch(receive) as watch:
            if self.caching.enabled:
                answer, outcome, hits = await self.caching.embeddings(route, body, cache_control, fetch)
            else:
                answer, outcome = await fetch(body)
                hits = 0
        if watch.disconnected:
            exchange.close("cancelled", 499)
            return Response(status_code=499)
        if self.caching.enabled:
            self.metrics.cache_lookup(route.public, exchange.endpoint, outcome is None)
        headers = [*_proxy_headers(outcome)] if outcome is not None else []
        if outcome is None:
            exchange.cache_hit()
            exchange.record.resolved_model = route.target
        headers += [(b"x-cache", b"HIT" if outcome is None else b"MISS"), *exchange.headers()]
        if hits:
            headers.append((b"x-cache-hits", str(hits).encode()))
        exchange.tokens_from_body(answer)
        exchange.close("ok", 200)
        response = Response(answer, media_type="application/json")
        response.raw_headers.extend(headers)
        return response

    async def _dispatch(self, route: Route, operation: Operation, body: dict) -> Outcome:
        sizes: dict[tuple[str, str], Sizing | None] = {}
        wanted = self.router.affinity is not None and operation != "embeddings"
        conversation = conversation_key(route.public, body) if wanted else None
        try:
            outcome = await self.router.dispatch(route, operation, self._preparer(body, operation, sizes), conversation)
        except TemplateRejected as exc:
            # The template refused the roles: remember it for this model, adapt, try once more.
            candidate = exc.candidate
            self.catalog.learn(candidate.backend.name, candidate.model, system_role=exc.system_role,
                               alternation=exc.alternation)  # fmt: skip
            outcome = await self.router.dispatch(route, operation, self._preparer(body, operation, sizes), conversation)
            outcome.attempts += 1
        sizing = sizes.get((outcome.candidate.backend.name, outcome.candidate.model))
        if sizing is not None:
            outcome.headers += sizing.headers()
        return outcome

    def _preparer(self, body: dict, operation: Operation,
                  sizes: dict[tuple[str, str], Sizing | None]) -> Callable[[Candidate], dict]:  # fmt: skip
        """Per candidate, the body adapted to its model's template and defaults (computed once per model),
        and for Ollama its context window sized to the prompt (recorded in ``sizes``)."""
        if operation == "embeddings":
            return lambda candidate: body
        prepared: dict[ModelConfig | None, dict] = {}
        fitted: dict[tuple[str, str], dict] = {}

        def prepare(candidate: Candidate) -> dict:
            model = self._effective_model(candidate)
            if model not in prepared:
                prepared[model] = adapt_request(body, model) if needs_adapting(model) else body
            config = getattr(candidate.backend, "config", None)
            if config is None or config.kind != "ollama":
                return prepared[model]
            key = (candidate.backend.name, candidate.model)
            if key not in fitted:
                info = self.catalog.model_info(*key)
                ceiling = candidate.alias.max_num_ctx if candidate.alias is not None else None
                fitted[key], sizes[key] = num_ctx.fit(prepared[model], operation, info, ceiling, self.config.context)
            return fitted[key]

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

    async def ready(self, storage_problem: str | None = None) -> JSONResponse:
        """200 when a backend answers and the database is the one opened; 503 with the reasons otherwise."""
        if not self.catalog.any_reachable():
            await self.catalog.refresh_if_stale()
        states = {
            name: {"reachable": bool(view.reachable), "models": len(view.models), "error": view.error}
            for name, view in self.catalog.views.items()
        }
        ok = self.catalog.any_reachable() and storage_problem is None
        body = {"status": "ready" if ok else "unavailable", "backends": states,
                "storage": {"ok": storage_problem is None, "error": storage_problem}}  # fmt: skip
        return JSONResponse(body, 200 if ok else 503)
