"""The schema, as an ordered list of migrations, and the code that applies them.

``PRAGMA user_version`` holds the number of the last migration applied. Opening a
database applies every newer migration in one ``BEGIN IMMEDIATE`` transaction and
re-reads the version inside it, so when several workers start at once the first
one migrates and the others find nothing left to do. A database written by an
older release therefore opens in a newer one; adding a migration is one more
entry at the end of ``MIGRATIONS`` (never edit an entry that has shipped).

Timestamps are REAL epoch seconds (UTC).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence

import aiosqlite

log = logging.getLogger("llm_proxy.storage")

Migration = tuple[int, str]

_V1 = """
-- One row per running proxy process. in_progress rows of an instance whose heartbeat
-- went stale (or whose pid is gone on this host) are marked interrupted by the others.
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);

CREATE TABLE requests (
    id                TEXT PRIMARY KEY,
    instance_id       TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    started_at        REAL NOT NULL,
    finished_at       REAL,
    duration_seconds  REAL,
    status            TEXT NOT NULL,
    requested_model   TEXT,
    resolved_model    TEXT,
    backend           TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    cache_hit         INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    ttft_seconds      REAL,
    http_status       INTEGER,
    error             TEXT,
    key_id            TEXT,
    stream            INTEGER NOT NULL DEFAULT 0,
    request_body      BLOB,
    response_body     BLOB
);
-- Listing is newest first with a (started_at, id) cursor; retention deletes by started_at.
CREATE INDEX requests_started ON requests (started_at, id);
CREATE INDEX requests_requested_model ON requests (requested_model, started_at);
CREATE INDEX requests_resolved_model ON requests (resolved_model, started_at);
CREATE INDEX requests_backend ON requests (backend, started_at);
CREATE INDEX requests_in_progress ON requests (instance_id) WHERE status = 'in_progress';

CREATE TABLE response_cache (
    key          TEXT PRIMARY KEY,
    model        TEXT NOT NULL,
    body         BLOB NOT NULL,
    size         INTEGER NOT NULL,
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    last_used_at REAL NOT NULL
);
CREATE INDEX response_cache_lru ON response_cache (last_used_at);
CREATE INDEX response_cache_model ON response_cache (model);
CREATE INDEX response_cache_expiry ON response_cache (expires_at);

-- One vector per (model, input, dimensions), little-endian float64, so floats come back exactly.
CREATE TABLE embedding_cache (
    key          TEXT PRIMARY KEY,
    model        TEXT NOT NULL,
    vector       BLOB NOT NULL,
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    last_used_at REAL NOT NULL
);
CREATE INDEX embedding_cache_lru ON embedding_cache (last_used_at);
CREATE INDEX embedding_cache_model ON embedding_cache (model);
CREATE INDEX embedding_cache_expiry ON embedding_cache (expires_at);

-- Bumped by every purge; each process polls it and empties its in-memory front on a change.
CREATE TABLE cache_generation (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL
);
INSERT INTO cache_generation (id, generation) VALUES (1, 0);
"""

_V2 = """
-- Nodes registered at run time (POST /admin/nodes); nodes of the config file are not stored.
-- spec holds the BackendConfig fields as JSON, api_key included: keep the file private.
CREATE TABLE nodes (
    name       TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    url        TEXT NOT NULL,
    spec       TEXT NOT NULL,
    created_at REAL NOT NULL
);

-- Admin operations (pull, delete, activate, sync) with their last known progress. Rows still
-- queued or running whose process is gone are marked interrupted by the next one to start.
CREATE TABLE model_operations (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    node        TEXT,
    model       TEXT NOT NULL,
    params      TEXT NOT NULL DEFAULT '{}',
    state       TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT '',
    completed   INTEGER NOT NULL DEFAULT 0,
    total       INTEGER NOT NULL DEFAULT 0,
    fraction    REAL NOT NULL DEFAULT 0,
    speed       REAL,
    eta_seconds REAL,
    error       TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    result      TEXT,
    instance    TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL
);
CREATE INDEX model_operations_created ON model_operations (created_at);
CREATE INDEX model_operations_active ON model_operations (state) WHERE state IN ('queued', 'running');

