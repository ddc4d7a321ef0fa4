"""proxy/cache.py: keys, policy, and the store (memory front, SQLite, TTL, LRU, purge across processes)."""

from __future__ import annotations

import asyncio
import json

import pytest

from proxy.cache import ResponseCache, cache_key, embedding_keys, pack_vector, policy, unpack_vector
from proxy.config import CacheConfig
from proxy.storage import Database

BODY = {
    "model": "chat",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "temperature": 0,
    "max_tokens": 20,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
}


def run(coro):
    return asyncio.run(coro)


def key(body: dict, model: str = "llama3.1:8b", operation: str = "chat") -> str:
    return cache_key(operation, model, body)


# --- keys ---------------------------------------------------------------------------------------


def test_key_ignores_key_order_and_whitespace():
    compact = json.dumps(BODY, separators=(",", ":"))
    spaced = json.dumps(BODY, indent=4)
    reordered = json.dumps(
        {k: BODY[k] for k in reversed(list(BODY))} | {"tools": [{"function": {"parameters": {"properties": {}, "type": "object"}, "name": "f"}, "type": "function"}]}
    )  # fmt: skip
    keys = {key(json.loads(text)) for text in (compact, spaced, reordered)}
    assert len(keys) == 1
    assert len(keys.pop()) == 40


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "Hi!"}]},
        {"temperature": 0.7},
        {"top_p": 0.9},
        {"top_k": 5},
        {"min_p": 0.1},
        {"seed": 1},
        {"max_tokens": 21},
        {"max_completion_tokens": 20},
        {"stop": ["\n"]},
        {"n": 2},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"logit_bias": {"50256": -100}},
        {"logprobs": True},
        {"top_logprobs": 2},
        {"tools": []},
        {"tool_choice": "required"},
        {"parallel_tool_calls": False},
        {"response_format": {"type": "json_object"}},
        {"reasoning_effort": "high"},
        {"think": False},
        {"options": {"num_ctx": 8192}},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_answer_changing_parameter_changes_the_key(change):
    assert key({**BODY, **change}) != key(BODY)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other-alias"},
        {"stream": True},
        {"stream_options": {"include_usage": True}},
        {"user": "u-1"},
        {"metadata": {"team": "a"}},
        {"store": True},
        {"service_tier": "auto"},
        {"task_type": "code_generation"},
        {"keep_alive": "10m"},
        {"prompt_cache_key": "abc"},
        {"seed": None},
        {"temperature": 0.0},
    ],
    ids=lambda change: next(iter(change)),
)
def test_fields_that_do_not_change_the_answer_do_not_change_the_key(change):
    assert key({**BODY, **change}) == key(BODY)


def test_resolved_model_and_operation_are_part_of_the_key():
    assert key(BODY, model="qwen3:4b") != key(BODY)
    assert key(BODY, operation="completion") != key(BODY)


def test_stop_string_means_a_one_item_list():
    assert key({**BODY, "stop": "END"}) == key({**BODY, "stop": ["END"]})


def test_embedding_keys_are_per_input():
    single = embedding_keys("nomic", {"input": "alpha"})
    batch = embedding_keys("nomic", {"input": ["alpha", "beta", "alpha"], "encoding_format": "base64"})
    assert batch[0] == batch[2] == single[0] != batch[1]
    assert embedding_keys("nomic", {"input": ["alpha"], "encoding_format": "float"}) == single
    assert embedding_keys("nomic", {"input": "alpha", "dimensions": 8}) != single
    assert embedding_keys("other", {"input": "alpha"}) != single
    assert embedding_keys("nomic", {"input": "alpha", "user": "u"}) == single
    tokens = embedding_keys("nomic", {"input": [1, 2, 3]})
    assert len(tokens) == 1 and embedding_keys("nomic", {"input": [[1, 2, 3], [4]]})[0] == tokens[0]
    assert embedding_keys("nomic", {"input": "1"}) != embedding_keys("nomic", {"input": [1]})


# --- policy -------------------------------------------------------------------------------------

GREEDY = {"temperature": 0}
SEEDED = {"temperature": 0.8, "seed": 7}
SAMPLED = {"temperature": 0.8}
DEFAULT = {}


