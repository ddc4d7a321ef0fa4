"""GET /admin/catalog against fake sources that are real HTTP servers on loopback: an Ollama-library-like
search page and a Hugging-Face-like /api/models. Caching (counted at the fakes), the offline fallback
from the shipped file, the GPU fit per node, filters, limits, bad parameters and admin auth."""

from __future__ import annotations

import asyncio
import contextlib
import html
import math
import socket
import threading

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from proxy.config import ConfigError, load_config, parse_config
from proxy.installable.catalog import load_file
from proxy.installable.entry import GIB, MEMORY_FACTOR, MEMORY_OVERHEAD, Entry, parameters_of
from proxy.sim import ServerThread
from tests.support import running_proxy

ADMIN = "catalog-admin-key"
LLAMA_8B = 4920753328  # llama3.1:8b in the shipped file, as /api/tags reports it after a pull
GEMMA_27B = 17396936941

# name, description, capabilities, size tags: what the library's search page lists.
LIBRARY = [
    ("llama3.1", "Llama 3.1 is a state-of-the-art model from Meta", ["tools"], ["8b", "70b"]),
    ("gemma3", "The current, most capable model that runs on a single GPU.", ["vision"], ["1b", "27b"]),
    ("smollm2", "A family of compact language models (mentions llama in the text only)", ["tools"],
     ["135m", "1.7b"]),
    ("nomic-embed-text", "A high-performing open embedding model", ["embedding"], []),
    ("kimi-k2", "Runs on ollama.com only", ["cloud"], []),
]  # fmt: skip

HUB = [
    {"id": "meta-llama/Llama-3.1-8B-Instruct", "pipeline_tag": "text-generation", "downloads": 900,
     "tags": ["transformers", "safetensors", "llama", "conversational", "license:llama3.1", "region:us"],
     "safetensors": {"parameters": {"BF16": 8030261248}, "total": 8030261248}},
    {"id": "Qwen/Qwen2.5-7B-Instruct-AWQ", "pipeline_tag": "text-generation", "downloads": 500,
     "tags": ["safetensors", "qwen2", "awq", "4-bit", "conversational"],
     "safetensors": {"parameters": {"I32": 887_000_000, "F16": 1_090_000_000}, "total": 1_977_000_000}},
    {"id": "bartowski/Llama-3.2-3B-Instruct-GGUF", "pipeline_tag": "text-generation", "downloads": 300,
     "tags": ["gguf", "llama", "conversational"], "gguf": {"total": 3212749888, "architecture": "llama"}},
    {"id": "BAAI/bge-m3", "pipeline_tag": "sentence-similarity", "downloads": 200,
     "tags": ["sentence-transformers", "xlm-roberta"], "safetensors": {"parameters": {"F32": 567754752}}},
]  # fmt: skip


def _library_page(models) -> str:
    """The library's markup, reduced to what marks a model (the x-test-* attributes), with some noise."""
    items = []
    for name, description, capabilities, sizes in models:
        caps = "".join(f'<span x-test-capability class="c">{html.escape(c)}</span>' for c in capabilities)
        tags = "".join(f'<span x-test-size class="s">{html.escape(s)}</span>' for s in sizes)
        items.append(
            f'<li x-test-model class="flex"><a href="/library/{name}"><div title="{name}"><h2>'
            f"<span x-test-search-response-title>{html.escape(name)}</span></h2>"
            f'<p class="max-w-lg">{html.escape(description)}</p></div><div><div>{caps}{tags}</div>'
            f'<p class="my-1"><span><svg><path d="M3"/></svg><span x-test-pull-count>27.7K</span>'
            f"<span>&nbsp;Pulls</span></span><br></p></div></a></li>"
        )
    return f'<ul role="list">{"".join(items)}</ul>'


