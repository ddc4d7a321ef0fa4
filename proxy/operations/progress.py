"""Progress of one pull, from Ollama's status lines. Pure: the caller passes the time.

Ollama reports per layer: ``{"status": "pulling 8eeb52dfb3bb", "digest",
"total", "completed"}``, ``completed`` left out while 0, one layer after the
other or interleaved. Three things make a naive sum wrong, and each is handled
here so that what an operator sees never goes backwards:

- A resumed pull (after a failure, a cancel or a restart) starts each layer at
  the bytes already on disk. That jump is not download speed: the first line
  of a layer in each attempt is only a baseline, and speed counts what came
  after it.
- A layer can restart lower (Ollama threw a partial blob away). Completed bytes
  keep the highest value seen per layer, so the total does not drop; speed
  still counts the bytes fetched again.
- Layers appear one by one, so the total grows as the pull goes. The fraction
  is held at its highest value and stays below 1 until ``success``.
"""

from __future__ import annotations

from collections import deque

SPEED_WINDOW = 5.0  # seconds of samples the speed is measured over
_MIN_SPAN = 0.05  # below this, a speed would be noise
_NEARLY_DONE = 0.999  # the fraction before Ollama says "success"


class PullProgress:
    def __init__(self, completed: int = 0, total: int = 0, fraction: float = 0.0) -> None:
        # What an earlier run of the same operation reached: the floor for this one.
        self._floor_completed = completed
        self._floor_total = total
        self._fraction = fraction
        self._layers: dict[str, list[int]] = {}  # digest -> [total, highest completed]
        self._baseline: dict[str, int] = {}  # digest -> completed in this attempt's last line
        self._transferred = 0  # bytes actually fetched in this process, all attempts
        self._samples: deque[tuple[float, int]] = deque()
        self.status = ""
        self.done = False

    # --- input ----------------------------------------------------------------------------------

    def feed(self, line: dict, now: float) -> bool:
        """Take one status line; True when the status text changed (worth telling at once)."""
        status = str(line.get("status") or self.status)
        changed = status != self.status
        self.status = status
        digest, total = line.get("digest"), line.get("total")
        if isinstance(digest, str) and isinstance(total, int) and total > 0:
            completed = line.get("completed") or 0
            completed = min(max(completed if isinstance(completed, int) else 0, 0), total)
            layer = self._layers.setdefault(digest, [total, 0])
            layer[0] = total
            previous = self._baseline.get(digest)
            if previous is not None and completed > previous:
                self._transferred += completed - previous
            self._baseline[digest] = completed
            layer[1] = max(layer[1], completed)
            self._sample(now)
        if status == "success":
            self.done = True
            self._fraction = 1.0
        return changed

    def new_attempt(self) -> None:
        """A new request for the same pull: its first line per layer is a baseline again."""
        self._baseline.clear()

    def _sample(self, now: float) -> None:
        samples = self._samples
        samples.append((now, self._transferred))
        while samples[0][0] < now - SPEED_WINDOW:
            samples.popleft()

    # --- output ---------------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return max(self._floor_total, sum(layer[0] for layer in self._layers.values()))

    @property
    def completed(self) -> int:
        if self.done:
            return self.total
        return min(max(self._floor_completed, sum(layer[1] for layer in self._layers.values())), self.total)

    @property
    def fraction(self) -> float:
        if not self.done and self.total:
            self._fraction = max(self._fraction, min(self.completed / self.total, _NEARLY_DONE))
        return self._fraction

    def speed(self, now: float) -> float | None:
        """Bytes per second over the last :data:`SPEED_WINDOW` seconds; falls while nothing arrives."""
        if self.done or not self._samples:
            return None
        # From the first sample inside the window: the bytes a sample reports arrived before it, so
        # counting from an older one would add bytes fetched before the window began.
        cut = now - SPEED_WINDOW
        inside = next(((at, count) for at, count in self._samples if at >= cut), None)
        if inside is None:
            return 0.0  # nothing for a whole window
        start, start_bytes = inside
        span = now - start
        if span < _MIN_SPAN:
            return None
        return (self._transferred - start_bytes) / span

    def eta(self, now: float) -> float | None:
        speed = self.speed(now)
        if self.done:
            return 0.0
        if not speed or not self.total:
            return None
        return (self.total - self.completed) / speed

    def snapshot(self, now: float) -> dict:
        return {
            "status": self.status,
            "completed": self.completed,
            "total": self.total,
            "fraction": self.fraction,
            "speed": self.speed(now),
            "eta_seconds": self.eta(now),
        }
