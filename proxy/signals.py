"""What backends report about their own load, parsed and kept per backend. Parsing is pure.

- vLLM's Prometheus ``/metrics``: ``vllm:num_requests_running``,
  ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` (the older
  ``vllm:gpu_cache_usage_perc`` when that is all there is), summed over engines.
- Ollama's ``/api/ps``: which models are loaded, and until when (``expires_at``).

Read on every health round, and, for a backend with requests in flight, again
when a request finds them older than ``health.signals_interval`` (in the
background: no request waits for it). The proxy also notes what it caused
itself: a request that answered from a model marks it loaded there, and
requests in flight for a model that was not loaded mark it *loading*, so more
requests for a cold model gather on the node that is already loading it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime

_SAMPLE = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+([-+0-9.eEinfNa]+)", re.MULTILINE)
_NANOS = re.compile(r"(\.\d{6})\d+")
KV_FULL = 0.95  # at this KV-cache usage vLLM starts preempting: new requests would only wait

# Ollama keeps a model loaded five minutes after its last request unless told otherwise.
_DEFAULT_KEEP_ALIVE = 300.0


@dataclass(frozen=True)
class Load:
    running: int
    waiting: int
    kv_cache: float | None  # 0..1


def parse_vllm_metrics(text: str) -> Load | None:
    """The load gauges from vLLM's Prometheus text, or None when they are not there (not a vLLM)."""
    values: dict[str, float] = {}
    for name, value in _SAMPLE.findall(text):
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    if "vllm:num_requests_running" not in values:
        return None
    kv = values.get("vllm:kv_cache_usage_perc", values.get("vllm:gpu_cache_usage_perc"))
    engines = max(1, len(re.findall(r"^vllm:num_requests_running[{ ]", text, re.MULTILINE)))
    return Load(
        running=int(values["vllm:num_requests_running"]),
        waiting=int(values.get("vllm:num_requests_waiting", 0)),
        kv_cache=min(1.0, kv / engines) if kv is not None else None,  # a share: average over engines
    )


def _epoch(stamp: object) -> float | None:
    if not isinstance(stamp, str) or not stamp:
        return None
    try:  # Go writes nanoseconds; fromisoformat takes at most microseconds
        return datetime.fromisoformat(_NANOS.sub(r"\1", stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_ollama_ps(body: object) -> dict[str, float]:
    """Model name -> when it unloads (epoch seconds), from ``/api/ps``."""
    loaded: dict[str, float] = {}
    entries = body.get("models") if isinstance(body, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict):
            continue
        name = entry.get("model") or entry.get("name")
        expires = _epoch(entry.get("expires_at"))
        if isinstance(name, str) and name:
            loaded[name] = expires if expires is not None else time.time() + _DEFAULT_KEEP_ALIVE
    return loaded


@dataclass
class Signals:
    """One backend's latest report, plus what the proxy's own requests did there."""

    load: Load | None = None
    loaded: dict[str, float] | None = None  # model key -> unload time; None: the backend does not say
    loading: dict[str, int] = field(default_factory=dict)  # model key -> requests in flight that found it cold
    read_at: float = 0.0  # time.monotonic() of the last report
    error: str | None = None
    refreshing: bool = False

    def age(self) -> float:
        return time.monotonic() - self.read_at if self.read_at else float("inf")

    def is_loaded(self, key: str) -> bool | None:
        """True / False when the backend reports loaded models, None when it does not (vLLM: always loaded)."""
        if self.loaded is None:
            return None
        expires = self.loaded.get(key)
        return expires is not None and expires > time.time()

    def warm(self, key: str) -> bool:
        """Loaded, or being loaded by requests of ours: where more requests for the model should go."""
        return bool(self.is_loaded(key)) or self.loading.get(key, 0) > 0

    @property
    def queue(self) -> int:
        return self.load.waiting if self.load is not None else 0

    @property
    def kv_full(self) -> bool:
        return self.load is not None and self.load.kv_cache is not None and self.load.kv_cache >= KV_FULL

    def reported(self, load: Load | None, loaded: dict[str, float] | None) -> None:
        self.load, self.read_at, self.error = load, time.monotonic(), None
        if loaded is not None:
            self.loaded = loaded

    def answered(self, key: str) -> None:
        """A request of ours was answered by the model here: it is loaded now, whatever the last report said."""
        if self.loaded is not None and not self.is_loaded(key):
            self.loaded = {**self.loaded, key: time.time() + _DEFAULT_KEEP_ALIVE}

    def snapshot(self) -> dict:
        now = time.time()
        return {
            "requests_running": self.load.running if self.load else None,
            "requests_waiting": self.load.waiting if self.load else None,
            "kv_cache_usage": round(self.load.kv_cache, 3) if self.load and self.load.kv_cache is not None else None,
            "loaded_models": None if self.loaded is None else
            {name: round(expires - now, 1) for name, expires in sorted(self.loaded.items()) if expires > now},
            "loading_models": {k: v for k, v in self.loading.items() if v > 0},
            "age_seconds": round(self.age(), 2) if self.read_at else None,
            "error": self.error,
        }  # fmt: skip
