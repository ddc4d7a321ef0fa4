"""Five-field cron expressions (``minute hour day-of-month month day-of-week``), parsed and matched. Pure.

Each field is ``*``, a number, a range ``a-b``, a step ``*/n`` or ``a-b/n``, or a
comma-separated list of those; day-of-week runs 0-6 from Sunday (7 is Sunday
too). As in cron, when both day fields are restricted a day matching either
one matches. Times are local, like ``pulls.window``. Names (``MON``, ``JAN``)
and the ``@daily`` shorthands are not supported: the five numbers say it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


class CronError(ValueError):
    pass


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if body == "*":
                start, end = low, high
            elif "-" in body:
                a, b = body.split("-", 1)
                start, end = int(a), int(b)
            else:
                start = end = int(body)
                if step_text:
                    end = high  # "5/15": from 5, every 15
        except ValueError:
            raise CronError(f"{name}: {part!r} is not a number, range or step") from None
        if step < 1:
            raise CronError(f"{name}: the step in {part!r} must be at least 1")
        if not (low <= start <= high and low <= end <= high) or start > end:
            raise CronError(f"{name}: {part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, text: str) -> Cron:
        parts = text.split()
        if len(parts) != 5:
            raise CronError(f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}")
        fields = [_field(p, *spec) for p, spec in zip(parts, _FIELDS)]
        weekdays = frozenset(d % 7 for d in fields[4])
        return cls(fields[0], fields[1], fields[2], fields[3], weekdays, parts[2] == "*", parts[4] == "*")

    def matches(self, at: datetime) -> bool:
        if at.minute not in self.minutes or at.hour not in self.hours or at.month not in self.months:
            return False
        day = at.day in self.days
        weekday = (at.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return day and weekday
        return day or weekday

    def times_of_day(self) -> list[int]:
        """Minutes after midnight at which it may fire."""
        return sorted(h * 60 + m for h in self.hours for m in self.minutes)
