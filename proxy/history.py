"""Request history: one row per request, written behind the request path.

The request path creates a :class:`RequestRecord`, calls :meth:`History.begin`,
fills the record in as the request goes, and calls :meth:`History.finish`. Both
calls only copy the record into a buffer (a few microseconds, nothing awaited);
a background writer upserts the buffer in one transaction per batch, so a request
that began and finished before the writer ran costs one INSERT. A batch gathers for
a quarter of a second after the first row: each commit, each hand-off to the
database thread and each page of the write-ahead log is then shared by many rows
(at 20 ms, history cost 14 futex calls and 3.7 WAL writes per request; at 250 ms,
6.5 and 2.6). Reads through :meth:`list` and :meth:`get` write the buffer first,
so they never miss a row of this process; another reader of the table calls :meth:`catch_up`
first (the admin stats do).

Several worker processes share the file. Each :class:`History` is an *instance*
with a heartbeat row in ``instances``; rows still ``in_progress`` whose instance
stopped beating (or whose pid is gone on this host) are marked ``interrupted`` by
whichever instance notices first, at start and then every minute. A live
sibling's in-flight rows are never touched. :meth:`History.close` writes
everything buffered (a SIGTERM loses no row), then marks this instance's rows
that can no longer finish ``interrupted``.

When the writer falls behind (the disk is locked or failing), the buffer holds up
to ``max_pending`` records (and ``max_pending_bytes`` of captured bodies). Beyond
that a ``begin`` is skipped (the row appears when the request finishes, if there
is room then; counted in ``stats.deferred``) and a ``finish`` of a record not
already buffered is dropped (``stats.dropped``, logged at most once a minute).
The request path never waits.

Dict shape (what ``GET /admin/history/requests`` returns as JSON)::

    list(...) -> {"object": "list", "data": [row, ...], "next": "<cursor>" | null}
    row = {
      "id": "q3Jx0c2LrN9bVw1e",            # 16 URL-safe chars; also the X-Request-Id header
      "endpoint": "/v1/chat/completions",  # whatever the caller recorded
      "status": "in_progress" | "ok" | "error" | "cancelled" | "interrupted",
      "started_at": "2025-07-07T20:22:19.180Z",  # ISO 8601 UTC, milliseconds
      "finished_at": "..." | null,               # null while in progress (and when interrupted)
      "duration_seconds": 1.234 | null,          # null while in progress (and when interrupted)
      "requested_model": str | null, "resolved_model": str | null, "backend": str | null,
      "attempts": int, "cache_hit": bool, "stream": bool,
      "prompt_tokens": int | null, "completion_tokens": int | null,
      "ttft_seconds": float | null, "http_status": int | null,
      "error": str | null, "key_id": str | null,
    }
    get(id) -> row plus "request_body" and "response_body" (str | null; only stored when
                history.capture_bodies is on, cut at history.max_body_bytes), or None

Rows are newest first (``started_at`` then ``id`` descending); ``next`` is an opaque
cursor for the following page, null on the last one. SQLite stores epoch seconds.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from .config import HistoryConfig
from .storage import Database
from .storage.background import Periodic, WriteBehind, pid_alive

log = logging.getLogger("llm_proxy.history")

Status = Literal["in_progress", "ok", "error", "cancelled", "interrupted"]
STATUSES = frozenset({"in_progress", "ok", "error", "cancelled", "interrupted"})

_MAX_ERROR_CHARS = 4000
_INTERRUPTED = "the proxy process handling this request stopped before it finished"


def new_request_id() -> str:
    return secrets.token_urlsafe(12)


def key_id(api_key: str | None) -> str | None:
    """A short, stable id for an API key: tells keys apart in the history, and cannot give the key back."""
    if not api_key:
        return None
    return hashlib.blake2b(api_key.encode(), digest_size=6, person=b"llm-proxy-key").hexdigest()


@dataclass(slots=True)
class RequestRecord:
    """One request, filled in by the request path. ``begin``/``finish`` copy it; keep mutating freely."""

    endpoint: str
    id: str = field(default_factory=new_request_id)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    duration_seconds: float | None = None
    status: Status = "in_progress"
    requested_model: str | None = None
    resolved_model: str | None = None
    backend: str | None = None
    attempts: int = 0
    cache_hit: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_seconds: float | None = None
    http_status: int | None = None
    error: str | None = None
    key_id: str | None = None
    stream: bool = False
    # Kept only when history.capture_bodies is on (History drops or cuts them).
    request_body: bytes | str | None = None
    response_body: bytes | str | None = None
    # Monotonic start, for a duration that a wall-clock step cannot make negative.
    t0: float = field(default_factory=time.monotonic, repr=False, compare=False)


@dataclass
class HistoryStats:
    written: int = 0
    batches: int = 0
    deferred: int = 0  # begin skipped because the buffer was full
    dropped: int = 0  # finish lost because the buffer was full
    late: int = 0  # begin/finish after close()
    interrupted: int = 0  # rows this instance marked interrupted
    purged: int = 0  # rows removed by retention


_COLUMNS = ("id", "instance_id", "endpoint", "started_at", "finished_at", "duration_seconds", "status",
            "requested_model", "resolved_model", "backend", "attempts", "cache_hit", "prompt_tokens",
            "completion_tokens", "ttft_seconds", "http_status", "error", "key_id", "stream",
            "request_body", "response_body")  # fmt: skip
_REGISTER = ("INSERT INTO instances (id, host, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?) "
             "ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
             "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at")  # fmt: skip
_UPSERT = (
    f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS[1:])}"
)
# What list() and get() return, in this order (instance_id stays internal).
_PUBLIC = ("id", "endpoint", "status", "started_at", "finished_at", "duration_seconds", "requested_model",
           "resolved_model", "backend", "attempts", "cache_hit", "stream", "prompt_tokens", "completion_tokens",
           "ttft_seconds", "http_status", "error", "key_id")  # fmt: skip
_BODIES = ("request_body", "response_body")


class History:
    def __init__(
        self,
        db: Database,
        config: HistoryConfig,
        *,
        clock: Callable[[], float] = time.time,
        heartbeat_interval: float = 10.0,
        stale_after: float = 60.0,
        sweep_interval: float = 60.0,
        retention_interval: float = 3600.0,
        linger: float = 0.25,
        batch_size: int = 1000,
        max_pending: int = 50_000,
        max_pending_bytes: int = 128 * 1024 * 1024,
    ) -> None:
        self._db = db
        self.config = config
        self._clock = clock
        self._capture = config.capture_bodies
        self._max_body = config.max_body_bytes
        # Read by the request path (proxy/exchange.py), which hands the bodies over only when they are kept.
        self.capture_bodies = config.enabled and config.capture_bodies
        self.max_body_bytes = config.max_body_bytes
        self._stale_after = stale_after
        self._sweep_every = max(1, round(sweep_interval / heartbeat_interval))
        self._retention_every = max(1, round(retention_interval / heartbeat_interval))
        self._ticks = 0
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self.instance_id = secrets.token_urlsafe(9)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.stats = HistoryStats()
        self._pending: dict[str, tuple] = {}
        self._pending_bytes = 0
        self._closed = False
        self._last_drop_log = 0.0
        self._writer = WriteBehind("history", self._flush_batch, self._has_pending, linger=linger)
        self._ticker = Periodic("history-heartbeat", heartbeat_interval, self._tick)
        if not config.enabled:
            self.begin = self.finish = _ignore  # type: ignore[method-assign]

    key_id = staticmethod(key_id)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register this instance, mark dead instances' rows interrupted, purge old rows, start writing."""
        if not self.config.enabled:
            return
        now = self._clock()
        await self._db.execute(
            _REGISTER,
            (self.instance_id, self.host, self.pid, now, now),
        )
        await self.sweep()
        await self.purge_expired()
        self._writer.start()
        self._ticker.start()

    async def flush(self) -> None:
        """Write everything buffered (until the buffer is empty)."""
        await self._writer.drain()

    async def catch_up(self) -> None:
        """Write what was buffered when this is called (not what arrives meanwhile): for a reader of the
        ``requests`` table that must see this process's recent requests (the admin stats, ``list``)."""
        if not self.config.enabled or self._closed:
            return
        # The buffer keeps arrival order, so that many batches.
        await self._writer.drain(rounds=len(self._pending) // self._batch_size + 2)

    _catch_up = catch_up

    async def close(self) -> None:
        """Write everything buffered, then stop; rows of this instance still in progress become interrupted."""
        if self._closed or not self.config.enabled:
            self._closed = True
            return
        await self._ticker.close()
        await self._writer.close()
        self._closed = True
        now = self._clock()
        async with self._db.transaction() as db:
            self.stats.interrupted += await db.execute(
                "UPDATE requests SET status = 'interrupted', error = COALESCE(error, ?) "
                "WHERE status = 'in_progress' AND instance_id = ?",
                (_INTERRUPTED, self.instance_id),
            )
            await db.execute("DELETE FROM instances WHERE id = ?", (self.instance_id,))
        log.debug("history closed at %.3f: %s", now, self.stats)

    # --- the request path -----------------------------------------------------------------------

    def begin(self, record: RequestRecord) -> None:
        """Queue the row of a request that started. Never awaits, never blocks."""
        if self._closed:
            self.stats.late += 1
            return
        if len(self._pending) >= self._max_pending or self._pending_bytes >= self._max_pending_bytes:
            self.stats.deferred += 1
            return
        self._put(record)

    def finish(self, record: RequestRecord) -> None:
        """Queue the final row: sets finished_at, duration and (if still in_progress) ok/error."""
        if record.finished_at is None:
            record.finished_at = self._clock()
            record.duration_seconds = time.monotonic() - record.t0
        elif record.duration_seconds is None:
            record.duration_seconds = record.finished_at - record.started_at
        if record.status == "in_progress":
            record.status = "error" if record.error or (record.http_status or 200) >= 400 else "ok"
        if self._closed:
            self.stats.late += 1
            return
        if record.id not in self._pending and (
            len(self._pending) >= self._max_pending or self._pending_bytes >= self._max_pending_bytes
        ):
            self.stats.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log > 60:
                self._last_drop_log = now
                log.warning("history writer is behind: dropped %d rows so far", self.stats.dropped)
            return
        self._put(record)

    def _put(self, r: RequestRecord) -> None:
        request_body = response_body = None
        if self._capture:
            request_body = self._cap(r.request_body)
            response_body = self._cap(r.response_body)
            old = self._pending.get(r.id)
            if old is not None:
                self._pending_bytes -= len(old[19] or b"") + len(old[20] or b"")
            self._pending_bytes += len(request_body or b"") + len(response_body or b"")
        error = r.error if r.error is None or len(r.error) <= _MAX_ERROR_CHARS else r.error[:_MAX_ERROR_CHARS]
        self._pending[r.id] = (
            r.id, self.instance_id, r.endpoint, r.started_at, r.finished_at, r.duration_seconds, r.status,
            r.requested_model, r.resolved_model, r.backend, r.attempts, 1 if r.cache_hit else 0,
            r.prompt_tokens, r.completion_tokens, r.ttft_seconds, r.http_status, error, r.key_id,
            1 if r.stream else 0, request_body, response_body,
        )  # fmt: skip
        self._writer.notify()

    def _cap(self, body: bytes | str | None) -> bytes | None:
        if body is None:
            return None
        if isinstance(body, str):
            body = body.encode()
        return body if len(body) <= self._max_body else body[: self._max_body]

    # --- the writer -----------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Rows waiting to be written (many while the database is away)."""
        return len(self._pending)

    def _has_pending(self) -> bool:
        return bool(self._pending)

    async def _flush_batch(self) -> None:
        if len(self._pending) <= self._batch_size:
            batch, self._pending = self._pending, {}
        else:
            batch = {k: self._pending.pop(k) for k in list(itertools.islice(self._pending, self._batch_size))}
        if self._capture:
            self._pending_bytes -= sum(len(row[19] or b"") + len(row[20] or b"") for row in batch.values())
        try:
            async with self._db.transaction() as db:
                await db.executemany(_UPSERT, batch.values())
        except BaseException:
            # Put the batch back; a newer snapshot that arrived meanwhile wins. Upserts make a retry harmless.
            for key, row in batch.items():
                if key not in self._pending:
                    self._pending[key] = row
                    if self._capture:
                        self._pending_bytes += len(row[19] or b"") + len(row[20] or b"")
            raise
        self.stats.written += len(batch)
        self.stats.batches += 1

    async def _tick(self) -> None:
        self._ticks += 1
        changed = await self._db.execute(
            "UPDATE instances SET heartbeat_at = ? WHERE id = ?", (self._clock(), self.instance_id)
        )
        if not changed:
            # Another instance took us for dead (this loop stalled past stale_after): register again.
            now = self._clock()
            await self._db.execute(
                _REGISTER,
                (self.instance_id, self.host, self.pid, now, now),
            )
        if self._ticks % self._sweep_every == 0:
            await self.sweep()
        if self._ticks % self._retention_every == 0:
            await self.purge_expired()

    async def sweep(self) -> int:
        """Mark in_progress rows of dead instances interrupted; returns how many."""
        now = self._clock()
        instances = await self._db.fetchall("SELECT id, host, pid, heartbeat_at FROM instances WHERE id != ?",
                                            (self.instance_id,))  # fmt: skip
        dead = [
            iid
            for iid, host, pid, beat in instances
            if beat < now - self._stale_after or (host == self.host and not pid_alive(pid))
        ]
        marked = 0
        async with self._db.transaction() as db:
            for i in range(0, len(dead), 500):
                chunk = dead[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                marked += await db.execute(
                    f"UPDATE requests SET status = 'interrupted', error = COALESCE(error, ?) "
                    f"WHERE status = 'in_progress' AND instance_id IN ({marks})",
                    (_INTERRUPTED, *chunk),
                )
                await db.execute(f"DELETE FROM instances WHERE id IN ({marks})", chunk)
            # Rows whose instance row is gone altogether (deleted by a sweep that raced their last write).
            marked += await db.execute(
                "UPDATE requests SET status = 'interrupted', error = COALESCE(error, ?) "
                "WHERE status = 'in_progress' AND instance_id NOT IN (SELECT id FROM instances)",
                (_INTERRUPTED,),
            )
        if marked:
            log.info("marked %d request(s) of stopped proxy processes as interrupted", marked)
        self.stats.interrupted += marked
        return marked

    async def purge_expired(self) -> int:
        """Delete rows older than history.retention_days, a few thousand per transaction."""
        cutoff = self._clock() - self.config.retention_days * 86400
        total = 0
        while True:
            n = await self._db.execute(
                "DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE started_at < ? LIMIT 5000)",
                (cutoff,),
            )
            total += n
            if n < 5000:
                break
        self.stats.purged += total
        return total

    # --- queries --------------------------------------------------------------------------------

    async def list(
        self,
        *,
        model: str | None = None,
        backend: str | None = None,
        status: str | None = None,
        endpoint: str | None = None,
        since: float | str | datetime | None = None,
        until: float | str | datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
        offset: int = 0,
    ) -> dict:
        """Rows newest first. ``model`` matches the requested or the resolved model; since is
        inclusive, until exclusive; ``cursor`` is a previous page's ``next``. Raises ValueError
        on a bad status, time or cursor (the API answers 400)."""
        await self._catch_up()  # this worker's own recent requests are visible at once
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if model is not None:
            where.append("(requested_model = ? OR resolved_model = ?)")
            params += [model, model]
        if backend is not None:
            where.append("backend = ?")
            params.append(backend)
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"unknown status {status!r}; expected one of {', '.join(sorted(STATUSES))}")
            where.append("status = ?")
            params.append(status)
        if endpoint is not None:
            where.append("endpoint = ?")
            params.append(endpoint)
        if since is not None:
            where.append("started_at >= ?")
            params.append(parse_time(since))
        if until is not None:
            where.append("started_at < ?")
            params.append(parse_time(until))
        if cursor:
            at, last_id = _decode_cursor(cursor)
            where.append("(started_at < ? OR (started_at = ? AND id < ?))")
            params += [at, at, last_id]
        limit = max(1, min(int(limit), 1000))
        sql = (
            f"SELECT {', '.join(_PUBLIC)} FROM requests"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " ORDER BY started_at DESC, id DESC LIMIT ? OFFSET ?"
        )
        rows = await self._db.fetchall(sql, (*params, limit + 1, max(0, int(offset))))
        data = [_to_dict(row, _PUBLIC) for row in rows[:limit]]
        following = None
        if len(rows) > limit:
            last = rows[limit - 1]
            following = _encode_cursor(last[3], last[0])
        return {"object": "list", "data": data, "next": following}

    async def get(self, request_id: str) -> dict | None:
        await self._catch_up()
        columns = (*_PUBLIC, *_BODIES)
        row = await self._db.fetchone(f"SELECT {', '.join(columns)} FROM requests WHERE id = ?", (request_id,))
        return None if row is None else _to_dict(row, columns)


def _ignore(record: RequestRecord) -> None:
    return None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: float | int | str | datetime) -> float:
    """Epoch seconds from epoch seconds, a datetime, or an ISO 8601 string (``Z`` or an offset; naive is UTC)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid time {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        moment = value
    else:
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"invalid time {value!r}: expected ISO 8601 (2025-01-31T12:00:00Z) or epoch seconds"
            ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _to_dict(row: tuple, columns: tuple[str, ...]) -> dict:
    out = dict(zip(columns, row))
    in_progress = out["status"] == "in_progress"
    out["started_at"] = iso(out["started_at"])
    out["finished_at"] = None if in_progress else iso(out["finished_at"])
    if in_progress:
        out["duration_seconds"] = None
    out["cache_hit"] = bool(out["cache_hit"])
    out["stream"] = bool(out["stream"])
    for name in _BODIES:
        if name in out and out[name] is not None:
            raw = out[name]
            out[name] = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return out


def _encode_cursor(started_at: float, request_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([started_at, request_id])).rstrip(b"=").decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, request_id = orjson.loads(raw)
        if isinstance(at, bool) or not isinstance(at, int | float) or not isinstance(request_id, str):
            raise ValueError
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise ValueError(f"invalid cursor {cursor!r}") from None
    return float(at), request_id
