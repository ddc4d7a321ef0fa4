"""The benchmark's outputs: a Markdown page for people and a CSV for tools."""

from __future__ import annotations

import csv
import math
import os
import platform
import subprocess
from dataclasses import dataclass, fields
from datetime import datetime
from importlib import metadata
from pathlib import Path

from .procs import ROOT
from .scenarios import Check, Scenario
from .stats import Summary

_PACKAGES = ("llm-proxy", "uvicorn", "starlette", "httpx", "httpcore", "orjson", "uvloop", "httptools", "locust")


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for name in _PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": ", ".join(versions),
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} (with uncommitted changes)" if head and dirty else head or "unknown"


@dataclass
class ScenarioResult:
    scenario: Scenario
    summaries: dict[str, Summary]  # by leg label, pooled over rounds
    per_round: list[Summary]
    comparisons: list[Summary]  # subject - baseline, subject / baseline
    checks: list[Check]


# ----------------------------------------------------------------------------- CSV

_CSV_FIELDS = [f.name for f in fields(Summary) if f.name not in ("errors", "leg", "round")]


def write_csv(path: Path, results: list[ScenarioResult], backend: str) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["scenario", "backend", "leg", "round", *_CSV_FIELDS])
        for result in results:
            name = result.scenario.name
            for s in [*result.summaries.values(), *result.comparisons, *result.per_round]:
                writer.writerow([name, backend, s.leg, s.round, *(_csv_value(getattr(s, f)) for f in _CSV_FIELDS)])


