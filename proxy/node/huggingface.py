"""Hugging Face weights for vLLM: planned, checked against the disk limits, downloaded, verified, recorded.

Downloads go through ``huggingface_hub`` (the official client) into its cache
layout under the agent's ``--models-dir`` (``models--org--name/blobs``,
``snapshots/<commit>``, ``refs``), so ``vllm serve org/name`` finds them with
``HF_HUB_CACHE`` pointing there, offline. ``HF_ENDPOINT`` picks the hub (a
mirror, or a fake one in the tests); the token comes from the environment
variable the agent's config names.

Resuming: the client resumes a transfer that breaks off within one call
(``Range``), but it writes each download to a temporary file unique to that
call and deletes it when the call fails, so a cancelled or failed pull (or an
agent restarted) would start every partial file over. So the bytes are fetched
here, with the client's own ``http_get``, into a stable
``blobs/<etag>.incomplete`` that outlives the call: the next attempt asks for
``Range: bytes=<size on disk>-``. The finished blob is renamed into place and
``hf_hub_download`` only links it into the snapshot. The ETag names the partial
file, so bytes of an older version of a file are never continued with a newer
one. Files already in the cache are not fetched again.

Every file is then checked: its SHA-256 against the hub's LFS metadata (the
git blob id for small files kept in git). A copy that does not match is
deleted and fetched again, up to ``verify_attempts`` times. What was installed
(size, SHA-256 per file, revision, commit, date) goes in the manifest,
``<models-dir>/llm-proxy-manifest.json``.

Everything here blocks (network, disk): the agent calls it in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from .config import DiskLimits

MANIFEST = "llm-proxy-manifest.json"
GB = 1_000_000_000
_HASH_CHUNK = 1024 * 1024


class HubError(Exception):
    """A download cannot go on; ``status`` is the HTTP status the agent answers with."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Cancelled(Exception):
    """The proxy stopped listening: the pull was cancelled."""


@dataclass
class RepoFile:
    path: str
    size: int
    sha256: str | None  # from the LFS metadata; None for a file kept in git
    git_oid: str | None

    def as_dict(self) -> dict:
        return {"name": self.path, "size": self.size, "sha256": self.sha256}


@dataclass
class Plan:
    repo: str
    revision: str
    commit: str
    files: list[RepoFile]
    cached_bytes: int = 0
    checks: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def needed_bytes(self) -> int:
        return max(0, self.total_bytes - self.cached_bytes)

    def as_dict(self) -> dict:
        return {"model": self.repo, "revision": self.revision, "commit": self.commit, "files": len(self.files),
                "total_bytes": self.total_bytes, "cached_bytes": self.cached_bytes,
                "needed_bytes": self.needed_bytes, **self.checks}  # fmt: skip


