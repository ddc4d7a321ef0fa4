"""The response cache: exact-match keys and policy (pure), and the store (SQLite with an in-memory front).

Keys. :func:`cache_key` hashes the operation, the *resolved* model and a canonical
form of the request body: keys sorted at every level, no whitespace, integral
floats among the sampling parameters written as integers (``0.0`` and ``0`` mean
the same), ``null`` top-level fields dropped (same as absent), a string ``stop``
as a one-item list. Fields that
cannot change the answer are dropped: ``model`` (the resolved one is hashed
instead), ``stream``, ``stream_options`` (a stored answer is replayed as a stream
with or without usage), ``user``, ``metadata``, ``store``, ``service_tier``,
``prompt_cache_key``, ``safety_identifier``, ``task_type`` (routing only) and
``keep_alive`` (how long a backend keeps the model loaded). Everything else is
kept: messages, prompt, tools, tool_choice, parallel_tool_calls, sampling
(temperature, top_p, top_k, min_p, seed, penalties, max_tokens, stop, n,
logit_bias, ...), response_format, logprobs, reasoning_effort/think, options.
Hash the body *after* the alias's adaptation (system prompt, defaults), since
that is what the backend answers; rewrite ``model`` (and ideally ``id``) in a
stored answer before serving it under another name.

Embeddings are cached per input: :func:`embedding_keys` gives one key per item
of ``input`` (a string or a token list) over the model and the other answer-
changing fields (``dimensions``, ``truncate``, ``options``); ``encoding_format``
is not part of the key. Vectors are stored as float64, so ``float`` answers come
back exactly and ``base64`` is encoded from them on the way out.

Store. :class:`ResponseCache` keeps hot entries in an in-memory LRU (a hit never
touches SQLite) over the ``response_cache`` table (TTL, at most ``max_entries``
rows, least recently used evicted). Writes are write-behind: :meth:`put` returns
at once and a background task inserts batches. Several workers share the file: a
purge bumps ``cache_generation``, which every process polls about twice a second
and on a change empties its memory front.

Shared front. With a bus (:meth:`ResponseCache.share`: Redis, ``redis.url``) a
put also goes there, and a lookup that misses memory asks it before the
database: an answer stored by one replica is a hit on the others at once, before
its row is written (or while the database is away). Its keys carry the cache
generation, so a purge anywhere leaves the old entries unread; they expire on
their own. A bus that is away is skipped (memory and database, as without one).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

from .config import CacheConfig
from .storage import Database
from .storage.background import Periodic, WriteBehind

if TYPE_CHECKING:
    from .metrics import Metrics
    from .store.base import Bus

log = logging.getLogger("llm_proxy.cache")

Mode = Literal["deterministic", "always", "off"]

# Bump when the canonical form changes, so old rows stop matching instead of matching wrongly.
_KEY_VERSION = b"llm-proxy-cache-v1\0"

IGNORED_FIELDS = frozenset({
    "model", "stream", "stream_options", "user", "metadata", "store", "service_tier",
    "prompt_cache_key", "safety_identifier", "task_type", "keep_alive",
})  # fmt: skip
_EMBEDDING_IGNORED = IGNORED_FIELDS | {"input", "encoding_format"}

_EXACT_INT = 2**53


def _number(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < _EXACT_INT:
        return int(value)
    return value


def canonical(body: dict, ignored: frozenset[str] = IGNORED_FIELDS) -> bytes:
    """The bytes a key is hashed over: answer-changing fields only, in one spelling.

    Numbers are normalised where clients differ in practice (sampling parameters and
    ``options``); nested content (messages, tool schemas) is hashed as sent, key order
    aside, since walking it in Python would cost more than the rare miss it avoids.
    """
    out = {}
    for name, value in body.items():
        if name in ignored or value is None:
            continue
        if name == "stop" and isinstance(value, str):
            value = [value]
        elif isinstance(value, float):
            value = _number(value)
        elif name == "options" and isinstance(value, dict):
            value = {k: _number(v) for k, v in value.items()}
        out[name] = value
    return orjson.dumps(out, option=orjson.OPT_SORT_KEYS)


def _digest(*parts: bytes) -> str:
    # sha256 runs on the CPU's SHA extensions: about twice blake2b's speed on large bodies.
    h = hashlib.sha256(_KEY_VERSION)
    for part in parts:
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:40]


def cache_key(operation: str, model: str, body: dict) -> str:
    """The key of one chat or completion answer (40 hex chars)."""
    return _digest(operation.encode(), model.encode(), canonical(body))


def embedding_key(model: str, item: str | list[int], params: bytes = b"{}") -> str:
    """The key of one embedding input; ``params`` is :func:`canonical` of the request's other fields."""
    return _digest(b"embeddings", model.encode(), params, orjson.dumps(item))


