"""``llm-proxy node report``: this machine's hardware check report, as Markdown, without a proxy.

The figures are the agent's (:func:`proxy.node.hardware.collect`), the alerts
use the configured thresholds, and the installed models come from the
manifest in ``--models-dir``. Operators attach it to an acceptance.
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime

from . import hardware
from .config import NodeConfig
from .huggingface import HubClient


def _gb(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _cell(value: object) -> str:
    # A value is text in a table cell: a "|" or a newline would break the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(hw: dict, config: NodeConfig, models: list[dict], *, host: str, when: datetime,
           runtime: dict | None = None) -> str:  # fmt: skip
    """Pure: the report for these figures."""
    t = config.thresholds
    lines = [f"# Hardware check report: {_cell(host)}", "", f"Generated {when.isoformat(timespec='seconds')}", ""]
    lines += ["## Host", "", "| item | value |", "|---|---|",
              f"| CPUs | {hw['cpu_count']} |", f"| load (1 min) | {hw['load_1m']:.2f} |",
              f"| RAM | {_gb(hw['memory_used_bytes'])} used of {_gb(hw['memory_total_bytes'])} |", ""]  # fmt: skip
    lines += ["## GPUs", ""]
    if hw["gpus"]:
        lines += ["| # | name | memory used | memory total | utilisation |", "|---|---|---|---|---|"]
        for i, g in enumerate(hw["gpus"]):
            util = "n/a" if g["utilization"] is None else f"{g['utilization']:g}%"
            lines.append(f"| {i} | {_cell(g['name'])} | {_gb(g['memory_used_bytes'])} | "
                         f"{_gb(g['memory_total_bytes'])} | {util} |")  # fmt: skip
    else:
        lines.append(_cell(hw.get("gpu_note") or "no GPU"))
    lines += ["", "## Disks", "", "| path | free | total |", "|---|---|---|"]
    lines += [f"| {_cell(d['path'])} | {_gb(d['free_bytes'])} | {_gb(d['total_bytes'])} |" for d in hw["disks"]]
    if runtime is not None:
        lines += ["", "## Runtime", "", "| item | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(runtime.get(k))} |" for k in ("kind", "version", "state", "pid", "memory_bytes",
                                                                  "uptime_seconds", "restarts")]  # fmt: skip
    d = config.disk
    lines += ["", "## Thresholds and limits", "", "| setting | value |", "|---|---|",
              f"| RAM alert above | {t.memory_percent:g}% |", f"| VRAM alert above | {t.gpu_memory_percent:g}% |",
              f"| disk alert above | {t.disk_percent:g}% |",
              f"| max_disk_gb | {d.max_disk_gb:g} GB |" if d.max_disk_gb else "| max_disk_gb | no limit |",
              f"| min_free_gb | {d.min_free_gb:g} GB |", f"| confirm_above_gb | {d.confirm_above_gb:g} GB |"]  # fmt: skip
    found = hardware.alerts(hw, t, runtime)
    lines += ["", "## Alerts", ""]
    lines += [f"- **{a['kind']}**: {_cell(a['message'])}" for a in found] or ["None."]
    lines += ["", "## Installed models", ""]
    if models:
        lines += ["| model | revision | commit | size | files | installed |", "|---|---|---|---|---|---|"]
        for m in models:
            lines.append(f"| {_cell(m['model'])} | {_cell(m['revision'])} | {_cell(m['commit'][:12])} | "
                         f"{_gb(m['size'])} | {len(m['files'])} | {_cell(m['installed_at'])} |")  # fmt: skip
    else:
        lines.append("None recorded in the manifest.")
    return "\n".join(lines) + "\n"


def report(models_dir: str, config: NodeConfig) -> str:
    os.makedirs(models_dir, exist_ok=True)
    hw = hardware.collect([models_dir])
    return render(hw, config, HubClient(models_dir).manifest(), host=platform.node(), when=datetime.now(UTC))
