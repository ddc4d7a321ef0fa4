"""The operators' API under ``/admin``: fleet status, models, and (later modules) nodes and operations.

Access is checked by :class:`proxy.middleware.AdminAuth` before any handler runs.
"""

from starlette.routing import Route

from . import catalog, events, nodes, operations, records, stats, status


def routes() -> list[Route]:
    return [
        Route("/admin/status", status.fleet_status, methods=["GET"]),
        # Read-only feeds for the dashboard (proxy/ui): one SSE stream per page, and traffic over time.
        Route("/admin/events", events.stream, methods=["GET"]),
        Route("/admin/stats", stats.traffic, methods=["GET"]),
        Route("/admin/models", status.models, methods=["GET"]),
        Route("/admin/models/{name:path}/capabilities", status.capabilities, methods=["GET"]),
        Route("/admin/history/requests", records.list_requests, methods=["GET"]),
        Route("/admin/history/requests/{id}", records.get_request, methods=["GET"]),
        Route("/admin/cache", records.purge_cache, methods=["DELETE"]),
        # What can be installed (proxy/installable), with whether it fits each node's GPU.
        Route("/admin/catalog", catalog.installable, methods=["GET"]),
        # Nodes, pulls, sync, activation (proxy/operations). The fixed /admin/models/... paths come
        # before DELETE /admin/models/{model:path}, which would otherwise take any name.
        Route("/admin/nodes", nodes.list_nodes, methods=["GET"]),
        Route("/admin/nodes", nodes.register_node, methods=["POST"]),
        Route("/admin/nodes/{name}", nodes.get_node, methods=["GET"]),
        Route("/admin/nodes/{name}", nodes.remove_node, methods=["DELETE"]),
        Route("/admin/nodes/{name}/drain", nodes.drain_node, methods=["POST"]),
        Route("/admin/nodes/{name}/manifest", nodes.manifest, methods=["GET"]),
        Route("/admin/agents", nodes.register_agent, methods=["POST"]),
        Route("/admin/agents/{name}/heartbeat", nodes.agent_heartbeat, methods=["POST"]),
        Route("/admin/nodes/{name}/resume", nodes.resume_node, methods=["POST"]),
        Route("/admin/models/matrix", nodes.model_matrix, methods=["GET"]),
        Route("/admin/models/pull", operations.pull, methods=["POST"]),
        Route("/admin/models/sync", operations.sync, methods=["POST"]),
        Route("/admin/models/activate", operations.activate, methods=["POST"]),
        Route("/admin/models/{model:path}", operations.delete_model, methods=["DELETE"]),
        Route("/admin/operations", operations.list_operations, methods=["GET"]),
        Route("/admin/operations/{id}", operations.get_operation, methods=["GET"]),
        Route("/admin/operations/{id}", operations.cancel_operation, methods=["DELETE"]),
        Route("/admin/operations/{id}/events", operations.operation_events, methods=["GET"]),
        Route("/admin/operations/{id}/retry", operations.retry_operation, methods=["POST"]),
    ]
