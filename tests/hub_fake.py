"""A small Hugging Face Hub on loopback, for the real ``huggingface_hub`` client (``HF_ENDPOINT``).

It implements what the client calls (see /work/shared/reference/huggingface-hub.md):
model info with ``sha`` and ``siblings``, the recursive tree listing with LFS
metadata, and ``HEAD``/``GET`` on ``/{repo}/resolve/{revision}/{path}`` with
``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, a
relative redirect for them (as the hub does), and ``Range``. Faults on request:
``corrupt_once`` serves wrong bytes (right length) once, ``cut_once`` closes the
connection once after a given number of body bytes, so the client must resume
with Range; ``hold_once`` sends part of a body and waits for an event before the
rest, so a test can cancel a transfer with bytes already on disk. (The client resumes from the last whole chunk it wrote, 10 MiB, so a
resume test cuts a file past that.)

A plain ``http.server`` rather than an ASGI app: cutting a body short at a
chosen byte is what the resume test needs.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import orjson

# Before huggingface_hub is imported anywhere in the tests: plain HTTP, no Xet, no telemetry.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # paths stored in LFS (sha256 metadata)

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + self.files[path])
        return digest.hexdigest()

    def etag(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest() if path in self.lfs else git_oid(self.files[path])


def tiny_repo(weights_bytes: int = 300_000) -> Repo:
    """A model repository small enough for a test: a config, a tokenizer and LFS weights."""
    weights = random.Random(weights_bytes).randbytes(weights_bytes)
    return Repo({"config.json": b'{"model_type": "llama", "hidden_size": 64}\n',
                 "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
                 "model.safetensors": weights}, lfs={"model.safetensors"})  # fmt: skip


class FakeHub:
    def __init__(self, token: str | None = None) -> None:
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, range)
        self.auth_seen: list[str | None] = []
        self.corrupt_once: set[str] = set()
        self.cut_once: dict[str, int] = {}  # path -> bytes sent before the connection is closed
        self.slow: dict[str, float] = {}  # path -> seconds to wait before each 64 KiB of its body
        # path -> (bytes sent, then wait for the event before the rest): a transfer held mid-way, once
        self.hold_once: dict[str, tuple[int, threading.Event]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def gets(self, path_end: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(path_end)]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, data: object) -> None:
        self._send(200, orjson.dumps(data), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str, extra: dict | None = None) -> None:
        self._send(status, orjson.dumps({"error": message}), {"X-Error-Code": code, "X-Error-Message": message,
                                                               "Content-Type": "application/json", **(extra or {})})  # fmt: skip

    def _record(self) -> str:
        path = unquote(urlsplit(self.path).path)
        with self.hub._lock:
            self.hub.requests.append((self.command, path, self.headers.get("Range")))
            self.hub.auth_seen.append(self.headers.get("authorization"))
        return path

    def _authorized(self) -> bool:
        if self.hub.token is None:
            return True
        if self.headers.get("authorization") == f"Bearer {self.hub.token}":
            return True
        self._error(401, "RepoNotFound", "Repository not found")
        return False

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        path = self._record()
        if not self._authorized():
            return
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api(parts[2] + "/" + parts[3], parts[4:])
        if len(parts) >= 5 and parts[2] in ("resolve", "lfs-cdn"):
            return self._file(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), head, cdn=parts[2] == "lfs-cdn")
        self._error(404, "EntryNotFound", f"no route {path}")

    def _repo(self, repo_id: str, revision: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Revision {revision} not found")
            return None
        return repo

    def _api(self, repo_id: str, rest: list[str]) -> None:
        revision = unquote(rest[1]) if len(rest) >= 2 else "main"
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            siblings = [{"rfilename": p, "size": len(b), **({"lfs": {"sha256": repo.etag(p), "size": len(b), "pointerSize": 134}}
                                                            if p in repo.lfs else {})}
                        for p, b in sorted(repo.files.items())]  # fmt: skip
            return self._json({"id": repo_id, "sha": repo.commit, "siblings": siblings, "private": False})
        if rest[0] == "tree":
            entries = []
            for p, b in sorted(repo.files.items()):
                entry = {"type": "file", "path": p, "oid": git_oid(b), "size": len(b)}
                if p in repo.lfs:
                    entry["lfs"] = {"oid": repo.etag(p), "size": len(b), "pointerSize": 134}
                entries.append(entry)
            return self._json(entries)
        self._error(404, "EntryNotFound", "unknown api path")

    def _file(self, repo_id: str, revision: str, name: str, head: bool, *, cdn: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        data = repo.files.get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} not found", {"X-Repo-Commit": repo.commit})
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(name)}"', "Accept-Ranges": "bytes"}
        if name in repo.lfs and not cdn:
            # The hub answers LFS files with a redirect, the metadata in the X-Linked-* headers.
            headers.update({"X-Linked-Etag": f'"{repo.etag(name)}"', "X-Linked-Size": str(len(data)),
                            "Location": f"/{repo_id}/lfs-cdn/{repo.commit}/{name}"})  # fmt: skip
            return self._send(302, b"", headers, head=head)
        if head:
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        with self.hub._lock:
            corrupt = name in self.hub.corrupt_once
            cut = self.hub.cut_once.pop(name, None)
            hold = self.hub.hold_once.pop(name, None)
            self.hub.corrupt_once.discard(name)
        if corrupt:
            data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
        start = 0
        ranged = self.headers.get("Range")
        if ranged and ranged.startswith("bytes="):
            start = int(ranged[6:].split("-")[0] or 0)
        body = data[start:]
        self.send_response(206 if start else 200)
        for k, v in headers.items():
            self.send_header(k, v)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if hold is not None:
            self.wfile.write(body[: hold[0]])
            self.wfile.flush()
            hold[1].wait(60)
            body = body[hold[0] :]
        delay = self.hub.slow.get(name)
        if not delay:
            self.wfile.write(body)
            return
        for offset in range(0, len(body), 65536):
            time.sleep(delay)  # a slow link, so a test can watch the transfer run
            self.wfile.write(body[offset : offset + 65536])