def _csv_value(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


# ----------------------------------------------------------------------------- Markdown


def _num(value: float, unit: str = "") -> str:
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if abs(value) < 10:
        text = f"{value:.3f}"
    elif abs(value) < 1000:
        text = f"{value:.1f}"
    else:
        text = f"{value:,.0f}"
    return text + unit


def _signed(value: float) -> str:
    return "–" if math.isnan(value) else ("+" if value >= 0 else "") + _num(value)


def _columns(kind: str, many: bool) -> list[tuple[str, str]]:
    cols = [("requests", "answered"), ("rps", "req/s")]
    if not many:
        cols += [("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms")]
    if kind == "stream":
        cols += [("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
                 ("itl_p50_ms", "inter-token p50 ms"), ("itl_p99_ms", "inter-token p99 ms")]  # fmt: skip
    if many:
        cols += [("peak_open_streams", "open streams"), ("proxy_cpu_us_per_chunk", "proxy CPU µs/chunk")]
    cols += [("failure_rate", "failed"), ("proxy_cpu_s", "proxy CPU s"), ("proxy_cpu_pct", "proxy CPU %"),
             ("proxy_cpu_us_per_req", "proxy CPU µs/req"), ("proxy_peak_rss_mb", "proxy peak RSS MB")]  # fmt: skip
    return cols


def _cell(s: Summary, field: str, row: str) -> str:
    value = getattr(s, field)
    if row == "value":
        if field == "failure_rate":
            return f"{100 * value:.2f}%"
        if isinstance(value, int):
            return f"{value:,}"
        return _num(value)
    if field not in ("rps", "failure_rate") and not field.endswith("_ms"):
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if row == "ratio":
        return f"{value:.3f}×"
    return f"{100 * value:+.2f} pt" if field == "failure_rate" else _signed(value)


def scenario_table(result: ScenarioResult) -> list[str]:
    sc = result.scenario
    cols = _columns(sc.kind, sc.name == "many-streams")
    lines = ["| path | " + " | ".join(title for _, title in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows = [(s, "value") for s in result.summaries.values()]
    rows += [(c, "diff" if " - " in c.leg else "ratio") for c in result.comparisons]
    for s, row in rows:
        label = s.leg.replace(" - ", " − ").replace(" / ", " ÷ ")
        if row == "value" and s.users:
            label += f" ({s.users} client{'s' if s.users > 1 else ''})"
        lines.append(f"| {label} | " + " | ".join(_cell(s, f, row) for f, _ in cols) + " |")
    return lines


# Where a report's missed targets are explained: what the profile shows and what would close each.
ANALYSIS = "changes.md#where-the-time-goes-target-by-target"


def profile_section(results: list[ScenarioResult], profiles: Path) -> list[str]:
    """The first round's py-spy split (where the GIL time goes) of every proxy path, per scenario."""
    lines = ["## Where the proxy's time goes (py-spy)", "",
             "Sampled at 500 Hz with `--gil` during each proxy path's first round; py-spy itself runs on the same "
             "cores, so this run's other figures are a little worse than an unprofiled run's. Full summaries "
             f"(functions by own and inclusive time) are the `.md` files next to the raw profiles in `{profiles}`.",
             ""]  # fmt: skip
    for result in results:
        sc = result.scenario
        for leg in sc.legs:
            if leg.target == "direct":
                continue
            summary = profiles / f"{sc.name}-{leg.label}-r1.md"
            if not summary.exists():
                continue
            text = summary.read_text().split("\n\nTop ", 1)[0]  # the headline and the split by owner
            head, _, table = text.partition("\n\n")
            lines += [f"### {sc.name}, {leg.label}", "", head.split(": ", 1)[-1] + ".", "", table, ""]
    return lines


def write_markdown(path: Path, results: list[ScenarioResult], info: dict[str, str], command: str, backend: str,
                   csv_name: str, started: datetime, elapsed: float, quick: bool,
                   profiles: Path | None = None) -> None:  # fmt: skip
    checks = [c for r in results for c in r.checks]
    failed = [c for c in checks if not c.ok]
    lines = [
        "# Latency parity: llm-proxy against the backend it fronts",
        "",
        "What putting the proxy in front of a node costs, measured on one machine in one run: a simulated "
        f"{backend} backend, the proxy (one uvicorn worker) in front of it, and a load generator, each its own "
        "process. Every scenario alternates rounds between the paths: **direct** (the backend's own "
        "OpenAI-compatible `/v1` endpoint, as a client without the proxy would use it) and **proxy** (the same "
        "requests through llm-proxy, which talks to the backend's native API). How to run and read it: "
        "[README.md](README.md).",
        "",
        f"- **Run**: {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s{' (`--quick`: shortened rounds)' if quick else ''}"
        f", commit {info['commit']}",
        f"- **Command**: `{command}`",
        f"- **Machine**: {info['cpu']}, {info['cores']} cores, {info['kernel']}, {info['python']}",
        f"- **Versions**: {info['packages']}",
        f"- **Raw numbers**: [{csv_name}]({csv_name}) (every path, comparison and round)",
        "",
        "## Targets",
        "",
        f"{len(checks) - len(failed)} of {len(checks)} checks pass.",
        "",
        "| scenario | check | target | measured | |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {c.scenario} | {c.what} | {c.target} | {c.measured} | {'pass' if c.ok else '**FAIL**'} |"
              for c in checks]  # fmt: skip
    if failed:
        lines += [
            "",
            f"Why each missed target is missed, with its profile, and what would close it: [changes.md]({ANALYSIS}).",
        ]
    lines += ["", "## Results", "",
              "Times in milliseconds. Latency is the whole answer (a stream: until `data: [DONE]`); TTFT is the "
              "first content token; `failed` is the share of requests that failed. Proxy CPU and peak RSS are the "
              "proxy process's own (`/proc`), over the rounds of that path, warm-up included; CPU % is of one "
              "core.", ""]  # fmt: skip
    for result in results:
        sc = result.scenario
        pacing = "no delay" if not sc.ttft and not sc.tps else (
            f"{sc.ttft * 1000:g} ms to first token" + (f", {sc.tps:g} tokens/s" if sc.tps else ""))  # fmt: skip
        rounds = f"{sc.rounds} round{'s' if sc.rounds > 1 else ''}"
        lines += [f"### {sc.name}", "",
                  f"{sc.purpose[0].upper()}{sc.purpose[1:]}. Backend: {pacing}, {sc.tokens}-token answers. {rounds} "
                  f"per path of {sc.duration:g} s after {sc.ramp + sc.warmup:g} s of warm-up.", ""]  # fmt: skip
        lines += scenario_table(result)
        errors = {f"{leg}: {msg}": n for leg, s in result.summaries.items() for msg, n in s.errors.items()}
        if errors:
            lines += ["", "Errors: " + "; ".join(f"{msg} ({n}×)" for msg, n in list(errors.items())[:5])]
        lines.append("")
    if profiles is not None:
        lines += profile_section(results, profiles)
    path.write_text("\n".join(lines))