@pytest.mark.parametrize(
    "mode,body,header,expected",
    [
        ("deterministic", GREEDY, None, (True, True)),
        ("deterministic", SEEDED, None, (True, True)),
        ("deterministic", SAMPLED, None, (False, False)),
        ("deterministic", DEFAULT, None, (False, False)),
        ("deterministic", {"options": {"temperature": 0}}, None, (True, True)),
        ("deterministic", {"temperature": False}, None, (False, False)),
        ("always", SAMPLED, None, (True, True)),
        ("always", DEFAULT, None, (True, True)),
        ("off", GREEDY, None, (False, False)),
        ("off", GREEDY, "no-cache", (False, False)),
        ("deterministic", GREEDY, "no-cache", (False, True)),
        ("deterministic", GREEDY, "No-Cache", (False, True)),
        ("deterministic", GREEDY, "max-age=0", (False, True)),
        ("deterministic", GREEDY, "no-store", (False, False)),
        ("always", SAMPLED, "private, no-store", (False, False)),
        ("always", SAMPLED, "no-cache", (False, True)),
        ("deterministic", SAMPLED, "no-cache", (False, False)),
        ("deterministic", GREEDY, "max-age=60", (True, True)),
    ],
)
def test_policy(mode, body, header, expected):
    assert policy(mode, body, header) == expected


def test_embeddings_are_deterministic():
    assert policy("deterministic", {"input": "x"}, None, operation="embeddings") == (True, True)
    assert policy("deterministic", {"input": "x"}, "no-store", operation="embeddings") == (False, False)


# --- the store ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def opened(path: str = ":memory:", db: Database | None = None, **config) -> tuple[Database, ResponseCache]:
    db = db or await Database.open(path)
    options = {k: config.pop(k) for k in ("clock", "poll_interval", "linger") if k in config}
    cache = ResponseCache(db, CacheConfig(**config), **options)
    await cache.start()
    return db, cache


async def rows(db: Database, table: str = "response_cache") -> int:
    return (await db.fetchone(f"SELECT COUNT(*) FROM {table}"))[0]


def test_put_then_get_from_memory_then_from_sqlite(tmp_path):
    path = str(tmp_path / "c.db")

    async def main():
        db, cache = await opened(path)
        assert await cache.get("k1") is None
        cache.put("k1", "m", b'{"answer":1}')
        assert await rows(db) == 0  # write-behind: nothing written yet
        assert await cache.get("k1") == b'{"answer":1}'
        await cache.flush()
        assert await rows(db) == 1
        assert (cache.stats.memory_hits, cache.stats.db_hits, cache.stats.misses) == (1, 0, 1)

        db2, other = await opened(path)  # another worker: empty memory front, same file
        assert await other.get("k1") == b'{"answer":1}'
        assert await other.get("k1") == b'{"answer":1}'
        assert (other.stats.db_hits, other.stats.memory_hits) == (1, 1)
        for c, d in ((cache, db), (other, db2)):
            await c.close()
            await d.close()

    run(main())


def test_memory_hit_does_not_touch_sqlite():
    async def main():
        db, cache = await opened()
        cache.put("k", "m", b"x")
        await cache.flush()

        async def fail(*args, **kwargs):
            raise AssertionError("SQLite was queried on a memory hit")

        db.fetchone = fail
        assert await cache.get("k") == b"x"
        await cache.close()
        await db.close()

    run(main())


def test_close_writes_what_is_pending(tmp_path):
    path = str(tmp_path / "c.db")

    async def main():
        db, cache = await opened(path, linger=10)
        for i in range(50):
            cache.put(f"k{i}", "m", b"x" * i)
        await cache.close()
        assert await rows(db) == 50
        await db.close()

    run(main())


def test_ttl_expiry_in_memory_and_in_sqlite():
    clock = Clock()

    async def main():
        db, cache = await opened(ttl_hours=1, clock=clock)
        cache.put("k", "m", b"x")
        await cache.flush()
        _, cold = await opened(db=db, ttl_hours=1, clock=clock)  # reads SQLite: nothing in its memory
        clock.now += 3599
        assert await cache.get("k") == b"x"
        clock.now += 2
        assert await cache.get("k") is None  # the memory entry expired
        assert await cold.get("k") is None  # and so did the row
        assert await rows(db) == 1
        assert await cache.expire() == 1 and await rows(db) == 0
        await cold.close()
        await cache.close()
        await db.close()

    run(main())


