"""The web UI against a gateway with keys: the pages ask for the keys they need (the management port's, the
inference ports'), send them, ask again when one is refused, and keep them in the tab's session storage only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import DESKTOP, READERS, open_page, screenshot
from tests.helpers import LiftoffServer

API_KEY = "browser-api-key-0123456789"
MANAGEMENT_KEY = "browser-management-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiftoffServer]:
    """A gateway whose inference and management ports need keys."""
    keys = {"api_keys": API_KEY, "management_api_keys": MANAGEMENT_KEY, "heartbeat_interval_ms": 250}
    liftoff = LiftoffServer(workdir=tmp_path_factory.mktemp("ui-keys"), readers=READERS, server=keys)
    try:
        liftoff.start()
        liftoff.wait_live(len(READERS))
        yield liftoff
    finally:
        liftoff.close()


def give_key(page: Page, kind: str, key: str) -> None:
    dialog = page.locator(f"#key-dialog[data-kind='{kind}']")
    expect(dialog).to_be_visible()
    dialog.locator("#key-input").fill(key)
    dialog.locator("#key-submit").click()
    expect(dialog).to_have_count(0)


def stored(page: Page) -> dict[str, object]:
    return page.evaluate("() => ({session: {...sessionStorage}, local: {...localStorage}, cookies: document.cookie})")


def test_the_playground_asks_for_each_key_once_and_keeps_them_in_the_tab(page: Page) -> None:
    page.goto("/playground")
    expect(page.locator("#key-dialog[data-kind='management']")).to_contain_text("management key")
    screenshot(page, "keys-asked")
    give_key(page, "management", MANAGEMENT_KEY)  # the consumer groups come from the management port
    expect(page.locator("#group option[value='primary']")).to_have_count(1)
    page.fill("#prompt", "a keyed prompt")
    page.click("#generate")
    give_key(page, "inference", API_KEY)
    expect(page.locator("#output")).to_have_text("a keyed prompt")
    page.fill("#prompt", "and another")
    page.click("#generate")  # the key is kept: no second question
    expect(page.locator("#output")).to_have_text("and another")
    expect(page.locator("#key-dialog")).to_have_count(0)
    kept = stored(page)
    assert kept == {"session": {"liftoff-key:management": MANAGEMENT_KEY, "liftoff-key:inference": API_KEY},
                    "local": {}, "cookies": ""}  # fmt: skip
    page.goto("/chat")  # the same tab: the keys are still there
    page.fill("#input", "hello")
    page.press("#input", "Enter")
    expect(page.locator(".msg.assistant .content").first).to_have_text("user: hello\nassistant:")
    expect(page.locator("#key-dialog")).to_have_count(0)


def test_a_refused_key_is_asked_again_and_cancelling_shows_the_error(page: Page) -> None:
    page.goto("/readers")
    page.fill("#key-input", "not-the-management-key-0000")
    page.click("#key-submit")
    expect(page.locator("#key-refused")).to_have_text("The server refused that key.")  # asked again, saying why
    screenshot(page, "keys-refused")
    page.click("#key-cancel")
    expect(page.locator("#error")).to_contain_text("401 unauthorized")
    page.reload()
    give_key(page, "management", MANAGEMENT_KEY)
    expect(page.locator("[data-group='primary'] tr[data-reader='fast']")).to_have_attribute("data-state", "live")


def test_a_new_session_is_asked_again(browser: Browser, server: LiftoffServer) -> None:
    for _ in range(2):  # two browser sessions, one after the other: nothing is remembered between them
        for page in open_page(browser, server, viewport=DESKTOP):
            page.goto("/dashboard")
            give_key(page, "management", MANAGEMENT_KEY)
            expect(page.locator("#now-requests")).not_to_have_text("")
            assert stored(page)["session"] == {"liftoff-key:management": MANAGEMENT_KEY}
