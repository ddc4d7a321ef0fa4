"""Activation: repoint a public alias to another model, once that model is ready to answer.

Checked when asked (so a mistake is a 4xx, not a failed operation): the alias
exists, no other activation of it is running, and its nodes can do it. The
nodes are the alias's ``backends``; without them, the vLLM nodes that serve the
alias's current target if there are any, else every Ollama node. One runtime per
activation: a name means different things to Ollama and to vLLM.

Ollama: the model must be installed on every node (409 listing the missing ones,
or pulled first with ``pull: true``, with progress). Each node loads it
(``keep_alive``: the node's ``preload_keep_alive``), the alias switches, and with
``unload_old`` the old model is unloaded where no other alias uses it.

vLLM: per node, the node is drained and its requests in flight may finish (up
to ``drain_timeout``), then its agent (``llm-proxy node``) restarts the runtime
it supervises with ``--model`` and ``--served-model-name``, or, for a node
without an agent, its ``activate_command`` runs (an argv, never a
shell; ``{model}`` and ``{served_name}`` in an argument are replaced), then
``/health`` and ``/v1/models`` are polled until the served name appears, within
``activate_timeout``. The alias then points at the served name.

The switch itself is :meth:`AliasOverrides.set`: stored, then one assignment in
the resolver; requests already routed finish on the old target. On any failure
the alias stays where it was and the operation says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..backends.ollama import normalize
from ..errors import BackendUnavailable, Conflict, InvalidRequest, NotFound, NotInstalled, ProxyError
from .manager import OperationManager
from .model import RETRYABLE, Operation
from .pulls import installed_entry

if TYPE_CHECKING:
    from .fleet import Fleet

log = logging.getLogger("llm_proxy.activate")

# What may go into activate_command's arguments: a Hugging Face id or a local path, never
# something a program could take for an option (the same rule as systemd/vllm-activate).
_ARGUMENT = re.compile(r"(?!-)(?!.*\.\.)[A-Za-z0-9._:/@-]{1,256}")
_POLL = 0.25  # seconds between checks of a restarting vLLM node
_STDERR_CHARS = 2000


@dataclass
class Plan:
    alias: str
    model: str
    runtime: str  # ollama | vllm
    nodes: list[str]
    missing: list[str]
    served_name: str | None


def _tail(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return text[-_STDERR_CHARS:] if text else "(no output)"


class Activator:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    @property
    def parts(self):
        return self.fleet.parts

    # --- at request time ------------------------------------------------------------------------

    async def plan(self, body: dict) -> Plan:
        alias, model = body.get("alias"), body.get("model")
        for key, value in (("alias", alias), ("model", model)):
            if not isinstance(value, str) or not value:
                raise InvalidRequest(f"{key} is required (a non-empty string)", param=key)
        served = body.get("served_name")
        if served is not None and (not isinstance(served, str) or not served):
            raise InvalidRequest("served_name must be a non-empty string", param="served_name")
        for key in ("pull", "unload_old"):
            if not isinstance(body.get(key, False), bool):
                raise InvalidRequest(f"{key} must be true or false", param=key)
        resolver = self.parts.resolver
        entry = resolver.aliases.get(alias)
        if entry is None:
            raise NotFound(f"No alias called {alias!r} (aliases: {', '.join(resolver.aliases) or 'none'})",
                           param="alias")  # fmt: skip
        running = self.fleet.manager.active("activate", alias=alias)
        if running is not None:
            raise Conflict(f"Alias {alias!r} is being activated already by operation {running.id}; wait for it or "
                           f"cancel it (DELETE /admin/operations/{running.id})", param="alias")  # fmt: skip
        runtime, nodes = self._nodes(entry)
        if runtime == "vllm":
            for key, value in (("model", model), ("served_name", served)):
                if value is not None and not _ARGUMENT.fullmatch(value):
                    raise InvalidRequest(f"{key} {value!r} cannot be passed to activate_command: use letters, digits "
                                         "and ._:/@- only, not starting with - and without ..", param=key)  # fmt: skip
            missing_command = [n for n in nodes if not self.fleet.registry.config_of(n).activate_command
                               and self.fleet.agents.get(n) is None]  # fmt: skip
            if missing_command:
                raise Conflict(f"vLLM node(s) {', '.join(missing_command)} have neither an agent (llm-proxy node) nor "
                               "an activate_command in the config, so the proxy cannot switch their model",
                               param="alias")  # fmt: skip
            return Plan(alias, model, runtime, nodes, [], served)
        missing = await self._missing(model, nodes)
        if missing and not body.get("pull", False):
            raise NotInstalled(f"{model!r} is not installed on {', '.join(missing)}; pull it first "
                               "(POST /admin/models/pull) or send \"pull\": true", missing)  # fmt: skip
        return Plan(alias, model, runtime, nodes, missing, served)

    def _nodes(self, alias) -> tuple[str, list[str]]:
        catalog = self.parts.catalog
        kinds = {n: b.config.kind for n, b in catalog.backends.items()}
        if alias.backends:
            nodes = [n for n in alias.backends if n in kinds]
        else:
            serving = [n for n, k in kinds.items() if k == "vllm" and catalog.served_name(n, alias.target)]
            nodes = serving or [n for n, k in kinds.items() if k == "ollama"]
        if not nodes:
            raise Conflict(f"Alias {alias.name!r} has no node to activate on", param="alias")
        runtimes = {kinds[n] for n in nodes}
        if "openai" in runtimes:
            raise Conflict(f"Alias {alias.name!r} is served by an OpenAI-compatible node the proxy cannot switch",
                           param="alias")  # fmt: skip
        if len(runtimes) > 1:
            raise Conflict(f"Alias {alias.name!r} is served by both Ollama and vLLM nodes ({', '.join(nodes)}); a "
                           "model name means different things to each: list one runtime in its backends",
                           param="alias")  # fmt: skip
        return runtimes.pop(), nodes

    async def _missing(self, model: str, nodes: list[str]) -> list[str]:
        admins = [self.fleet.registry.ollama(n) for n in nodes]
        answers = await asyncio.gather(*(a.tags() for a in admins), return_exceptions=True)
        down = [f"{n} ({a.message})" for n, a in zip(nodes, answers) if isinstance(a, ProxyError)]
        if down:
            raise BackendUnavailable(f"Cannot check the alias's nodes: not answering: {'; '.join(down)}")
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return [n for n, tags in zip(nodes, answers) if installed_entry(tags, model) is None]

    def submit(self, plan: Plan, body: dict) -> Operation:
        children = [self.fleet.submit_pull(node, plan.model).id for node in plan.missing]
        params = {"alias": plan.alias, "nodes": plan.nodes, "runtime": plan.runtime, "children": children,
                  "pull": bool(body.get("pull")), "unload_old": bool(body.get("unload_old"))}  # fmt: skip
        if plan.served_name:
            params["served_name"] = plan.served_name
        node = plan.nodes[0] if len(plan.nodes) == 1 else None
        return self.fleet.manager.submit(Operation("activate", plan.model, node, params))

    # --- the operation --------------------------------------------------------------------------

    async def __call__(self, op: Operation, manager: OperationManager) -> None:
        alias, params = op.params["alias"], op.params
        old = self.parts.resolver.aliases[alias].target
        manager.begin(op, f"activating {op.model} for {alias} on {', '.join(params['nodes'])}")
        if params["runtime"] == "ollama":
            target = await self._ollama(op, manager, old)
        else:
            served = await asyncio.gather(*(self._vllm(op, manager, n, old) for n in params["nodes"]))
            target = served[0]
        manager.say(op, "refreshing what the nodes serve")
        await self.parts.catalog.refresh()
        previous = await self.fleet.aliases.set(alias, target, operation_id=op.id)
        op.fraction = 1.0
        op.result = {"alias": alias, "previous": previous, "target": target, "nodes": params["nodes"]}
        manager.say(op, f"{alias} now points to {target}")
        log.info("alias %s switched from %s to %s (operation %s)", alias, previous, target, op.id)
        if params.get("unload_old") and params["runtime"] == "ollama" and normalize(previous) != normalize(target):
            unloaded = op.result["unloaded"] = await self._unload(op, manager, previous)
            kept = "skipped" in unloaded or any(v != "unloaded" for v in unloaded.values())
            manager.say(op, f"{alias} now points to {target}; {previous} " + ("not unloaded everywhere, see result"
                                                                               if kept else "unloaded"))  # fmt: skip

    async def _ollama(self, op: Operation, manager: OperationManager, old: str) -> str:
        nodes, children = op.params["nodes"], op.params.get("children", [])
        for child in children:
            if manager.get(child).state in RETRYABLE:
                await manager.retry(child)
        if children:
            manager.say(op, f"pulling {op.model} on {len(children)} node(s)")
            failed = [f"{c.node}: {c.error or c.state}" for c in await manager.follow(op, children)
                      if c.state != "succeeded"]  # fmt: skip
            if failed:
                raise ProxyError(f"pulling {op.model} failed ({'; '.join(failed)}); {op.params['alias']} stays on {old}",
                                 status=502)  # fmt: skip
        missing = await self._missing(op.model, nodes)
        if missing:
            raise ProxyError(f"{op.model} is not installed on {', '.join(missing)}; {op.params['alias']} stays on "
                             f"{old}", status=409)  # fmt: skip
        manager.say(op, f"loading {op.model} on {', '.join(nodes)}")
        registry = self.fleet.registry

        async def load(node: str) -> None:
            try:
                await registry.ollama(node).load(op.model, registry.config_of(node).preload_keep_alive)
            except ProxyError as exc:
                raise ProxyError(f"loading {op.model} on {node} failed: {exc.message}; {op.params['alias']} stays "
                                 f"on {old}", status=502) from None  # fmt: skip

        await asyncio.gather(*(load(n) for n in nodes))
        return op.model

    async def _unload(self, op: Operation, manager: OperationManager, previous: str) -> dict:
        still_used = {normalize(a.target) for a in self.parts.resolver.alias_models()}
        if normalize(previous) in still_used:
            return {"skipped": f"{previous} is still the target of another alias"}
        manager.say(op, f"unloading {previous}")
        outcome = {}
        for node in op.params["nodes"]:
            try:
                await self.fleet.registry.ollama(node).unload(previous)
                outcome[node] = "unloaded"
            except ProxyError as exc:
                outcome[node] = exc.message
        return outcome

    async def _vllm(self, op: Operation, manager: OperationManager, node: str, old: str) -> str:
        registry = self.fleet.registry
        config = registry.config_of(node)
        health = self.parts.catalog.health[node]
        served = op.params.get("served_name") or op.model
        was_draining = health.draining
        registry.drain(node)
        try:
            if health.in_flight:
                manager.say(op, f"{node}: waiting for {health.in_flight} request(s) in flight")
                if not await registry.wait_idle(node, config.drain_timeout):
                    log.warning("node %s: %d request(s) still in flight after %gs; restarting anyway",
                                node, health.in_flight, config.drain_timeout)  # fmt: skip
            deadline = time.monotonic() + config.activate_timeout
            link = self.fleet.agents.get(node)
            if link is not None:
                # The agent restarts the runtime it supervises with --model and --served-model-name.
                manager.say(op, f"{node}: restarting the runtime through its agent")
                await link.client.activate(op.model, served)
            else:
                argv = [a.replace("{model}", op.model).replace("{served_name}", served)
                        for a in config.activate_command]  # fmt: skip
                manager.say(op, f"{node}: running {argv[0]}")
                await self._run(node, argv, config.activate_timeout)
            manager.say(op, f"{node}: waiting for {served} to be served")
            return await self._served(op, node, served, deadline, config.activate_timeout, old)
        finally:
            if node in self.parts.catalog.health:
                registry.drain(node, was_draining)

    async def _run(self, node: str, argv: list[str], timeout: float) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)  # fmt: skip
        except OSError as exc:
            raise ProxyError(f"{node}: activate_command {argv[0]!r} could not start: {exc.strerror or exc}",
                             status=502) from None  # fmt: skip
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            if isinstance(exc, TimeoutError):
                raise ProxyError(f"{node}: activate_command did not finish within {timeout:g}s", status=504) from None
            raise
        if proc.returncode != 0:
            raise ProxyError(f"{node}: activate_command exited with status {proc.returncode}: {_tail(err or out)}",
                             status=502)  # fmt: skip

    async def _served(self, op: Operation, node: str, served: str, deadline: float, timeout: float, old: str) -> str:
        backend = self.parts.catalog.backends[node]
        by_root = "served_name" not in op.params
        last = "it has not answered yet"
        while True:
            try:
                await backend.probe()
                models = await backend.list_models()
            except ProxyError as exc:
                last = f"it does not answer: {exc.message}"
            else:
                for m in models:
                    if m.name == served or (by_root and m.details.get("root") == op.model):
                        return m.name
                last = f"it serves {', '.join(m.name for m in models) or 'nothing'}"
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))
        raise ProxyError(f"{node} did not serve {served!r} within {timeout:g}s ({last}); {op.params['alias']} stays "
                         f"on {old}", status=504)  # fmt: skip
