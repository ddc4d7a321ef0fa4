"""The admin API's security model: cross-site requests, DNS rebinding, forwarded addresses, media types.

Without ``admin_keys`` the admin API is "loopback only". These tests act as a web page open in a
browser on the proxy's machine would (cross-site POSTs with form-like bodies, a rebound host
name), and as a client behind a reverse proxy on loopback would (X-Forwarded-For), and check each
is refused while same-origin and command-line use still work.
"""

from __future__ import annotations

import httpx
import pytest

from proxy.middleware import cross_site, is_loopback
from tests.support import running_proxy

NODE = {"name": "n1", "kind": "ollama", "url": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def open_proxy(tmp_path_factory):
    config = {"storage": {"path": str(tmp_path_factory.mktemp("sec") / "p.db")}, "health": {"interval": 60},
              "timeouts": {"connect": 0.5}}  # fmt: skip
    with running_proxy(config) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_proxy(tmp_path_factory):
    config = {"storage": {"path": str(tmp_path_factory.mktemp("sec") / "p.db")}, "health": {"interval": 60},
              "server": {"admin_keys": ["adm-key"]}, "timeouts": {"connect": 0.5}}  # fmt: skip
    with running_proxy(config) as server:
        yield server


def _error(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


def test_cross_site_posts_are_refused(open_proxy):
    url = f"{open_proxy.url}/admin/nodes"
    for headers in ({"origin": "http://evil.example"}, {"sec-fetch-site": "cross-site"},
                    {"sec-fetch-site": "same-site"}, {"origin": "null"}):  # fmt: skip
        answer = httpx.post(url, json={**NODE, "name": "cross"}, headers=headers)
        assert answer.status_code == 403, (headers, answer.text)
        assert _error(answer)["code"] == "cross_site_request"
    # The form-like body a page can send without a preflight: refused as a media type too.
    plain = httpx.post(url, content=b'{"name": "plain", "kind": "ollama", "url": "http://127.0.0.1:9"}',
                       headers={"content-type": "text/plain"})  # fmt: skip
    assert plain.status_code == 415 and _error(plain)["code"] == "unsupported_media_type"
    form = httpx.post(f"{open_proxy.url}/admin/nodes/x/drain", data={"a": "b"})
    assert form.status_code == 415
    names = [n["name"] for n in httpx.get(url).json()["data"]]
    assert "cross" not in names and "plain" not in names


def test_same_origin_and_command_line_requests_work(open_proxy):
    url = f"{open_proxy.url}/admin/nodes"
    origin = open_proxy.url  # what a page served by the proxy itself sends
    same = httpx.post(url, json=NODE, headers={"origin": origin, "sec-fetch-site": "same-origin"})
    assert same.status_code == 201, same.text
    assert httpx.post(f"{url}/n1/drain").status_code == 200  # curl: no Origin, no body
    assert httpx.delete(f"{url}/n1", headers={"origin": origin}).status_code == 200
    # Reading is not state-changing: a GET with a foreign Origin gets no CORS headers to read it with.
    read = httpx.get(f"{open_proxy.url}/admin/status", headers={"origin": "http://evil.example"})
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers


def test_a_rebound_host_name_is_refused_without_admin_keys(open_proxy):
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example"):
        answer = httpx.get(f"{open_proxy.url}/admin/status", headers={"host": host})
        assert answer.status_code == 403, host
        assert _error(answer)["code"] == "forbidden_host"
    for host in ("localhost", f"localhost:{open_proxy.port}", "127.0.0.1", "[::1]:8080"):
        assert httpx.get(f"{open_proxy.url}/admin/status", headers={"host": host}).status_code == 200, host
    # /v1 is not the admin API: any Host is fine there.
    assert httpx.get(f"{open_proxy.url}/v1/models", headers={"host": "evil.example"}).status_code == 200


def test_forwarded_addresses_are_parsed_not_prefix_matched(open_proxy):
    # uvicorn takes X-Forwarded-For from a loopback peer (a reverse proxy on this machine).
    for forwarded in ("127.0.0.1.evil.com", "10.1.2.3", "127.evil"):
        answer = httpx.get(f"{open_proxy.url}/admin/status", headers={"x-forwarded-for": forwarded})
        assert answer.status_code == 403, forwarded
    assert httpx.get(f"{open_proxy.url}/admin/status", headers={"x-forwarded-for": "127.0.0.5"}).status_code == 200


def test_with_admin_keys_the_key_decides_and_cross_site_is_still_refused(keyed_proxy):
    url = f"{keyed_proxy.url}/admin/nodes"
    key = {"authorization": "Bearer adm-key"}
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={**key, "host": "proxy.example"}).status_code == 200  # a name clients use
    cross = httpx.post(url, json=NODE, headers={**key, "origin": "http://evil.example"})
    assert cross.status_code == 403 and _error(cross)["code"] == "cross_site_request"


def test_a_trailing_slash_is_an_openai_shaped_404_not_a_redirect(open_proxy):
    answer = httpx.delete(f"{open_proxy.url}/admin/nodes/", follow_redirects=False)
    assert answer.status_code == 404 and _error(answer)["code"] == "not_found"


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.9.8.7", True), ("::1", True), ("::ffff:127.0.0.1", True), ("[::1]", True),
     ("127.0.0.1.evil.com", False), ("10.0.0.1", False), ("localhost", False), ("", False), (None, False)],
)  # fmt: skip
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def _scope(**headers) -> dict:
    return {"headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


def test_cross_site():
    assert not cross_site(_scope(host="127.0.0.1:8080"))
    assert not cross_site(_scope(host="127.0.0.1:8080", origin="http://127.0.0.1:8080"))
    assert not cross_site(_scope(host="127.0.0.1:8080", sec_fetch_site="same-origin"))
    assert not cross_site(_scope(host="127.0.0.1:8080", sec_fetch_site="none"))  # typed in the address bar
    assert cross_site(_scope(host="127.0.0.1:8080", origin="http://127.0.0.1:9999"))
    assert cross_site(_scope(host="127.0.0.1:8080", origin="http://localhost:8080"))
