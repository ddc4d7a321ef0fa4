"""The latency-parity runner (loadtest/parity.py) at its shortest, so it cannot rot.

It starts the simulated backend, the proxy and the load generator as real processes on
loopback, exactly as the full benchmark does, and checks that the report holds sane numbers.
It asserts no timing target: a busy CI machine must not fail the suite (``--report-only``).
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.scenarios import SCENARIOS, Limits, checks_for
from loadtest.stats import Summary

ROOT = Path(__file__).resolve().parent.parent


def run_parity(out_dir: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "loadtest.parity", "--quick", "--duration", "0.6", "--warmup", "0.2",
            "--report-only", "--out-dir", str(out_dir), *args]  # fmt: skip
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def pooled_rows(out_dir: Path) -> dict[tuple[str, str], dict[str, str]]:
    with (out_dir / "latency-parity.csv").open() as fh:
        return {(r["scenario"], r["leg"]): r for r in csv.DictReader(fh) if r["round"] == "all"}


def assert_sane(row: dict[str, str]) -> None:
    assert int(row["requests"]) > 0, row
    assert int(row["failures"]) == 0, row
    p50, p95, p99 = (float(row[k]) for k in ("p50_ms", "p95_ms", "p99_ms"))
    assert 0 < p50 <= p95 <= p99 < 5000, row
    assert float(row["rps"]) > 0, row


def test_runner_reports_both_paths_with_the_asyncio_client(tmp_path):
    # The asyncio client needs only the proxy's own dependencies, so this runs where Locust is absent.
    run_parity(tmp_path, "--client", "asyncio", "--scenario", "latency,streaming")
    rows = pooled_rows(tmp_path)
    for scenario in ("latency", "streaming"):
        for leg in ("direct", "proxy"):
            assert_sane(rows[scenario, leg])
        proxy = rows[scenario, "proxy"]
        assert float(proxy["proxy_cpu_s"]) > 0 and 10 < float(proxy["proxy_peak_rss_mb"]) < 2000
        assert rows[scenario, "direct"]["proxy_cpu_s"] == ""  # nothing of the proxy's is charged to direct
        assert (scenario, "proxy - direct") in rows and (scenario, "proxy / direct") in rows
    for leg in ("direct", "proxy"):
        row = rows["streaming", leg]
        # every stream delivered its 20 tokens; a stream straddling either edge of the recording
        # window counts in one figure and not the other, hence the slack of two streams
        assert abs(int(row["chunks"]) - 20 * int(row["requests"])) <= 40
        assert 0 < float(row["ttft_p50_ms"]) <= float(row["p50_ms"])

    page = (tmp_path / "latency-parity.md").read_text()
    assert "`python -m loadtest.parity --quick" in page
    assert "| latency | added latency p50 | <= 0.4 ms |" in page
    assert "| latency | proxy CPU per request | <= 350 us |" in page
    assert "### streaming" in page and "| proxy − direct |" in page


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="Locust is in the 'load' extra")
def test_runner_drives_the_locustfile(tmp_path):
    run_parity(tmp_path, "--client", "locust", "--scenario", "latency")
    rows = pooled_rows(tmp_path)
    assert_sane(rows["latency", "direct"])
    assert_sane(rows["latency", "proxy"])


def _summary(leg: str, p50: float, p99: float, cpu_us: float = 300.0) -> Summary:
    return Summary(leg=leg, requests=100, p50_ms=p50, p95_ms=p99, p99_ms=p99, proxy_cpu_us_per_req=cpu_us)


def test_checks_fail_over_a_target_and_on_failed_requests():
    latency = SCENARIOS["latency"]
    within = checks_for(latency, {"direct": _summary("direct", 0.4, 0.6), "proxy": _summary("proxy", 0.7, 1.8)},
                        Limits())  # fmt: skip
    assert [c.ok for c in within] == [True, True, True]
    over = checks_for(latency, {"direct": _summary("direct", 0.4, 0.6), "proxy": _summary("proxy", 0.9, 1.8, 400)},
                      Limits())  # fmt: skip
    assert [c.ok for c in over] == [False, True, False]
    failing = _summary("proxy", 0.5, 0.5)
    failing.failures = 3
    assert not all(c.ok for c in checks_for(latency, {"direct": _summary("direct", 0.4, 0.6), "proxy": failing},
                                            Limits()))  # fmt: skip
    realistic = SCENARIOS["realistic"]
    ratio = checks_for(realistic, {"direct": _summary("direct", 200, 220), "proxy": _summary("proxy", 215, 250)},
                       Limits(pct=10))  # fmt: skip
    assert [c.ok for c in ratio] == [True, False]


def test_checks_of_the_issue_15_scenarios():
    workers = SCENARIOS["workers"]
    one, two = _summary("1 worker", 10, 20), _summary("2 workers", 10, 20)
    one.rps, two.rps = 1000.0, 1800.0
    assert [c.ok for c in checks_for(workers, {"1 worker": one, "2 workers": two}, Limits())] == [True]
    two.rps = 1500.0
    assert [c.ok for c in checks_for(workers, {"1 worker": one, "2 workers": two}, Limits())] == [False]
    streams = SCENARIOS["10k-streams"]
    few, many = _summary("proxy@1000", 1, 1), _summary("proxy", 1, 1)
    few.users, many.users, few.peak_open_streams, many.peak_open_streams = 1000, 10_000, 1000, 10_000
    many.proxy_peak_rss_mb = 700.0
    assert [c.ok for c in checks_for(streams, {"proxy@1000": few, "proxy": many}, Limits())] == [True, True]
    many.peak_open_streams, many.proxy_peak_rss_mb = 9000, 1100.0
    assert [c.ok for c in checks_for(streams, {"proxy@1000": few, "proxy": many}, Limits())] == [False, False]


def test_report_embeds_the_profile_split_of_each_proxy_path(tmp_path):
    from loadtest.profile import summarize
    from loadtest.report import ScenarioResult, profile_section

    # py-spy's raw format: one collapsed stack per line (root first), then its sample count.
    raw = tmp_path / "latency-proxy-r1.txt"
    raw.write_text("main (proxy/cli.py:1);serve (uvicorn/server.py:2) 30\n"
                   "main (proxy/cli.py:1);relay (proxy/gateway.py:3) 70\n")  # fmt: skip
    raw.with_suffix(".md").write_text(summarize(raw, requests=100, rate=500) + "\n")
    result = ScenarioResult(SCENARIOS["latency"], {}, [], [], [])
    text = "\n".join(profile_section([result], tmp_path))
    assert "### latency, proxy" in text and "### latency, direct" not in text
    assert "100 samples = 0.20 s holding the GIL over 100 requests = 2000 us per request." in text
    assert "| llm-proxy's own code | 1400 | 70% |" in text
    assert "| uvicorn: parsing requests, writing responses | 600 | 30% |" in text
    assert "Top 15 functions" not in text  # the split only; the full summary stays beside the raw file
