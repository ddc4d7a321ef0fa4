"""The proxy's cost per request in instructions, counted by valgrind: a number a busy machine cannot move.

    python -m loadtest.cost                          # chat, features as shipped, 300 requests
    python -m loadtest.cost --kind stream --features off --requests 200
    python -m loadtest.cost --kind stream --tokens 50 --paced 100  # one chunk per read, as at 2 tokens/s

CPU time per request, read from ``/proc``, is the benchmark's figure, but on a 2-core machine
shared with other work it moves by 10-30% between identical runs (caches, frequency, the other
tenants' wake-ups). To compare two versions of the proxy change by change, this runs the proxy
under ``valgrind --tool=callgrind`` with instrumentation off during start-up and warm-up, turns
it on for a fixed number of sequential requests (``callgrind_control -i on``), dumps, and divides
the instructions executed (all threads: the SQLite writer included) by the requests. It is slow
(valgrind runs the proxy about 50 times slower), so the figure is instructions, never time; the
profile it leaves (``--keep``) opens in ``callgrind_annotate`` or KCachegrind, with Python's C
functions (``_PyEval_EvalFrameDefault``, ``PyObject_Call``...) rather than Python frames.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import yaml

from .procs import RunError, Service, Sim, free_port, proxy_config
from .scenarios import reply_of

_ONLY = {"history": {"history": {"enabled": True}}, "metrics": {"metrics": {"enabled": True}},
         "cache": {"cache": {"mode": "always"}}}  # fmt: skip


class CountedProxy(Service):
    """The proxy under callgrind, counting nothing until :meth:`count` is entered."""

    def __init__(self, sim: Sim, workdir: Path, features: str) -> None:
        port = free_port()
        config_path = workdir / "proxy.yaml"
        if features in _ONLY:  # everything off but one feature, to tell their costs apart
            config = proxy_config(sim, port, workdir / "proxy.db", "off") | _ONLY[features]
        else:
            config = proxy_config(sim, port, workdir / "proxy.db", features)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.out = workdir / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={self.out}",
                sys.executable, "-m", "proxy", "serve", "--config", str(config_path), "--log-level", "warning"]  # fmt: skip
        super().__init__("proxy under callgrind", argv, workdir / "proxy.log")
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        try:
            self.wait_ready(f"{self.url}/ready", timeout=300)
        except BaseException:
            self.stop()
            raise

    def control(self, *args: str) -> None:
        done = subprocess.run(["callgrind_control", *args, str(self.pid)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RunError(f"callgrind_control {' '.join(args)} failed: {done.stdout}{done.stderr}")

    def instructions(self) -> int:
        """Instructions counted in the dumps so far (every thread's file)."""
        total = 0
        for path in self.out.parent.glob(self.out.name + "*"):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("summary:") or line.startswith("totals:"):
                    total += int(line.split()[1])
                    break
        return total


def _requests(port: int, model: str, kind: str, count: int, start: int, tokens: int = 20) -> int:
    """``count`` sequential requests on one keep-alive connection; how many chunks streams carried."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    chunks = 0
    try:
        for i in range(start, start + count):
            body = {"model": model, "max_tokens": tokens + 16,
                    "messages": [{"role": "user", "content": f"Write two sentences about load testing. [{i}]"}]}  # fmt: skip
            if kind == "stream":
                body["stream"] = True
            conn.request("POST", "/v1/chat/completions", orjson.dumps(body), {"content-type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status != 200:
                raise RunError(f"request {i} answered {resp.status}: {raw[:300]!r}")
            chunks += raw.count(b"data: {")
    finally:
        conn.close()
    return chunks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=["chat", "stream"], default="chat")
    p.add_argument("--features", choices=["default", "off", "on", *_ONLY], default="default",
                   help="as shipped; all off; history + metrics + cache always (see loadtest/procs.py); "
                        "or only history, metrics or cache (always) on")  # fmt: skip
    p.add_argument("--backend", choices=["ollama", "vllm"], default="ollama")
    p.add_argument("--requests", type=int, default=300, help="requests counted")
    p.add_argument("--warmup", type=int, default=100, help="requests before counting starts")
    p.add_argument("--tokens", type=int, default=20, help="tokens per answer (two lengths: the slope is per chunk)")
    p.add_argument("--paced", type=float, default=0, metavar="TOKENS_PER_S",
                   help="the backend sends this many tokens a second (0: all at once), so each chunk arrives "
                        "in a read of its own as at 2 tokens/s; valgrind is slow, 100 keeps that true")  # fmt: skip
    p.add_argument("--idle", type=float, default=None, metavar="SECONDS",
                   help="first count the idle proxy this long and subtract its rate over the requests' time "
                        "(its timers: uvicorn's tick, probes); default 10 when --paced, whose slow requests "
                        "would otherwise carry ~1.4 M instructions a second of it, else 0")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the callgrind profile and logs; prints where")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("error: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-cost-"))
    services: list[Service] = []
    try:
        sim = Sim(args.backend, reply_of(args.tokens), workdir)
        services.append(sim)
        sim.behave(reply=reply_of(args.tokens), ttft=0, tokens_per_second=args.paced)
        proxy = CountedProxy(sim, workdir, args.features)
        services.append(proxy)
        _requests(proxy.port, sim.model, args.kind, args.warmup, 0, args.tokens)
        idle_seconds = args.idle if args.idle is not None else (10.0 if args.paced else 0.0)
        idle = idle_rate = 0.0
        if idle_seconds > 0:
            proxy.control("-i", "on")
            started = time.monotonic()
            time.sleep(idle_seconds)
            proxy.control("-d")
            idle = proxy.instructions()
            idle_rate = idle / (time.monotonic() - started)
        proxy.control("-i", "on")
        started = time.monotonic()
        chunks = _requests(proxy.port, sim.model, args.kind, args.requests, args.warmup, args.tokens)
        proxy.control("-d")
        elapsed = time.monotonic() - started
        proxy.control("-i", "off")
        total = proxy.instructions() - idle
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for service in reversed(services):
            service.stop()
        if args.keep:
            print(f"profile and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    per = (total - idle_rate * elapsed) / args.requests
    paced = f", paced {args.paced:g} tokens/s" if args.paced else ""
    line = (f"{args.kind}, features {args.features}, {args.backend}, {args.tokens} tokens{paced}: "
            f"{per / 1e6:.3f} M instructions per request")  # fmt: skip
    if chunks:
        line += f" ({chunks / args.requests:.0f} chunks each)"
    if idle_rate:
        line += f" (idle {idle_rate / 1e6:.2f} M/s subtracted: {idle_rate * elapsed / args.requests / 1e6:.3f} M each)"
    print(f"{line} ({args.requests} requests in {elapsed:.0f} s under valgrind)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
