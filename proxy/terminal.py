"""What the command line shows: the fleet as aligned tables, and pull progress one line per node.

Rendering only (rich does the drawing; no I/O beyond the output stream), shared
by ``llm-proxy status``, ``llm-proxy pull`` and ``llm-proxy sync``. On a terminal
the progress lines are redrawn in place; anywhere else (a pipe, a log file, cron)
each line is printed plainly, when an operation's state or status changes and
every few seconds while it runs, so a log shows the progress without escape codes.

Operations are given in their API dict form (``Operation.as_dict()``, what
``GET /admin/operations/{id}`` and its SSE events carry).
"""

from __future__ import annotations

import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Column, Table

ACTIVE = ("queued", "running")
PLAIN_EVERY = 5.0  # seconds between plain progress lines of an operation whose status did not change
_PLAIN_WIDTH = 200  # no wrapping when the output is not a terminal (its width is unknown)


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def transfer(op: dict, *, compact: bool = False) -> str:
    """Bytes, speed and ETA of an operation: ``1.2 GB of 4.9 GB  52.4 MB/s  ETA 71s`` (``1.2/4.9 GB ...`` compact)."""
    parts = []
    if op.get("total"):
        done, total = size(op.get("completed")), size(op["total"])
        if compact and done.rsplit(" ", 1)[-1] == total.rsplit(" ", 1)[-1]:
            parts.append(f"{done.rsplit(' ', 1)[0]}/{total}")
        else:
            parts.append(f"{done} of {total}")
    if op.get("speed"):
        parts.append(f"{size(op['speed'])}/s")
    if op.get("eta_seconds") is not None and op.get("state") in ACTIVE:
        parts.append(f"ETA {duration(op['eta_seconds'])}")
    return "  ".join(parts)


def progress_line(op: dict) -> str:
    """One plain line: ``gpu-1  llama3.1:8b  running: pulling 8eeb52dfb3bb  24.5%  1.2 GB of ...``."""
    parts = [f"{op.get('node') or '-'}  {op['model']}  {op['state']}: {op['status']}"]
    if op.get("total"):
        parts.append(f"{op['fraction'] * 100:.1f}%")
    moved = transfer(op)
    if moved:
        parts.append(moved)
    if op.get("error"):
        parts.append(op["error"])
    return "  ".join(parts)


def console(out: TextIO, tty: bool | None = None) -> Console:
    tty = out.isatty() if tty is None else tty
    return Console(file=out, force_terminal=tty, width=None if tty else _PLAIN_WIDTH, highlight=False,
                   soft_wrap=not tty)  # fmt: skip


