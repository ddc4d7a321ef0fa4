"""The operators' API under ``/admin``: fleet status, models, and (later modules) nodes and operations.

Access is checked by :class:`proxy.middleware.AdminAuth` before any handler runs.
"""

from starlette.routing import Route

from . import records, status


def routes() -> list[Route]:
    return [
        Route("/admin/status", status.fleet_status, methods=["GET"]),
        Route("/admin/models", status.models, methods=["GET"]),
        Route("/admin/models/{name:path}/capabilities", status.capabilities, methods=["GET"]),
        Route("/admin/history/requests", records.list_requests, methods=["GET"]),
        Route("/admin/history/requests/{id}", records.get_request, methods=["GET"]),
        Route("/admin/cache", records.purge_cache, methods=["DELETE"]),
    ]