def test_memory_front_is_lru_bounded():
    async def main():
        db, cache = await opened(memory_entries=2)
        for k in ("a", "b"):
            cache.put(k, "m", k.encode())
        await cache.flush()
        await cache.get("a")  # a is now more recent than b
        cache.put("c", "m", b"c")  # evicts b from memory
        await cache.flush()
        assert cache.stats.memory_evictions == 1
        hits = cache.stats.memory_hits
        assert await cache.get("a") == b"a" and await cache.get("c") == b"c"
        assert cache.stats.memory_hits == hits + 2
        assert await cache.get("b") == b"b"  # still in SQLite
        assert cache.stats.db_hits == 1
        await cache.close()
        await db.close()

    run(main())


def test_sqlite_is_lru_bounded_and_hits_count_as_use():
    clock = Clock()

    async def main():
        db, cache = await opened(max_entries=3, memory_entries=0, clock=clock)
        for k in ("a", "b", "c"):
            clock.now += 1
            cache.put(k, "m", k.encode())
            await cache.flush()
        clock.now += 1
        assert await cache.get("a") == b"a"  # a becomes the most recently used
        clock.now += 1
        cache.put("d", "m", b"d")
        await cache.flush()
        assert await rows(db) == 3
        assert cache.stats.db_evictions == 1
        assert await cache.get("b") is None
        assert [await cache.get(k) for k in ("a", "c", "d")] == [b"a", b"c", b"d"]
        await cache.close()
        await db.close()

    run(main())


def test_purge_by_model_and_all():
    async def main():
        db, cache = await opened()
        cache.put("a1", "alpha", b"1")
        cache.put("a2", "alpha", b"2")
        cache.put("b1", "beta", b"3")
        cache.put_embeddings("alpha", {"e1": [0.5]})
        await cache.flush()
        cache.put("a3", "alpha", b"4")  # still buffered: counted, deleted, and must not come back
        assert await cache.purge("alpha") == 4
        await cache.flush()
        assert [await cache.get(k) for k in ("a1", "a2", "a3", "b1")] == [None, None, None, b"3"]
        assert await cache.get_embeddings(["e1"]) == {}
        assert await cache.purge() == 1
        assert await cache.get("b1") is None and await rows(db) == 0
        await cache.close()
        await db.close()

    run(main())


def test_purge_empties_the_memory_front_of_another_process(tmp_path):
    path = str(tmp_path / "c.db")

    async def main():
        db_a, a = await opened(path, poll_interval=0.05)
        db_b, b = await opened(path, poll_interval=0.05)
        a.put("k", "m", b"x")
        await a.flush()
        assert await b.get("k") == b"x"  # now in b's memory front

        async def fail(*args, **kwargs):
            raise AssertionError("memory hit expected")

        real = db_b.fetchone
        db_b.fetchone = fail
        assert await b.get("k") == b"x"
        db_b.fetchone = real

        await a.purge()
        for _ in range(40):  # well under a second
            await asyncio.sleep(0.025)
            if not b._memory:
                break
        assert await b.get("k") is None
        for c, d in ((a, db_a), (b, db_b)):
            await c.close()
            await d.close()

    run(main())


def test_embeddings_per_input_exactly():
    async def main():
        db, cache = await opened()
        keys = embedding_keys("nomic", {"input": ["alpha", "beta"]})
        vectors = {keys[0]: [0.1, -0.2, 0.30000000000000004], keys[1]: [1e-40, 3.0]}
        cache.put_embeddings("nomic", vectors)
        assert await cache.get_embeddings(keys) == vectors  # from the write-behind buffer
        await cache.flush()
        _, cold = await opened(db=db)
        more = embedding_keys("nomic", {"input": ["beta", "gamma"]})
        assert await cold.get_embeddings(more) == {more[0]: [1e-40, 3.0]}  # only what changed is missing
        assert (cold.stats.embedding_hits, cold.stats.embedding_misses) == (1, 1)
        await cold.close()
        await cache.close()
        await db.close()

    run(main())


def test_vector_packing_round_trips():
    vector = [0.1, -0.2, 0.3, 1.5e300, -0.0]
    assert unpack_vector(pack_vector(vector)) == vector
    assert len(pack_vector(vector)) == 8 * len(vector)
