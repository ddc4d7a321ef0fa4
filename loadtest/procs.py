"""The processes a benchmark run owns: a simulated backend, proxies, load generators.

Each runs as its own OS process, so the proxy's CPU and memory can be read from
``/proc`` without the load generator's or the backend's mixed in, and the
scheduler can spread them over the cores as it would in production.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class RunError(RuntimeError):
    """A process of the benchmark failed to start or to finish its job."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- /proc readings


def _stat(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn's workers under its supervisor)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process (every thread) and of its live children, in seconds.

    With ``--workers N`` the proxy is a supervisor and N worker processes; their CPU is what counts.
    Children that exited are not included: a round reads the workers that served it.
    """
    total = 0
    for each in descendants(pid):
        with contextlib.suppress(OSError, IndexError):
            fields = _stat(each)
            total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE


def _peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return rss_bytes(pid)


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the highest resident set size since start or since :func:`reset_peak_rss`, summed over
    the process and its children (each worker's own peak: an upper bound of their peak together)."""
    total = 0
    for each in descendants(pid):
        with contextlib.suppress(OSError):
            total += _peak(each)
    return total


def reset_peak_rss(pid: int) -> bool:
    """Restart VmHWM from the current RSS, so each round reports its own peak (Linux >= 4.0)."""
    try:
        for each in descendants(pid):
            Path(f"/proc/{each}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# Streams held open at once need a descriptor each on the client, two in the proxy (its client's
# and its backend's) and one in the backend: 10,000 streams outgrow the usual limits (1024, 20000).
OPEN_FILES = 65536


def raise_open_files(wanted: int = OPEN_FILES) -> int:
    """Raise this process's RLIMIT_NOFILE towards ``wanted`` (the hard limit too, when allowed: root);
    returns the soft limit now in force. Children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
        return wanted
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ----------------------------------------------------------------------------- services


class Service:
    """A child process that serves HTTP until stopped; its output goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        # Both streams to the file: a pipe nobody reads would stall the child once it fills up.
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def fail(self, what: str) -> RunError:
        return RunError(f"{self.name} {what}\n  command: {' '.join(self.argv)}\n{self.log_tail()}")

    def wait_for_output(self, marker: str, timeout: float) -> str:
        """The first line of the process's output containing ``marker`` (a sim prints its URL)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if marker in line:
                    return line.strip()
            if self.proc.poll() is not None:
                raise self.fail(f"exited with status {self.proc.returncode} during start-up")
            time.sleep(0.05)
        raise self.fail(f"printed no {marker!r} within {timeout:g} s")

    def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.fail(f"exited with status {self.proc.returncode} during start-up")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                    return
            time.sleep(0.1)
        raise self.fail(f"was not ready at {url} within {timeout:g} s")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise self.fail(f"died with status {self.proc.returncode}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Sim(Service):
    """``python -m proxy.sim``: a simulated Ollama or vLLM, re-scripted over ``/_sim/``."""

    # What clients call the model, on both paths; vLLM is given a served name, as deployments do.
    MODELS = {"ollama": "llama3.1:8b", "vllm": "qwen2.5-7b"}

    def __init__(self, kind: str, reply: str, workdir: Path) -> None:
        model = self.MODELS[kind]
        argv = [sys.executable, "-m", "proxy.sim", kind, "--port", "0", "--reply", reply]
        if kind == "vllm":
            argv += ["--model", "Qwen/Qwen2.5-7B-Instruct", "--served-model-name", model]
        else:
            argv += ["--model", model]
        super().__init__(f"simulated {kind}", argv, workdir / f"sim-{kind}.log")
        self.kind = kind
        self.model = model
        try:
            line = self.wait_for_output("http://", timeout=30)
            self.url = line[line.index("http://") :].split()[0]
            self.wait_ready(f"{self.url}/_sim/stats")
        except BaseException:
            self.stop()
            raise

    def behave(self, **changes: object) -> None:
        resp = httpx.patch(f"{self.url}/_sim/behavior", content=orjson.dumps(changes), trust_env=False)
        if resp.status_code != 200:
            raise self.fail(f"refused behaviour {changes}: {resp.text}")

    def reset(self) -> None:
        """Forget the request log, which the sim keeps for tests and would otherwise grow all run."""
        httpx.post(f"{self.url}/_sim/reset", trust_env=False).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_sim/stats", trust_env=False).json()


def proxy_config(sim: Sim, port: int, db_path: Path, features: str) -> dict:
    """The proxy's YAML for one backend. ``features``: ``default`` (as shipped), ``off`` or ``on``.

    ``on`` turns every optional per-request feature on, cache included for every request
    (``always``), so a run with unique prompts pays for a cache lookup and store that never hit.
    """
    config: dict = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"path": str(db_path)},
        "backends": [{"name": f"sim-{sim.kind}", "kind": sim.kind, "url": sim.url}],
    }
    if features == "off":
        config |= {"history": {"enabled": False}, "metrics": {"enabled": False}, "cache": {"mode": "off"}}
    elif features == "on":
        config |= {"history": {"enabled": True}, "metrics": {"enabled": True}, "cache": {"mode": "always"}}
    return config


class Proxy(Service):
    """``python -m proxy serve`` with one uvicorn worker (or ``workers``), in front of ``sim``."""

    def __init__(self, label: str, sim: Sim, workdir: Path, features: str = "default", workers: int = 1) -> None:
        port = free_port()
        config_path = workdir / f"{label}.yaml"
        config = proxy_config(sim, port, workdir / f"{label}.db", features)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config_path), "--log-level", "warning"]
        if workers > 1:
            argv += ["--workers", str(workers)]
        super().__init__(label, argv, workdir / f"{label}.log")
        self.url = f"http://127.0.0.1:{port}"
        try:
            self.wait_ready(f"{self.url}/ready")
        except BaseException:
            self.stop()
            raise


# ----------------------------------------------------------------------------- load generators


@dataclass(frozen=True)
class LoadSpec:
    """One round of load from one generator process."""

    client: str  # "locust" or "asyncio"
    kind: str  # "chat" or "stream"
    users: int
    warmup: float  # seconds of load before recording starts (connections, caches, spawning)
    duration: float  # seconds recorded
    ramp: float = 0.0  # seconds over which the users start
    timeout: float = 60.0  # seconds one request may take (a slow stream: longer)


def run_load(spec: LoadSpec, host: str, model: str, workdir: Path, max_tokens: int) -> dict:
    """Run one load generator process to completion and return what it recorded."""
    module = "loadtest.locust_round" if spec.client == "locust" else "loadtest.aioload"
    with tempfile.NamedTemporaryFile(dir=workdir, suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    argv = [sys.executable, "-m", module, "--host", host, "--kind", spec.kind, "--users", str(spec.users),
            "--warmup", str(spec.warmup), "--duration", str(spec.duration), "--ramp", str(spec.ramp),
            "--out", str(out_path)]  # fmt: skip
    env = {**os.environ, "LOAD_CHAT_MODEL": model, "LOAD_MAX_TOKENS": str(max_tokens), "LOAD_UNIQUE": "1",
           "LOAD_PROMPT": "Write two sentences about load testing."}  # fmt: skip
    env["LOAD_TIMEOUT"] = str(spec.timeout)
    env.pop("LOAD_API_KEY", None)
    # requests (Locust's HttpUser) would send loopback traffic through a proxy named in the environment.
    for name in [k for k in env if k.lower() in ("http_proxy", "https_proxy", "all_proxy")]:
        del env[name]
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    limit = spec.warmup + spec.duration + spec.ramp + max(60, spec.timeout)
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        raise RunError(f"load generator did not finish within {limit:g} s: {' '.join(argv)}") from exc
    try:
        if done.returncode != 0:
            tail = "\n".join(done.stderr.splitlines()[-30:])
            raise RunError(f"load generator failed ({done.returncode}): {' '.join(argv)}\n{tail}")
        return orjson.loads(out_path.read_bytes())
    finally:
        out_path.unlink(missing_ok=True)