def embedding_keys(model: str, body: dict) -> list[str]:
    """One key per input of an embeddings request, in input order (duplicates give equal keys)."""
    params = canonical(body, _EMBEDDING_IGNORED)
    inputs = body.get("input")
    if isinstance(inputs, str):
        items: list = [inputs]
    elif isinstance(inputs, list) and inputs and all(isinstance(t, int) and not isinstance(t, bool) for t in inputs):
        items = [inputs]  # one token list
    elif isinstance(inputs, list):
        items = inputs
    else:
        items = []
    return [embedding_key(model, item, params) for item in items]


def _is_zero(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def deterministic(body: dict) -> bool:
    """Temperature 0 or an explicit seed (OpenAI fields, or Ollama ``options`` sent as extra fields)."""
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    return (
        _is_zero(body.get("temperature"))
        or body.get("seed") is not None
        or _is_zero(options.get("temperature"))
        or options.get("seed") is not None
    )


def cache_directives(header: str | None) -> frozenset[str]:
    if not header:
        return frozenset()
    return frozenset(part.strip().lower().replace(" ", "") for part in header.split(",") if part.strip())


def policy(mode: Mode, body: dict, cache_control: str | None = None, *, operation: str = "chat") -> tuple[bool, bool]:
    """(read, write) for one request.

    off: neither. deterministic: only temperature 0 or a seed (embeddings always).
    always: every request. ``Cache-Control: no-store`` does neither; ``no-cache``
    (or ``max-age=0``) skips the read but still stores the fresh answer.
    """
    if mode == "off":
        return False, False
    directives = cache_directives(cache_control)
    if "no-store" in directives:
        return False, False
    if mode == "deterministic" and operation != "embeddings" and not deterministic(body):
        return False, False
    read = "no-cache" not in directives and "max-age=0" not in directives
    return read, True


def pack_vector(vector: Iterable[float]) -> bytes:
    packed = array("d", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def unpack_vector(blob: bytes) -> list[float]:
    packed = array("d")
    packed.frombytes(blob)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tolist()


# --- the store ----------------------------------------------------------------------------------


@dataclass
class CacheStats:
    memory_hits: int = 0
    db_hits: int = 0
    misses: int = 0
    stores: int = 0
    dropped: int = 0  # puts lost because the write-behind buffer was full
    memory_evictions: int = 0
    db_evictions: int = 0
    expired: int = 0
    embedding_hits: int = 0
    embedding_misses: int = 0
    purged: int = 0
    lookup_failures: int = 0  # database lookups that failed (a PostgreSQL server away), taken as misses
    shared_hits: int = 0  # answers found in the shared front (another replica stored them), before the database

    @property
    def hits(self) -> int:
        return self.memory_hits + self.shared_hits + self.db_hits


_SHARED_HEAD = struct.Struct("<dH")  # expires_at, length of the model's name; then the name, then the body


def _pack_shared(body: bytes, model: str, expires_at: float) -> bytes:
    name = model.encode()
    return _SHARED_HEAD.pack(expires_at, len(name)) + name + body


def _unpack_shared(blob: bytes) -> tuple[bytes, str, float] | None:
    try:
        expires_at, size = _SHARED_HEAD.unpack_from(blob)
    except struct.error:
        return None
    start = _SHARED_HEAD.size
    return blob[start + size :], blob[start : start + size].decode(errors="replace"), expires_at


# ON CONFLICT rather than SQLite's INSERT OR REPLACE: the same statement runs on PostgreSQL.
_PUT = ("INSERT INTO response_cache (key, model, body, size, created_at, expires_at, last_used_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET model = excluded.model, body = excluded.body, "
        "size = excluded.size, created_at = excluded.created_at, expires_at = excluded.expires_at, "
        "last_used_at = excluded.last_used_at")  # fmt: skip
_PUT_EMBEDDING = ("INSERT INTO embedding_cache (key, model, vector, created_at, expires_at, last_used_at) "
                  "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET model = excluded.model, "
                  "vector = excluded.vector, created_at = excluded.created_at, expires_at = excluded.expires_at, "
                  "last_used_at = excluded.last_used_at")  # fmt: skip
_TABLES = ("response_cache", "embedding_cache")


class ResponseCache:
    """Answers by key. Create in the lifespan, ``await start()``, ``await close()`` on shutdown."""

    def __init__(
        self,
        db: Database,
        config: CacheConfig,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        memory_max_bytes: int = 256 * 1024 * 1024,
        poll_interval: float = 0.5,
        expiry_interval: float = 60.0,
        linger: float = 0.05,
        max_pending: int = 5000,
        max_pending_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._db = db
        self.config = config
        self._clock = clock
        self._metrics = metrics
        self._ttl = config.ttl_hours * 3600
        self._max_rows = config.max_entries
        self._memory_entries = config.memory_entries
        self._memory_max_bytes = memory_max_bytes
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self.stats = CacheStats()
        # key -> (body, model, expires_at); most recently used last
        self._memory: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()
        self._memory_bytes = 0
        # Write-behind buffers: key -> row; key -> last used time.
        self._pending: dict[str, tuple] = {}
        self._pending_bytes = 0
        self._pending_embeddings: dict[str, tuple] = {}
        self._touched: dict[str, float] = {}
        self._touched_embeddings: dict[str, float] = {}
        # Bumped whenever the memory front is emptied; a read that began before does not refill it.
        self._epoch = 0
        self._generation: int | None = None
        self._writer = WriteBehind("cache", self._flush_batch, self._has_pending, linger=linger)
        self._poller = Periodic("cache-generation", poll_interval, self.poll)
        self._expirer = Periodic("cache-expiry", expiry_interval, self.expire)
        self._bus: Bus | None = None

    def share(self, bus: Bus | None) -> None:
        """Put answers on ``bus`` too, and look there before the database (replicas share hot answers)."""
        self._bus = bus

    def _shared_key(self, key: str) -> str:
        return f"{self._generation or 0}:{key}"

    async def start(self) -> None:
        await self.poll()
        await self.expire()
        self._writer.start()
        self._poller.start()
        self._expirer.start()

    async def close(self) -> None:
        await self._poller.close()
        await self._expirer.close()
        await self._writer.close()

    async def flush(self) -> None:
        await self._writer.drain()

    # --- answers --------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        now = self._clock()
        entry = self._memory.get(key)
        if entry is not None:
            if entry[2] > now:
                self._memory.move_to_end(key)
                self._touched[key] = now  # so SQLite's LRU order knows this entry is hot
                self.stats.memory_hits += 1
                return entry[0]
            self._forget(key)
        row = self._pending.get(key)
        if row is not None and row[5] > now:
            self.stats.memory_hits += 1
            return row[2]
        epoch = self._epoch
        bus = self._bus
        if bus is not None and bus.up:
            shared = await bus.cache_get(self._shared_key(key))
            entry = _unpack_shared(shared) if shared is not None else None
            if entry is not None and entry[2] > now:
                if epoch == self._epoch:
                    self._remember(key, *entry)
                self.stats.shared_hits += 1
                return entry[0]
        try:
            found = await self._db.fetchone("SELECT body, model, expires_at FROM response_cache WHERE key = ?", (key,))
        except Exception as exc:  # a database server that is down costs a miss, never the request
            found = self._unreachable(exc)
        if found is None or found[2] <= now:
            self.stats.misses += 1
            return None
        body, model, expires_at = found
        if epoch == self._epoch:
            self._remember(key, body, model, expires_at)
        self._touched[key] = now
        self.stats.db_hits += 1
        return body

    def _unreachable(self, exc: Exception) -> None:
        self.stats.lookup_failures += 1
        if self.stats.lookup_failures in (1, 100) or self.stats.lookup_failures % 10_000 == 0:
            log.warning("cache lookups in the database fail (%d so far), answered as misses: %s: %s",
                        self.stats.lookup_failures, type(exc).__name__, exc)  # fmt: skip
        return None

    def put(self, key: str, model: str, body: bytes) -> None:
        """Store a complete answer. Returns at once; the row is written in the background."""
        now = self._clock()
        expires_at = now + self._ttl
        self._remember(key, body, model, expires_at)
        if self._bus is not None:
            self._bus.cache_put(self._shared_key(key), _pack_shared(body, model, expires_at), self._ttl)
        old = self._pending.get(key)
        if old is None and (len(self._pending) >= self._max_pending or self._pending_bytes >= self._max_pending_bytes):
            self.stats.dropped += 1
            return
        if old is not None:
            self._pending_bytes -= old[3]
        self._pending[key] = (key, model, body, len(body), now, expires_at, now)
        self._pending_bytes += len(body)
        self.stats.stores += 1
        self._writer.notify()

    # --- embeddings -----------------------------------------------------------------------------

    async def get_embeddings(self, keys: Iterable[str]) -> dict[str, list[float]]:
        """The cached vectors among ``keys`` (missing ones are simply absent)."""
        now = self._clock()
        wanted = list(dict.fromkeys(keys))
        found: dict[str, list[float]] = {}
        rest = []
        for key in wanted:
            row = self._pending_embeddings.get(key)
            if row is not None and row[4] > now:
                found[key] = unpack_vector(row[2])
            else:
                rest.append(key)
        for i in range(0, len(rest), 500):
            chunk = rest[i : i + 500]
            try:
                rows = await self._db.fetchall(
                    f"SELECT key, vector, expires_at FROM embedding_cache WHERE key IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
            except Exception as exc:
                rows = self._unreachable(exc) or []
            for key, blob, expires_at in rows:
                if expires_at > now:
                    found[key] = unpack_vector(blob)
                    self._touched_embeddings[key] = now
        self.stats.embedding_hits += len(found)
        self.stats.embedding_misses += len(wanted) - len(found)
        return found

    def put_embeddings(self, model: str, vectors: dict[str, list[float]]) -> None:
        """Store vectors by key (from :func:`embedding_keys`). Returns at once."""
        now = self._clock()
        expires_at = now + self._ttl
        for key, vector in vectors.items():
            if key not in self._pending_embeddings and len(self._pending_embeddings) >= self._max_pending * 10:
                self.stats.dropped += 1
                continue
            self._pending_embeddings[key] = (key, model, pack_vector(vector), now, expires_at, now)
        self._writer.notify()

    # --- purge and upkeep -----------------------------------------------------------------------

    async def purge(self, model: str | None = None) -> int:
        """Delete every cached answer and vector (of one model, or all); returns the rows deleted.

        Other worker processes empty their memory fronts when they next poll (within about a second).
        """
        await self.flush()  # answers still waiting to be written count as cached: delete them too
        self._drop_local(model)
        where, params = ("", ()) if model is None else (" WHERE model = ?", (model,))
        deleted = 0
        async with self._db.transaction() as db:
            for table in _TABLES:
                deleted += await db.execute(f"DELETE FROM {table}{where}", params)
            await db.execute("UPDATE cache_generation SET generation = generation + 1 WHERE id = 1")
            row = await db.fetchone("SELECT generation FROM cache_generation WHERE id = 1")
        self._generation = row[0] if row else None
        self._drop_local(model)  # a read that raced the delete may have refilled the front
        self.stats.purged += deleted
        log.info("cache purged (%s): %d entries", model or "all models", deleted)
        return deleted

    async def poll(self) -> None:
        """Empty the memory front if another process purged; push pending LRU touches."""
        row = await self._db.fetchone("SELECT generation FROM cache_generation WHERE id = 1")
        generation = row[0] if row else 0
        if self._generation is not None and generation != self._generation:
            self._drop_local(None, keep_pending=True)
        self._generation = generation
        if self._touched or self._touched_embeddings:
            self._writer.notify()

    async def expire(self) -> int:
        """Delete expired rows (a few thousand per transaction)."""
        now = self._clock()
        total = 0
        for table in _TABLES:
            while True:
                n = await self._db.execute(
                    f"DELETE FROM {table} WHERE key IN (SELECT key FROM {table} WHERE expires_at <= ? LIMIT 5000)",
                    (now,),
                )
                total += n
                if n < 5000:
                    break
        self.stats.expired += total
        return total

    # --- internals ------------------------------------------------------------------------------

    def _remember(self, key: str, body: bytes, model: str, expires_at: float) -> None:
        if self._memory_entries <= 0 or len(body) > self._memory_max_bytes:
            return
        if key in self._memory:
            self._forget(key)
        self._memory[key] = (body, model, expires_at)
        self._memory_bytes += len(body)
        evicted = 0
        while len(self._memory) > self._memory_entries or self._memory_bytes > self._memory_max_bytes:
            _, (old, _, _) = self._memory.popitem(last=False)
            self._memory_bytes -= len(old)
            evicted += 1
        if evicted:
            self.stats.memory_evictions += evicted
            if self._metrics is not None:
                self._metrics.cache_evictions("memory", evicted)

    def _forget(self, key: str) -> None:
        entry = self._memory.pop(key, None)
        if entry is not None:
            self._memory_bytes -= len(entry[0])

    def _drop_local(self, model: str | None, keep_pending: bool = False) -> None:
        self._epoch += 1
        if model is None:
            self._memory.clear()
            self._memory_bytes = 0
            if not keep_pending:
                self._pending.clear()
                self._pending_bytes = 0
                self._pending_embeddings.clear()
            return
        for key in [k for k, entry in self._memory.items() if entry[1] == model]:
            self._forget(key)
        if not keep_pending:
            for key in [k for k, row in self._pending.items() if row[1] == model]:
                self._pending_bytes -= self._pending.pop(key)[3]
            for key in [k for k, row in self._pending_embeddings.items() if row[1] == model]:
                del self._pending_embeddings[key]

    def _has_pending(self) -> bool:
        return bool(self._pending or self._pending_embeddings or self._touched or self._touched_embeddings)

    async def _flush_batch(self) -> None:
        puts, self._pending = self._pending, {}
        self._pending_bytes = 0
        embeddings, self._pending_embeddings = self._pending_embeddings, {}
        touched, self._touched = self._touched, {}
        touched_embeddings, self._touched_embeddings = self._touched_embeddings, {}
        try:
            async with self._db.transaction() as db:
                if puts:
                    await db.executemany(_PUT, puts.values())
                if embeddings:
                    await db.executemany(_PUT_EMBEDDING, embeddings.values())
                if touched:
                    await db.executemany("UPDATE response_cache SET last_used_at = ? WHERE key = ?",
                                         [(t, k) for k, t in touched.items()])  # fmt: skip
                if touched_embeddings:
                    await db.executemany("UPDATE embedding_cache SET last_used_at = ? WHERE key = ?",
                                         [(t, k) for k, t in touched_embeddings.items()])  # fmt: skip
                evicted = 0
                if puts:
                    evicted += await self._evict(db, "response_cache")
                if embeddings:
                    evicted += await self._evict(db, "embedding_cache")
        except BaseException:
            # Newer writes that arrived meanwhile win; INSERT OR REPLACE makes a retry harmless.
            for key, row in puts.items():
                if key not in self._pending:
                    self._pending[key] = row
                    self._pending_bytes += row[3]
            for key, row in embeddings.items():
                self._pending_embeddings.setdefault(key, row)
            for key, at in touched.items():
                self._touched.setdefault(key, at)
            for key, at in touched_embeddings.items():
                self._touched_embeddings.setdefault(key, at)
            raise
        if evicted:
            self.stats.db_evictions += evicted
            if self._metrics is not None:
                self._metrics.cache_evictions("sqlite", evicted)

    async def _evict(self, db: Database, table: str) -> int:
        # The count is global, so each process keeps the shared table within max_entries.
        row = await db.fetchone(f"SELECT COUNT(*) FROM {table}")
        excess = (row[0] if row else 0) - self._max_rows
        if excess <= 0:
            return 0
        return await db.execute(
            f"DELETE FROM {table} WHERE key IN (SELECT key FROM {table} ORDER BY last_used_at LIMIT ?)",
            (excess,),
        )
