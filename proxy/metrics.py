"""Prometheus metrics, owned by a :class:`Metrics` object created in the app lifespan.

Names and labels (all prefixed ``llm_proxy_``):

=========================================  =========  ===========================================
requests_total                             counter    model, backend, endpoint, status (HTTP code)
request_duration_seconds                   histogram  model, backend, endpoint
time_to_first_token_seconds                histogram  model, backend
prompt_tokens_total, completion_tokens_total  counter model, backend
cache_hits_total, cache_misses_total       counter    model, endpoint
cache_evictions_total                      counter    tier (memory | sqlite)
failovers_total                            counter    model, backend (the one given up), reason
retries_total                              counter    model, backend (the one tried again)
backend_up                                 gauge      backend (1 online or degraded, 0 offline)
backend_health                             gauge      backend, state (online|degraded|offline, one-hot)
backend_in_flight                          gauge      backend (summed over live workers)
backend_queue_depth                        gauge      backend (summed over live workers)
alias_mismatch                             gauge      alias, target, backend (1 while mismatched)
overhead_seconds                           histogram  endpoint (time in the proxy, not the backend)
=========================================  =========  ===========================================

``model`` is the public name the client asked for, once it resolved; pass
``"unknown"`` for names that did not, never raw client input (every distinct
value is a series). As a backstop, past ``max_label_sets`` distinct label sets
per metric new ones are folded into ``model="other"``.

Several uvicorn workers: when ``PROMETHEUS_MULTIPROC_DIR`` is set in the
environment *before* prometheus_client is first imported (set it in the service
unit or the shell, and empty the directory before the workers start), every
worker writes its values to files there and :meth:`Metrics.render` merges them
all: counters and histograms sum over every worker that ever ran; the per-backend
in-flight and queue gauges are ``livesum`` (sum over live workers); the health,
up and alias gauges are ``livemostrecent`` (the last value any live worker set).
A removed node's series are dropped (:meth:`Metrics.remove_backend`); in multiprocess
mode prometheus-client cannot delete from its files, so there its gauges read 0 and its
counters stay until the next start. Call :func:`mark_process_dead` when a worker exits so its live gauges stop
counting; :meth:`Metrics.render` also drops those of workers whose pid is gone
(killed, crashed). Keep one ``Metrics`` per process: two in one process would
share, and overwrite, the same file entries. Without the variable, one private
in-process registry per ``Metrics``.

Hot-path cost is a dict lookup of the label tuple (children are cached) plus the
prometheus_client update; with ``enabled: false`` every method is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values

from .config import MetricsConfig
from .storage.background import pid_alive

log = logging.getLogger("llm_proxy.metrics")

PREFIX = "llm_proxy_"

# From a cache hit (milliseconds) to a long generation on a cold node (minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                    300.0, 600.0)  # fmt: skip
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 30.0,
                60.0, 120.0, 300.0)  # fmt: skip
# The proxy's own cost per request should sit well under a millisecond.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

HEALTH_STATES = ("online", "degraded", "offline")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


def _multiprocess_values() -> bool:
    # prometheus_client picks file-backed values once, at import, from the environment.
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


def mark_process_dead(pid: int | None = None) -> None:
    """A worker exited: drop its live gauges (in-flight, queue, health) from the merged view.

    Call it from the worker's own shutdown (no argument) or from a supervisor hook with
    the worker's pid. :meth:`Metrics.render` also sweeps workers that died without it.
    """
    path = multiprocess_dir()
    if not path:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(os.getpid() if pid is None else pid, path)


_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def sweep_dead_processes(path: str | None = None) -> list[int]:
    """Drop the live gauges of workers that are gone (killed, crashed) without calling mark_process_dead.

    The directory is local to the host (prometheus-client's files are mmapped), so a
    pid that no longer exists here is a dead worker.
    """
    path = path or multiprocess_dir()
    if not path:
        return []
    from prometheus_client import multiprocess

    dead = set()
    for name in os.listdir(path):
        match = _LIVE_GAUGE_FILE.fullmatch(name)
        if match and not pid_alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)
    return sorted(dead)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _Family:
    """A labelled metric with its children cached per label tuple (``labels()`` costs a lock and str())."""

    __slots__ = ("metric", "children", "limit", "model_position", "backend_position")

    def __init__(self, metric: Any, limit: int, model_position: int | None) -> None:
        self.metric = metric
        self.children: dict[tuple, Any] = {}
        self.limit = limit
        self.model_position = model_position
        names = getattr(metric, "_labelnames", ())
        self.backend_position = names.index("backend") if "backend" in names else None

    def child(self, key: tuple) -> Any:
        child = self.children.get(key)
        if child is None:
            if len(self.children) >= self.limit and self.model_position is not None:
                key = key[: self.model_position] + ("other",) + key[self.model_position + 1 :]
                child = self.children.get(key)
                if child is not None:
                    return child
            child = self.children[key] = self.metric.labels(*key)
        return child

    def forget_backend(self, backend: str) -> None:
        """Drop every series labelled with ``backend``, so a removed node stops being reported."""
        if self.backend_position is None:
            return
        for key in [k for k in self.children if k[self.backend_position] == backend]:
            child = self.children.pop(key)
            if isinstance(self.metric, Gauge):
                child.set(0.0)  # multiprocess files cannot forget a series: it reads 0 until the next start
            self.metric.remove(*key)


class Metrics:
    def __init__(self, config: MetricsConfig, *, max_label_sets: int = 5000) -> None:
        self.enabled = config.enabled
        self.multiprocess = False
        self._registry = CollectorRegistry(auto_describe=True)
        self._render_registry = self._registry
        self._path: str | None = None
        if not self.enabled:
            self._disable()
            return
        path = self._path = multiprocess_dir()
        self.multiprocess = _multiprocess_values()
        if path and not self.multiprocess:
            log.warning("PROMETHEUS_MULTIPROC_DIR is set but prometheus_client was imported before it was; "
                        "each worker reports only its own metrics")  # fmt: skip
        if self.multiprocess:
            from prometheus_client import multiprocess

            # Metrics defined in a registry that is also rendered would be reported twice:
            # the definitions stay in _registry, the scrape reads every worker's files.
            self._render_registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._render_registry, path=path)

        r = self._registry
        limit = max_label_sets

        def family(cls, name: str, doc: str, labels: tuple[str, ...], **kw: Any) -> _Family:
            metric = cls(PREFIX + name, doc, labels, registry=r, **kw)
            return _Family(metric, limit, labels.index("model") if "model" in labels else None)

        self._requests = family(Counter, "requests", "Requests answered", ("model", "backend", "endpoint", "status"))
        self._duration = family(Histogram, "request_duration_seconds", "Request duration, first byte in to last out",
                                ("model", "backend", "endpoint"), buckets=DURATION_BUCKETS)  # fmt: skip
        self._ttft = family(Histogram, "time_to_first_token_seconds", "Time to the first generated token",
                            ("model", "backend"), buckets=TTFT_BUCKETS)  # fmt: skip
        self._prompt_tokens = family(Counter, "prompt_tokens", "Prompt tokens", ("model", "backend"))
        self._completion_tokens = family(Counter, "completion_tokens", "Completion tokens", ("model", "backend"))
        self._cache_hits = family(Counter, "cache_hits", "Answers served from the cache", ("model", "endpoint"))
        self._cache_misses = family(Counter, "cache_misses", "Cacheable requests not in the cache",
                                    ("model", "endpoint"))  # fmt: skip
        self._cache_evictions = family(Counter, "cache_evictions", "Cache entries evicted (LRU)", ("tier",))
        self._failovers = family(Counter, "failovers", "Attempts given up on a backend before trying the next",
                                 ("model", "backend", "reason"))  # fmt: skip
        self._retries = family(Counter, "retries", "Attempts after the first", ("model", "backend"))
        self._up = family(Gauge, "backend_up", "1 when the backend takes requests (online or degraded)",
                          ("backend",), multiprocess_mode="livemostrecent")  # fmt: skip
        self._health = family(Gauge, "backend_health", "Backend health state (one-hot)", ("backend", "state"),
                              multiprocess_mode="livemostrecent")  # fmt: skip
        self._in_flight = family(Gauge, "backend_in_flight", "Requests in flight to the backend", ("backend",),
                                 multiprocess_mode="livesum")  # fmt: skip
        self._queue = family(Gauge, "backend_queue_depth", "Requests waiting for a backend slot", ("backend",),
                             multiprocess_mode="livesum")  # fmt: skip
        self._alias_mismatch = family(Gauge, "alias_mismatch", "1 while an alias's target is not what the backend serves",
                                      ("alias", "target", "backend"), multiprocess_mode="livemostrecent")  # fmt: skip
        # With the database away (PostgreSQL down), history rows wait in memory up to a bound.
        self._history_buffered = Gauge(PREFIX + "history_rows_buffered", "History rows waiting to be written",
                                       registry=r, multiprocess_mode="livesum")  # fmt: skip
        self._history_dropped = Gauge(PREFIX + "history_rows_dropped", "History rows dropped since start: the "
                                      "buffer was full", registry=r, multiprocess_mode="livesum")  # fmt: skip
        self._overhead = family(Histogram, "overhead_seconds", "Time spent in the proxy itself, backend excluded",
                                ("endpoint",), buckets=OVERHEAD_BUCKETS)  # fmt: skip

    def remove_backend(self, backend: str) -> None:
        """A node was removed: its series go from /metrics (in this process; see the module doc)."""
        for family in self._families():
            family.forget_backend(backend)

    def _families(self) -> list[_Family]:
        return [v for v in vars(self).values() if isinstance(v, _Family)]

    def _disable(self) -> None:
        for name in ("request", "remove_backend", "cache_lookup", "cache_evictions", "failover", "retry", "backend_state",
                     "backend_in_flight", "set_backend_in_flight", "backend_queue", "set_backend_queue",
                     "alias_mismatch", "overhead", "history_buffer"):  # fmt: skip
            setattr(self, name, _noop)

    # --- the request path -----------------------------------------------------------------------

    def request(
        self,
        model: str,
        backend: str,
        endpoint: str,
        status: int,
        duration: float,
        *,
        ttft: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        overhead: float | None = None,
    ) -> None:
        """One finished request. ``backend`` is "" when none was reached (cache hit, validation error)."""
        self._requests.child((model, backend, endpoint, str(status))).inc()
        self._duration.child((model, backend, endpoint)).observe(duration)
        if ttft is not None:
            self._ttft.child((model, backend)).observe(ttft)
        if prompt_tokens:
            self._prompt_tokens.child((model, backend)).inc(prompt_tokens)
        if completion_tokens:
            self._completion_tokens.child((model, backend)).inc(completion_tokens)
        if overhead is not None:
            self._overhead.child((endpoint,)).observe(overhead)

    def overhead(self, endpoint: str, seconds: float) -> None:
        self._overhead.child((endpoint,)).observe(seconds)

    def cache_lookup(self, model: str, endpoint: str, hit: bool) -> None:
        (self._cache_hits if hit else self._cache_misses).child((model, endpoint)).inc()

    def history_buffer(self, buffered: int, dropped: int) -> None:
        self._history_buffered.set(buffered)
        self._history_dropped.set(dropped)

    def cache_evictions(self, tier: str, count: int = 1) -> None:
        self._cache_evictions.child((tier,)).inc(count)

    def failover(self, model: str, backend: str, reason: str) -> None:
        """An attempt on ``backend`` failed before anything was sent, and the router moves on."""
        self._failovers.child((model, backend, reason)).inc()

    def retry(self, model: str, backend: str) -> None:
        """An attempt after the first, on ``backend``."""
        self._retries.child((model, backend)).inc()

    # --- backends -------------------------------------------------------------------------------

    def backend_state(self, backend: str, state: str) -> None:
        """online | degraded | offline. Sets every state's series, so a scrape sees exactly one at 1."""
        for name in HEALTH_STATES:
            self._health.child((backend, name)).set(1.0 if name == state else 0.0)
        self._up.child((backend,)).set(0.0 if state == "offline" else 1.0)

    def backend_in_flight(self, backend: str, delta: int) -> None:
        self._in_flight.child((backend,)).inc(delta)

    def set_backend_in_flight(self, backend: str, value: int) -> None:
        self._in_flight.child((backend,)).set(value)

    def backend_queue(self, backend: str, delta: int) -> None:
        self._queue.child((backend,)).inc(delta)

    def set_backend_queue(self, backend: str, value: int) -> None:
        self._queue.child((backend,)).set(value)

    def alias_mismatch(self, alias: str, target: str, backend: str, mismatched: bool) -> None:
        self._alias_mismatch.child((alias, target, backend)).set(1.0 if mismatched else 0.0)

    # --- exposition -----------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type.

        In multiprocess mode this reads every worker's files: call it through
        :meth:`arender` (a thread) from the event loop.
        """
        if not self.enabled:
            return b"", CONTENT_TYPE_LATEST
        if self.multiprocess:
            sweep_dead_processes(self._path)
        return generate_latest(self._render_registry), CONTENT_TYPE_LATEST

    async def arender(self) -> tuple[bytes, str]:
        if self.multiprocess:
            return await asyncio.to_thread(self.render)
        return self.render()
