"""Exact per-request timings of one load round, shared by both load generators.

Locust's own statistics round response times (to whole milliseconds below 100 ms),
too coarse for an added latency measured in fractions of a millisecond, so each
generator records every sample itself and the runner computes the percentiles.
Only samples that end inside the recording window count; the warm-up before it
(connection set-up, user spawning, the proxy's first requests) is only counted.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson


class Recorder:
    def __init__(self) -> None:
        self.recording = False
        self.ok: dict[str, list[float]] = defaultdict(list)
        self.failed: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()  # warm-up included: for CPU per request
        self.errors: Counter[str] = Counter()
        self.started_at = 0.0
        self.window = 0.0

    def add(self, name: str, ms: float, error: str | None = None) -> None:
        self.completed[name] += 1
        if not self.recording:
            return
        if error is None:
            self.ok[name].append(ms)
        else:
            self.failed[name] += 1
            self.errors[f"{name}: {error[:200]}"] += 1

    def start(self) -> None:
        self.recording = True
        self.started_at = time.monotonic()

    def stop(self) -> None:
        if self.recording:
            self.recording = False
            self.window = time.monotonic() - self.started_at

    def dump(self, path: str | Path, **extra: object) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        names = set(self.ok) | set(self.failed) | set(self.completed)
        report = {
            "entries": {
                name: {
                    "ok": [round(ms, 4) for ms in self.ok.get(name, ())],
                    "failed": self.failed.get(name, 0),
                    "completed": self.completed.get(name, 0),
                }  # fmt: skip
                for name in sorted(names)
            },
            "errors": dict(self.errors.most_common(20)),
            "window": self.window,
            "client_cpu": usage.ru_utime + usage.ru_stime,
            **extra,
        }
        Path(path).write_bytes(orjson.dumps(report))


def round_arguments(prog: str, kinds: list[str], argv: list[str] | None) -> argparse.Namespace:
    """The command line every load generator takes, so the runner drives both the same way."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--host", required=True)
    parser.add_argument("--kind", choices=kinds, required=True)
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds over which users start (0: at once)")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)
