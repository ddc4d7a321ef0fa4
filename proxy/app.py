"""The ASGI application: routes, middleware and the lifespan that owns all state."""

from __future__ import annotations

import contextlib
import logging
import os

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import admin, ui
from .config import Config, load_config
from .errors import MethodNotAllowed, NotFound, ProxyError, anthropic_error_response, error_response, internal_error
from .gateway import Gateway
from .ingress import ANTHROPIC, count_tokens
from .installable import Installable
from .middleware import ANTHROPIC_PREFIX, AdminAuth, APIKeyAuth, UnexpectedErrors
from .services import Services

log = logging.getLogger("llm_proxy")


def _gateway(request: Request) -> Gateway:
    return request.app.state.services.gateway


# The OpenAI generation endpoints: POST is answered by Generation below, ahead of Starlette's layers.
GENERATION = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/embeddings": "embeddings"}


class Generation:
    """``POST`` to the OpenAI generation endpoints, as a plain ASGI endpoint.

    These are the requests that count (thousands a second), and for them Starlette's layers
    (``Starlette.__call__``, its server-error middleware, the router's regular expression per
    route, its exception middleware, the ``Request`` object) were a noticeable share of the
    proxy's cost: each layer is one more call per ``send`` and one more frame that every
    suspension of the request's task unwinds and re-enters. The chain is the same: this runs
    below the same middleware (``UnexpectedErrors``, the API-key check), renders a
    :class:`ProxyError` with the same ``error_response``, and calls the same :class:`Gateway`.
    """

    def __init__(self, owner: Starlette) -> None:
        self.owner = owner  # the Starlette app, whose state holds the services once the lifespan ran

    async def __call__(self, scope, receive, send) -> None:
        try:
            response = await self.owner.state.services.gateway.generate(scope, receive, GENERATION[scope["path"]])
        except ProxyError as exc:
            response = error_response(exc)
        await response(scope, receive, send)


class ProxyApp(Starlette):
    """Starlette, except that ``POST`` to a :data:`GENERATION` path goes to :class:`Generation` through the
    app's middleware only; every other request (another method on those paths too: 405) is Starlette's."""

    _generation = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATION:
            if self._generation is None:
                app = Generation(self)
                for cls, args, kwargs in reversed(self.user_middleware):
                    app = cls(app, *args, **kwargs)
                self._generation = app
            scope["app"] = self
            await self._generation(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def _in_anthropic_shape(request: Request, call) -> Response:
    # Errors are rendered here, in Anthropic's shape, rather than by the app's OpenAI-shaped handlers.
    try:
        return await call()
    except ProxyError as exc:
        return anthropic_error_response(exc)
    except Exception as exc:
        request_id = getattr(request.state, "request_id", None)
        log.error("request %s (%s %s) failed: %s: %s", request_id or "-", request.method, request.url.path,
                  type(exc).__name__, exc)  # fmt: skip
        log.debug("traceback of request %s", request_id or "-", exc_info=exc)
        problem = internal_error()
        if request_id:
            problem.headers = {"x-request-id": request_id}
        return anthropic_error_response(problem)


async def messages(request: Request):
    return await _in_anthropic_shape(
        request, lambda: _gateway(request).generate(request.scope, request.receive, "chat", ANTHROPIC)
    )


async def messages_count_tokens(request: Request):
    return await _in_anthropic_shape(request, lambda: count_tokens(request, _gateway(request)))


async def list_models(request: Request):
    return await _gateway(request).list_models()


async def get_model(request: Request):
    return await _gateway(request).get_model(request.path_params["model_id"])


async def health(request: Request):
    return JSONResponse({"status": "ok"})


async def ready(request: Request):
    return await _gateway(request).ready(request.app.state.services.db.lost)


async def metrics(request: Request):
    services = request.app.state.services
    services.update_gauges()
    body, content_type = await services.metrics.arender()
    return Response(body, media_type=content_type)


async def _proxy_error(request: Request, exc: ProxyError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    render = anthropic_error_response if request.url.path.startswith(ANTHROPIC_PREFIX) else error_response
    if exc.status_code == 404:
        return render(NotFound(f"Unknown path {request.url.path}"))
    if exc.status_code == 405:
        return render(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}"))
    return render(ProxyError(str(exc.detail), status=exc.status_code))


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette's last resort, reached only if UnexpectedErrors (which logs) could not answer; Starlette
    # re-raises after this, and uvicorn logs that, so logging here would only repeat it.
    return error_response(internal_error())


def _generation_route(operation: str):
    # Reached only when ProxyApp did not take the request itself (a path seen through a root_path).
    async def endpoint(request: Request):
        return await _gateway(request).generate(request.scope, request.receive, operation)

    return endpoint


def create_app(config: Config) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # Read first: a bad catalog.file stops the start before anything else is opened.
        app.state.installable = installable = await Installable.open(config.catalog)
        try:
            services = await Services.open(config)
            await services.start()
            app.state.services = services
            try:
                yield
            finally:
                await services.close()
        finally:
            await installable.aclose()

    routes = [
        # The GENERATION paths: ProxyApp hands POST to Generation before routing; these routes answer
        # other methods (405) and whatever reaches them by another way, through the same gateway.
        *(Route(path, _generation_route(operation), methods=["POST"]) for path, operation in GENERATION.items()),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", messages_count_tokens, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *admin.routes(),
        *ui.routes(),  # the dashboard at /ui; / redirects there
    ]
    app = ProxyApp(
        routes=routes,
        middleware=[
            # First, so it wraps everything below: an unexpected exception stops there, answered and logged once.
            Middleware(UnexpectedErrors),
            Middleware(APIKeyAuth, keys=config.server.api_keys),
            Middleware(AdminAuth, keys=config.server.admin_keys),
        ],
        exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error, Exception: _unexpected},
        lifespan=lifespan,
    )
    # A trailing slash is a different path, answered with an OpenAI-shaped 404, not a 307 to follow.
    app.router.redirect_slashes = False
    app.state.config = config
    return app


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` and multi-worker serving: the config path comes from the environment."""
    return create_app(load_config(os.environ["LLM_PROXY_CONFIG"]))
