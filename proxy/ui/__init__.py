"""The operators' dashboard: static files under ``/ui`` (``/`` redirects there), served with strict headers.

Nothing here knows the proxy: the page in ``static/`` talks to the public admin
and ``/v1`` APIs from the browser, like curl would. No build step: plain ES
modules, CSS, and uPlot vendored in ``static/vendor/uplot`` with its licence.
"""

from __future__ import annotations

import os

from starlette.datastructures import MutableHeaders
from starlette.responses import RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = os.path.join(os.path.dirname(__file__), "static")

# No inline script or style, no eval, nothing from another origin, never framed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")  # fmt: skip
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    # Revalidate every time (the ETag makes that a 304): an upgraded proxy never serves yesterday's page.
    "cache-control": "no-cache",
}


class _SecurityHeaders:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, with_headers)


async def _to_ui(request) -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


def routes() -> list:
    return [
        Route("/", _to_ui, methods=["GET", "HEAD"]),
        Route("/ui", _to_ui, methods=["GET", "HEAD"]),  # the app does not redirect slashes on its own
        Mount("/ui", app=_SecurityHeaders(StaticFiles(directory=STATIC, html=True)), name="ui"),
    ]
