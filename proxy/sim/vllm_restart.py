"""Restarting a simulated vLLM node onto another model, as ``systemctl restart vllm@gpu1`` would.

A real vLLM process serves one model for its whole life; switching models
means restarting it with other arguments. While it is down, and while the new
one loads its weights, connections are refused: vLLM binds its port early
but only listens once the engine is up (``create_server_socket`` then
``serve_http`` in vllm/entrypoints/openai/api_server.py).

``POST /_sim/restart`` (or :meth:`Restartable.restart`) answers first, then
closes the listening socket, cuts streams in flight, waits ``downtime``
seconds and binds the same port again serving the new model (``ok``), the old
one (``old_model``, a bad env file or a failed switch), or stays down
(``never``, a crash loop). ``python -m proxy.sim switch`` triggers it from the
command line, so a test can configure it as the proxy's ``activate_command``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from .core import ORJSONResponse, SimBase, request_json

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "never", "old_model")
DEFAULT_DOWNTIME = 1.0


def restart_plan(body: Any, model: str, names: list[str]) -> dict[str, Any]:
    """The validated restart request; ``model``/``names`` are what the node serves now. Raises ValueError."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object: {model, served_model_name, downtime, outcome}")
    unknown = sorted(set(body) - {"model", "served_model_name", "downtime", "outcome"})
    if unknown:
        raise ValueError(f"unknown restart field(s): {', '.join(unknown)}")
    new_model = body.get("model", model)
    if not isinstance(new_model, str) or not new_model:
        raise ValueError("model must be a non-empty string")
    served = body.get("served_model_name")
    if served is None:
        served = [new_model] if "model" in body else list(names)  # vLLM serves the model under its own name
    elif isinstance(served, str):
        served = [served]
    if not served or not all(isinstance(n, str) and n for n in served):
        raise ValueError("served_model_name must be a name or a list of names")
    downtime = body.get("downtime", DEFAULT_DOWNTIME)
    if isinstance(downtime, bool) or not isinstance(downtime, (int, float)) or downtime < 0:
        raise ValueError("downtime must be a non-negative number of seconds")
    outcome = body.get("outcome", "ok")
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
    return {"model": new_model, "served_model_names": served, "downtime": float(downtime), "outcome": outcome}


