"""Pull progress from Ollama status lines (pure), against recorded and hand-made line fixtures.

tests/fixtures/pull/: ``sim_*`` were recorded from the simulated Ollama node with their
timestamps; ``ollama_interleaved`` is assembled in the real server's format (interleaved
layers, an explicit ``completed: 0``, ``removing unused layers``); ``layer_restart`` has a
layer that starts again lower.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from proxy.operations.progress import SPEED_WINDOW, PullProgress
from proxy.operations.window import seconds_until_open

FIXTURES = Path(__file__).parent / "fixtures" / "pull"
ALL = sorted(p.stem for p in FIXTURES.glob("*.json"))


def load(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def replay(data: dict, progress: PullProgress | None = None, gap: float = 1.0) -> tuple[PullProgress, list[dict]]:
    """Feed every attempt's lines (attempts one after the other, ``gap`` seconds apart); return the snapshots."""
    progress = progress or PullProgress()
    snapshots = []
    offset = 0.0
    for attempt in data["attempts"]:
        progress.new_attempt()
        for entry in attempt:
            if "error" in entry["line"]:
                continue  # the adapter raises on it; progress never sees it
            now = offset + entry["t"]
            progress.feed(entry["line"], now)
            snapshots.append(progress.snapshot(now))
        offset += attempt[-1]["t"] + gap
    return progress, snapshots


@pytest.mark.parametrize("name", ALL)
def test_progress_never_goes_backwards_and_ends_at_the_model_size(name):
    data = load(name)
    progress, snapshots = replay(data)
    for before, after in zip(snapshots, snapshots[1:]):
        assert after["completed"] >= before["completed"]
        assert after["fraction"] >= before["fraction"]
        assert after["total"] >= before["total"]
    assert all(s["completed"] <= s["total"] for s in snapshots)
    assert all(s["fraction"] < 1.0 for s in snapshots if s["status"] != "success")
    assert progress.done
    assert snapshots[-1]["completed"] == snapshots[-1]["total"] == data["size"]
    assert snapshots[-1]["fraction"] == 1.0
    assert snapshots[-1]["status"] == "success"


def test_status_text_changes_are_reported():
    progress = PullProgress()
    data = load("ollama_interleaved")
    changes = [e["line"]["status"] for e in data["attempts"][0] if progress.feed(e["line"], e["t"])]
    assert changes[0] == "pulling manifest"
    assert changes[-4:] == ["verifying sha256 digest", "writing manifest", "removing unused layers", "success"]
    # The interleaved small layers make the text flip back and forth; each flip is a change.
    assert changes.count("pulling dde5aa3fc5ff") > 1


def test_speed_and_eta_follow_the_download_rate():
    data = load("ollama_interleaved")
    rate = data["rate"]
    progress = PullProgress()
    checked = 0
    for entry in data["attempts"][0]:
        progress.feed(entry["line"], entry["t"])
        now = entry["t"]
        if now > SPEED_WINDOW + 1 and not progress.done and progress.completed < progress.total:
            assert progress.speed(now) == pytest.approx(rate, rel=0.05)
            left = progress.total - progress.completed
            assert progress.eta(now) == pytest.approx(left / rate, rel=0.05)
            checked += 1
    assert checked > 10


def test_speed_decays_while_nothing_arrives():
    data = load("ollama_interleaved")
    progress = PullProgress()
    for entry in data["attempts"][0][:40]:
        progress.feed(entry["line"], entry["t"])
    last = data["attempts"][0][39]["t"]
    moving = progress.speed(last)
    assert moving and moving > 0
    assert 0 < progress.speed(last + SPEED_WINDOW / 2) < moving
    assert progress.speed(last + SPEED_WINDOW + 0.1) == 0
    assert progress.eta(last + SPEED_WINDOW + 0.1) is None  # no speed, no ETA


def test_a_resumed_pull_does_not_count_the_bytes_on_disk_as_speed():
    data = load("sim_failed_then_resumed")
    first, second = data["attempts"]
    progress = PullProgress()
    for entry in first:
        if "line" in entry and "error" not in entry["line"]:
            progress.feed(entry["line"], entry["t"])
    reached = progress.completed
    assert 0 < reached < data["size"]
    progress.new_attempt()
    start = 100.0  # the retry comes much later
    progress.feed(second[0]["line"], start)
    progress.feed(second[1]["line"], start)  # the weights layer, at the offset on disk
    assert progress.completed == reached  # picks up where it was, no jump back or forward
    assert progress.speed(start + 0.1) == 0  # half the model "arrived" in no time, but it was already there
    speeds = []
    for entry in second[2:]:
        progress.feed(entry["line"], start + entry["t"])
        speeds.append(progress.speed(start + entry["t"]) or 0)
    # Only what the second request fetched counts: never more than the simulated 3 GB/s (plus jitter).
    assert 0 < max(speeds) <= 3.3e9
    assert progress.completed == data["size"]


def test_a_layer_that_restarts_lower_keeps_the_highest_count_but_counts_the_refetch_as_speed():
    data = load("layer_restart")
    progress = PullProgress()
    seen = []
    for entry in data["attempts"][0]:
        progress.feed(entry["line"], entry["t"])
        seen.append(progress.completed)
    assert seen == sorted(seen)
    assert progress._transferred == data["fetched"]


def test_the_floor_from_an_earlier_run_holds():
    # After a restart the operation resumes with what it had shown; a pull that reports less
    # (the node lost its partial blobs) must not make the numbers go back.
    progress = PullProgress(completed=900, total=1024, fraction=0.8)
    progress.feed({"status": "pulling abababababab", "digest": "sha256:" + "ab" * 32, "total": 1000}, 0.0)
    assert progress.completed == 900
    assert progress.fraction == pytest.approx(900 / 1024)
    progress.feed({"status": "pulling abababababab", "digest": "sha256:" + "ab" * 32, "total": 1000,
                   "completed": 950}, 1.0)  # fmt: skip
    assert progress.completed == 950
    assert progress.fraction == pytest.approx(950 / 1024)


def test_a_line_without_numbers_changes_only_the_text():
    progress = PullProgress()
    progress.feed({"status": "pulling manifest"}, 0.0)
    assert progress.snapshot(0.0) == {"status": "pulling manifest", "completed": 0, "total": 0, "fraction": 0.0,
                                      "speed": None, "eta_seconds": None}  # fmt: skip


@pytest.mark.parametrize(
    ("window", "now", "expected"),
    [
        ("", "12:00", 0),
        ("01:00-05:00", "02:30", 0),
        ("01:00-05:00", "05:00", 20 * 3600),
        ("01:00-05:00", "00:30", 30 * 60),
        ("22:00-06:00", "23:59", 0),
        ("22:00-06:00", "03:00", 0),
        ("22:00-06:00", "12:00", 10 * 3600),
        ("08:00-08:00", "12:00", 0),
    ],
)
def test_pull_window(window, now, expected):
    hour, minute = map(int, now.split(":"))
    assert seconds_until_open(window, datetime(2025, 7, 7, hour, minute)) == expected