class PullProgress:
    """Progress of several operations (one per node), shown as they change.

    ``with PullProgress(sys.stdout) as view: view.update(op_dict)`` as often as
    snapshots arrive; on leaving, the TTY view stays on screen as its final state.
    """

    def __init__(self, out: TextIO, *, tty: bool | None = None, every: float = PLAIN_EVERY) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.every = every
        self.ops: dict[str, dict] = {}
        self._shown: dict[str, tuple[str, str, float]] = {}
        self._tasks: dict[str, TaskID] = {}
        self._progress: Progress | None = None
        if self.tty:
            # On a narrow terminal the detail is cut short, never the bar.
            self._progress = Progress(
                TextColumn("{task.fields[node]}", style="bold", table_column=Column(no_wrap=True)),
                TextColumn("{task.fields[model]}", table_column=Column(no_wrap=True)),
                BarColumn(bar_width=24, table_column=Column(min_width=24, no_wrap=True)),
                TextColumn("{task.percentage:>5.1f}%", table_column=Column(min_width=6, no_wrap=True)),
                TextColumn("{task.fields[detail]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
                console=console(out, True),
                refresh_per_second=8,
            )

    def __enter__(self) -> PullProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()

    def update(self, op: dict) -> None:
        self.ops[op["id"]] = op
        if self._progress is None:
            self._plain(op)
            return
        # Speed and ETA first: on a narrow terminal the status text is what gets cut.
        state = op["status"] if op["state"] in ACTIVE else op["state"]
        moved = transfer(op, compact=True)
        parts = (moved, state) if op["state"] == "running" and moved else (state, moved)
        detail = "  ".join(p for p in (*parts, op.get("error") or "") if p)
        fields = {"node": op.get("node") or "-", "model": op["model"], "detail": detail}
        # Left alone, rich would shrink every column to fit a long detail; the detail gives way instead.
        names = [(o.get("node") or "-", o["model"]) for o in self.ops.values()]
        fixed = max(len(n) for n, _ in names) + max(len(m) for _, m in names) + 24 + 6 + 4
        room = max(10, self._progress.console.width - fixed - 1)
        if len(detail) > room:
            fields["detail"] = detail[: room - 1] + "…"
        task = self._tasks.get(op["id"])
        if task is None:
            task = self._tasks[op["id"]] = self._progress.add_task("", total=100, **fields)
        self._progress.update(task, completed=round(op["fraction"] * 100, 1), **fields)

    def _plain(self, op: dict) -> None:
        now = time.monotonic()
        state, status, at = self._shown.get(op["id"], ("", "", 0.0))
        if (op["state"], op["status"]) != (state, status) or (op["state"] in ACTIVE and now - at >= self.every):
            self.out.write(progress_line(op) + "\n")
            self.out.flush()
            self._shown[op["id"]] = (op["state"], op["status"], now)

    @property
    def done(self) -> bool:
        return all(op["state"] not in ACTIVE for op in self.ops.values())


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def status_tables(nodes: list[dict], status: dict, operations: list[dict]) -> list:
    """The fleet as rich renderables: nodes, aliases (and mismatches), running operations."""
    health = {b["name"]: b for b in status.get("backends", [])}
    node_table = Table(title="Nodes", title_justify="left", expand=False)
    for heading, justify in (("node", "left"), ("kind", "left"), ("state", "left"), ("version", "left"),
                             ("gpu", "right"), ("in flight", "right"), ("queued", "right"), ("latency", "right"),
                             ("installed", "left"), ("loaded", "left")):  # fmt: skip
        node_table.add_column(heading, justify=justify)  # type: ignore[arg-type]
    for node in nodes:
        b = health.get(node["name"], {})
        state = "draining" if node.get("draining") else node["state"]
        gpu = "-" if node.get("gpu_memory_gb") is None else f"{node['gpu_memory_gb']:g} GB"
        node_table.add_row(node["name"], node["kind"], state, node.get("version") or "-", gpu, str(node["in_flight"]),
                           str(b.get("queue_depth", 0)), _ms(b.get("latency_ms")),
                           ", ".join(m["model"] for m in node.get("installed", [])) or "-",
                           ", ".join(m["model"] for m in node.get("loaded", [])) or "-")  # fmt: skip
    alias_table = Table(title="Aliases", title_justify="left")
    for heading in ("alias", "target", "state", "served by"):
        alias_table.add_column(heading)
    for alias in status.get("aliases", []):
        alias_table.add_row(alias["name"], alias["target"], alias["state"], ", ".join(alias["served_by"]) or "-")
    out: list = [node_table, alias_table]
    for m in status.get("alias_mismatches", []):
        instead = "; ".join(f"{n} serves {', '.join(ms) or 'nothing'}" for n, ms in m["served_instead"].items())
        out.append(f"alias {m['alias']} points to {m['target']}, which no reachable node serves ({instead})")
    ops_table = Table(title="Running operations", title_justify="left")
    for heading, justify in (("operation", "left"), ("kind", "left"), ("model", "left"), ("node", "left"),
                             ("state", "left"), ("progress", "right"), ("transfer", "left")):  # fmt: skip
        ops_table.add_column(heading, justify=justify)  # type: ignore[arg-type]
    for op in operations:
        ops_table.add_row(op["id"], op["kind"], op["model"], op.get("node") or "-", op["state"],
                          f"{op['fraction'] * 100:.1f}%", transfer(op) or op["status"])  # fmt: skip
    out.append(ops_table if operations else "no operations running")
    return out


def print_status(out: TextIO, nodes: list[dict], status: dict, operations: list[dict], *, tty: bool | None = None):
    view = console(out, tty)
    for renderable in status_tables(nodes, status, operations):
        view.print(renderable)
