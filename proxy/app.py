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
from .errors import MethodNotAllowed, NotFound, ProxyError, error_response, internal_error
from .gateway import Gateway
from .middleware import AdminAuth, APIKeyAuth
from .services import Services

log = logging.getLogger("llm_proxy")


def _gateway(request: Request) -> Gateway:
    return request.app.state.services.gateway


async def chat_completions(request: Request):
    return await _gateway(request).generate(request, "chat")


async def completions(request: Request):
    return await _gateway(request).generate(request, "completion")


async def embeddings(request: Request):
    return await _gateway(request).generate(request, "embeddings")


async def list_models(request: Request):
    return await _gateway(request).list_models()


async def get_model(request: Request):
    return await _gateway(request).get_model(request.path_params["model_id"])


async def health(request: Request):
    return JSONResponse({"status": "ok"})


async def ready(request: Request):
    return await _gateway(request).ready()


async def metrics(request: Request):
    services = request.app.state.services
    services.update_gauges()
    body, content_type = await services.metrics.arender()
    return Response(body, media_type=content_type)


async def _proxy_error(request: Request, exc: ProxyError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        return error_response(NotFound(f"Unknown path {request.url.path}"))
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}"))
    return error_response(ProxyError(str(exc.detail), status=exc.status_code))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(internal_error())


def create_app(config: Config) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        services = await Services.open(config)
        await services.start()
        app.state.services = services
        try:
            yield
        finally:
            await services.close()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *admin.routes(),
        *ui.routes(),  # the dashboard at /ui; / redirects there
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(APIKeyAuth, keys=config.server.api_keys),
            Middleware(AdminAuth, keys=config.server.admin_keys),
        ],
        exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.config = config
    return app


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` and multi-worker serving: the config path comes from the environment."""
    return create_app(load_config(os.environ["LLM_PROXY_CONFIG"]))
