"""Latency parity: what the proxy costs compared with talking to the backend directly.

    python -m loadtest.parity                        # every scenario, a few minutes on 2 cores
    python -m loadtest.parity --quick                # every scenario, shortened rounds
    python -m loadtest.parity --scenario latency --scenario streaming

Starts a simulated backend (``python -m proxy.sim``) and the proxy (``python -m proxy serve``,
one worker) as their own processes, then runs a load generator process per round, alternating
between the paths: direct to the backend's OpenAI-compatible endpoint, and through the proxy.
Writes ``latency-parity.md`` and ``latency-parity.csv`` (default: docs/performance/) and exits
1 when a target is missed (unless ``--report-only``), 2 when the run itself failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shlex
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from .procs import (
    ROOT,
    LoadSpec,
    Proxy,
    RunError,
    Service,
    Sim,
    cpu_seconds,
    peak_rss_bytes,
    raise_open_files,
    reset_peak_rss,
    run_load,
)
from .profile import Sampler
from .report import ScenarioResult, machine, write_csv, write_markdown
from .scenarios import SCENARIOS, Leg, Limits, Scenario, checks_for, reply_of
from .stats import CHUNK_ENTRIES, MAIN_ENTRY, RoundResult, compare, summarize

# Proxy labels the scenarios' legs name, and the features and worker processes each runs with.
# "proxy-many" (10k-streams) gets as many workers as the descriptor limit needs: see _many_workers().
_PROXIES = {"proxy": ("default", 1), "proxy-off": ("off", 1), "proxy-on": ("on", 1), "proxy-2w": ("default", 2),
            "proxy-many": ("default", 0)}  # fmt: skip


def _many_workers(selected: list[Scenario], open_files: int) -> tuple[int, str]:
    """Workers for "proxy-many", and a sentence for the report when that is more than one.

    Each open stream holds two descriptors in the proxy (its client's and its backend's
    connection), and every descriptor of a worker counts against that process's RLIMIT_NOFILE.
    Where the hard limit is low and cannot be raised (a container without CAP_SYS_RESOURCE:
    20,000 here), one process cannot hold 10,000 streams; two workers, each with its own limit,
    hold them, and their memory is summed.
    """
    users = max((sc.users_of(leg) for sc in selected for leg in sc.legs if leg.target == "proxy-many"), default=0)
    needed = 2 * users + 256
    workers = max(1, -(-needed // max(open_files - 256, 1)))
    if workers == 1:
        return 1, ""
    return workers, (f" The proxy runs {workers} workers: RLIMIT_NOFILE is {open_files} and could not be raised, "
                     f"and one process would need {needed} descriptors; their memory is summed")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.parity", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--scenario", action="append", default=[], metavar="NAME",
                   help=f"run only these (repeat or comma-separate): {', '.join(SCENARIOS)}; default all")  # fmt: skip
    p.add_argument("--backend", choices=["ollama", "vllm"], default="ollama",
                   help="simulated backend; direct means its /v1 API, the proxy uses Ollama's native /api")  # fmt: skip
    p.add_argument("--client", choices=["locust", "asyncio"], default="locust",
                   help="load generator (many-streams always uses asyncio)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="one short round per path")
    p.add_argument("--rounds", type=int, help="rounds per path (overrides the scenario's)")
    p.add_argument("--duration", type=float, help="seconds recorded per round (overrides the scenario's)")
    p.add_argument("--warmup", type=float, help="seconds of unrecorded load before each round's window")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "performance")
    p.add_argument("--name", default="latency-parity", help="base name of the .md and .csv written")
    p.add_argument("--report-only", action="store_true", help="exit 0 even when a target is missed")
    p.add_argument("--keep", action="store_true", help="keep the working directory (configs, process logs)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record the proxy with py-spy during its rounds; raw profiles and summaries go to DIR")  # fmt: skip
    t = p.add_argument_group("targets")
    t.add_argument(
        "--threshold",
        type=float,
        default=Limits.pct,
        metavar="PCT",
        help="largest latency difference in percent (realistic, stream-rate, features, many-streams)",
    )
    t.add_argument("--max-added-p50-ms", type=float, default=Limits.added_p50_ms)
    t.add_argument("--max-added-p99-ms", type=float, default=Limits.added_p99_ms)
    t.add_argument("--max-added-ttft-ms", type=float, default=Limits.added_ttft_ms)
    t.add_argument("--max-added-stream-ms", type=float, default=Limits.added_stream_ms)
    t.add_argument("--max-cpu-us", type=float, default=Limits.max_cpu_us_per_req,
                   help="latency: proxy CPU per request (from /proc)")  # fmt: skip
    t.add_argument("--min-rps", type=float, default=Limits.min_rps, help="saturation: proxy requests/s")
    t.add_argument("--min-workers-ratio", type=float, default=Limits.min_workers_ratio,
                   help="workers: requests/s of 2 workers over 1")  # fmt: skip
    t.add_argument("--max-chunk-cpu-us", type=float, default=Limits.max_chunk_cpu_us,
                   help="many-streams: proxy CPU per chunk at 1000 streams")  # fmt: skip
    t.add_argument("--max-many-streams-mb", type=float, default=Limits.max_many_streams_mb,
                   help="10k-streams: proxy peak memory")  # fmt: skip
    t.add_argument("--min-streams", type=int, default=Limits.min_streams)
    t.add_argument("--max-kb-per-stream", type=float, default=Limits.max_kb_per_stream)
    t.add_argument("--max-chunk-cost-growth", type=float, default=Limits.max_chunk_cost_growth)
    args = p.parse_args(argv)
    names = [n.strip() for arg in args.scenario for n in arg.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCENARIOS) - {"all"})
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.names = list(SCENARIOS) if not names or "all" in names else list(dict.fromkeys(names))
    return args


def configure(args: argparse.Namespace) -> list[Scenario]:
    selected = []
    for name in args.names:
        sc = SCENARIOS[name].quick() if args.quick else SCENARIOS[name]
        changes = {k: v for k, v in (("rounds", args.rounds), ("duration", args.duration), ("warmup", args.warmup))
                   if v is not None}  # fmt: skip
        selected.append(dataclasses.replace(sc, **changes))
    return selected


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(pct=args.threshold, added_p50_ms=args.max_added_p50_ms, added_p99_ms=args.max_added_p99_ms,
                  added_ttft_ms=args.max_added_ttft_ms, added_stream_ms=args.max_added_stream_ms,
                  min_rps=args.min_rps, min_streams=args.min_streams, max_kb_per_stream=args.max_kb_per_stream,
                  max_chunk_cost_growth=args.max_chunk_cost_growth, max_cpu_us_per_req=args.max_cpu_us,
                  min_workers_ratio=args.min_workers_ratio, max_chunk_cpu_us=args.max_chunk_cpu_us,
                  max_many_streams_mb=args.max_many_streams_mb)  # fmt: skip


class Bench:
    """The running processes of one benchmark and the rounds run against them."""

    def __init__(self, sim: Sim, proxies: dict[str, Proxy], client: str, workdir: Path,
                 profile_dir: Path | None = None) -> None:  # fmt: skip
        self.sim = sim
        self.proxies = proxies
        self.client = client
        self.workdir = workdir
        self.profile_dir = profile_dir

    def round(self, sc: Scenario, leg: Leg, index: int) -> RoundResult:
        # A paced stream may take longer than a minute (10k-streams: 100 s); the client waits that long.
        timeout = max(60.0, sc.tokens / sc.tps + sc.ttft + 30) if sc.tps else 60.0
        spec = LoadSpec(client=sc.client or self.client, kind=sc.kind, users=sc.users_of(leg), warmup=sc.warmup,
                        duration=sc.duration, ramp=sc.ramp, timeout=timeout)  # fmt: skip
        proxy = self.proxies.get(leg.target)
        host = proxy.url if proxy else self.sim.url
        self.sim.reset()
        if proxy:
            reset_peak_rss(proxy.pid)
            proxy_cpu = cpu_seconds(proxy.pid)
        sim_cpu = cpu_seconds(self.sim.pid)
        sampler = None
        if proxy and self.profile_dir:
            sampler = Sampler(proxy.pid, self.profile_dir / f"{sc.name}-{leg.label}-r{index + 1}.txt")
        try:
            # Ask for more tokens than the answer has, so the backend never cuts it short.
            raw = run_load(spec, host, self.sim.model, self.workdir, max_tokens=sc.tokens + 16)
        finally:
            if sampler:
                sampler.stop()
        if sampler:
            done = {name: entry.get("completed", 0) for name, entry in raw["entries"].items()}
            sampler.summarize(done.get(MAIN_ENTRY[sc.kind], 0), sum(done.get(e, 0) for e in CHUNK_ENTRIES))
        result = RoundResult(leg=leg.label, index=index, raw=raw, load_seconds=sc.ramp + sc.warmup + sc.duration,
                             sim_cpu=cpu_seconds(self.sim.pid) - sim_cpu,
                             sim_max_active=int(self.sim.stats().get("max_active", 0)))  # fmt: skip
        self.sim.check_alive()
        if proxy:
            proxy.check_alive()
            result.proxy_cpu = cpu_seconds(proxy.pid) - proxy_cpu
            result.proxy_peak_rss = peak_rss_bytes(proxy.pid)
        return result

    def scenario(self, sc: Scenario, limits: Limits) -> ScenarioResult:
        self.sim.behave(reply=reply_of(sc.tokens), ttft=sc.ttft, tokens_per_second=sc.tps)
        rounds: dict[str, list[RoundResult]] = {leg.label: [] for leg in sc.legs}
        for index in range(sc.rounds):
            # Alternate the order, so a drift over time (thermal, another tenant) hits both paths alike.
            for leg in sc.legs if index % 2 == 0 else sc.legs[::-1]:
                result = self.round(sc, leg, index)
                rounds[leg.label].append(result)
                _progress(sc, leg, index, summarize(leg.label, sc.kind, [result]), result.raw.get("errors") or {})
        summaries = {label: summarize(label, sc.kind, rs) for label, rs in rounds.items()}
        per_round = [summarize(label, sc.kind, [r], label=str(r.index + 1)) for label, rs in rounds.items() for r in rs]
        comparisons = list(compare(summaries[sc.subject], summaries[sc.baseline]))
        return ScenarioResult(sc, summaries, per_round, comparisons, checks_for(sc, summaries, limits))


def _progress(sc: Scenario, leg: Leg, index: int, s, errors: dict[str, int]) -> None:
    stream = f", TTFT p50 {s.ttft_p50_ms:.3f} ms" if sc.kind == "stream" else ""
    opened = f", {s.peak_open_streams} open" if s.peak_open_streams > 1 else ""
    print(f"[{sc.name}] round {index + 1}/{sc.rounds} {leg.label:>9}: {s.requests} answered, {s.failures} failed, "
          f"{s.rps:.0f} req/s, p50 {s.p50_ms:.3f} ms, p99 {s.p99_ms:.3f} ms{stream}{opened}", file=sys.stderr,
          flush=True)  # fmt: skip
    for error, count in list(errors.items())[:3]:  # what failed, most frequent first
        print(f"    {count} x {error}", file=sys.stderr, flush=True)


def run(selected: list[Scenario], args: argparse.Namespace, workdir: Path) -> list[ScenarioResult]:
    services: list[Service] = []
    try:
        sim = Sim(args.backend, reply_of(20), workdir)
        services.append(sim)
        proxies: dict[str, Proxy] = {}
        many, note = _many_workers(selected, raise_open_files())
        if note:
            print(f"note:{note}.", file=sys.stderr, flush=True)
            selected = [dataclasses.replace(sc, purpose=sc.purpose + "." + note) if any(
                leg.target == "proxy-many" for leg in sc.legs) else sc for sc in selected]  # fmt: skip
        for label in sorted({leg.target for sc in selected for leg in sc.legs} - {"direct"}):
            features, workers = _PROXIES[label]
            proxies[label] = Proxy(label, sim, workdir, features, workers or many)
            services.append(proxies[label])
        bench = Bench(sim, proxies, args.client, workdir, args.profile)
        return [bench.scenario(sc, limits_of(args)) for sc in selected]
    finally:
        for service in reversed(services):
            service.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    selected = configure(args)
    if any((sc.client or args.client) == "locust" for sc in selected) and importlib.util.find_spec("locust") is None:
        print("error: Locust is not installed: pip install -e '.[load]', or pass --client asyncio", file=sys.stderr)
        return 2
    if args.profile:
        if not Sampler.available():
            print("error: --profile needs py-spy on PATH or next to this Python: pip install py-spy", file=sys.stderr)
            return 2
        args.profile.mkdir(parents=True, exist_ok=True)
    raise_open_files()  # inherited by the backend, the proxies and the load generators
    started, clock = datetime.now(UTC), time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-parity-"))
    try:
        results = run(selected, args, workdir)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"configs and process logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - clock

    args.out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = args.out_dir / f"{args.name}.md", args.out_dir / f"{args.name}.csv"
    command = shlex.join(["python", "-m", "loadtest.parity", *argv])
    write_csv(csv_path, results, args.backend)
    write_markdown(
        md, results, machine(), command, args.backend, csv_path.name, started, elapsed, args.quick, args.profile
    )
    checks = [c for r in results for c in r.checks]
    for c in checks:
        print(f"{'pass' if c.ok else 'FAIL'}  {c.scenario:<12} {c.what}: {c.measured} (target {c.target})")
    print(f"wrote {md} and {csv_path} in {elapsed:.0f} s")
    missed = [c for c in checks if not c.ok]
    if missed and not args.report_only:
        print(f"{len(missed)} of {len(checks)} targets missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
