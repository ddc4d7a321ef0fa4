"""The schema on PostgreSQL: the same tables as :mod:`.migrations`, in PostgreSQL's types.

The same discipline: an ordered list, never an entry edited once shipped, the
version kept in the database (``llm_proxy_schema``), applied in one transaction
by whichever replica starts first while it holds an advisory lock (the others
wait on the lock, then find nothing left to do). Version 1 here is what SQLite
reached in three steps.
"""

from __future__ import annotations

_V1 = """
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          BIGINT NOT NULL,
    started_at   DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE requests (
    id                TEXT PRIMARY KEY,
    instance_id       TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    started_at        DOUBLE PRECISION NOT NULL,
    finished_at       DOUBLE PRECISION,
    duration_seconds  DOUBLE PRECISION,
    status            TEXT NOT NULL,
    requested_model   TEXT,
    resolved_model    TEXT,
    backend           TEXT,
    attempts          BIGINT NOT NULL DEFAULT 0,
    cache_hit         BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    ttft_seconds      DOUBLE PRECISION,
    http_status       BIGINT,
    error             TEXT,
    key_id            TEXT,
    stream            BIGINT NOT NULL DEFAULT 0,
    request_body      BYTEA,
    response_body     BYTEA
);
CREATE INDEX requests_started ON requests (started_at, id);
CREATE INDEX requests_requested_model ON requests (requested_model, started_at);
CREATE INDEX requests_resolved_model ON requests (resolved_model, started_at);
CREATE INDEX requests_backend ON requests (backend, started_at);
CREATE INDEX requests_in_progress ON requests (instance_id) WHERE status = 'in_progress';

CREATE TABLE response_cache (
    key          TEXT PRIMARY KEY,
    model        TEXT NOT NULL,
    body         BYTEA NOT NULL,
    size         BIGINT NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    expires_at   DOUBLE PRECISION NOT NULL,
    last_used_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX response_cache_lru ON response_cache (last_used_at);
CREATE INDEX response_cache_model ON response_cache (model);
CREATE INDEX response_cache_expiry ON response_cache (expires_at);

CREATE TABLE embedding_cache (
    key          TEXT PRIMARY KEY,
    model        TEXT NOT NULL,
    vector       BYTEA NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    expires_at   DOUBLE PRECISION NOT NULL,
    last_used_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX embedding_cache_lru ON embedding_cache (last_used_at);
CREATE INDEX embedding_cache_model ON embedding_cache (model);
CREATE INDEX embedding_cache_expiry ON embedding_cache (expires_at);

CREATE TABLE cache_generation (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    generation BIGINT NOT NULL
);
INSERT INTO cache_generation (id, generation) VALUES (1, 0);

CREATE TABLE nodes (
    name       TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    url        TEXT NOT NULL,
    spec       TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE model_operations (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    node        TEXT,
    model       TEXT NOT NULL,
    params      TEXT NOT NULL DEFAULT '{}',
    state       TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT '',
    completed   BIGINT NOT NULL DEFAULT 0,
    total       BIGINT NOT NULL DEFAULT 0,
    fraction    DOUBLE PRECISION NOT NULL DEFAULT 0,
    speed       DOUBLE PRECISION,
    eta_seconds DOUBLE PRECISION,
    error       TEXT,
    attempts    BIGINT NOT NULL DEFAULT 0,
    result      TEXT,
    instance    TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         BIGINT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    started_at  DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    lease_until DOUBLE PRECISION
);
CREATE INDEX model_operations_created ON model_operations (created_at);
CREATE INDEX model_operations_active ON model_operations (state) WHERE state IN ('queued', 'running');

CREATE TABLE alias_overrides (
    alias         TEXT PRIMARY KEY,
    target        TEXT NOT NULL,
    config_target TEXT NOT NULL,
    previous      TEXT,
    operation_id  TEXT,
    updated_at    DOUBLE PRECISION NOT NULL
);

CREATE TABLE fleet_changes (
    seq    BIGSERIAL PRIMARY KEY,
    topic  TEXT NOT NULL,
    key    TEXT NOT NULL,
    data   TEXT,
    origin TEXT NOT NULL,
    at     DOUBLE PRECISION NOT NULL
);
CREATE INDEX fleet_changes_at ON fleet_changes (at);

CREATE TABLE node_drains (
    name       TEXT PRIMARY KEY,
    updated_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
"""

MIGRATIONS: tuple[tuple[int, str], ...] = ((1, _V1),)
