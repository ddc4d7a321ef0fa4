"""``llm-proxy status`` and ``llm-proxy pull``: a running proxy's admin API from the shell.

Both talk HTTP to ``--url`` (the proxy), with the admin key from
``LLM_PROXY_ADMIN_KEY`` when the proxy has ``server.admin_keys``. ``pull``
starts the pulls, then follows each operation's SSE events
(``GET /admin/operations/{id}/events``) and draws them with
:class:`proxy.terminal.PullProgress`.

Exit status: 0 on success; 1 when the proxy cannot be reached, refuses, or a
pull does not succeed.
"""

from __future__ import annotations

import asyncio
import os
from typing import TextIO

import httpx
import orjson

from .terminal import PullProgress, print_status

DEFAULT_URL = "http://127.0.0.1:8080"


class AdminUnavailable(Exception):
    """The proxy did not answer, or refused: the message says which and why."""


def _headers() -> dict[str, str]:
    key = os.environ.get("LLM_PROXY_ADMIN_KEY")
    return {"authorization": f"Bearer {key}"} if key else {}


def _check(response: httpx.Response) -> dict:
    if response.is_success:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    hint = " (set LLM_PROXY_ADMIN_KEY to a key from server.admin_keys)" if response.status_code == 401 else ""
    raise AdminUnavailable(f"{response.request.method} {response.request.url.path}: HTTP {response.status_code}: "
                           f"{message}{hint}")  # fmt: skip


def _unreachable(url: str, exc: Exception) -> AdminUnavailable:
    return AdminUnavailable(f"cannot reach the proxy at {url}: {exc.__class__.__name__}: {exc}")


def status(url: str, out: TextIO, *, tty: bool | None = None) -> int:
    try:
        with httpx.Client(base_url=url, headers=_headers(), timeout=15) as client:
            nodes = _check(client.get("/admin/nodes"))["data"]
            fleet = _check(client.get("/admin/status"))
            ops = [op for state in ("running", "queued")
                   for op in _check(client.get("/admin/operations", params={"state": state}))["data"]]  # fmt: skip
    except httpx.HTTPError as exc:
        raise _unreachable(url, exc) from None
    print_status(out, nodes, fleet, ops, tty=tty)
    return 0


def parse_nodes(value: str) -> list[str] | str:
    if value in ("all", "auto"):
        return value
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise AdminUnavailable('--nodes takes "all", "auto" or a comma-separated list of node names')
    return names


async def _follow(client: httpx.AsyncClient, op: dict, view: PullProgress) -> dict:
    """Feed one operation's SSE snapshots to the view until it ends; reconnect if the stream drops."""
    last = op
    for _ in range(100):
        try:
            async with client.stream("GET", f"/admin/operations/{op['id']}/events") as response:
                if not response.is_success:
                    await response.aread()
                    _check(response)
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        last = orjson.loads(line[5:])
                        view.update(last)
        except httpx.TransportError:
            await asyncio.sleep(1)
            continue
        if last["state"] not in ("queued", "running"):
            return last
    return last


async def _pull(url: str, model: str, nodes, force: bool, out: TextIO, tty: bool | None) -> int:
    timeout = httpx.Timeout(15, read=60)  # events come at least every 5 s
    async with httpx.AsyncClient(base_url=url, headers=_headers(), timeout=timeout) as client:
        try:
            started = _check(await client.post("/admin/models/pull", json={"model": model, "nodes": nodes,
                                                                           "force": force}))["data"]  # fmt: skip
        except httpx.HTTPError as exc:
            raise _unreachable(url, exc) from None
        with PullProgress(out, tty=tty) as view:
            for op in started:
                view.update(op)
            finals = await asyncio.gather(*(_follow(client, op, view) for op in started))
    failed = [op for op in finals if op["state"] != "succeeded"]
    for op in failed:
        out.write(f"{op['node']}: {model}: {op['state']}{': ' + op['error'] if op.get('error') else ''}\n")
    return 1 if failed else 0


def pull(url: str, model: str, nodes: str, *, force: bool = False, out: TextIO, tty: bool | None = None) -> int:
    return asyncio.run(_pull(url, model, parse_nodes(nodes), force, out, tty))
