"""The schema on PostgreSQL, derived from :mod:`.migrations`: one list of migrations, two dialects.

The same discipline: an ordered list, never an entry edited once shipped, the
version kept in the database (``llm_proxy_schema``), applied in one transaction
by whichever replica starts first while it holds an advisory lock (the others
wait on the lock, then find nothing left to do).

Each SQLite migration is translated by :func:`to_postgres` (column types only:
the statements are the common dialect already). PostgreSQL arrived after SQLite's
third migration, so its version 1 is those three in one; SQLite's migration
``n`` (from 4 on) is PostgreSQL's ``n - 2``. A new migration is written once, in
:mod:`.migrations`, in SQL both engines read.
"""

from __future__ import annotations

import re

from .migrations import MIGRATIONS as SQLITE_MIGRATIONS

MERGED = 3  # SQLite migrations folded into PostgreSQL's version 1

# Order matters: the auto-numbered key first, then the plain types. A plain INTEGER PRIMARY KEY
# (cache_generation's single row) stays INTEGER; every other INTEGER may outgrow 32 bits.
_TYPES = (
    (re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b(?! PRIMARY KEY)"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)


def to_postgres(script: str) -> str:
    """A SQLite migration in PostgreSQL's column types (comments are dropped: they may name types)."""
    lines = [line.split("--", 1)[0].rstrip() for line in script.splitlines()]
    text = "\n".join(line for line in lines if line.strip())
    for pattern, replacement in _TYPES:
        text = pattern.sub(replacement, text)
    return text + "\n"


def derive(sqlite: tuple[tuple[int, str], ...]) -> tuple[tuple[int, str], ...]:
    first = "\n".join(to_postgres(script) for version, script in sqlite if version <= MERGED)
    rest = tuple((version - MERGED + 1, to_postgres(script)) for version, script in sqlite if version > MERGED)
    return ((1, first), *rest)


MIGRATIONS: tuple[tuple[int, str], ...] = derive(SQLITE_MIGRATIONS)
