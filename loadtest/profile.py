"""Where the proxy's time goes per request, from a py-spy profile taken under load.

    py-spy record --pid PID --gil --nonblocking --rate 500 --format raw --output prof.txt
    python -m loadtest.profile prof.txt --requests 4000 --rate 500

``python -m loadtest.parity --profile DIR`` records one such file per proxy round and
writes these summaries next to them. ``--gil`` keeps only samples of the thread holding
the GIL, so waiting in epoll or on a queue is not counted as work; time in system calls
made with the GIL held (uvloop writes to sockets that way) is. Divided by the requests
served while sampling, each sample count becomes microseconds per request.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Leaf-most frame first: the first owner found walking from the leaf up names the sample.
# A frame of these functions anywhere in the stack wins over everything else.
_SPECIAL = (("_assign_requests_to_connections", "httpcore pool bookkeeping (scans every pooled connection)"),)
_OWNERS = (
    (("aiosqlite/", "proxy/history", "proxy/storage/", "sqlite3"), "SQLite storage (history, cache) and its thread"),
    (("prometheus_client/", "proxy/metrics"), "metrics"),
    (("proxy/cache",), "cache"),
    (("httpx/", "httpcore/", "h11/", "anyio/"), "upstream HTTP client (httpx, httpcore, h11, anyio)"),
    (("uvicorn/",), "uvicorn: parsing requests, writing responses"),
    (("starlette/",), "starlette: routing, middleware, responses"),
    (("proxy/",), "llm-proxy's own code"),
    (("asyncio/", "uvloop/", "contextlib", "threading", "selectors", "concurrent/"), "event loop, tasks, threads"),
)


def _parse(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if not match:
        return frame, ""
    return match["func"], match["file"]


def category(frames: list[str]) -> str:
    for frame in frames:
        for name, label in _SPECIAL:
            if name in frame:
                return label
    for frame in reversed(frames):
        _, path = _parse(frame)
        for prefixes, label in _OWNERS:
            if any(p in path for p in prefixes):
                return label
    return "other"


def read(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(path: Path, requests: float, rate: float, top: int = 15, chunks: float = 0) -> str:
    stacks = read(path)
    total = sum(n for _, n in stacks)
    if not total or requests <= 0:
        return f"{path.name}: no samples or no requests"

    def us(n: int) -> float:
        return n / rate / requests * 1e6

    by_category: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        by_category[category(frames)] += n
        func, file = _parse(frames[-1])
        own[f"{func} ({file})"] += n
        for key in {f"{f} ({p})" for f, p in map(_parse, frames)}:
            inclusive[key] += n
    per_chunk = f", {total / rate / chunks * 1e6:.0f} us per stream chunk" if chunks else ""
    lines = [f"{path.name}: {total} samples = {total / rate:.2f} s holding the GIL over {requests:.0f} requests "
             f"= {us(total):.0f} us per request{per_chunk}", "", "| where | us/request | share |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {label} | {us(n):.0f} | {n / total:.0%} |" for label, n in by_category.most_common()]
    lines += ["", f"Top {top} functions by own time:", "", "| function | us/request | share |", "|---|---|---|"]
    lines += [f"| `{name}` | {us(n):.1f} | {n / total:.1%} |" for name, n in own.most_common(top)]
    # The command-line entry points hold every sample; they say nothing.
    interesting = [(k, n) for k, n in inclusive.most_common()
                   if ("(proxy/" in k or "httpx/_client" in k) and "proxy/cli.py" not in k and "__main__" not in k]  # fmt: skip
    lines += ["", "Inclusive time of llm-proxy's functions (and httpx's entry points):", "",
              "| function | us/request | share |", "|---|---|---|"]  # fmt: skip
    lines += [f"| `{name}` | {us(n):.1f} | {n / total:.1%} |" for name, n in interesting[:top]]
    return "\n".join(lines)


class Sampler:
    """py-spy recording one process until stopped; then a summary next to the raw file."""

    RATE = 500

    @staticmethod
    def executable() -> str | None:
        beside = Path(sys.executable).parent / "py-spy"
        return str(beside) if beside.exists() else shutil.which("py-spy")

    @classmethod
    def available(cls) -> bool:
        return cls.executable() is not None

    def __init__(self, pid: int, output: Path) -> None:
        self.output = output
        argv = [self.executable() or "py-spy", "record", "--pid", str(pid), "--gil", "--nonblocking",
                "--rate", str(self.RATE), "--format", "raw", "--output", str(output)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def summarize(self, requests: int, chunks: int = 0) -> None:
        if not self.output.exists():
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            print(f"py-spy wrote no profile to {self.output}: {err.strip()[-500:]}", file=sys.stderr)
            return
        text = summarize(self.output, requests, self.RATE, chunks=chunks)
        self.output.with_suffix(".md").write_text(text + "\n")
        print(f"profile: {self.output.with_suffix('.md')}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="py-spy --format raw output")
    parser.add_argument("--requests", type=float, required=True, help="requests served while sampling")
    parser.add_argument("--rate", type=float, default=500, help="py-spy --rate used")
    parser.add_argument("--chunks", type=float, default=0, help="stream chunks relayed while sampling")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(summarize(args.raw, args.requests, args.rate, args.top, args.chunks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
