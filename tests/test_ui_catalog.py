"""The dashboard's Catalog page in headless Chromium: search, source choice, the fit per node, and names
from the sources shown as text. The sources are the fake library and Hub of tests/test_admin_catalog.py."""

from __future__ import annotations

import pytest

from tests.support import running_proxy
from tests.test_admin_catalog import HUB, LIBRARY, FakeSources, closed_port_url
from tests.ui_support import PHONE, XSS, browser, need_browser, shoot, watched_tab

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need_browser()
    tmp = tmp_path_factory.mktemp("ui-catalog")
    # A model whose name and description are markup: the page must show them as text.
    fakes = FakeSources(library=[*LIBRARY, (XSS, XSS, ["tools"], ["7b"])], hub=HUB)
    fakes.server.start()
    nowhere = closed_port_url()
    config = {
        "storage": {"path": str(tmp / "proxy.db")},
        "timeouts": {"connect": 1, "first_byte": 2, "idle": 2},
        "health": {"interval": 60},
        "backends": [
            {"name": "gpu-small", "kind": "ollama", "url": nowhere, "gpu_memory_gb": 8},
            {"name": "gpu-big", "kind": "ollama", "url": nowhere, "gpu_memory_gb": 24},
        ],
        "catalog": {"ollama_url": fakes.url, "huggingface_url": fakes.url, "timeout": 2},
    }
    try:
        with running_proxy(config) as server, browser() as chromium:
            yield {"server": server, "browser": chromium, "fakes": fakes}
    finally:
        fakes.server.stop()


@pytest.fixture
def page(stack):
    with watched_tab(stack["browser"]) as tab:
        yield tab


def expect():
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect


def model_row(page, name: str):
    return (
        page.get_by_role("table", name="Installable models")
        .get_by_role("row")
        .filter(has=page.get_by_role("rowheader", name=name, exact=True))
    )


def test_the_catalog_lists_searches_and_says_what_fits_where(page, stack):
    check = expect()
    page.goto(f"{stack['server'].url}/ui/")
    page.get_by_role("link", name="Catalog").click()
    check(page.get_by_role("heading", name="Catalog", level=1)).to_be_visible()
    llama = model_row(page, "llama3.1:8b")
    check(llama).to_contain_text("4.9 GB")
    check(llama).to_contain_text("gpu-small: fits")
    check(page.get_by_role("status").filter(has_text="Ollama library: live")).to_be_visible()

    page.get_by_role("searchbox", name="Search").fill("gemma")
    page.get_by_role("button", name="Search", exact=True).click()
    big = model_row(page, "gemma3:27b")
    check(big).to_contain_text("gpu-small: too big")
    check(big).to_contain_text("gpu-big: fits")
    check(model_row(page, "llama3.1:8b")).to_have_count(0)
    rows = page.get_by_role("table", name="Installable models").get_by_role("rowheader")
    assert all("gemma" in name for name in rows.all_inner_texts())
    shoot(page, "catalog-search")

    page.get_by_role("searchbox", name="Search").fill("")
    page.get_by_label("Source").select_option("huggingface")
    page.get_by_role("button", name="Search", exact=True).click()
    hub = model_row(page, "meta-llama/Llama-3.1-8B-Instruct")
    check(hub).to_contain_text("Hugging Face")
    check(hub).to_contain_text("BF16")
    check(model_row(page, "gemma3:27b")).to_have_count(0)


def test_names_from_a_source_are_text_and_the_page_fits_a_phone(stack):
    context = stack["browser"].new_context(viewport=PHONE)
    tab = context.new_page()
    try:
        tab.goto(f"{stack['server'].url}/ui/#catalog")
        tab.get_by_role("searchbox", name="Search").fill("<img")
        tab.get_by_role("button", name="Search", exact=True).click()
        expect()(model_row(tab, f"{XSS}:7b")).to_be_visible()
        assert tab.locator("table img").count() == 0
        assert tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    finally:
        context.close()
