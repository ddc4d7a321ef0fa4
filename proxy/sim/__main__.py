"""Run a simulated node in the foreground.

    python -m proxy.sim ollama --port 11434 --model llama3.1:8b --model nomic-embed-text
    python -m proxy.sim vllm --port 8000 --model Qwen/Qwen2.5-7B-Instruct --served-model-name qwen
    python -m proxy.sim switch --url http://127.0.0.1:8000 Qwen/Qwen3-8B --served-model-name qwen3 --downtime 2

It prints one line with its URL once it accepts connections and exits cleanly
on SIGINT or SIGTERM, so a supervisor (systemd, an activate_command) can
start, stop and restart it like a real node. ``switch`` asks a running vLLM
sim to restart onto another model and exits at once (see :mod:`.vllm_restart`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .behavior import Behavior
from .ollama import SimOllama, guess_spec
from .vllm import SimVLLM
from .vllm_restart import add_switch_parser, switch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m proxy.sim", description="Run a simulated Ollama or vLLM node.")
    kinds = parser.add_subparsers(dest="kind", required=True)

    def common(sub: argparse.ArgumentParser, port: int) -> None:
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, default=port, help=f"0 picks a free port (default {port})")
        sub.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
        sub.add_argument("--tps", type=float, default=0.0, help="tokens per second; 0 means no delay")
        sub.add_argument("--reply", default=None, help="canned reply text (default: echo the prompt)")
        sub.add_argument("--version", dest="server_version", default=None, help="version the node reports")

    ollama = kinds.add_parser("ollama", help="Ollama native API (/api/*)")
    common(ollama, 11434)
    ollama.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME",
        help="installed model; repeat for several (default: a small built-in set)",
    )
    ollama.add_argument("--num-ctx", type=int, default=4096, help="window of requests without options.num_ctx")

    vllm = kinds.add_parser("vllm", help="vLLM OpenAI-compatible server (/v1/*)")
    common(vllm, 8000)
    vllm.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct")
    vllm.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME")
    vllm.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"))
    vllm.add_argument("--no-system-role", action="store_true", help="reject system messages (Gemma-style template)")
    vllm.add_argument("--max-model-len", type=int, default=32768)
    vllm.add_argument("--embedding", action="store_true", help="serve an embedding model instead of a chat model")
    vllm.add_argument("--no-stream-usage", action="store_true", help="no usage chunk in streams (like llama.cpp)")
    vllm.add_argument("--max-num-seqs", type=int, default=256, help="running requests before more wait (/metrics)")
    add_switch_parser(kinds)
    return parser


def build(args: argparse.Namespace) -> SimOllama | SimVLLM:
    behavior = Behavior(reply=args.reply, ttft=args.ttft, tokens_per_second=args.tps)
    version = {"version": args.server_version} if args.server_version else {}
    if args.kind == "ollama":
        models = [guess_spec(name) for name in args.model] or None
        return SimOllama(models=models, behavior=behavior, host=args.host, port=args.port, num_ctx=args.num_ctx,
                         **version)  # fmt: skip
    return SimVLLM(
        model=args.model,
        served_model_names=args.served_model_name,
        behavior=behavior,
        api_key=args.api_key,
        supports_system_role=not args.no_system_role,
        max_model_len=args.max_model_len,
        embedding=args.embedding,
        stream_usage=not args.no_stream_usage,
        max_num_seqs=args.max_num_seqs,
        host=args.host,
        port=args.port,
        **version,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.kind == "switch":
        return switch(args)
    try:
        sim = build(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        sim.start()
    except (OSError, RuntimeError) as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.kind} sim listening on {sim.url}", flush=True)
    while not stopping.wait(0.5):  # a timed wait keeps signal delivery prompt on every platform
        pass
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
