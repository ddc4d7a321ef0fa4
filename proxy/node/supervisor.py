"""The runtime, kept running: as the agent's own child (a process group), or as a systemd unit.

Child mode: the command runs in a new session, so it and every worker it forks
share one process group, which is what is signalled. Stopping sends SIGTERM to
the group, then SIGKILL after ``stop_timeout``, and SIGKILL again to whatever of
the group outlived its leader: no worker is left holding GPU memory. A child
that exits on its own is restarted after a backoff (doubling, back to the start
once a run lasted ``stable_after``), and counted in ``restarts``. Its output goes
to a log file rotated by size. The child also gets SIGTERM if the agent dies
without stopping it (``PR_SET_PDEATHSIG``).

systemd mode: the agent only runs ``systemctl`` (start, stop, restart, show);
systemd restarts the unit. A unit already active is not started again, so an
``ollama.service`` the operator runs is adopted, not doubled. The unit owns the
command line, so switching the model goes the systemd way: the agent writes
``<env_dir>/<unit>.env`` (``MODEL``, ``SERVED_MODEL_NAME``; atomically, 0644),
which the unit reads with ``EnvironmentFile=``, then restarts the unit. The
names are not ``VLLM_*``: vLLM warns about every unknown variable of its own prefix.

External (neither): the runtime is someone else's; the agent only watches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from .config import SupervisorConfig

log = logging.getLogger("llm_proxy.node")

_PR_SET_PDEATHSIG = 1
_READ_CHUNK = 65536


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RotatingLog:
    """Appends bytes to ``path``; past ``max_bytes`` the file becomes ``path.1`` (older ones shift). Blocking."""

    def __init__(self, path: str | os.PathLike, max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
            size = f.tell()
        if size >= self.max_bytes:
            self.rotate()

    def rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))


def with_model(argv: list[str], model: str, served_name: str) -> list[str]:
    """``argv`` serving ``model`` as ``served_name``: earlier --model / --served-model-name dropped, then added.

    A positional model (``vllm serve MODEL``) is replaced too: the word after ``serve``."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            # --served-model-name takes one or more names: skip until the next option.
            if arg.startswith("-"):
                skip = False
            else:
                continue
        if arg in ("--model", "--served-model-name"):
            skip = True
            continue
        if arg.startswith(("--model=", "--served-model-name=")):
            continue
        if i > 0 and argv[i - 1] == "serve" and not arg.startswith("-"):
            continue
        out.append(arg)
    return [*out, "--model", model, "--served-model-name", served_name]