class FakeSources:
    """Both fakes in one app, counting requests; ``hang`` makes them never answer in time."""

    def __init__(self, library=LIBRARY, hub=HUB) -> None:
        self.library, self.hub = library, hub
        self.requests: list[tuple[str, dict]] = []
        self.hang = False
        self.broken = False
        self.server = ServerThread(Starlette(routes=[Route("/search", self.search), Route("/api/models", self.models)]))

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)

    async def _wait(self) -> None:
        if self.hang:
            await asyncio.sleep(30)

    async def search(self, request: Request) -> Response:
        self.requests.append(("/search", dict(request.query_params)))
        await self._wait()
        if self.broken:
            return Response("upstream trouble", status_code=503)
        q = request.query_params.get("q", "").lower()
        # Like the real site, the search matches descriptions too.
        hits = [m for m in self.library if q in m[0].lower() or q in m[1].lower()]
        return HTMLResponse(f"<html><body>{_library_page(hits)}</body></html>")

    async def models(self, request: Request) -> Response:
        self.requests.append(("/api/models", {k: request.query_params.getlist(k) for k in request.query_params}))
        await self._wait()
        if self.broken:
            return Response(orjson.dumps({"error": "Invalid filter"}), media_type="application/json")
        q = request.query_params.get("search", "").lower()
        wanted = request.query_params.get("filter")
        hits = [m for m in self.hub if q in m["id"].lower() and (not wanted or m["pipeline_tag"] == wanted)]
        return Response(orjson.dumps(hits[: int(request.query_params.get("limit", "1000"))]),
                        media_type="application/json")  # fmt: skip

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def fakes():
    sources = FakeSources()
    sources.server.start()
    yield sources
    sources.hang = False
    sources.server.stop()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def proxy_config(tmp_path, *, ollama_url: str, huggingface_url: str, **catalog) -> dict:
    nowhere = closed_port_url()  # the nodes need not answer for the catalog; their GPU size is config
    return {
        "server": {"admin_keys": [ADMIN]},
        "storage": {"path": str(tmp_path / "proxy.db")},
        "timeouts": {"connect": 1, "first_byte": 2, "idle": 2},
        "health": {"interval": 60},
        "backends": [
            {"name": "small", "kind": "ollama", "url": nowhere, "gpu_memory_gb": 8},
            {"name": "big", "kind": "vllm", "url": nowhere, "gpu_memory_gb": 24},
            {"name": "unknown", "kind": "ollama", "url": nowhere},
        ],
        "catalog": {"ollama_url": ollama_url, "huggingface_url": huggingface_url, "timeout": 2,
                    "huggingface_filter": "text-generation", **catalog},
    }  # fmt: skip


@contextlib.contextmanager
def catalog_client(tmp_path, **kwargs):
    with running_proxy(proxy_config(tmp_path, **kwargs)) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=15, headers={"Authorization": f"Bearer {ADMIN}"}) as http:
            yield http