-- An alias repointed by POST /admin/models/activate. config_target is the alias's target in the
-- config file at that moment: when the file says something else later, the file wins.
CREATE TABLE alias_overrides (
    alias         TEXT PRIMARY KEY,
    target        TEXT NOT NULL,
    config_target TEXT NOT NULL,
    previous      TEXT,
    operation_id  TEXT,
    updated_at    REAL NOT NULL
);
"""

_V3 = """
-- Shared fleet state (proxy/store): what one process changes, the others apply.
-- Every change to nodes, drains, aliases, operations or health adds a row here; each process
-- reads the rows after the last seq it saw, about twice a second. Old rows are pruned.
CREATE TABLE fleet_changes (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    topic  TEXT NOT NULL,
    key    TEXT NOT NULL,
    data   TEXT,
    origin TEXT NOT NULL,
    at     REAL NOT NULL
);
CREATE INDEX fleet_changes_at ON fleet_changes (at);

-- A drained node stays drained across restarts, in every process.
CREATE TABLE node_drains (
    name       TEXT PRIMARY KEY,
    updated_at REAL NOT NULL
);

-- Named leases: the pull slots (per node, and pulls.max_parallel in all), scheduled runs.
-- A holder renews its leases while it lives; an expired one is free for the taking.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at REAL NOT NULL
);

-- The runner of a queued or running operation renews this; once it lapses, the runner is gone
-- and the operation becomes interrupted.
ALTER TABLE model_operations ADD COLUMN lease_until REAL;
"""

MIGRATIONS: tuple[Migration, ...] = (
    (1, _V1),
    (2, _V2),
    (3, _V3),
)  # fmt: skip


def split_statements(script: str) -> list[str]:
    """The statements of a script, so they can run inside a transaction we control.

    ``executescript`` would commit any open transaction first, which would break
    the one-transaction guarantee. ``sqlite3.complete_statement`` knows about
    string literals and trigger bodies, so splitting on it is exact.
    """
    statements: list[str] = []
    current = ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            text = current.strip()
            if _has_code(text):
                statements.append(text)
            current = ""
    if _has_code(current.rstrip(";")):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {current.strip()[:80]!r}")
    return statements


def _has_code(text: str) -> bool:
    for line in text.splitlines():
        line = line.split("--", 1)[0].strip()
        if line and line != ";":
            return True
    return False


def check(migrations: Sequence[Migration]) -> None:
    versions = [v for v, _ in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1, 2, 3, ... in order, got {versions}")


async def apply(conn: aiosqlite.Connection, migrations: Sequence[Migration]) -> int:
    """Bring the schema up to date; returns the version now in place.

    The connection is in autocommit mode (``isolation_level=None``) and not yet
    shared, so the explicit BEGIN IMMEDIATE below is the only transaction: it takes
    the write lock before re-reading the version, and a second process waits on it
    (busy_timeout) and then finds the new version.
    """
    check(migrations)
    latest = migrations[-1][0] if migrations else 0
    current = await _user_version(conn)
    if current < latest:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            current = await _user_version(conn)
            for version, script in migrations:
                if version <= current:
                    continue
                for statement in split_statements(script):
                    await conn.execute(statement)
                log.info("database schema migrated to version %d", version)
            if latest > current:
                # PRAGMA takes no parameters; latest is an int from our own list.
                await conn.execute(f"PRAGMA user_version = {int(latest)}")
            await conn.execute("COMMIT")
        except BaseException:
            await asyncio.shield(conn.execute("ROLLBACK"))
            raise
    if current > latest:
        # Migrations only add tables and columns, so an older release keeps working on a
        # newer file (after a rollback, say); say so rather than refuse to start.
        log.warning("database schema version %d is newer than this release knows (%d)", current, latest)
    return max(current, latest)


async def _user_version(conn: aiosqlite.Connection) -> int:
    rows = await conn.execute_fetchall("PRAGMA user_version")
    return int(rows[0][0])
