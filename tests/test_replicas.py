"""Replicas on PostgreSQL and Redis behave as one proxy (issue 11, step 2).

The fixtures start a real PostgreSQL (``initdb``/``pg_ctl``, as the ``postgres``
user when the tests run as root, which PostgreSQL refuses) and a real
``redis-server``, each on a temporary directory and a free loopback port. Two
proxies (each its own app, store, pools and feed, on its own port) share them.
Without the servers (Debian: ``apt-get install postgresql redis-server``) the
tests are skipped, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import time

import httpx
import orjson
import pytest

from proxy.app import create_app
from proxy.config import parse_config
from proxy.sim import ModelSpec, ServerThread, SimOllama
from proxy.sim.behavior import PullBehavior
from tests.support import wait_for
from tests.test_cli import free_port

PASSWORD = "pg-Secret-4711"
MSG = [{"role": "user", "content": "hi"}]
N = 12

_PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
pytestmark = [
    pytest.mark.skipif(
        not _PG_BIN, reason="PostgreSQL is not installed (apt-get install postgresql): replica tests skipped"
    ),  # fmt: skip
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="redis-server is not installed (apt-get install redis-server): replica tests skipped",
    ),
]


def _as_postgres(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in args)]


class Postgres:
    def __init__(self) -> None:
        self.bin = os.path.dirname(_PG_BIN[-1])
        self.dir = tempfile.mkdtemp(prefix="llm-proxy-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        pwfile = os.path.join(self.dir, "pw")
        with open(pwfile, "w") as f:
            f.write(PASSWORD)
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            for path in (self.dir, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        subprocess.run(_as_postgres([f"{self.bin}/initdb", "-D", self.data, "-U", "postgres", "--auth=scram-sha-256",
                                     f"--pwfile={pwfile}"]), check=True, capture_output=True, timeout=120)  # fmt: skip
        self.start()

    def start(self) -> None:
        subprocess.run(_as_postgres([f"{self.bin}/pg_ctl", "-D", self.data, "-l", f"{self.dir}/log", "-w", "-o",
                                     f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                                     "start"]), check=True, capture_output=True, timeout=60)  # fmt: skip

    def stop(self) -> None:
        subprocess.run(_as_postgres([f"{self.bin}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=60)  # fmt: skip

    def database(self) -> str:
        """A new, empty database; its name."""
        import asyncpg

        name = f"t{time.monotonic_ns()}"

        async def create():
            conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres", password=PASSWORD,
                                         database="postgres")  # fmt: skip
            try:
                await conn.execute(f"CREATE DATABASE {name}")
            finally:
                await conn.close()

        asyncio.run(create())
        return name

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llm-proxy-redis-")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        import redis

        def up() -> bool:
            try:
                return redis.Redis(port=self.port, socket_connect_timeout=0.5).ping()
            except redis.RedisError:
                return False

        assert wait_for(up, 10), "redis-server did not start"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    server = Postgres()
    yield server
    server.close()


@pytest.fixture(scope="module")
def redis_server():
    server = Redis()
    yield server
    server.close()


@pytest.fixture
def node():
    sim = SimOllama(models=[ModelSpec("llama3.1:8b"), ModelSpec("qwen3:4b")])
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def spare():
    sim = SimOllama(models=[ModelSpec("phi3:mini")])
    sim.start()
    yield sim
    sim.stop()


def replica_config(postgres: Postgres, db: str, node: SimOllama, tmp_path, redis: Redis | None) -> dict:
    config = {
        "storage": {
            "url": f"postgresql://postgres:${{LLM_TEST_PG_PASSWORD}}@127.0.0.1:{postgres.port}/{db}",
            "key_path": str(tmp_path / "proxy.key"),
        },  # fmt: skip
        "timeouts": {"connect": 1, "first_byte": 5, "idle": 5},
        "health": {"interval": 30},
        "pulls": {"backoff": 0.02},
        "distribution": {"manifest_path": str(tmp_path / "manifest.json")},
        "backends": [{"name": "n1", "kind": "ollama", "url": node.url}],
        "models": [{"name": "chat", "target": "llama3.1:8b", "backends": ["n1"]}],
    }
    if redis is not None:
        config["redis"] = {"url": f"redis://127.0.0.1:{redis.port}/0"}
    return config


@contextlib.contextmanager
def replicas(config: dict, count: int = 2):
    env = {"LLM_TEST_PG_PASSWORD": PASSWORD}
    servers = []
    try:
        for _ in range(count):
            server = ServerThread(create_app(parse_config(config, env=env)))
            server.start()
            servers.append(server)
        yield [httpx.Client(base_url=s.url, timeout=20) for s in servers]
    finally:
        for server in servers:
            server.stop()


def chat(http: httpx.Client, model: str = "chat", **extra) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": MSG, **extra})


def test_two_replicas_on_postgres_and_redis_are_one_proxy(postgres, redis_server, node, spare, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = replica_config(postgres, postgres.database(), node, tmp_path, redis_server)
    with replicas(config) as (a, b):
        for http in (a, b):
            status = http.get("/admin/status").json()
            assert status["storage"]["kind"] == "postgresql" and status["redis"]["state"] == "up"
            assert PASSWORD not in str(status) and "***" in status["storage"]["location"]

        # A node registered on one is listed and routed by the other.
        created = a.post("/admin/nodes", json={"name": "gpu-9", "kind": "ollama", "url": spare.url})
        assert created.status_code == 201, created.text
        assert "gpu-9" in {n["name"] for n in b.get("/admin/nodes").json()["data"]}
        assert wait_for(lambda: chat(b, "phi3:mini").status_code == 200, 3)
        assert sum(chat(b, "phi3:mini").headers.get("x-proxy-backend") == "gpu-9" for _ in range(N)) == N

        # An activation on one applies on the other.
        op = a.post("/admin/models/activate", json={"alias": "chat", "model": "qwen3:4b"}).json()
        assert wait_for(lambda: b.get(f"/admin/operations/{op['id']}").json()["state"] == "succeeded", 10)
        assert wait_for(lambda: chat(b).headers.get("x-proxy-model") == "qwen3:4b", 3)
        assert sum(chat(b).headers.get("x-proxy-model") == "qwen3:4b" for _ in range(N)) == N

        # An operation started on one is visible and cancellable on the other.
        node.behavior.pull = PullBehavior(seconds=30)
        pull = a.post("/admin/models/pull", json={"model": "gemma3:1b", "nodes": ["n1"]}).json()["data"][0]
        assert wait_for(lambda: b.get(f"/admin/operations/{pull['id']}").json()["state"] == "running", 5)
        assert b.delete(f"/admin/operations/{pull['id']}").status_code == 200
        assert wait_for(lambda: a.get(f"/admin/operations/{pull['id']}").json()["state"] == "cancelled", 5)

        # A cached answer stored by one is a hit on the other.
        first = chat(a, temperature=0)
        assert first.status_code == 200
        ids = {first.headers["x-request-id"]}

        def hit_on_b() -> bool:
            again = chat(b, temperature=0)
            ids.add(again.headers["x-request-id"])
            row = b.get(f"/admin/history/requests/{again.headers['x-request-id']}").json()
            return row["cache_hit"] is True

        assert wait_for(hit_on_b, 5)

        # Either shows the requests of both.
        for http in (a, b):
            listed = {r["id"] for r in http.get("/admin/history/requests?limit=1000").json()["data"]}
            assert ids <= listed
        traffic = b.get("/admin/stats?window=3600&step=60")
        assert traffic.status_code == 200, traffic.text  # the dashboard's SQL runs on PostgreSQL too
        finished = [r for r in b.get("/admin/history/requests?limit=1000").json()["data"]
                    if r["endpoint"].startswith("/v1/") and r["status"] != "in_progress"]  # fmt: skip
        assert sum(traffic.json()["series"][0]["requests"]) == len(finished)
    assert not [r for r in caplog.records if PASSWORD in r.getMessage()]


def test_without_redis_replicas_converge_by_polling(postgres, node, spare, tmp_path):
    config = replica_config(postgres, postgres.database(), node, tmp_path, None)
    with replicas(config) as (a, b):
        assert b.get("/admin/status").json()["redis"] is None
        assert a.post("/admin/nodes", json={"name": "gpu-9", "kind": "ollama", "url": spare.url}).status_code == 201
        started = time.monotonic()
        assert wait_for(lambda: chat(b, "phi3:mini").status_code == 200, 2)  # routing, by polling alone
        assert time.monotonic() - started < 2
        assert a.post("/admin/nodes/gpu-9/drain").status_code == 200
        assert wait_for(lambda: chat(b, "phi3:mini").status_code != 200, 2)


def redis_status(http: httpx.Client) -> dict:
    return http.get("/admin/status").json()["redis"]


def backend_state(http: httpx.Client, name: str) -> dict:
    return next(b for b in http.get("/admin/status").json()["backends"] if b["name"] == name)


def in_redis(server: Redis) -> int:
    """Answers the hot cache holds (a put is sent in the background: a lookup at once may beat it)."""
    import redis

    client = redis.Redis(port=server.port, socket_connect_timeout=1)
    try:
        return len(client.keys("llm-proxy:cache:*"))
    finally:
        client.close()


def test_redis_shares_health_the_hot_cache_and_progress_even_with_postgres_away(postgres, redis_server, node, spare,
                                                                               tmp_path):  # fmt: skip
    config = replica_config(postgres, postgres.database(), node, tmp_path, redis_server)
    config["health"].update({"cooldown": 30, "max_cooldown": 60})
    config["routing"] = {"retries": 2}
    config["backends"].append({"name": "flaky", "kind": "ollama", "url": spare.url, "weight": 1000})
    config["models"].append({"name": "pair", "target": "phi3:mini", "backends": ["flaky", "n1"]})
    node.models.append(ModelSpec("phi3:mini"))
    with replicas(config) as (a, b):
        assert wait_for(lambda: all(redis_status(h)["state"] == "up" for h in (a, b)), 5)
        assert chat(a, "pair").headers["x-proxy-backend"] == "flaky"

        # Operation progress: a follower on b sees the pull run on a move, from the events Redis brings.
        node.behavior.pull = PullBehavior(seconds=3)
        events_before = redis_status(b)["received"]["events"]
        pull = a.post("/admin/models/pull", json={"model": "gemma3:1b", "nodes": ["n1"]}).json()["data"][0]
        frames = []
        with b.stream("GET", f"/admin/operations/{pull['id']}/events") as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    frames.append(orjson.loads(line[6:]))
        assert frames[-1]["state"] == "succeeded"
        fractions = [f["fraction"] for f in frames]
        assert fractions == sorted(fractions) and len(set(fractions)) >= 3  # progress, never backwards
        assert redis_status(b)["received"]["events"] > events_before

        postgres.stop()
        try:
            # The hot cache: an answer stored by a is a hit on b, with no database to read it from.
            stored = in_redis(redis_server)
            first = chat(a, temperature=0, seed=4711)
            assert first.status_code == 200 and first.headers.get("x-cache") != "HIT"
            assert wait_for(lambda: in_redis(redis_server) > stored, 3)
            assert chat(b, temperature=0, seed=4711).headers.get("x-cache") == "HIT"
            assert redis_status(b)["cache_hits"] == 1

            # Health: flaky dies; a pays one failed attempt, and b has it in cooldown without trying it.
            spare.stop()
            assert chat(a, "pair").headers["x-proxy-backend"] == "n1"
            assert wait_for(lambda: backend_state(b, "flaky")["cooldown_seconds"] > 0, 3)
            assert backend_state(b, "flaky")["state"] == "offline"
            assert all(chat(b, "pair").headers["x-proxy-backend"] == "n1" for _ in range(N))
            assert backend_state(b, "flaky")["consecutive_failures"] == 1  # b never tried it itself

            # What needs the database answers a clear 503, in OpenAI's shape, with Retry-After.
            refused = a.post("/admin/nodes", json={"name": "gpu-7", "kind": "ollama", "url": node.url})
            assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
            assert refused.json()["error"]["code"] == "store_unavailable"
            assert refused.json()["error"]["type"] == "api_error" and PASSWORD not in refused.text
            assert a.post("/admin/nodes/n1/drain").status_code == 503
            listed = a.get("/admin/nodes")  # reads answer from what the replica holds
            assert listed.status_code == 200 and "gpu-7" not in {n["name"] for n in listed.json()["data"]}
        finally:
            postgres.start()
        assert wait_for(lambda: a.post("/admin/nodes/n1/drain").status_code == 200, 20)
        assert a.post("/admin/nodes/n1/resume").status_code == 200


def test_losing_redis_keeps_traffic_and_says_so(postgres, node, spare, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    own = Redis()  # this test kills it
    try:
        config = replica_config(postgres, postgres.database(), node, tmp_path, own)
        with replicas(config) as (a, b):
            assert wait_for(lambda: all(redis_status(h)["state"] == "up" for h in (a, b)), 5)
            own.stop()
            assert wait_for(lambda: all(redis_status(h)["state"] == "down" for h in (a, b)), 10)
            assert all(redis_status(h)["fallback"] for h in (a, b))
            assert [r for r in caplog.records if r.name == "llm_proxy.redis" and "not answering" in r.getMessage()]
            assert all(chat(h).status_code == 200 for h in (a, b) for _ in range(4))
            # The cache goes on, local and in the database: b finds a's answer once it is written.
            first = chat(a, temperature=0, seed=99)
            assert first.status_code == 200 and chat(a, temperature=0, seed=99).headers.get("x-cache") == "HIT"
            assert wait_for(lambda: chat(b, temperature=0, seed=99).headers.get("x-cache") == "HIT", 5)
            # Changes still travel, through the database.
            assert a.post("/admin/nodes", json={"name": "gpu-9", "kind": "ollama", "url": spare.url}).status_code == 201
            assert wait_for(lambda: chat(b, "phi3:mini").status_code == 200, 3)
            own.start()
            assert wait_for(lambda: all(redis_status(h)["state"] == "up" for h in (a, b)), 10)
            assert all(redis_status(h)["fallback"] is None for h in (a, b))
            # And shares again: a new answer of a is a hit on b at once, from Redis.
            hits, stored = redis_status(b)["cache_hits"], in_redis(own)
            assert chat(a, temperature=0, seed=100).status_code == 200
            assert wait_for(lambda: in_redis(own) > stored, 3)
            assert chat(b, temperature=0, seed=100).headers.get("x-cache") == "HIT"
            assert redis_status(b)["cache_hits"] == hits + 1
    finally:
        own.close()


def test_losing_postgres_keeps_serving_and_writes_the_history_when_it_returns(postgres, node, tmp_path):
    config = replica_config(postgres, postgres.database(), node, tmp_path, None)
    with replicas(config, count=1) as (a,):
        assert chat(a).status_code == 200
        postgres.stop()
        try:
            served = [chat(a, temperature=0.1 * i) for i in range(N)]  # each a cache miss: the lookup fails
            assert all(r.status_code == 200 for r in served)
            ids = {r.headers["x-request-id"] for r in served}
            gauges = {line.split()[0]: float(line.split()[1]) for line in a.get("/metrics").text.splitlines()
                      if line.startswith("llm_proxy_history_rows_")}  # fmt: skip
            assert gauges["llm_proxy_history_rows_buffered"] >= N  # kept in memory while the server is away
            assert gauges["llm_proxy_history_rows_dropped"] == 0
            listing = a.get("/admin/history/requests")  # needs the database: a clear 503, not a 500
            assert listing.status_code == 503 and listing.json()["error"]["code"] == "store_unavailable"
            assert int(listing.headers["retry-after"]) >= 1
        finally:
            postgres.start()

        def written() -> bool:
            answer = a.get("/admin/history/requests?limit=1000")
            return answer.status_code == 200 and ids <= {r["id"] for r in answer.json()["data"]}

        assert wait_for(written, 20)  # buffered while the server was away, written once it came back
        history = a.get("/admin/history/requests?limit=1000").json()["data"]
        assert all(r["status"] == "ok" for r in history if r["id"] in ids)


def test_the_postgresql_schema_is_the_sqlite_one_translated(postgres, tmp_path):
    """pg_schema derives from migrations.py: the same tables, the same columns in the same order."""
    from proxy.storage import Database
    from proxy.storage.postgres import PostgresDatabase

    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{postgres.port}/{postgres.database()}"

    async def columns() -> tuple[dict, dict]:
        pg = await PostgresDatabase.open(url)
        lite = await Database.open(str(tmp_path / "p.db"))
        try:
            rows = await pg.fetchall("SELECT table_name, column_name FROM information_schema.columns WHERE "
                                     "table_schema = 'public' AND table_name <> 'llm_proxy_schema' "
                                     "ORDER BY table_name, ordinal_position")  # fmt: skip
            on_pg: dict = {}
            for table, column in rows:
                on_pg.setdefault(table, []).append(column)
            tables = await lite.fetchall("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                         "'sqlite_%' ORDER BY name")  # fmt: skip
            on_sqlite = {t: [c[1] for c in await lite.fetchall(f"PRAGMA table_info({t})")] for (t,) in tables}
            return on_pg, on_sqlite
        finally:
            await pg.close()
            await lite.close()

    on_pg, on_sqlite = asyncio.run(columns())
    assert on_pg == on_sqlite and "fleet_changes" in on_pg
    assert on_pg["model_operations"][-1] == "lease_until"