def repo_folder(models_dir: str | os.PathLike, repo: str) -> Path:
    return Path(models_dir) / ("models--" + repo.replace("/", "--"))


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_id(path: str | os.PathLike) -> str:
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes the files under ``path`` take (symlinks not followed: a snapshot's links point into blobs)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                full = os.path.join(root, name)
                if not os.path.islink(full):
                    total += os.path.getsize(full)
    return total


def check_disk(plan: Plan, limits: DiskLimits, models_dir: str, *, confirm: bool) -> str | None:
    """Why the download must not start (with the numbers), or None; records the figures in ``plan.checks``."""
    used = tree_bytes(models_dir)
    free = shutil.disk_usage(models_dir).free
    needed = plan.needed_bytes
    plan.checks = {"models_dir_bytes": used, "free_bytes": free, "max_disk_bytes": int(limits.max_disk_gb * GB),
                   "min_free_bytes": int(limits.min_free_gb * GB)}  # fmt: skip
    gb = lambda n: f"{n / GB:.2f} GB"  # noqa: E731
    if limits.max_disk_gb and used + needed > limits.max_disk_gb * GB:
        return (f"{plan.repo} needs {gb(needed)} more; the models directory holds {gb(used)} and max_disk_gb is "
                f"{limits.max_disk_gb:g} GB, so {gb(used + needed)} would exceed it")  # fmt: skip
    if free - needed < limits.min_free_gb * GB:
        return (f"{plan.repo} needs {gb(needed)}; {gb(free)} is free and min_free_gb is {limits.min_free_gb:g} GB, "
                f"so only {gb(free - needed)} would be left")  # fmt: skip
    if limits.confirm_above_gb and needed > limits.confirm_above_gb * GB and not confirm:
        return (f"{plan.repo} is {gb(needed)} to download, above confirm_above_gb ({limits.confirm_above_gb:g} GB); "
                'send "confirm": true to go ahead')  # fmt: skip
    return None


Progress = Callable[[int, int, str], None]  # (completed bytes, total bytes, status)


class _Recorder:
    """What huggingface_hub's download loop calls as its progress bar (a tqdm lookalike)."""

    sink: Callable[[int], None] = staticmethod(lambda n: None)
    cancelled: threading.Event | None = None

    def __init__(self, *args, **kwargs) -> None:
        self.n = int(kwargs.get("initial") or 0)
        type(self).sink(self.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise Cancelled("cancelled")
        self.n += n
        type(self).sink(self.n)

    def set_description(self, *args, **kwargs) -> None: ...

    def reset(self, total=None) -> None:
        self.n = 0
        type(self).sink(0)

    def refresh(self, *args, **kwargs) -> None: ...

    def close(self) -> None: ...


class HubClient:
    def __init__(self, models_dir: str, *, endpoint: str | None = None, token: str | None = None,
                 verify_attempts: int = 3) -> None:  # fmt: skip
        self.models_dir = models_dir
        self.endpoint = endpoint or None
        self.token = token or None
        self.verify_attempts = verify_attempts
        self._manifest_lock = threading.Lock()

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)

    def _hub_error(self, exc: Exception, repo: str, revision: str) -> HubError:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        if isinstance(exc, RevisionNotFoundError):
            return HubError(f"{repo} has no revision {revision!r} on the hub", 404)
        if isinstance(exc, GatedRepoError):
            return HubError(f"{repo} is gated: accept its licence on the hub and give the node a token", 403)
        if isinstance(exc, RepositoryNotFoundError):
            return HubError(f"{repo} is not on the hub (or is private and the node's token cannot see it)", 404)
        return HubError(f"the hub failed for {repo}: {type(exc).__name__}: {exc}", 502)

    # --- planning -------------------------------------------------------------------------------

    def plan(self, repo: str, revision: str = "main") -> Plan:
        api = self._api()
        try:
            commit = api.model_info(repo, revision=revision).sha
            entries = list(api.list_repo_tree(repo, revision=commit, recursive=True))
        except HubError:
            raise
        except Exception as exc:
            raise self._hub_error(exc, repo, revision) from None
        files = []
        for entry in entries:
            if getattr(entry, "size", None) is None or not hasattr(entry, "blob_id"):
                continue  # a folder
            lfs = getattr(entry, "lfs", None)
            files.append(RepoFile(entry.path, int(entry.size), lfs.sha256 if lfs else None, entry.blob_id))
        plan = Plan(repo, revision, commit, sorted(files, key=lambda f: f.path))
        folder = repo_folder(self.models_dir, repo)
        snapshot = folder / "snapshots" / commit
        for f in plan.files:
            if (snapshot / f.path).is_file():
                plan.cached_bytes += f.size
            else:  # what an interrupted attempt left: the download continues after it
                with contextlib.suppress(OSError):
                    partial = folder / "blobs" / f"{f.sha256 or f.git_oid}.incomplete"
                    plan.cached_bytes += min(f.size, partial.stat().st_size)
        return plan

    # --- downloading ----------------------------------------------------------------------------

    def download(self, plan: Plan, progress: Progress, cancelled: threading.Event | None = None) -> dict:
        """Every file of ``plan`` in the cache and verified; the manifest entry. Raises HubError or Cancelled."""
        from huggingface_hub import hf_hub_download

        total, done = plan.total_bytes, 0
        recorder = type("Recorder", (_Recorder,), {"cancelled": cancelled})
        refetched = []
        for index, item in enumerate(plan.files, 1):
            status = f"downloading {item.path} ({index} of {len(plan.files)})"
            recorder.sink = staticmethod(lambda n, base=done, s=status, size=item.size: progress(base + min(n, size),
                                                                                               total, s))  # fmt: skip
            progress(done, total, status)
            for attempt in range(1, self.verify_attempts + 1):
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled("cancelled")
                try:
                    self._fetch_blob(plan, item, recorder)
                    # The blob is in place: this only links it into the snapshot (a bad copy was
                    # discarded below, so the next attempt fetched it again from byte 0).
                    path = hf_hub_download(plan.repo, item.path, revision=plan.commit, cache_dir=self.models_dir,
                                           endpoint=self.endpoint, token=self.token, tqdm_class=recorder)  # fmt: skip
                except Cancelled:
                    raise
                except Exception as exc:
                    raise self._hub_error(exc, plan.repo, plan.revision) from None
                progress(done + item.size, total, f"verifying {item.path}")
                digest = sha256_of(path)
                if self._matches(item, path, digest):
                    break
                refetched.append(item.path)
                self._discard(path)
                if attempt == self.verify_attempts:
                    raise HubError(f"{item.path} of {plan.repo} does not match the hub's checksum after "
                                   f"{attempt} download(s); it was deleted", 502)  # fmt: skip
                progress(done, total, f"{item.path}: checksum mismatch, downloading it again")
            item.sha256 = digest
            done += item.size
        self._write_ref(plan)
        entry = {"model": plan.repo, "source": "huggingface", "revision": plan.revision, "commit": plan.commit,
                 "size": total, "installed_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                 "files": [f.as_dict() for f in plan.files]}  # fmt: skip
        self._record(entry)
        progress(total, total, "all files verified")
        return {**entry, "refetched": refetched}

    def _fetch_blob(self, plan: Plan, item: RepoFile, recorder: type) -> None:
        """``blobs/<etag>`` complete, continuing the ``.incomplete`` bytes an earlier attempt left."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import WeakFileLock, build_hf_headers

        url = hf_hub_url(plan.repo, item.path, revision=plan.commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
        if not meta.etag or "/" in meta.etag:
            return  # no usable name for the blob: leave the whole transfer to hf_hub_download
        blobs = repo_folder(self.models_dir, plan.repo) / "blobs"
        blob = blobs / meta.etag
        if blob.exists():
            return
        blobs.mkdir(parents=True, exist_ok=True)
        partial = blobs / (meta.etag + ".incomplete")
        headers = build_hf_headers(token=self.token)
        headers["Accept-Encoding"] = "identity"  # a byte offset only means something in the raw file
        if urlsplit(meta.location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # as the client does: the token is not sent to a CDN
        # The client's own lock for this blob: a second process on the same cache waits rather than
        # appending to the same partial file.
        lock = Path(self.models_dir, ".locks", repo_folder(self.models_dir, plan.repo).name, meta.etag + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if blob.exists():
                return
            with open(partial, "ab") as f:
                have = f.tell()
                if meta.size is not None and have > meta.size:
                    f.truncate(0)  # longer than the file can be: not a prefix of it
                    have = 0
                http_get(meta.location, f, resume_size=have, headers=headers, expected_size=meta.size,
                         displayed_filename=item.path, tqdm_class=recorder)  # fmt: skip
            os.replace(partial, blob)

    @staticmethod
    def _matches(item: RepoFile, path: str, digest: str) -> bool:
        if item.sha256 is not None:
            return digest == item.sha256
        return item.git_oid is None or git_blob_id(path) == item.git_oid

    @staticmethod
    def _discard(path: str) -> None:
        blob = os.path.realpath(path)
        for victim in (path, blob):
            with contextlib.suppress(FileNotFoundError):
                os.remove(victim)

    def _write_ref(self, plan: Plan) -> None:
        # With revision=<commit> the client writes no ref for the branch: write it, so that offline
        # `vllm serve org/name` (revision main) resolves to this snapshot.
        if plan.revision != plan.commit:
            ref = repo_folder(self.models_dir, plan.repo) / "refs" / plan.revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(plan.commit)

    # --- the manifest ---------------------------------------------------------------------------

    def manifest(self) -> list[dict]:
        try:
            data = orjson.loads(Path(self.models_dir, MANIFEST).read_bytes())
        except FileNotFoundError:
            return []
        return data.get("data", [])

    def _save(self, entries: list[dict]) -> None:
        target = Path(self.models_dir, MANIFEST)
        fd, tmp = tempfile.mkstemp(dir=self.models_dir, prefix=".manifest-")
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps({"object": "list", "data": entries}, option=orjson.OPT_INDENT_2))
        os.replace(tmp, target)

    def _record(self, entry: dict) -> None:
        with self._manifest_lock:
            entries = [e for e in self.manifest() if e.get("model") != entry["model"]]
            self._save([*entries, entry])

    def delete(self, repo: str) -> bool:
        """The repository out of the cache and the manifest; False if it was not there."""
        folder = repo_folder(self.models_dir, repo)
        existed = folder.exists()
        if existed:
            shutil.rmtree(folder)
        shutil.rmtree(Path(self.models_dir, ".locks", folder.name), ignore_errors=True)
        with self._manifest_lock:
            entries = self.manifest()
            kept = [e for e in entries if e.get("model") != repo]
            if len(kept) != len(entries):
                self._save(kept)
                existed = True
        return existed