class Restartable:
    """Mixed into :class:`SimVLLM` before :class:`SimBase`."""

    model: str
    served_model_names: list[str]
    _lock: threading.Lock

    def _init_restarts(self) -> None:
        self._restart_thread: threading.Thread | None = None
        self._restart_busy = False  # from acceptance until the node is back (or gave up)
        self._restart_epoch = 0  # stop() bumps it, so a restart accepted earlier never brings the node back
        self._restart_cancel = threading.Event()
        self.restarts = 0  # restarts accepted, for tests that count activations

    # ----------------------------------------------------------- Python API

    def restart(
        self,
        model: str | None = None,
        served_model_name: str | list[str] | None = None,
        downtime: float = DEFAULT_DOWNTIME,
        outcome: str = "ok",
    ) -> dict[str, Any]:
        """Go down now and come back after ``downtime`` seconds; returns at once with the plan."""
        body: dict[str, Any] = {"downtime": downtime, "outcome": outcome}
        if model is not None:
            body["model"] = model
        if served_model_name is not None:
            body["served_model_name"] = served_model_name
        plan = restart_plan(body, self.model, self.served_model_names)
        self._reserve_restart(plan).start()
        return plan

    @property
    def restarting(self) -> bool:
        """True from the moment a restart is accepted until the node serves again (or gives up)."""
        return self._restart_busy

    def wait_restarted(self, timeout: float = 10.0) -> bool:
        """Wait for a restart under way to finish; True when the node is up and serving."""
        finished = threading.Event()
        deadline = time.monotonic() + timeout
        while self._restart_busy and time.monotonic() < deadline:
            finished.wait(0.01)
        return not self._restart_busy and self._server._thread is not None

    def stop(self) -> None:
        """Also abandons a restart under way, so a node in its downtime does not come back later."""
        with self._lock:
            self._restart_epoch += 1
            thread = self._restart_thread
        self._restart_cancel.set()
        if thread is not None and thread.ident is not None and thread is not threading.current_thread():
            thread.join(10.0)
        self._restart_cancel.clear()
        self._restart_busy = False
        super().stop()

    # ----------------------------------------------------------- internals

    def _reserve_restart(self, plan: dict[str, Any]) -> threading.Thread:
        """Claim the node for a restart (RuntimeError if one is under way); the caller starts the thread."""
        with self._lock:
            if self._restart_busy:
                raise RuntimeError("a restart is already under way")
            self._restart_busy = True
            self.restarts += 1
            thread = threading.Thread(
                target=self._restart_run, args=(plan, self._restart_epoch), name=f"restart-{self.port}", daemon=True
            )
            self._restart_thread = thread
        return thread

    def _restart_run(self, plan: dict[str, Any], epoch: int) -> None:
        try:
            if epoch != self._restart_epoch:
                return
            SimBase.stop(self)  # not self.stop(): that one waits for this very thread
            if self._restart_cancel.wait(plan["downtime"]) or plan["outcome"] == "never":
                return
            if epoch != self._restart_epoch:
                return
            if plan["outcome"] == "ok":
                self.model = plan["model"]
                self.served_model_names = list(plan["served_model_names"])
            try:
                SimBase.start(self)
            except (OSError, RuntimeError) as exc:  # the port was taken meanwhile: stay down, like systemd would
                log.warning("simulated vLLM could not come back on port %s: %s", self.port, exc)
        finally:
            if epoch == self._restart_epoch:
                self._restart_busy = False

    async def _post_restart(self, request: Request) -> Response:
        body, parse_error = request_json(request)
        try:
            if parse_error is not None:
                raise ValueError(parse_error)
            plan = restart_plan(body if body is not None else {}, self.model, self.served_model_names)
        except ValueError as exc:
            return ORJSONResponse({"error": str(exc)}, status_code=400)
        try:
            thread = self._reserve_restart(plan)
        except RuntimeError as exc:
            return ORJSONResponse({"error": str(exc)}, status_code=409)
        # The thread starts once the response is out: the caller must hear back before the socket closes.
        return ORJSONResponse(
            {"status": "restarting", **plan}, status_code=202, background=BackgroundTask(thread.start)
        )


# --------------------------------------------------------------------------- python -m proxy.sim switch


def add_switch_parser(kinds: argparse._SubParsersAction) -> None:
    switch = kinds.add_parser(
        "switch",
        help="restart a running vLLM sim onto another model (usable as an activate_command)",
        description="Ask a running vLLM simulator to restart onto MODEL and exit at once, like "
        "`systemctl restart` of a Type=simple unit. Exit status 1 if the simulator cannot be reached "
        "or refuses.",
    )
    switch.add_argument("--url", required=True, help="base URL of the vLLM sim, e.g. http://127.0.0.1:8000")
    switch.add_argument("model", metavar="MODEL")
    switch.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        metavar="NAME",
        help="name to serve it under (repeat for several; default: MODEL)",
    )
    switch.add_argument("--downtime", type=float, default=DEFAULT_DOWNTIME, help="seconds the node stays down")
    switch.add_argument(
        "--outcome",
        choices=OUTCOMES,
        default="ok",
        help="ok: serve MODEL; old_model: come back with the old model; never: stay down",
    )
    switch.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the simulator's answer")


def switch(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model, "downtime": args.downtime, "outcome": args.outcome}
    if args.served_model_name:
        body["served_model_name"] = args.served_model_name
    url = args.url.rstrip("/") + "/_sim/restart"
    try:
        response = httpx.post(url, json=body, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the vLLM simulator at {args.url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    if response.status_code != 202:
        try:
            reason = response.json().get("error", response.text)
        except ValueError:
            reason = response.text
        print(f"error: the simulator refused the switch (HTTP {response.status_code}): {reason}", file=sys.stderr)
        return 1
    return 0
