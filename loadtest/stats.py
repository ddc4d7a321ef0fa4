"""From the raw samples of each round to one summary per path, and path-to-path comparisons."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

# The entry whose time is "the request": a non-streaming answer, or a stream up to [DONE].
MAIN_ENTRY = {"chat": "chat", "stream": "stream-total", "embed": "embeddings"}
CHUNK_ENTRIES = ("TTFT", "inter-token")  # one per content chunk received


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no samples."""
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * q / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


@dataclass
class RoundResult:
    """One load-generator run against one path, with the processes' readings around it."""

    leg: str
    index: int
    raw: dict  # what loadtest.samples.Recorder wrote
    load_seconds: float  # ramp + warm-up + window: the time the generator kept the path busy
    proxy_cpu: float | None = None
    proxy_peak_rss: int | None = None
    sim_cpu: float = 0.0
    sim_max_active: int = 0

    def ok(self, entry: str) -> list[float]:
        return self.raw["entries"].get(entry, {}).get("ok", [])

    def failed(self, entry: str) -> int:
        return self.raw["entries"].get(entry, {}).get("failed", 0)

    def completed(self, entry: str) -> int:
        return self.raw["entries"].get(entry, {}).get("completed", 0)


@dataclass
class Summary:
    """One path of one scenario, pooled over its rounds. Times in ms, memory in MB."""

    leg: str
    round: str = "all"
    users: int = 0
    requests: int = 0
    failures: int = 0
    failure_rate: float = 0.0
    rps: float = math.nan
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    mean_ms: float = math.nan
    ttft_p50_ms: float = math.nan
    ttft_p95_ms: float = math.nan
    ttft_p99_ms: float = math.nan
    itl_p50_ms: float = math.nan
    itl_p99_ms: float = math.nan
    chunks: int = 0
    proxy_cpu_s: float = math.nan
    proxy_cpu_pct: float = math.nan
    proxy_cpu_us_per_req: float = math.nan
    proxy_cpu_us_per_chunk: float = math.nan
    proxy_peak_rss_mb: float = math.nan
    peak_open_streams: int = 0
    backend_peak_active: int = 0
    client_cpu_s: float = math.nan
    sim_cpu_s: float = math.nan
    errors: dict[str, int] = field(default_factory=dict)


def summarize(leg: str, kind: str, rounds: list[RoundResult], label: str = "all") -> Summary:
    main = MAIN_ENTRY[kind]
    latencies = sorted(ms for r in rounds for ms in r.ok(main))
    failures = sum(r.failed(main) for r in rounds)
    window = sum(r.raw["window"] for r in rounds)
    s = Summary(leg=leg, round=label, users=max((r.raw.get("users", 0) for r in rounds), default=0))
    s.requests = len(latencies)
    s.failures = failures
    s.failure_rate = failures / (len(latencies) + failures) if latencies or failures else 0.0
    s.rps = len(latencies) / window if window > 0 else math.nan
    s.p50_ms, s.p95_ms, s.p99_ms = (percentile(latencies, q) for q in (50, 95, 99))
    s.mean_ms = sum(latencies) / len(latencies) if latencies else math.nan
    if kind == "stream":
        ttft = sorted(ms for r in rounds for ms in r.ok("TTFT"))
        gaps = sorted(ms for r in rounds for ms in r.ok("inter-token"))
        s.ttft_p50_ms, s.ttft_p95_ms, s.ttft_p99_ms = (percentile(ttft, q) for q in (50, 95, 99))
        s.itl_p50_ms, s.itl_p99_ms = percentile(gaps, 50), percentile(gaps, 99)
        s.chunks = len(ttft) + len(gaps)
    measured = [r for r in rounds if r.proxy_cpu is not None]
    if measured:
        cpu = sum(r.proxy_cpu or 0.0 for r in measured)
        busy = sum(r.load_seconds for r in measured)
        served = sum(r.completed(main) for r in measured)
        chunks = sum(r.completed(e) for r in measured for e in CHUNK_ENTRIES)
        s.proxy_cpu_s = cpu
        s.proxy_cpu_pct = 100 * cpu / busy if busy else math.nan
        s.proxy_cpu_us_per_req = 1e6 * cpu / served if served else math.nan
        s.proxy_cpu_us_per_chunk = 1e6 * cpu / chunks if chunks else math.nan
        s.proxy_peak_rss_mb = max((r.proxy_peak_rss or 0) for r in measured) / 2**20
    s.peak_open_streams = max((r.raw.get("peak_open_streams", 0) for r in rounds), default=0)
    s.backend_peak_active = max((r.sim_max_active for r in rounds), default=0)
    s.client_cpu_s = sum(r.raw.get("client_cpu", 0.0) for r in rounds)
    s.sim_cpu_s = sum(r.sim_cpu for r in rounds)
    for r in rounds:
        for message, count in r.raw.get("errors", {}).items():
            s.errors[message] = s.errors.get(message, 0) + count
    return s


# Fields that compare meaningfully between two paths: the subject minus (or over) the baseline.
COMPARED = ("rps", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p99_ms", "failure_rate")  # fmt: skip


def compare(subject: Summary, baseline: Summary) -> tuple[Summary, Summary]:
    """(subject - baseline, subject / baseline) as summaries with only the compared fields set."""
    diff = Summary(leg=f"{subject.leg} - {baseline.leg}")
    ratio = Summary(leg=f"{subject.leg} / {baseline.leg}")
    for f in fields(Summary):
        if f.name in COMPARED:
            a, b = getattr(subject, f.name), getattr(baseline, f.name)
            setattr(diff, f.name, a - b)
            setattr(ratio, f.name, a / b if b else math.nan)
    for name in ("requests", "failures", "chunks", "users", "peak_open_streams", "backend_peak_active"):
        setattr(diff, name, 0)
        setattr(ratio, name, 0)
    return diff, ratio
