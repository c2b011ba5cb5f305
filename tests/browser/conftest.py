"""Fixtures of the browser tests: Debian's Chromium driven by Playwright, one Liftoff server with echo readers, and
screenshots under ``test-artifacts/screenshots`` (git-ignored) for a person to look at.

Playwright's own browser downloads are never used (``playwright install`` is never run): the tests drive the
system's Chromium (``apt-get install chromium``; ``make test`` installs it), or the one ``LIFTOFF_CHROMIUM`` names.
They are skipped only when no Chromium can be found.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.helpers import LiftoffServer, echo_reader

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "/snap/bin/chromium")
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 15_000

# reader id → config: "fast" streams quickly (most tests), "slow" streams slowly enough to be stopped mid-way.
READERS = {"fast": echo_reader("primary", delay_ms=15), "slow": echo_reader("slow", delay_ms=100, batch=2)}


def find_chromium() -> str | None:
    """The Chromium to drive: ``LIFTOFF_CHROMIUM``, else Debian's ``chromium`` on the PATH or where it installs."""
    named = os.environ.get("LIFTOFF_CHROMIUM")
    if named:
        assert os.access(named, os.X_OK), f"LIFTOFF_CHROMIUM={named} is not an executable"
        return named
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return next((path for path in CHROMIUM_PATHS if os.access(path, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium for one module: Playwright's event loop must be gone before other modules' asyncio tests run."""
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            f"no Chromium: none of {', '.join(CHROMIUM_NAMES)} is on the PATH and none of {', '.join(CHROMIUM_PATHS)} "
            "exists; install Debian's with `apt-get install chromium` (`make test` does) or set LIFTOFF_CHROMIUM"
        )
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiftoffServer]:
    """One gateway for the module: readers "fast" (group primary) and "slow" (group slow), quick heartbeats."""
    workdir = tmp_path_factory.mktemp("ui")
    liftoff = LiftoffServer(workdir=workdir, readers=READERS, server={"heartbeat_interval_ms": 250})
    try:
        liftoff.start()
        liftoff.wait_live(len(READERS))
        yield liftoff
    finally:
        liftoff.close()


def open_page(browser: Browser, server: LiftoffServer, **options: object) -> Iterator[Page]:
    """A page in a fresh context; fails the test if the page throws an uncaught JavaScript error."""
    context = browser.new_context(base_url=server.base, **options)  # type: ignore[arg-type]
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"uncaught JavaScript errors: {errors}"


@pytest.fixture
def page(browser: Browser, server: LiftoffServer) -> Iterator[Page]:
    """A desktop-sized page (1280 by 860)."""
    yield from open_page(browser, server, viewport=DESKTOP)


def screenshot(page: Page, name: str) -> Path:
    """Save the whole page as ``test-artifacts/screenshots/<name>.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")  # else the sticky header is drawn where the page was scrolled to
    page.screenshot(path=path, full_page=True)
    return path
