"""The benchmark's scenarios, and the checks that turn their numbers into pass or fail.

Targets come from issues 6 and 15. Added latency is measured with one sequential client, never at
saturation, where queueing would swamp it; the saturation scenario measures throughput only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .stats import Summary


def reply_of(tokens: int) -> str:
    """A canned answer of exactly ``tokens`` simulated tokens (the sims split on whitespace)."""
    return " ".join(f"word{i}" for i in range(tokens))


@dataclass(frozen=True)
class Leg:
    """One path under load: ``target`` is ``direct`` or the label of a running proxy."""

    label: str
    target: str
    users: int | None = None  # None: the scenario's


DIRECT_VS_PROXY = (Leg("direct", "direct"), Leg("proxy", "proxy"))


@dataclass(frozen=True)
class Scenario:
    name: str
    purpose: str
    kind: str  # "chat" (non-streaming) or "stream"
    users: int
    ttft: float  # the simulated backend's seconds before the first token
    tps: float  # its tokens per second (0: no pacing)
    tokens: int  # answer length in tokens (stream chunks)
    rounds: int
    warmup: float
    duration: float
    ramp: float = 0.0
    legs: tuple[Leg, ...] = DIRECT_VS_PROXY
    baseline: str = "direct"
    subject: str = "proxy"
    client: str | None = None  # a load generator this scenario needs, whatever --client says

    def quick(self) -> Scenario:
        """The same scenario with every round shortened, for a fast look (and the smoke test)."""
        # Thousands of streams still open over a few seconds: opening them in one would measure a burst.
        ramp = min(self.ramp, 1.0 if self.users <= 1000 else 8.0)
        return dataclasses.replace(self, rounds=1, warmup=min(self.warmup, 0.3), ramp=ramp,
                                   duration=min(self.duration, 2.0 if self.ramp else 1.0))  # fmt: skip

    def users_of(self, leg: Leg) -> int:
        return leg.users if leg.users is not None else self.users


# fmt: off
SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("latency", "added latency: zero-latency backend, 1 sequential client, non-streaming",
                 kind="chat", users=1, ttft=0, tps=0, tokens=20, rounds=3, warmup=0.5, duration=4),
        Scenario("streaming", "added TTFT and total: zero-latency backend, 20 chunks, 1 sequential client",
                 kind="stream", users=1, ttft=0, tps=0, tokens=20, rounds=3, warmup=0.5, duration=4),
        Scenario("saturation", "throughput ceiling: zero-latency backend, 32 concurrent clients",
                 kind="chat", users=32, ttft=0, tps=0, tokens=20, rounds=3, warmup=1, duration=4),
        Scenario("realistic", "200 ms per answer, 64 concurrent clients, non-streaming",
                 kind="chat", users=64, ttft=0.2, tps=0, tokens=20, rounds=3, warmup=1.5, duration=5),
        Scenario("stream-rate", "50 tokens/s per stream after 100 ms, 32 concurrent streams",
                 kind="stream", users=32, ttft=0.1, tps=50, tokens=20, rounds=2, warmup=1.5, duration=5),
        Scenario("many-streams", "1000 concurrent open streams at 2 tokens/s (asyncio client)",
                 kind="stream", users=1000, ttft=0, tps=2, tokens=12, rounds=1, warmup=1, duration=8, ramp=3,
                 legs=(Leg("proxy@100", "proxy", users=100), Leg("direct", "direct"), Leg("proxy", "proxy")),
                 client="asyncio"),
        Scenario("features", "history + metrics + cache (all misses) on vs all off, 1 sequential client",
                 kind="chat", users=1, ttft=0, tps=0, tokens=20, rounds=3, warmup=0.5, duration=4,
                 legs=(Leg("off", "proxy-off"), Leg("on", "proxy-on")), baseline="off", subject="on"),
        Scenario("workers", "throughput of --workers 2 against 1 worker: zero-latency backend, 64 clients (asyncio client)",
                 kind="chat", users=64, ttft=0, tps=0, tokens=20, rounds=2, warmup=1, duration=4,
                 legs=(Leg("1 worker", "proxy"), Leg("2 workers", "proxy-2w")), baseline="1 worker",
                 subject="2 workers", client="asyncio"),
        Scenario("10k-streams", "10,000 streams open at once at 1 token per 10 s (asyncio client), proxy memory",
                 kind="stream", users=10_000, ttft=0, tps=0.1, tokens=10, rounds=1, warmup=3, duration=5, ramp=40,
                 legs=(Leg("proxy@1000", "proxy-many", users=1000), Leg("proxy", "proxy-many")),
                 baseline="proxy@1000", client="asyncio"),
    )
}
# fmt: on


@dataclass(frozen=True)
class Limits:
    """Pass/fail thresholds; every one is a command-line option of the runner."""

    pct: float = 10.0  # largest relative latency difference, realistic-latency scenarios
    added_p50_ms: float = 0.4
    added_p99_ms: float = 1.5
    added_ttft_ms: float = 0.5
    added_stream_ms: float = 2.0
    max_cpu_us_per_req: float = 350.0  # proxy CPU per non-streaming request, latency scenario
    min_rps: float = 3000.0
    min_workers_ratio: float = 1.7  # requests/s of --workers 2 over 1 worker
    min_streams: int = 1000
    max_kb_per_stream: float = 100.0  # proxy memory for each extra open stream
    max_chunk_cost_growth: float = 1.5  # proxy CPU per chunk at 1000 streams over that at 100
    max_chunk_cpu_us: float = 40.0  # proxy CPU per relayed chunk, many-streams at 1000
    min_many_streams: int = 10_000
    max_many_streams_mb: float = 1024.0  # proxy peak memory with min_many_streams open


@dataclass(frozen=True)
class Check:
    scenario: str
    what: str
    target: str
    measured: str
    ok: bool


def _ms(value: float) -> str:
    return f"{value:+.3f} ms" if abs(value) < 10 else f"{value:+.1f} ms"


def checks_for(scenario: Scenario, legs: dict[str, Summary], limits: Limits) -> list[Check]:
    name = scenario.name
    out: list[Check] = []

    def check(what: str, target: str, measured: str, ok: bool) -> None:
        out.append(Check(name, what, target, measured, bool(ok)))

    def added(field: str, what: str, limit: float) -> None:
        delta = getattr(legs[scenario.subject], field) - getattr(legs[scenario.baseline], field)
        check(what, f"<= {limit:g} ms", _ms(delta), delta <= limit)

    def relative(field: str, what: str) -> None:
        a, b = getattr(legs[scenario.subject], field), getattr(legs[scenario.baseline], field)
        pct = 100 * (a / b - 1) if b else math.nan
        delta = _ms(a - b) if field.endswith("_ms") else f"{a - b:+.0f} us"
        check(what, f"<= +{limits.pct:g}%", f"{pct:+.1f}% ({delta})", pct <= limits.pct)

    for label, s in legs.items():
        if s.failures or not s.requests and not s.chunks:
            check(f"{label}: no failures", "0 failed, > 0 answered", f"{s.failures} failed, {s.requests} answered",
                  False)  # fmt: skip
    if name == "latency":
        added("p50_ms", "added latency p50", limits.added_p50_ms)
        added("p99_ms", "added latency p99", limits.added_p99_ms)
        cpu = legs["proxy"].proxy_cpu_us_per_req  # from /proc: the proxy's own CPU, nobody else's
        check("proxy CPU per request", f"<= {limits.max_cpu_us_per_req:g} us", f"{cpu:.0f} us",
              cpu <= limits.max_cpu_us_per_req)  # fmt: skip
    elif name == "streaming":
        added("ttft_p50_ms", "added time to first token p50", limits.added_ttft_ms)
        added("p50_ms", "added total stream time p50", limits.added_stream_ms)
    elif name == "saturation":
        rps = legs["proxy"].rps
        check("proxy requests/s, 1 worker", f">= {limits.min_rps:g}", f"{rps:.0f}", rps >= limits.min_rps)
    elif name == "workers":
        one, two = legs[scenario.baseline], legs[scenario.subject]
        ratio = two.rps / one.rps if one.rps else math.nan
        check("requests/s, 2 workers over 1", f">= {limits.min_workers_ratio:g}x",
              f"{ratio:.2f}x ({one.rps:.0f} -> {two.rps:.0f}; proxy CPU {one.proxy_cpu_pct:.0f}% -> "
              f"{two.proxy_cpu_pct:.0f}% of a core)", ratio >= limits.min_workers_ratio)  # fmt: skip
    elif name == "10k-streams":
        many = legs["proxy"]
        check("proxy: streams open at once", f">= {limits.min_many_streams}", str(many.peak_open_streams),
              many.peak_open_streams >= limits.min_many_streams)  # fmt: skip
        check(f"proxy peak memory, {many.peak_open_streams} streams open", f"< {limits.max_many_streams_mb:g} MB",
              f"{many.proxy_peak_rss_mb:.0f} MB", many.proxy_peak_rss_mb < limits.max_many_streams_mb)  # fmt: skip
    elif name == "realistic":
        relative("p50_ms", "latency p50 difference")
        relative("p99_ms", "latency p99 difference")
    elif name == "features":
        # Not p99: one sequential client's p99 moves by more than 10% between identical rounds.
        relative("p50_ms", "latency p50 difference")
        relative("proxy_cpu_us_per_req", "proxy CPU per request difference")
    elif name == "stream-rate":
        relative("ttft_p50_ms", "time to first token p50 difference")
        relative("p50_ms", "total stream time p50 difference")
        relative("p99_ms", "total stream time p99 difference")
    elif name == "many-streams":
        few, many = legs["proxy@100"], legs["proxy"]
        for label in ("direct", "proxy"):
            opened = legs[label].peak_open_streams
            check(
                f"{label}: streams open at once", f">= {limits.min_streams}", str(opened), opened >= limits.min_streams
            )
        relative("itl_p50_ms", "inter-token gap p50 difference")
        relative("itl_p99_ms", "inter-token gap p99 difference")
        extra = many.users - few.users
        kb = (many.proxy_peak_rss_mb - few.proxy_peak_rss_mb) * 1024 / extra if extra else math.nan
        check("proxy memory per extra open stream", f"<= {limits.max_kb_per_stream:g} KB", f"{kb:.1f} KB",
              kb <= limits.max_kb_per_stream)  # fmt: skip
        growth = many.proxy_cpu_us_per_chunk / few.proxy_cpu_us_per_chunk
        check(f"proxy CPU per chunk, {many.users} vs {few.users} streams", f"<= {limits.max_chunk_cost_growth:g}x",
              f"{growth:.2f}x ({few.proxy_cpu_us_per_chunk:.0f} -> {many.proxy_cpu_us_per_chunk:.0f} us)",
              growth <= limits.max_chunk_cost_growth)  # fmt: skip
        check(f"proxy CPU per chunk, {many.users} streams", f"<= {limits.max_chunk_cpu_us:g} us",
              f"{many.proxy_cpu_us_per_chunk:.0f} us", many.proxy_cpu_us_per_chunk <= limits.max_chunk_cpu_us)  # fmt: skip
    return out
