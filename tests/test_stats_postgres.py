"""The dashboard's traffic buckets on PostgreSQL: the same counts as on SQLite, edges included.

PostgreSQL rounds where SQLite truncates when a fraction is cast to an integer, so a request in the
last half second of a bucket once landed in the next one, or fell off the end of the chart.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest

from proxy.app import create_app
from proxy.config import parse_config
from tests.support import ServerThread
from tests.test_replicas import _PG_BIN, PASSWORD, postgres  # noqa: F401 (the fixture)

pytestmark = pytest.mark.skipif(not _PG_BIN, reason="PostgreSQL is not installed (apt-get install postgresql)")


def insert(port: int, database: str, rows: list[tuple[str, float]]) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", password=PASSWORD, database=database)
        try:
            await conn.executemany(
                "INSERT INTO requests (id, instance_id, endpoint, started_at, finished_at, duration_seconds, status) "
                "VALUES ($1, 'elsewhere', '/v1/chat/completions', $2::float8, $2::float8 + 0.01, 0.01, 'ok')",
                rows,
            )
        finally:
            await conn.close()

    asyncio.run(run())


def test_requests_at_the_end_of_a_bucket_are_counted_in_it(postgres, tmp_path):  # noqa: F811
    database = postgres.database()
    config = {
        "storage": {
            "url": f"postgresql://postgres:${{PG_PASSWORD}}@127.0.0.1:{postgres.port}/{database}",
            "key_path": str(tmp_path / "proxy.key"),
        },  # fmt: skip
        "backends": [{"name": "n1", "kind": "ollama", "url": "http://127.0.0.1:9"}],
    }
    server = ServerThread(create_app(parse_config(config, env={"PG_PASSWORD": PASSWORD})))
    server.start()
    try:
        # The proxy has applied the schema by now; put rows at known places around a bucket edge.
        edge = (time.time() // 60) * 60  # the start of the bucket still filling
        insert(postgres.port, database, [("late", edge - 0.2), ("early", edge - 59.7), ("middle", edge - 30.4)])
        stats = httpx.get(f"{server.url}/admin/stats?window=600&step=60", timeout=10).json()
        requests = stats["series"][0]["requests"]
        starts = stats["t"]
        assert starts[-1] == edge, "the last bucket starts at the edge"
        assert requests[-2] == 3, requests  # all three in the bucket before the edge
        assert sum(requests) == 3
    finally:
        server.stop()
