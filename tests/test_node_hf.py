"""Hugging Face provisioning with the real ``huggingface_hub`` client against a fake Hub on loopback
(tests/hub_fake.py): the cache layout, the manifest, a corrupted file detected and fetched again,
an interrupted transfer resumed with Range, the disk limits, the token from the environment."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from proxy.node.config import DiskLimits  # noqa: E402
from proxy.node.huggingface import MANIFEST, Cancelled, HubClient, HubError, check_disk, repo_folder  # noqa: E402
from tests.hub_fake import FakeHub, tiny_repo  # first: it sets the client's environment before any import of it

REPO = "acme/tiny"


@pytest.fixture
def hub():
    with FakeHub() as fake:
        fake.repos[REPO] = tiny_repo()
        yield fake


def _download(client: HubClient, repo: str = REPO, revision: str = "main"):
    seen = []
    plan = client.plan(repo, revision)
    entry = client.download(plan, lambda done, total, status: seen.append((done, total, status)))
    return plan, entry, seen


def test_files_land_in_the_hub_cache_layout_and_the_manifest_says_what_they_are(hub, tmp_path):
    repo = hub.repos[REPO]
    client = HubClient(str(tmp_path), endpoint=hub.url)
    plan, entry, seen = _download(client)
    folder = repo_folder(tmp_path, REPO)
    assert folder.name == "models--acme--tiny"
    assert (folder / "refs" / "main").read_text() == repo.commit
    snapshot = folder / "snapshots" / repo.commit
    for path, data in repo.files.items():
        assert (snapshot / path).read_bytes() == data
        assert (snapshot / path).is_symlink()
    assert (folder / "blobs" / hashlib.sha256(repo.files["model.safetensors"]).hexdigest()).is_file()
    assert entry["commit"] == repo.commit and entry["revision"] == "main" and entry["source"] == "huggingface"
    assert entry["size"] == sum(len(d) for d in repo.files.values())
    assert {f["name"]: (f["size"], f["sha256"]) for f in entry["files"]} == {
        p: (len(d), hashlib.sha256(d).hexdigest()) for p, d in repo.files.items()}  # fmt: skip
    assert entry["installed_at"].endswith("Z") and entry["refetched"] == []
    manifest = client.manifest()
    assert [m["model"] for m in manifest] == [REPO] and "refetched" not in manifest[0]
    assert (tmp_path / MANIFEST).is_file()
    # Progress only goes up, and ends with everything done.
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and seen[-1] == (entry["size"], entry["size"], "all files verified")
    # Planned again, everything is cached: nothing left to fetch.
    assert client.plan(REPO).needed_bytes == 0


def test_a_corrupted_file_is_detected_deleted_and_fetched_again(hub, tmp_path):
    hub.corrupt_once.add("model.safetensors")
    _, entry, seen = _download(HubClient(str(tmp_path), endpoint=hub.url))
    assert entry["refetched"] == ["model.safetensors"]
    assert len(hub.gets("/model.safetensors")) == 2
    assert any("checksum mismatch" in status for _, _, status in seen)
    data = hub.repos[REPO].files["model.safetensors"]
    snapshot = repo_folder(tmp_path, REPO) / "snapshots" / hub.repos[REPO].commit
    assert (snapshot / "model.safetensors").read_bytes() == data


def test_a_file_that_stays_corrupted_fails_the_download_and_is_not_kept(hub, tmp_path):
    client = HubClient(str(tmp_path), endpoint=hub.url, verify_attempts=2)
    plan = client.plan(REPO)
    original = hub.repos[REPO].files["config.json"]

    class AlwaysBad(set):
        def __contains__(self, item):
            return item == "config.json"

        def discard(self, item):
            pass

    hub.corrupt_once = AlwaysBad()
    with pytest.raises(HubError, match="does not match the hub's checksum after 2 download"):
        client.download(plan, lambda *a: None)
    snapshot = repo_folder(tmp_path, REPO) / "snapshots" / plan.commit
    assert not (snapshot / "config.json").exists()
    assert client.manifest() == []
    assert original  # the fake kept the right bytes; the client never stored the wrong ones


def test_an_interrupted_transfer_resumes_where_it_stopped(tmp_path):
    # The client resumes from the last whole chunk it wrote (10 MiB): the weights are larger than that.
    with FakeHub() as hub:
        hub.repos[REPO] = tiny_repo(12 * 1024 * 1024)
        hub.cut_once["model.safetensors"] = 11 * 1024 * 1024
        _, entry, _ = _download(HubClient(str(tmp_path), endpoint=hub.url))
        gets = hub.gets("/model.safetensors")
    assert [r for _, _, r in gets] == [None, "bytes=10485760-"]
    data = hub.repos[REPO].files["model.safetensors"]
    sha = {f["name"]: f["sha256"] for f in entry["files"]}["model.safetensors"]
    assert sha == hashlib.sha256(data).hexdigest()


def test_a_download_in_progress_can_be_cancelled(hub, tmp_path):
    cancelled = threading.Event()
    client = HubClient(str(tmp_path), endpoint=hub.url)
    plan = client.plan(REPO)

    def progress(done, total, status):
        if status.startswith("downloading model.safetensors"):
            cancelled.set()

    with pytest.raises(Cancelled):
        client.download(plan, progress, cancelled)
    assert client.manifest() == []


def test_the_token_comes_from_the_environment_and_unknown_repos_are_clear(tmp_path):
    with FakeHub(token="hf_secret_token") as hub:
        hub.repos[REPO] = tiny_repo(1000)
        with pytest.raises(HubError, match="not on the hub"):
            HubClient(str(tmp_path), endpoint=hub.url).plan(REPO)
        _download(HubClient(str(tmp_path), endpoint=hub.url, token="hf_secret_token"))
        assert set(hub.auth_seen[-3:]) == {"Bearer hf_secret_token"}
        with pytest.raises(HubError, match="no revision"):
            HubClient(str(tmp_path), endpoint=hub.url, token="hf_secret_token").plan(REPO, "v9")


def test_disk_limits_refuse_before_anything_starts_with_the_numbers(hub, tmp_path):
    client = HubClient(str(tmp_path), endpoint=hub.url)
    plan = client.plan(REPO)
    assert check_disk(plan, DiskLimits(max_disk_gb=1, min_free_gb=0), str(tmp_path), confirm=False) is None
    over = check_disk(plan, DiskLimits(max_disk_gb=0.0001, min_free_gb=0), str(tmp_path), confirm=False)
    assert over.startswith("acme/tiny needs 0.00 GB more") and "max_disk_gb is 0.0001 GB" in over
    assert plan.checks["max_disk_bytes"] == 100_000
    free_gb = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize / 1e9
    floor = check_disk(plan, DiskLimits(min_free_gb=free_gb + 10), str(tmp_path), confirm=False)
    assert floor and "min_free_gb" in floor and "would be left" in floor
    ask = check_disk(plan, DiskLimits(min_free_gb=0, confirm_above_gb=0.0001), str(tmp_path), confirm=False)
    assert ask and '"confirm": true' in ask
    assert check_disk(plan, DiskLimits(min_free_gb=0, confirm_above_gb=0.0001), str(tmp_path), confirm=True) is None
    assert list(Path(tmp_path).iterdir()) == []  # nothing was written


def test_delete_removes_the_repository_and_its_manifest_entry(hub, tmp_path):
    client = HubClient(str(tmp_path), endpoint=hub.url)
    _download(client)
    assert client.delete(REPO) is True
    assert not repo_folder(tmp_path, REPO).exists() and client.manifest() == []
    assert client.delete(REPO) is False


def test_a_download_cancelled_part_way_continues_from_the_bytes_on_disk_after_a_restart(tmp_path, monkeypatch):
    # Small chunks, so a cancel leaves bytes on disk without a 10 MiB file (the client writes whole chunks).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    with FakeHub() as hub:
        hub.repos[REPO] = tiny_repo(1_000_000)
        data = hub.repos[REPO].files["model.safetensors"]
        cancelled = threading.Event()
        started: list[int] = []

        def progress(done, total, status):
            if status.startswith("downloading model.safetensors"):
                started.append(done)
                if done - started[0] >= 300_000:
                    cancelled.set()

        first = HubClient(str(tmp_path), endpoint=hub.url)
        with pytest.raises(Cancelled):
            first.download(first.plan(REPO), progress, cancelled)
        partial = repo_folder(tmp_path, REPO) / "blobs" / f"{hashlib.sha256(data).hexdigest()}.incomplete"
        kept = partial.stat().st_size
        assert 300_000 <= kept < len(data) and partial.read_bytes() == data[:kept]

        hub.requests.clear()
        again = HubClient(str(tmp_path), endpoint=hub.url)  # a new client: as after an agent restart
        plan = again.plan(REPO)
        assert plan.cached_bytes >= kept  # the disk check counts only what is left to fetch
        seen = []
        entry = again.download(plan, lambda *a: seen.append(a))
        gets = hub.gets("/model.safetensors")
    assert [r for _, _, r in gets] == [f"bytes={kept}-"]
    assert {f["name"]: f["sha256"] for f in entry["files"]}["model.safetensors"] == hashlib.sha256(data).hexdigest()
    snapshot = repo_folder(tmp_path, REPO) / "snapshots" / plan.commit
    assert (snapshot / "model.safetensors").read_bytes() == data and not partial.exists()
    assert entry["refetched"] == []
