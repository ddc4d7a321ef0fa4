"""The pull window: the local time of day when scheduled pulls may start (``pulls.window``).

``"01:00-05:00"`` opens at 01:00 and closes at 05:00; ``"22:00-06:00"`` wraps
midnight; an empty window is always open. A pull that started inside the window
runs to the end: the window only delays starting, it never cuts a download.
"""

from __future__ import annotations

from datetime import datetime, timedelta


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def seconds_until_open(window: str, now: datetime | None = None) -> float:
    """0 when a scheduled pull may start now, else the seconds until the window opens."""
    if not window:
        return 0.0
    now = now or datetime.now()
    start_text, end_text = window.split("-")
    start, end = _minutes(start_text), _minutes(end_text)
    if start == end:
        return 0.0
    minute = now.hour * 60 + now.minute
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if inside:
        return 0.0
    opening = now.replace(hour=start // 60, minute=start % 60, second=0, microsecond=0)
    if opening <= now:
        opening += timedelta(days=1)
    return (opening - now).total_seconds()
