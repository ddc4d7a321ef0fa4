"""Admin actions in the request history (``services.history``), as rows with an ``admin:*`` endpoint.

An operation's row is opened when it is submitted and closed when it ends, so a
pull shows up as in progress for as long as it runs, and as interrupted if the
proxy stops under it. Quick actions (registering a node, draining one) are one
row each. Without a history (not wired, or disabled) this does nothing.
"""

from __future__ import annotations

from ..history import RequestRecord
from .model import Operation

_STATUS = {"succeeded": "ok", "failed": "error", "cancelled": "cancelled", "interrupted": "interrupted"}


class Audit:
    def __init__(self, history) -> None:
        self.history = history

    def begin(self, op: Operation) -> RequestRecord | None:
        if self.history is None:
            return None
        alias = op.alias
        record = RequestRecord(
            endpoint=f"admin:{op.kind}",
            requested_model=alias or op.model,
            resolved_model=op.model,
            backend=op.node or ",".join(op.params.get("nodes", ())) or None,
            http_status=202,
        )
        self.history.begin(record)
        return record

    def finish(self, record: RequestRecord | None, op: Operation) -> None:
        if record is None or self.history is None:
            return
        record.attempts = op.attempts
        record.error = op.error
        record.status = _STATUS.get(op.state, "error")
        self.history.finish(record)

    def action(self, endpoint: str, *, node: str | None = None, model: str | None = None,
               http_status: int = 200, error: str | None = None) -> None:  # fmt: skip
        """One row for an action that is over as soon as it is answered."""
        if self.history is None:
            return
        record = RequestRecord(endpoint=f"admin:{endpoint}", backend=node, requested_model=model,
                               http_status=http_status, error=error)  # fmt: skip
        self.history.begin(record)
        self.history.finish(record)