def get(http: httpx.Client, **params) -> dict:
    answer = http.get("/admin/catalog", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def by_name(body: dict) -> dict[str, dict]:
    return {e["name"]: e for e in body["data"]}


@pytest.fixture(scope="module")
def live(fakes, tmp_path_factory):
    """A proxy over both fakes, with a long TTL."""
    with catalog_client(tmp_path_factory.mktemp("live"), ollama_url=fakes.url, huggingface_url=fakes.url) as http:
        yield http


# --- what the sources say, read ------------------------------------------------------------------


def test_library_entries_one_per_size_tag_with_exact_sizes_where_the_file_has_them(live):
    body = get(live, source="ollama", q="llama3.1")
    assert body["sources"] == {"ollama": "live"} and body["errors"] == {}
    entries = by_name(body)
    assert set(entries) == {"llama3.1:8b", "llama3.1:70b"}
    small = entries["llama3.1:8b"]
    assert (small["source"], small["size"], small["quantization"]) == ("ollama", LLAMA_8B, "Q4_K_M")
    assert small["estimated"] == {"size": False, "required_memory": True}
    assert small["required_memory"] == math.ceil(LLAMA_8B * MEMORY_FACTOR) + MEMORY_OVERHEAD
    assert small["capabilities"] == ["tools"] and small["tags"] == ["8b", "70b"]
    assert small["description"].startswith("Llama 3.1")
    large = entries["llama3.1:70b"]  # not in the shipped file: estimated from "70b" at Q4_K_M
    assert large["estimated"] == {"size": True, "required_memory": True}
    assert large["parameters"] == 70_000_000_000 and 40e9 < large["size"] < 45e9


def test_q_is_a_substring_of_the_name_even_when_the_source_matches_more(live):
    body = get(live, source="ollama", q="LLAMA")
    # smollm2's description mentions llama, and the site finds it; the catalog keeps names only.
    assert {e["name"].split(":")[0] for e in body["data"]} == {"llama3.1"}


def test_cloud_only_models_are_left_out_and_embedding_models_estimated_at_f16(live):
    entries = by_name(get(live, source="ollama"))
    assert not any(name.startswith("kimi-k2") for name in entries)
    embed = entries["nomic-embed-text:latest"]  # no size tag: the shipped file's :latest
    assert embed["size"] == 274302450 and embed["capabilities"] == ["embedding"]
    tiny = entries["smollm2:135m"]
    assert tiny["estimated"]["size"] and tiny["parameters"] == 135_000_000 and tiny["quantization"] == "Q4_K_M"


def test_hub_entries_sized_from_their_safetensors_weights(live, fakes):
    body = get(live, source="huggingface")
    assert body["sources"] == {"huggingface": "live"}
    entries = by_name(body)
    assert "BAAI/bge-m3" not in entries  # filtered out at the Hub by filter=text-generation
    llama = entries["meta-llama/Llama-3.1-8B-Instruct"]
    assert (llama["size"], llama["parameters"], llama["quantization"]) == (2 * 8030261248, 8030261248, "BF16")
    assert llama["estimated"] == {"size": False, "required_memory": True}
    assert "completion" in llama["capabilities"]
    assert "region:us" not in llama["tags"] and "conversational" in llama["tags"]
    awq = entries["Qwen/Qwen2.5-7B-Instruct-AWQ"]
    assert awq["quantization"] == "AWQ" and awq["size"] == 887_000_000 * 4 + 1_090_000_000 * 2
    gguf = entries["bartowski/Llama-3.2-3B-Instruct-GGUF"]
    assert gguf["parameters"] == 3212749888 and gguf["estimated"]["size"] is True
    _, query = next(r for r in reversed(fakes.requests) if r[0] == "/api/models")
    assert query["filter"] == ["text-generation"] and "safetensors" in query["expand"]


# --- fits ----------------------------------------------------------------------------------------


def test_fits_against_each_nodes_gpu_memory(live):
    body = get(live, source="ollama", q="gemma3")
    assert body["nodes"] == [{"name": "small", "gpu_memory_bytes": 8 * GIB},
                             {"name": "big", "gpu_memory_bytes": 24 * GIB},
                             {"name": "unknown", "gpu_memory_bytes": None}]  # fmt: skip
    entries = by_name(body)
    big_model = entries["gemma3:27b"]
    assert big_model["size"] == GEMMA_27B
    assert big_model["fits"] == {"small": False, "big": True, "unknown": None}
    assert entries["gemma3:1b"]["fits"] == {"small": True, "big": True, "unknown": None}
    huge = by_name(get(live, source="ollama", q="llama3.1"))["llama3.1:70b"]
    assert huge["fits"] == {"small": False, "big": False, "unknown": None}


def test_required_memory_follows_the_documented_estimate():
    entry = Entry("x:1b", "ollama", size=1_000_000_000).with_estimates()
    assert entry.required_memory == 1_200_000_000 + GIB // 2 and entry.memory_estimated
    known = Entry("y", "huggingface", size=10, required_memory=99).with_estimates()
    assert known.required_memory == 99 and not known.memory_estimated
    unknown = Entry("z", "ollama").with_estimates()
    assert unknown.size is None and unknown.required_memory is None
    assert [parameters_of(s) for s in ("8b", "0.6b", "137m", "8x7b", "e2b", "latest")] == \
        [8_000_000_000, 600_000_000, 137_000_000, 56_000_000_000, 2_000_000_000, None]  # fmt: skip


# --- caching -------------------------------------------------------------------------------------


def test_answers_are_kept_for_the_ttl_and_refresh_asks_again(live, fakes):
    before = fakes.count("/search")
    first = get(live, source="ollama", q="gemma")
    again = get(live, source="ollama", q="GEMMA")  # the same query, whatever its case
    assert fakes.count("/search") == before + 1
    assert (first["sources"], again["sources"]) == ({"ollama": "live"}, {"ollama": "cached"})
    assert again["data"] == first["data"]
    get(live, source="ollama", q="smol")
    assert fakes.count("/search") == before + 2
    assert get(live, source="ollama", q="gemma", refresh="true")["sources"] == {"ollama": "live"}
    assert fakes.count("/search") == before + 3


def test_requests_arriving_together_share_one_fetch(live, fakes):
    before = fakes.count("/api/models")
    answers: list[dict] = []
    threads = [threading.Thread(target=lambda: answers.append(get(live, source="huggingface", q="qwen")))
               for _ in range(4)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fakes.count("/api/models") == before + 1
    assert sorted(a["sources"]["huggingface"] for a in answers) == ["cached", "cached", "cached", "live"]


def test_an_expired_answer_is_fetched_again(fakes, tmp_path):
    with catalog_client(tmp_path, ollama_url=fakes.url, huggingface_url="", ttl=0.2) as http:
        before = fakes.count("/search")
        get(http, source="ollama", q="llama")
        # Past the TTL (the wait is on the fake's counter, not on a clock in the proxy).
        for _ in range(100):
            get(http, source="ollama", q="llama")
            if fakes.count("/search") > before + 1:
                break
            threading.Event().wait(0.05)
        assert fakes.count("/search") == before + 2


# --- offline -------------------------------------------------------------------------------------


def test_a_source_on_a_closed_port_is_answered_from_the_shipped_file(tmp_path):
    with catalog_client(tmp_path, ollama_url=closed_port_url(), huggingface_url=closed_port_url()) as http:
        body = get(http, q="llama")
        assert body["sources"] == {"ollama": "offline", "huggingface": "offline"}
        assert set(body["errors"]) == {"ollama", "huggingface"} and "Connect" in body["errors"]["ollama"]
        entries = by_name(body)
        assert entries["llama3.1:8b"]["size"] == LLAMA_8B and entries["llama3.1:8b"]["estimated"]["size"] is False
        assert entries["llama3.1:8b"]["fits"] == {"small": True, "big": True, "unknown": None}
        assert "meta-llama/Llama-3.1-8B-Instruct" in entries
        assert all("llama" in name.lower() for name in entries)
        # Both sources, taken in turn.
        assert [e["source"] for e in body["data"][:2]] == ["ollama", "huggingface"]


def test_a_source_that_hangs_or_answers_nonsense_falls_back_without_holding_the_request(fakes, tmp_path):
    with catalog_client(tmp_path, ollama_url=fakes.url, huggingface_url=fakes.url, timeout=0.5) as http:
        fakes.hang = True
        try:
            body = get(http, source="ollama", q="gemma")
        finally:
            fakes.hang = False
        assert body["sources"] == {"ollama": "offline"} and "0.5 s" in body["errors"]["ollama"]
        assert "gemma3:27b" in by_name(body)
        fakes.broken = True
        try:
            hub = get(http, source="huggingface", q="qwen")
            library = get(http, source="ollama", q="phi")
        finally:
            fakes.broken = False
        assert hub["sources"] == {"huggingface": "offline"} and "JSON list" in hub["errors"]["huggingface"]
        assert library["errors"] == {"ollama": f"HTTP 503 from {fakes.url}/search"}
        # Kept only for offline_ttl; refresh asks again at once and the source is back.
        assert get(http, source="ollama", q="gemma", refresh="true")["sources"] == {"ollama": "live"}


def test_an_empty_source_url_means_the_file_alone_and_catalog_file_replaces_the_shipped_one(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_bytes(orjson.dumps({"version": 1, "models": [
        {"name": "house-model:7b", "source": "ollama", "size": 4_000_000_000, "capabilities": ["completion"]},
        {"name": "house/big", "source": "huggingface", "size": 60_000_000_000, "required_memory": 70_000_000_000},
    ]}))  # fmt: skip
    with catalog_client(tmp_path, ollama_url="", huggingface_url="", file=str(mine)) as http:
        body = get(http)
        assert body["sources"] == {"ollama": "offline", "huggingface": "offline"} and body["errors"] == {}
        entries = by_name(body)
        assert set(entries) == {"house-model:7b", "house/big"}
        assert entries["house/big"]["required_memory"] == 70_000_000_000
        assert entries["house/big"]["estimated"] == {"size": False, "required_memory": False}
        assert entries["house/big"]["fits"] == {"small": False, "big": False, "unknown": None}


def test_the_shipped_file_is_sound():
    entries = load_file("")
    assert len(entries) >= 30
    assert {e.source for e in entries} == {"ollama", "huggingface"}
    assert all(e.size and e.size > 0 and e.quantization and e.capabilities for e in entries)
    assert len({(e.source, e.name) for e in entries}) == len(entries)


def test_a_bad_catalog_file_names_the_key(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"models": [{"name": "x", "source": "docker"}]}')
    with pytest.raises(ConfigError, match=r"catalog\.file: models\[0\]\.source"):
        load_file(str(bad))
    with pytest.raises(ConfigError, match=r"catalog\.file: cannot read"):
        load_file(str(tmp_path / "missing.json"))


def test_catalog_config_errors_name_the_key_path():
    with pytest.raises(ConfigError) as caught:
        parse_config({"catalog": {"ollama_url": "ftp://x", "ttl": 0, "timeout": "soon", "colour": 1}}, env={})
    problems = "\n".join(caught.value.problems)
    for key in ("catalog.ollama_url", "catalog.ttl", "catalog.timeout", "catalog.colour"):
        assert key in problems
    config = parse_config({}, env={}).catalog
    assert (config.ollama_url, config.huggingface_url, config.ttl) == (
        "https://ollama.com",
        "https://huggingface.co",
        3600,
    )


# --- the request ---------------------------------------------------------------------------------


def test_limit_default_and_truncation(live):
    body = get(live, limit=3)
    assert len(body["data"]) == 3 and body["truncated"] is True
    assert [e["source"] for e in body["data"]] == ["ollama", "huggingface", "ollama"]
    everything = get(live)
    assert len(everything["data"]) <= 50 and everything["truncated"] is False


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"source": "docker"}, "source"),
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"refresh": "maybe"}, "refresh"),
        ({"q": "x" * 201}, "q"),
        ({"query": "llama"}, "query"),
    ],
)
def test_bad_parameters_get_a_400_in_openai_shape(live, params, param):
    answer = live.get("/admin/catalog", params=params)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_the_catalog_needs_the_admin_key(live):
    base = str(live.base_url)
    assert httpx.get(f"{base}/admin/catalog", timeout=10).status_code == 401
    wrong = httpx.get(f"{base}/admin/catalog", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "invalid_request_error"


def test_a_relative_catalog_file_is_taken_from_the_config_files_directory(tmp_path):
    (tmp_path / "config.yaml").write_text("catalog:\n  file: models/mine.json\n")
    assert load_config(tmp_path / "config.yaml", env={}).catalog.file == str(tmp_path / "models" / "mine.json")


def test_at_most_max_kept_answers_are_kept_those_expiring_first_go_first():
    from proxy.config import CatalogConfig
    from proxy.installable.catalog import MAX_KEPT, Installable

    class Counting:
        name = "ollama"

        def __init__(self) -> None:
            self.asked: list[str] = []

        async def fetch(self, client, query):
            self.asked.append(query)
            return [Entry(f"{query}:1b", "ollama", size=1)]

    async def run() -> list[str]:
        source = Counting()
        catalog = Installable(CatalogConfig(), sources={"ollama": source}, offline=[])
        try:
            for i in range(MAX_KEPT + 1):
                assert (await catalog.answer("ollama", f"m{i}")).state == "live"
            assert (await catalog.answer("ollama", f"m{MAX_KEPT}")).state == "cached"
            assert (await catalog.answer("ollama", "m0")).state == "live"  # the oldest went
        finally:
            await catalog.aclose()
        return source.asked

    asked = asyncio.run(run())
    assert len(asked) == MAX_KEPT + 2 and asked[-1] == "m0"
