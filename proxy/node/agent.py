"""The agent itself: a small HTTP app beside the runtime, and its registration and heartbeat to the proxy.

The proxy talks to it with the node's token (``Authorization: Bearer``), which
the agent makes at start (or takes from ``LLM_PROXY_NODE_TOKEN``) and hands over
when it registers; the admin key it registers with comes from
``LLM_PROXY_ADMIN_KEY``. Only ``/health`` answers without the token.

    GET  /health                  liveness, no token
    GET  /status                  {hardware, runtime, alerts, agent}
    GET  /manifest                what the Hugging Face cache holds (the manifest)
    POST /hf/plan                 {model, revision?, confirm?} -> sizes and the disk check
    POST /hf/pull                 same body -> NDJSON progress lines, the last one success or error
    DELETE /hf/models/{repo}      out of the cache and the manifest
    POST /runtime/activate        {model, served_name}: restart the runtime serving that model
    POST /runtime/restart

Downloads are serialised (one at a time on the node) and run in a thread; a
client that goes away cancels the one it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..errors import Conflict, InvalidRequest, NotFound, ProxyError, Unauthorized, error_response
from . import hardware
from .config import NodeConfig
from .huggingface import Cancelled, HubClient, HubError, check_disk
from .supervisor import ChildSupervisor, External, SystemdUnit, with_model

log = logging.getLogger("llm_proxy.node")

TOKEN_ENV = "LLM_PROXY_NODE_TOKEN"
ADMIN_KEY_ENV = "LLM_PROXY_ADMIN_KEY"
_VERSION_PATHS = {"ollama": "/api/version", "vllm": "/version"}
_REGISTER_RETRY = 2.0  # seconds between registration attempts while the proxy does not answer
_STARTING_BEAT = 1.0  # seconds between heartbeats while the runtime is not running yet
_ARGUMENT = re.compile(r"(?!-)(?!.*\.\.)[A-Za-z0-9._:/@-]{1,256}")  # the rule of proxy/operations/activate.py


@dataclass
class AgentSettings:
    name: str
    runtime: str  # ollama | vllm
    runtime_url: str
    proxy_url: str | None
    models_dir: str
    listen_url: str = ""  # how the proxy reaches this agent (set once the socket is bound)
    run: list[str] = field(default_factory=list)
    systemd_unit: str | None = None
    log_path: str = ""


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class Agent:
    def __init__(self, settings: AgentSettings, config: NodeConfig, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.config = config
        env = dict(os.environ if env is None else env)
        self.token = env.get(TOKEN_ENV) or secrets.token_urlsafe(32)
        self.admin_key = env.get(ADMIN_KEY_ENV, "")
        Path(settings.models_dir).mkdir(parents=True, exist_ok=True)
        self.hub = HubClient(settings.models_dir, endpoint=env.get("HF_ENDPOINT"),
                             token=env.get(config.hf_token_env), verify_attempts=config.verify_attempts)  # fmt: skip
        if settings.run:
            # The runtime finds the weights the agent put in the cache, offline.
            child_env = {**env, "HF_HUB_CACHE": settings.models_dir}
            child_env.pop(TOKEN_ENV, None)
            child_env.pop(ADMIN_KEY_ENV, None)
            log_path = settings.log_path or os.path.join(settings.models_dir, "runtime.log")
            self.supervisor = ChildSupervisor(settings.run, config.supervisor, log_path, env=child_env)
        elif settings.systemd_unit:
            self.supervisor = SystemdUnit(settings.systemd_unit, env_dir=config.systemd.env_dir)
        else:
            self.supervisor = External()
        self.install_lock = asyncio.Lock()
        self.started = time.monotonic()
        self.registered = False
        self.last_heartbeat: float | None = None
        self.reported_state: str | None = None  # the runtime's state in the last registration or heartbeat
        self._http: httpx.AsyncClient | None = None
        self._beat: asyncio.Task | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=3.0))
        await self.supervisor.start()
        if self.settings.proxy_url:
            self._beat = asyncio.get_running_loop().create_task(self._heartbeats(), name="agent-heartbeat")

    async def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        await self.supervisor.stop()
        if self._http is not None:
            await self._http.aclose()
        log.info("agent %s stopped (runtime %s)", self.settings.name, self.supervisor.status()["state"])

    # --- what the agent reports -----------------------------------------------------------------

    def _paths(self) -> list[str]:
        return [self.settings.models_dir]

    async def hardware(self) -> dict:
        return await asyncio.to_thread(hardware.collect, self._paths())

    async def runtime(self) -> dict:
        kind = self.settings.runtime
        if isinstance(self.supervisor, SystemdUnit):
            with contextlib.suppress(RuntimeError, OSError):
                await self.supervisor.refresh()
        status = self.supervisor.status()
        version, error = await self._runtime_version()
        state = status["state"]
        if state is None:  # external: what its API says is all there is
            state = "running" if error is None else "unreachable"
        elif state == "running" and error is not None:
            state = "starting" if (status.get("uptime_seconds") or 0) < 120 else "unresponsive"
        pid = status["pid"]
        memory = await asyncio.to_thread(hardware.tree_rss, pid) if pid else None
        return {"kind": kind, "version": version, "pid": pid, "memory_bytes": memory,
                "uptime_seconds": status["uptime_seconds"], "restarts": status["restarts"], "state": state,
                "mode": self.supervisor.mode, "error": error or status.get("error")}  # fmt: skip

    async def _runtime_version(self) -> tuple[str | None, str | None]:
        url = self.settings.runtime_url.rstrip("/") + _VERSION_PATHS.get(self.settings.runtime, "/version")
        try:
            answer = await self._http.get(url, timeout=3.0)
            answer.raise_for_status()
            return answer.json().get("version"), None
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def snapshot(self) -> dict:
        hw, rt = await asyncio.gather(self.hardware(), self.runtime())
        return {"name": self.settings.name, "hardware": hw, "runtime": rt,
                "alerts": hardware.alerts(hw, self.config.thresholds, rt),
                "agent": {"version": __version__, "url": self.settings.listen_url, "mode": self.supervisor.mode,
                          "models_dir": self.settings.models_dir,
                          "uptime_seconds": round(time.monotonic() - self.started, 1)}}  # fmt: skip

    # --- registration and heartbeat -------------------------------------------------------------

    def _admin_headers(self) -> dict:
        return {"authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}

    async def register(self) -> None:
        snap = await self.snapshot()
        body = {"name": self.settings.name, "kind": self.settings.runtime, "url": self.settings.runtime_url,
                "agent_url": self.settings.listen_url, "token": self.token, "hardware": snap["hardware"],
                "runtime": snap["runtime"], "alerts": snap["alerts"],
                "gpu_memory_gb": hardware.gpu_memory_gb(snap["hardware"])}  # fmt: skip
        self.reported_state = snap["runtime"]["state"]
        answer = await self._http.post(self.settings.proxy_url.rstrip("/") + "/admin/agents", json=body,
                                       headers=self._admin_headers())  # fmt: skip
        if answer.status_code not in (200, 201):
            raise RuntimeError(f"registration refused: {answer.status_code} {answer.text[:300]}")
        self.registered = True
        log.info("registered with %s as %s", self.settings.proxy_url, self.settings.name)

    async def heartbeat(self) -> None:
        snap = await self.snapshot()
        self.reported_state = snap["runtime"]["state"]
        url = f"{self.settings.proxy_url.rstrip('/')}/admin/agents/{self.settings.name}/heartbeat"
        answer = await self._http.post(url, content=orjson.dumps(snap), headers={**self._admin_headers(),
                                       "content-type": "application/json"})  # fmt: skip
        if answer.status_code == 404:
            self.registered = False  # the proxy lost or removed the node: register again
            raise RuntimeError("the proxy does not know this node any more")
        answer.raise_for_status()
        self.last_heartbeat = time.time()

    async def _heartbeats(self) -> None:
        while True:
            try:
                if not self.registered:
                    await self.register()
                else:
                    await self.heartbeat()
                wait = self.config.heartbeat_interval
                if self.reported_state != "running":
                    # A runtime still starting: say so the moment it runs, so the proxy routes to it then.
                    wait = min(_STARTING_BEAT, wait)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the proxy may be down or restarting: keep trying
                log.warning("proxy %s: %s", self.settings.proxy_url, exc)
                wait = min(_REGISTER_RETRY, self.config.heartbeat_interval)
            await asyncio.sleep(wait)

    # --- requests -------------------------------------------------------------------------------

    def check_token(self, request: Request) -> None:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            raise Unauthorized("This node agent needs its token (Authorization: Bearer ...)", code="invalid_api_key")


async def _body(request: Request) -> dict:
    raw = await request.body()
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The body must be a JSON object")
    return data


def _pull_args(body: dict) -> tuple[str, str, bool]:
    model, revision, confirm = body.get("model"), body.get("revision", "main"), body.get("confirm", False)
    if not isinstance(model, str) or model.count("/") != 1 or not all(model.split("/")):
        raise InvalidRequest("model must be a Hugging Face repository id, org/name", param="model")
    if not isinstance(revision, str) or not revision:
        raise InvalidRequest("revision must be a branch, tag or commit", param="revision")
    if not isinstance(confirm, bool):
        raise InvalidRequest("confirm must be true or false", param="confirm")
    return model, revision, confirm


def _agent(request: Request) -> Agent:
    agent = request.app.state.agent
    if request.url.path != "/health":
        agent.check_token(request)
    return agent


def _guarded(handler):
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(_agent(request), request)
        except ProxyError as exc:
            return error_response(exc)
        except HubError as exc:
            return error_response(ProxyError(exc.message, status=exc.status, code="hub_error"))

    return endpoint


async def _health(agent: Agent, request: Request) -> Response:
    return _json({"status": "ok", "name": agent.settings.name})


async def _status(agent: Agent, request: Request) -> Response:
    return _json(await agent.snapshot())


async def _manifest(agent: Agent, request: Request) -> Response:
    return _json({"object": "list", "data": await asyncio.to_thread(agent.hub.manifest)})


async def _plan(agent: Agent, body: dict):
    model, revision, confirm = _pull_args(body)
    plan = await asyncio.to_thread(agent.hub.plan, model, revision)
    problem = await asyncio.to_thread(check_disk, plan, agent.config.disk, agent.settings.models_dir, confirm=confirm)
    return plan, problem


async def _hf_plan(agent: Agent, request: Request) -> Response:
    plan, problem = await _plan(agent, await _body(request))
    return _json({**plan.as_dict(), "problem": problem})


async def _hf_pull(agent: Agent, request: Request) -> Response:
    body = await _body(request)
    plan, problem = await _plan(agent, body)
    if problem:
        return _json({"error": {"message": problem, "type": "invalid_request_error", "param": "model",
                                "code": "disk_limit", "disk": plan.as_dict()}}, 409)  # fmt: skip
    lines: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    cancelled = threading.Event()
    last = [0.0, ""]

    def progress(completed: int, total: int, status: str) -> None:
        now = time.monotonic()
        if status != last[1] or now - last[0] >= 0.2:  # a line per chunk would swamp the proxy on a fast link
            last[0], last[1] = now, status
            line = {"status": status, "digest": "huggingface", "total": total, "completed": completed}
            loop.call_soon_threadsafe(lines.put_nowait, line)

    async def work() -> None:
        async with agent.install_lock:
            await lines.put({"status": f"downloading {plan.repo} at {plan.commit[:12]}", "digest": "huggingface",
                             "total": plan.total_bytes, "completed": plan.cached_bytes})  # fmt: skip
            try:
                entry = await asyncio.to_thread(agent.hub.download, plan, progress, cancelled)
                await lines.put({"status": "success", "entry": entry})
            except Cancelled:
                await lines.put({"error": "cancelled"})
            except HubError as exc:
                await lines.put({"error": exc.message, "status_code": exc.status})
            except OSError as exc:
                await lines.put({"error": f"writing to {agent.settings.models_dir} failed: {exc}", "status_code": 507})
        await lines.put(None)

    async def stream():
        task = loop.create_task(work())
        try:
            if agent.install_lock.locked():
                yield orjson.dumps({"status": "waiting for another install on this node"}) + b"\n"
            while (line := await lines.get()) is not None:
                yield orjson.dumps(line) + b"\n"
        finally:
            cancelled.set()  # a no-op once done; otherwise the proxy hung up: stop at the next chunk
            if not task.done():
                await asyncio.shield(task)

    return StreamingResponse(stream(), media_type="application/x-ndjson")


async def _hf_delete(agent: Agent, request: Request) -> Response:
    repo = request.path_params["repo"]
    async with agent.install_lock:
        removed = await asyncio.to_thread(agent.hub.delete, repo)
    return _json({"removed": removed, "model": repo})


async def _activate(agent: Agent, request: Request) -> Response:
    body = await _body(request)
    model, served = body.get("model"), body.get("served_name") or body.get("model")
    for key, value in (("model", model), ("served_name", served)):
        # They become arguments of the runtime's command: nothing it could take for an option.
        if not isinstance(value, str) or not _ARGUMENT.fullmatch(value):
            raise InvalidRequest(f"{key} must be a model id or path: letters, digits and ._:/@- only, not starting "
                                 "with - and without ..", param=key)  # fmt: skip
    if isinstance(agent.supervisor, SystemdUnit):
        try:
            env_file = await agent.supervisor.switch_model(model, served, agent.settings.models_dir)
        except (RuntimeError, OSError) as exc:
            raise Conflict(f"switching {agent.supervisor.unit} to {model} failed: {exc}", param="model") from None
        return _json({"env_file": str(env_file), "runtime": agent.supervisor.status()})
    if not isinstance(agent.supervisor, ChildSupervisor):
        raise Conflict(f"the runtime runs in {agent.supervisor.mode} mode; only a runtime the agent supervises "
                       "(--run or --systemd-unit) can be restarted onto another model", param="model")  # fmt: skip
    argv = with_model(agent.supervisor.argv, model, served)
    await agent.supervisor.restart(argv)
    return _json({"argv": argv, "runtime": agent.supervisor.status()})


async def _restart(agent: Agent, request: Request) -> Response:
    try:
        await agent.supervisor.restart()
    except RuntimeError as exc:
        raise Conflict(str(exc)) from None
    return _json({"runtime": agent.supervisor.status()})


async def _not_found(request: Request, exc) -> Response:
    return error_response(NotFound(f"No route {request.method} {request.url.path} on the node agent"))


def create_agent_app(agent: Agent) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await agent.start()
        try:
            yield
        finally:
            await agent.close()

    routes = [
        Route("/health", _guarded(_health), methods=["GET"]),
        Route("/status", _guarded(_status), methods=["GET"]),
        Route("/manifest", _guarded(_manifest), methods=["GET"]),
        Route("/hf/plan", _guarded(_hf_plan), methods=["POST"]),
        Route("/hf/pull", _guarded(_hf_pull), methods=["POST"]),
        Route("/hf/models/{repo:path}", _guarded(_hf_delete), methods=["DELETE"]),
        Route("/runtime/activate", _guarded(_activate), methods=["POST"]),
        Route("/runtime/restart", _guarded(_restart), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: _not_found})
    app.state.agent = agent
    return app


def serve(settings: AgentSettings, config: NodeConfig, host: str, port: int, advertise: str | None = None) -> int:
    """Bind, then run the agent until SIGTERM or SIGINT (which stop the runtime too)."""
    import uvicorn

    from ..server import BindError, bind_socket

    try:
        sock = bind_socket(host, port)
    except BindError as exc:
        print(f"llm-proxy node: {exc}", flush=True)
        return 1
    bound_host, bound_port = sock.getsockname()[:2]
    shown = bound_host if bound_host not in ("0.0.0.0", "::") else "127.0.0.1"
    settings.listen_url = advertise or f"http://{shown}:{bound_port}"
    agent = Agent(settings, config)
    server = uvicorn.Server(uvicorn.Config(create_agent_app(agent), log_level="warning", access_log=False,
                                           lifespan="on", timeout_graceful_shutdown=5))  # fmt: skip
    print(f"node agent {settings.name} listening on {settings.listen_url}", flush=True)
    server.run(sockets=[sock])  # uvicorn raises a SIGTERM it caught again once shut down: exit status -15
    return 0
