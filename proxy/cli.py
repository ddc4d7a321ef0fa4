"""``llm-proxy``: serve, check-config, demo, sync, status, pull. Options flow into one Config object."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from . import __version__
from .config import TASK_TYPES, Config, ConfigError, load_config


def _load(path: str, host: str | None = None, port: int | None = None) -> Config:
    config = load_config(path)
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, **overrides))
    return config


def routing_table(config: Config) -> str:
    lines = ["backends:"]
    width = max((len(b.name) for b in config.backends), default=0)
    for b in config.backends:
        limit = f" max_concurrent={b.max_concurrent}" if b.max_concurrent else ""
        key = " api_key=set" if b.api_key else ""
        lines.append(f"  {b.name:<{width}}  {b.kind:<6}  {b.url}  weight={b.weight:g}{limit}{key}")
    if not config.backends:
        lines.append("  (none: every request will fail until a backend is configured)")
    lines.append("models:")
    width = max((len(m.name) for m in config.models), default=0)
    for m in config.models:
        where = ", ".join(m.backends) if m.backends else "any backend that serves it"
        extra = f"  capabilities={','.join(m.capabilities)}" if m.capabilities else ""
        extra += f"  fallback={','.join(m.fallback)}" if m.fallback else ""
        lines.append(f"  {m.name:<{width}}  -> {m.target}  @ {where}{extra}")
    lines.append("  (any other model a backend serves is routable under its own name)")
    routing = config.routing
    if routing.routers:
        lines.append(f"task routing ({', '.join(routing.routers)}):")
        tasks = {t: config.task_capability(t) for t in sorted({*TASK_TYPES, *routing.task_types})}
        for task, capability in tasks.items():
            ranked = [m.name for m in sorted(
                (m for m in config.models if capability in m.capabilities),
                key=lambda m: (m.capabilities.index(capability), m.preference))]  # fmt: skip
            general = routing.default_model not in ranked and capability != "embedding"
            chain = " > ".join(ranked + ([routing.default_model] if general and routing.default_model else []))
            lines.append(f"  {task} -> {capability}: {chain or '(no model; set routing.default_model)'}")
    server = config.server
    lines.append(
        f"server: http://{server.host}:{server.port}  api_keys={len(server.api_keys)}"
        f"  admin_keys={len(server.admin_keys)}  max_body_bytes={server.max_body_bytes}"
    )
    t = config.timeouts
    lines.append(f"timeouts: connect={t.connect:g}s first_byte={t.first_byte:g}s idle={t.idle:g}s")
    return "\n".join(lines)


def _configure_logging(level: str) -> None:
    from .server import configure_logging

    configure_logging(level)  # the same format uvicorn's workers get (proxy/server.py)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import BindError, bind_socket, run

    config = _load(args.config, args.host, args.port)
    try:
        # First of all: a port in use fails now, not after migrations and the first health round.
        sock = bind_socket(config.server.host, config.server.port)
    except BindError as exc:
        print(f"llm-proxy: {exc}", file=sys.stderr)
        return 1
    _configure_logging(args.log_level)
    logs = {"log_level": args.log_level, "access_log": args.access_log}
    if args.workers > 1:
        # Each worker process builds its own app from the same file.
        os.environ["LLM_PROXY_CONFIG"] = os.path.abspath(args.config)
        if config.metrics.enabled:
            _multiprocess_metrics()
        run("proxy.app:app_from_env", config, sock, workers=args.workers, **logs)
        return 0
    from .app import create_app

    return 0 if run(create_app(config), config, sock, **logs) else 1


def _multiprocess_metrics() -> None:
    """Give the workers one fresh directory to pool their metrics in (prometheus-client multiprocess mode).

    It must be set before any worker imports prometheus_client, and start without
    the value files of a previous run, which would be counted again.
    """
    import glob
    import tempfile

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llm-proxy-metrics-")


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(f"{args.config}: OK")
    print(routing_table(config))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    import asyncio

    from .operations.cli_sync import run_sync

    config = _load(args.config)
    _configure_logging(args.log_level)
    return asyncio.run(run_sync(config, dry_run=args.dry_run, skip_existing=args.skip_existing,
                                no_download=args.no_download, manifest_path=args.manifest, out=sys.stdout))  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _configure_logging(args.log_level)
    return run_demo(host=args.host, port=args.port, log_level=args.log_level)


def cmd_status(args: argparse.Namespace) -> int:
    from .cli_admin import AdminUnavailable, status

    try:
        return status(args.url, sys.stdout)
    except AdminUnavailable as exc:
        print(f"llm-proxy status: {exc}", file=sys.stderr)
        return 1


def cmd_pull(args: argparse.Namespace) -> int:
    from .cli_admin import AdminUnavailable, pull

    try:
        return pull(args.url, args.model, args.nodes, force=args.force, out=sys.stdout)
    except AdminUnavailable as exc:
        print(f"llm-proxy pull: {exc}", file=sys.stderr)
        return 1


DEFAULT_MODELS_DIR = "/var/lib/llm-proxy-node/models"


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def cmd_node(args: argparse.Namespace) -> int:
    import shlex

    from .node.config import load_node_config

    config = load_node_config(args.config)
    if args.node_command == "report":
        from .node.report import report

        sys.stdout.write(report(args.models_dir, config))
        return 0
    missing = [o for o, v in (("--proxy", args.proxy), ("--name", args.name), ("--runtime", args.runtime),
                              ("--runtime-url", args.runtime_url)) if not v]  # fmt: skip
    if missing:
        print(f"llm-proxy node: {', '.join(missing)} required (or: llm-proxy node report)", file=sys.stderr)
        return 2
    if args.run and args.systemd_unit:
        print("llm-proxy node: give --run or --systemd-unit, not both", file=sys.stderr)
        return 2
    from .config import NODE_NAME
    from .node.agent import AgentSettings, serve

    if not NODE_NAME.fullmatch(args.name):
        print(f"llm-proxy node: --name {args.name!r}: letters, digits, '.', '_' or '-' only", file=sys.stderr)
        return 2
    _configure_logging(args.log_level)
    settings = AgentSettings(name=args.name, runtime=args.runtime, runtime_url=args.runtime_url,
                             proxy_url=args.proxy, models_dir=os.path.abspath(args.models_dir),
                             run=shlex.split(args.run) if args.run else [], systemd_unit=args.systemd_unit,
                             log_path=args.log_file or "")  # fmt: skip
    host, port = args.listen
    return serve(settings, config, host, port, advertise=args.advertise)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description="OpenAI-compatible gateway for Ollama and vLLM.")
    parser.add_argument("--version", action="version", version=f"llm-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, help="path to the YAML configuration")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--access-log", action="store_true", help="log every request line (off: it costs latency)")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a configuration and print the routing table")
    check.add_argument("--config", required=True)
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser("demo", help="run the proxy in front of built-in simulated Ollama and vLLM backends")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    demo.set_defaults(func=cmd_demo)

    sync = sub.add_parser("sync", help="pull the configured baseline and fallback models onto every node, write a manifest",
                          description="Talks to the nodes directly (no running proxy needed). See docs/deployment.md.")  # fmt: skip
    sync.add_argument("--config", required=True)
    sync.add_argument("--dry-run", action="store_true", help="print the plan, pull nothing, write nothing")
    sync.add_argument("--skip-existing", action="store_true", help="do not pull installed models again for updates")
    sync.add_argument("--no-download", action="store_true", help="only collect what is installed, for the manifest")
    sync.add_argument("--manifest", help="where to write the manifest (default: distribution.manifest_path)")
    sync.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sync.set_defaults(func=cmd_sync)

    admin_url = "the proxy's address (default http://127.0.0.1:8080); the admin key, if any, from LLM_PROXY_ADMIN_KEY"
    status = sub.add_parser("status", help="print a running proxy's fleet: nodes, states, models, running operations")
    status.add_argument("--url", default="http://127.0.0.1:8080", help=admin_url)
    status.set_defaults(func=cmd_status)

    pull = sub.add_parser("pull", help="pull a model onto nodes through a running proxy, with progress per node")
    pull.add_argument("model")
    pull.add_argument("--nodes", default="all", help='"all" (default), "auto" (by GPU tier) or names: a,b')
    pull.add_argument("--force", action="store_true", help="pull again even when installed (updates)")
    pull.add_argument("--url", default="http://127.0.0.1:8080", help=admin_url)
    pull.set_defaults(func=cmd_pull)

    node = sub.add_parser("node", help="run the node agent beside a runtime (or: node report)",
                          description="The node agent: registers with the proxy, reports hardware and runtime health, "
                                      "supervises the runtime, downloads Hugging Face models. See docs/deployment.md.")  # fmt: skip
    node.add_argument("--proxy", help="the proxy's URL; the admin key comes from LLM_PROXY_ADMIN_KEY")
    node.add_argument("--name", help="the node's name at the proxy")
    node.add_argument("--runtime", choices=["ollama", "vllm"])
    node.add_argument("--runtime-url", help="where the runtime's API answers, e.g. http://127.0.0.1:8000")
    node.add_argument(
        "--listen",
        type=_listen,
        default=("0.0.0.0", 8090),
        metavar="HOST:PORT",
        help="the agent's own address (default 0.0.0.0:8090; port 0 picks a free one)",
    )
    node.add_argument("--advertise", help="the URL the proxy should use for the agent (default: from --listen)")
    node.add_argument(
        "--models-dir",
        default=DEFAULT_MODELS_DIR,
        help=f"the Hugging Face cache the agent fills (default {DEFAULT_MODELS_DIR})",
    )
    node.add_argument("--run", help="the runtime's command line, supervised as the agent's child")
    node.add_argument("--systemd-unit", help="drive this systemd unit instead (start, restart, status)")
    node.add_argument("--log-file", help="the runtime's output with --run (default MODELS_DIR/runtime.log)")
    node.add_argument("--config", help="optional YAML: thresholds, disk limits, HF token variable")
    node.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    node_sub = node.add_subparsers(dest="node_command")
    report = node_sub.add_parser("report", help="print this machine's Markdown hardware check report")
    report.add_argument("--models-dir", default=argparse.SUPPRESS, help="where the manifest is")
    report.add_argument("--config", default=argparse.SUPPRESS, help="thresholds and limits to report")
    node.set_defaults(func=cmd_node)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"{exc.source}: invalid configuration", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
