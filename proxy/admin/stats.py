"""``GET /admin/stats``: traffic over time for the dashboard's charts, aggregated from the request history.

The answer is computed in SQL from the ``requests`` table (shared by every
worker, so all of them answer alike), in time buckets of ``step`` seconds over
the last ``window`` seconds. Latency percentiles come from a histogram per
bucket (durations counted in bins 25 % apart, 1 ms to 20 min), so the query
returns a few thousand small rows however many requests there were, and each
percentile is the upper edge of its bin: within 25 % of the exact value.

Only client traffic (``/v1/...`` endpoints) that finished is counted::

    {"window_seconds": 3600, "step_seconds": 60, "by": "model", "from": 1751900000.0,
     "t": [1751900000.0, ...],                     # bucket starts, epoch seconds
     "series": [{"key": "all", "requests": [..], "rps": [..], "p50_ms": [..], "p95_ms": [..],
                 "tokens_per_second": [..], "cache_hit_rate": [..]}, {"key": "chat", ...}]}

Empty buckets have ``requests`` 0 and null latency and cache rate. ``tokens_per_second``
counts completion tokens (what the models generated).
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from ..errors import InvalidRequest
from .operations import json_response

_EDGES = tuple(0.001 * 1.25**i for i in range(64) if 0.001 * 1.25**i <= 1200)  # seconds
_BIN = (
    "CASE WHEN duration_seconds IS NULL THEN NULL "
    + " ".join(f"WHEN duration_seconds < {edge!r} THEN {i}" for i, edge in enumerate(_EDGES))
    + f" ELSE {len(_EDGES)} END"
)
_KEYS = {"none": "''", "model": "COALESCE(requested_model, '')", "backend": "COALESCE(backend, '')"}
_MAX_KEYS = 8  # series per chart beyond "all": the busiest, so a legend stays readable


def _number(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a whole number of seconds", param=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}", param=name)
    return value


def _percentile(bins: dict[int, int], total: int, share: float) -> float | None:
    if not total:
        return None
    rank, seen = share * total, 0
    for index in sorted(bins):
        seen += bins[index]
        if seen >= rank:
            edge = _EDGES[index] if index < len(_EDGES) else _EDGES[-1]
            return round(edge * 1000, 1)
    return None


class _Series:
    def __init__(self, key: str, size: int) -> None:
        self.key = key
        self.count = [0] * size
        self.tokens = [0] * size
        self.hits = [0] * size
        self.bins: list[dict[int, int]] = [{} for _ in range(size)]

    def add(self, bucket: int, bin_index: int | None, count: int, tokens: int, hits: int) -> None:
        self.count[bucket] += count
        self.tokens[bucket] += tokens
        self.hits[bucket] += hits
        if bin_index is not None:
            self.bins[bucket][bin_index] = self.bins[bucket].get(bin_index, 0) + count

    def render(self, step: int) -> dict:
        timed = [sum(b.values()) for b in self.bins]
        return {
            "key": self.key,
            "requests": self.count,
            "rps": [round(c / step, 3) for c in self.count],
            "p50_ms": [_percentile(b, n, 0.50) for b, n in zip(self.bins, timed)],
            "p95_ms": [_percentile(b, n, 0.95) for b, n in zip(self.bins, timed)],
            "tokens_per_second": [round(t / step, 2) for t in self.tokens],
            "cache_hit_rate": [round(h / c, 3) if c else None for h, c in zip(self.hits, self.count)],
        }


async def traffic(request: Request) -> Response:
    """GET /admin/stats?window=3600&step=60&by=none|model|backend"""
    unknown = set(request.query_params) - {"window", "step", "by"}
    if unknown:
        raise InvalidRequest(f"Unknown parameter(s): {', '.join(sorted(unknown))}; valid: window, step, by",
                             param=sorted(unknown)[0])  # fmt: skip
    window = _number(request, "window", 3600, 60, 7 * 86400)
    step = _number(request, "step", 60, 1, 86400)
    by = request.query_params.get("by", "none")
    if by not in _KEYS:
        raise InvalidRequest("by must be one of none, model, backend", param="by")
    size = -(-window // step)
    if size > 2000:
        raise InvalidRequest("window / step gives more than 2000 buckets; use a larger step", param="step")
    until = (time.time() // step + 1) * step  # buckets aligned to the step, the last one still filling
    start = until - size * step
    db = request.app.state.services.db
    rows = await db.fetchall(
        # Integer division of integers truncates alike in SQLite and PostgreSQL, but a CAST of a fraction
        # truncates in SQLite and rounds in PostgreSQL: casting milliseconds keeps that rounding below a
        # millisecond, where the clamp below catches the one case it could matter (the last bucket).
        f"SELECT (CAST(started_at * 1000 AS BIGINT) - ?) / ? AS bucket, {_KEYS[by]} AS key, {_BIN} AS bin, COUNT(*), "
        "SUM(COALESCE(completion_tokens, 0)), SUM(cache_hit) FROM requests "
        "WHERE started_at >= ? AND started_at < ? AND endpoint LIKE '/v1/%' AND status != 'in_progress' "
        "GROUP BY bucket, key, bin",
        (int(start) * 1000, int(step) * 1000, start, until),
    )
    total = _Series("all", size)
    per_key: dict[str, _Series] = {}
    for bucket, key, bin_index, count, tokens, hits in rows:
        bucket = min(bucket, size - 1)
        if bucket < 0:
            continue
        total.add(bucket, bin_index, count, tokens or 0, hits or 0)
        if by != "none":
            series = per_key.get(key) or per_key.setdefault(key, _Series(key or "(none)", size))
            series.add(bucket, bin_index, count, tokens or 0, hits or 0)
    busiest = sorted(per_key.values(), key=lambda s: -sum(s.count))[:_MAX_KEYS]
    return json_response({
        "window_seconds": window,
        "step_seconds": step,
        "by": by,
        "from": start,
        "t": [start + i * step for i in range(size)],
        "series": [s.render(step) for s in (total, *busiest)],
    })  # fmt: skip
