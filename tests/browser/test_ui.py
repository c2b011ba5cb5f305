"""The web UI in headless Chromium against a real gateway with echo readers.

Each test drives one page as a person would (fill, click, watch), checks what the server did where it matters
(a stopped chat frees the reader; a removed reader is gone), and saves a screenshot of the page.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import DESKTOP, PHONE, open_page, screenshot
from tests.helpers import LiftoffServer, wait_until

WORDS = " ".join(f"w{i}" for i in range(40))


def active(server: LiftoffServer, reader_id: str) -> int:
    count: int = server.http.get(server.mgmt + f"/reader/{reader_id}").json()["active_requests"]
    return count


def choose_group(page: Page, group: str) -> None:
    expect(page.locator(f"#group option[value='{group}']")).to_have_count(1)
    page.select_option("#group", group)


# ---- playground -------------------------------------------------------------------------------------------------


def test_playground_streams_the_output_with_its_timings(page: Page) -> None:
    page.goto("/playground")
    expect(page).to_have_title(re.compile(r"^Playground · Liftoff$"))
    choose_group(page, "primary")
    page.fill("#prompt", WORDS)
    page.fill("#max_new_tokens", "100")
    page.fill("#sampling_temperature", "0.7")
    page.click("#generate")
    # streamed: part of the text shows before the whole of it (40 tokens, 15 ms apart)
    page.wait_for_function("(full) => { const t = document.querySelector('#output').textContent; "
                           "return t.length > 0 && t !== full; }", arg=WORDS)  # fmt: skip
    expect(page.locator("#output")).to_have_text(WORDS)
    expect(page.locator("#finish")).to_have_text("stop")
    expect(page.locator("#tokens")).to_have_text("40")
    expect(page.locator("#ttft")).to_have_text(re.compile(r"^\d+(\.\d+)? (ms|s)$"))
    expect(page.locator("#rate")).to_have_text(re.compile(r"^\d"))
    expect(page.locator("#meta")).to_contain_text("reader fast")
    expect(page.locator("#generate")).to_be_enabled()
    request = page.locator("#curl").text_content() or ""
    assert '"max_new_tokens":100' in request
    assert '"sampling_temperature":0.7' in request
    assert "sampling_topk" not in request  # empty fields are left to the server's defaults
    screenshot(page, "playground-streamed")


def test_playground_shows_what_is_wrong(page: Page) -> None:
    page.goto("/playground")
    choose_group(page, "primary")
    page.fill("#prompt", "yes or no")
    page.click("summary:has-text('Structured output')")
    page.fill("#json_schema", "{not json")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("json_schema is not valid JSON")
    page.fill("#json_schema", "")
    page.fill("#regex_string", "(yes|no)")
    page.click("#generate")
    # the server's own message: the echo backend cannot follow a regex
    expect(page.locator("#error")).to_contain_text("cannot follow regex_string")
    expect(page.locator("#finish")).to_have_text("error")
    screenshot(page, "playground-error")


# ---- chat -------------------------------------------------------------------------------------------------------


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_chat_keeps_the_conversation(page: Page) -> None:
    page.goto("/chat")
    choose_group(page, "primary")
    send(page, "hello there")
    first = page.locator(".msg.assistant").nth(0)
    expect(first).to_have_attribute("data-state", "done")
    # the echo reader answers with its prompt: the chat template's rendering of the conversation
    expect(first.locator(".content")).to_have_text("user: hello there\nassistant:")
    send(page, "and again")
    second = page.locator(".msg.assistant").nth(1)
    expect(second).to_have_attribute("data-state", "done")
    expect(second.locator(".content")).to_contain_text("user: hello there\nassistant: user: hello there")
    expect(second.locator(".content")).to_contain_text("user: and again\nassistant:")
    expect(second.locator(".meta")).to_contain_text("tokens")
    screenshot(page, "chat")


def test_chat_stop_cancels_the_generation_at_the_reader(page: Page, server: LiftoffServer) -> None:
    page.goto("/chat")
    choose_group(page, "slow")
    long_message = " ".join(f"word{i}" for i in range(120))  # 12 s of streaming at 100 ms a token
    send(page, long_message)
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".content")).to_contain_text("word3 ")
    wait_until(lambda: active(server, "slow") == 1, what="the slow reader to run the chat")
    expect(page.locator("#stop")).to_be_visible()
    page.click("#stop")
    expect(reply).to_have_attribute("data-state", "stopped")
    expect(reply.locator(".meta")).to_contain_text("stopped")
    # the server saw the connection close and aborted the generation: the reader's slot is free long before
    # the 12 s the reply would have taken
    wait_until(lambda: active(server, "slow") == 0, timeout=5, what="the reader to drop the stopped chat")
    stopped_at = reply.locator(".content").text_content() or ""
    assert "word119" not in stopped_at
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_hidden()
    assert reply.locator(".content").text_content() == stopped_at  # nothing arrives after the stop
    screenshot(page, "chat-stopped")


# ---- readers ----------------------------------------------------------------------------------------------------


def reader_ids(server: LiftoffServer, group: str) -> list[str]:
    status = server.status()["status"]
    return [reader_id for state in ("live", "loading", "dead") for reader_id, info in
            status[f"{state}_readers"].items() if group in info["consumer_groups"]]  # fmt: skip


def add_reader(page: Page, group: str, options: str) -> None:
    page.fill("#model_name", "echo")
    page.fill("#consumer_group", group)
    page.fill("#max_batch_size", "4")
    page.fill("#backend_options", options)
    page.click("#create")


def test_readers_add_watch_and_remove(page: Page, server: LiftoffServer) -> None:
    page.goto("/readers")
    expect(page.locator("[data-group='primary'] tr[data-reader='fast']")).to_have_attribute("data-state", "live")
    expect(page.locator("[data-group='slow'] tr[data-reader='slow'] td.age")).to_have_text(re.compile(r"s ago$"))
    expect(page.locator("[data-group='added']")).to_have_count(0)

    add_reader(page, "added", '{"load_delay_ms": 1500}')
    expect(page.locator("#add-result")).to_contain_text("added to added")
    (reader_id,) = reader_ids(server, "added")
    row = page.locator(f"[data-group='added'] tr[data-reader='{reader_id}']")
    expect(row).to_have_attribute("data-state", "loading")
    expect(row).to_have_attribute("data-state", "live")
    expect(row).to_contain_text("echo")
    expect(page.locator("#count-live")).to_have_text("3")
    screenshot(page, "readers-added")

    row.get_by_role("button", name=re.compile("^Remove reader")).click()
    row.get_by_role("button", name=re.compile("^Confirm removing")).click()
    expect(page.locator("[data-group='added']")).to_have_count(0)
    assert reader_ids(server, "added") == []
    expect(page.locator("#count-live")).to_have_text("2")


def test_readers_show_errors_and_why_a_reader_died(page: Page, server: LiftoffServer) -> None:
    page.goto("/readers")
    page.fill("#model_name", "   ")
    page.click("#create")
    expect(page.locator("#add-result")).to_contain_text("model_name")  # the server's 422, naming the field
    add_reader(page, "broken", "[1, 2]")
    expect(page.locator("#add-result")).to_contain_text("backend_options must be a JSON object")

    add_reader(page, "broken", '{"fail_load": "no such weights"}')
    expect(page.locator("#add-result")).to_contain_text("added to broken")  # the answer is in: the reader exists
    (reader_id,) = reader_ids(server, "broken")
    row = page.locator(f"tr[data-reader='{reader_id}']")
    expect(row).to_have_attribute("data-state", "dead")
    row.get_by_role("button", name="Details").click()
    expect(page.locator("tr.detail")).to_contain_text("Why it is dead")
    expect(page.locator("tr.detail")).to_contain_text("no such weights")
    screenshot(page, "readers-dead")
    row.get_by_role("button", name=re.compile("^Remove reader")).click()
    row.get_by_role("button", name=re.compile("^Confirm removing")).click()
    expect(page.locator("[data-group='broken']")).to_have_count(0)


# ---- metrics ----------------------------------------------------------------------------------------------------


@pytest.fixture
def traffic(server: LiftoffServer) -> Iterator[None]:
    """Generation requests to group primary, one after another, while the test runs."""
    stop = threading.Event()

    def run() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                client.post(server.base + "/generate", json={"text": "one two three four"})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(10)


def canvas(page: Page, key: str, attribute: str) -> float:
    value = page.locator(f"#chart-{key}").get_attribute(attribute)
    return float(value) if value else 0.0


def painted_pixels(page: Page, key: str) -> int:
    script = """(canvas) => { const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let painted = 0; for (let i = 3; i < data.length; i += 4) if (data[i]) painted += 1; return painted; }"""
    count: int = page.locator(f"#chart-{key}").evaluate(script)
    return count


@pytest.mark.usefixtures("traffic")
def test_dashboard_charts_the_metrics(page: Page) -> None:
    page.goto("/dashboard")
    # three scrapes' worth of lines (a scrape every 2 s): the charts draw lines, not just points
    page.wait_for_function("() => Number(document.querySelector('#chart-tokens').dataset.samples) >= 3", timeout=20_000)
    for key in ("requests", "latency", "tokens", "firstToken"):
        assert canvas(page, key, "data-max") > 0, f"the {key} chart shows nothing"
        assert canvas(page, key, "data-points") >= 3, f"the {key} chart has too few points"
    assert int(canvas(page, "waiting", "data-series")) >= 2  # one line per consumer group
    for key in ("requests", "latency", "tokens", "firstToken", "waiting", "running"):
        assert painted_pixels(page, key) > 1000, f"the {key} chart is blank"
    expect(page.locator("#legend-tokens")).to_contain_text("primary")
    expect(page.locator("#legend-requests")).to_contain_text("inference")
    expect(page.locator("#now-p50")).to_have_text(re.compile(r"\d"))
    expect(page.locator("#error")).to_be_hidden()
    screenshot(page, "dashboard-charts")


# ---- API docs ---------------------------------------------------------------------------------------------------


def test_api_docs_describe_every_port(page: Page, server: LiftoffServer) -> None:
    page.goto("/api-docs")
    expect(page.locator("#tabs button")).to_have_count(len(server.ports))
    generate = page.locator("details.op[data-path='/generate'][data-method='post']")
    generate.locator("summary").click()
    expect(generate).to_contain_text("max_new_tokens")
    expect(generate).to_contain_text("sampling_temperature")
    screenshot(page, "api-docs")
    page.click("#tabs button[data-port='management']")  # another port: fetched across origins (CORS)
    expect(page.locator("details.op[data-path='/reader'][data-method='post']")).to_have_count(1)
    page.click("#tabs button[data-port='openai']")
    expect(page.locator("details.op[data-path='/v1/chat/completions']")).to_have_count(1)
    expect(page.locator("#error")).to_be_hidden()


# ---- every page, phone and desktop ------------------------------------------------------------------------------

# page → what shows once it has loaded its data
READY = {
    "/": "#live.loaded",
    "/playground": "#group option",
    "/chat": "#group option",
    "/readers": "[data-group='primary']",
    "/dashboard": "#chart-requests[data-points]",
    "/api-docs": "details.op",
}
VIEWS: dict[str, dict[str, Any]] = {
    "desktop": {"viewport": DESKTOP},
    "phone": {"viewport": PHONE, "is_mobile": True, "has_touch": True, "device_scale_factor": 2},
    "dark": {"viewport": DESKTOP, "color_scheme": "dark"},
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_every_page_fits_the_screen(browser: Browser, server: LiftoffServer, view: str) -> None:
    for page in open_page(browser, server, **VIEWS[view]):
        for path, ready in READY.items():
            page.goto(path)
            expect(page.locator(ready).first).to_be_attached()
            expect(page).to_have_title(re.compile(r"Liftoff"))
            expect(page.locator("nav a")).to_have_count(5)
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{path} is {overflow}px wider than the {view} screen"
            if view == "dark":
                background = page.evaluate("getComputedStyle(document.body).backgroundColor")
                assert background == "rgb(18, 21, 29)", f"{path} is not dark: {background}"
            screenshot(page, f"{(path.strip('/') or 'index')}-{view}")


# ---- the page's own JavaScript ----------------------------------------------------------------------------------

JS_CHECKS = Path(__file__).with_name("ui_checks.js")


def test_metrics_parser_quantiles_and_event_stream_reader(page: Page) -> None:
    page.goto("/")
    result = page.evaluate(JS_CHECKS.read_text())
    assert result["byPort"] == {"3000": 10, "3003": 4}  # the UI's own files are not counted
    assert result["odd"] == [{"labels": {"text": 'a "quoted" \\ back\nslash', "le": "+Inf"}, "value": 1000}]
    assert result["plain"] == [{"labels": {}, "value": 7}]
    assert result["p50"] == pytest.approx(0.5)
    assert result["p95"] == pytest.approx(1.0)  # in the +Inf bucket: the largest finite bound
    assert result["p999"] == pytest.approx(1.0)
    assert result["empty"] is None
    assert result["tokens"] == {"a": 100}
    assert result["requests"] == {"3000": 10}
    assert result["waiting"] == {"a": 3}
    assert result["events"] == [
        {"event": "message", "data": "one"},
        {"event": "message", "data": " two\nlines"},
        {"event": "metadata", "data": '{"n": 1}'},
    ]
    assert result["ms"] == ["0", "0.25 ms", "42 ms", "1.5 s"]