class ChildSupervisor:
    mode = "child"

    def __init__(self, argv: list[str], config: SupervisorConfig, log_path: str | os.PathLike,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        if not argv:
            raise ValueError("an empty command")
        self.argv = list(argv)
        self.config = config
        self.log = RotatingLog(log_path, config.log_max_bytes, config.log_backups)
        self.env = env
        self.state = "stopped"
        self.restarts = 0
        self.last_exit: int | None = None
        self.last_error: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._started = 0.0
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._planned = False  # a restart asked for (activation): not a failure, no backoff
        self._wake = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def status(self) -> dict:
        running = self.pid is not None
        return {"pid": self.pid, "state": self.state, "restarts": self.restarts,
                "uptime_seconds": round(time.monotonic() - self._started, 1) if running else None,
                "last_exit": self.last_exit, "error": self.last_error}  # fmt: skip

    async def start(self) -> None:
        self._stopping = False
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="runtime-supervisor")

    async def restart(self, argv: list[str] | None = None) -> None:
        """Stop the child and start it again (with ``argv`` if given), without counting a failure."""
        if argv is not None:
            self.argv = list(argv)
        self._planned = True
        self._wake.set()  # a child in backoff starts at once
        proc = self._proc
        if proc is not None and proc.returncode is None:
            await self._terminate(proc)
        if self._task is None or self._task.done():
            await self.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self.state = "stopping"
            await self._terminate(proc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = "stopped"

    async def _loop(self) -> None:
        backoff = self.config.backoff
        while not self._stopping:
            self._planned = False
            ran = await self._run_once()
            if self._stopping:
                break
            if self._planned:
                continue
            self.restarts += 1
            backoff = self.config.backoff if ran >= self.config.stable_after else backoff
            self.state = "backoff"
            log.warning("runtime exited (status %s, after %.1fs); restart %d in %gs", self.last_exit, ran,
                        self.restarts, backoff)  # fmt: skip
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            backoff = min(backoff * 2, self.config.max_backoff)

    async def _run_once(self) -> float:
        """Start the child, pump its output, wait for it to end; the seconds it ran."""
        self.state = "starting"
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=self.env,
                preexec_fn=_die_with_parent)  # fmt: skip
        except OSError as exc:
            self.last_error = f"cannot start {self.argv[0]!r}: {exc.strerror or exc}"
            self.state = "failed"
            log.error("runtime: %s", self.last_error)
            return 0.0
        self._proc, self._started = proc, time.monotonic()
        self.state, self.last_error = "running", None
        log.info("runtime started, pid %d: %s", proc.pid, " ".join(self.argv))
        pump = asyncio.get_running_loop().create_task(self._pump(proc.stdout))
        try:
            self.last_exit = await proc.wait()
        finally:
            # The leader is gone; its workers may not be. None of the group outlives it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pump, 5.0)
        return time.monotonic() - self._started

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(_READ_CHUNK):
            try:
                await asyncio.to_thread(self.log.write, chunk)
            except OSError as exc:
                log.warning("runtime log %s: %s", self.log.path, exc)

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to the group, SIGKILL after stop_timeout; returns once the leader is reaped."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), self.config.stop_timeout)
        except TimeoutError:
            log.warning("runtime pid %d did not stop within %gs; killing it", proc.pid, self.config.stop_timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


Runner = Callable[[list[str]], Awaitable[tuple[int, str]]]


async def run_command(argv: list[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode, out.decode("utf-8", "replace")


SHOW_PROPERTIES = ("MainPID", "ActiveState", "SubState", "NRestarts", "ActiveEnterTimestampMonotonic")


def systemctl(action: str, unit: str) -> list[str]:
    """The command the agent runs for ``action`` (start, stop, restart, is-active, show)."""
    if action == "show":
        return ["systemctl", "show", unit, *(f"--property={p}" for p in SHOW_PROPERTIES)]
    if action not in ("start", "stop", "restart", "is-active"):
        raise ValueError(f"unknown systemctl action {action!r}")
    return ["systemctl", action, "--no-ask-password", unit] if action != "is-active" else ["systemctl", action, unit]


def parse_show(text: str, now_monotonic: float) -> dict:
    """``systemctl show`` key=value lines as the runtime's pid, state, restarts and uptime."""
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    pid = int(values.get("MainPID") or 0) or None
    active = values.get("ActiveState", "unknown")
    entered = int(values.get("ActiveEnterTimestampMonotonic") or 0)
    uptime = round(now_monotonic - entered / 1e6, 1) if active == "active" and entered else None
    state = {"active": "running", "activating": "starting", "deactivating": "stopping", "inactive": "stopped",
             "failed": "failed"}.get(active, active)  # fmt: skip
    return {"pid": pid, "state": state, "restarts": int(values.get("NRestarts") or 0), "uptime_seconds": uptime,
            "unit_state": f"{active}/{values.get('SubState', '')}"}  # fmt: skip


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``path`` holds ``data`` whole or keeps its old content: a unit starting meanwhile never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class SystemdUnit:
    mode = "systemd"

    def __init__(self, unit: str, runner: Runner = run_command, env_dir: str | None = None) -> None:
        self.unit = unit
        self.runner = runner
        self.env_dir = env_dir
        self._last: dict = {"pid": None, "state": "unknown", "restarts": 0, "uptime_seconds": None}

    async def _systemctl(self, action: str) -> str:
        code, out = await self.runner(systemctl(action, self.unit))
        if code != 0 and action != "is-active":
            raise RuntimeError(f"systemctl {action} {self.unit} exited with status {code}: {out.strip()[-500:]}")
        return out.strip()

    async def is_active(self) -> bool:
        return await self._systemctl("is-active") == "active"

    async def start(self) -> None:
        if await self.is_active():
            log.info("%s is active already: adopted, not started again", self.unit)
            return
        await self._systemctl("start")

    async def restart(self, argv: list[str] | None = None) -> None:
        if argv is not None:
            raise RuntimeError(f"{self.unit} is a systemd unit: its command line is the unit's, change it there")
        await self._systemctl("restart")

    @property
    def env_file(self) -> Path | None:
        if not self.env_dir:
            return None
        return Path(self.env_dir, self.unit.removesuffix(".service") + ".env")

    async def switch_model(self, model: str, served_name: str, cache_dir: str | None = None) -> Path:
        """The unit restarted on ``model``, served as ``served_name`` (both already checked as plain ids);
        ``cache_dir``, the agent's models directory, is where the runtime looks for Hugging Face weights."""
        target = self.env_file
        if target is None:
            raise RuntimeError(f"{self.unit}: no systemd.env_dir in the agent config to write the model to")
        text = (f"# Written by llm-proxy node: the model {self.unit} serves. Replaced at each switch; "
                f"the unit reads it with EnvironmentFile=.\nMODEL={model}\nSERVED_MODEL_NAME={served_name}\n")  # fmt: skip
        if cache_dir:
            text += f"HF_HUB_CACHE={cache_dir}\n"
        await asyncio.to_thread(write_atomically, target, text.encode())
        await self._systemctl("restart")
        return target

    async def stop(self) -> None:
        """The agent stopping leaves the unit to systemd: it was running before us, or systemd starts it at boot."""

    async def refresh(self) -> dict:
        self._last = parse_show(await self._systemctl("show"), time.monotonic())
        return self._last

    def status(self) -> dict:
        return dict(self._last)


class External:
    """A runtime someone else runs: watched over HTTP only."""

    mode = "external"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def restart(self, argv: list[str] | None = None) -> None:
        raise RuntimeError("the runtime is not supervised by the agent (start it with --run or --systemd-unit)")

    def status(self) -> dict:
        return {"pid": None, "state": None, "restarts": 0, "uptime_seconds": None}
