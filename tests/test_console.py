"""The web console (merlin_dp/controller/console/, served at /ui/) in a real browser:
Debian's chromium, installed when missing, driven by Playwright's Python API (no browser
download), against one real `merlin-dp up --demo` for the module and, for tokens, a
`merlin-dp controller --tokens`. What a person does in the page must change what the
controller holds and what the gateway serves: the split and req/s move with traffic,
50/50 set in the page is served 50/50, a rollback from the history takes effect, a stale
edit is refused by If-Match, a read-only token sees no controls, a bad token is told so.

Screenshots of each step go to .cache/test-artifacts/console/ (docs/console.png, the
README's, is model-live.png from there).
"""

from __future__ import annotations

import http.client
import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from merlin_dp.sdk import Client
from tests.clients import chromium
from tests.conftest import ROOT, Up, running_controller, running_up

ARTIFACTS = ROOT / ".cache" / "test-artifacts" / "console"
MODEL = "demo/iris"
BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}).encode()
WRITE_TOKEN, READ_TOKEN = "console-write-token", "console-read-token"
# Anything the page offers to change something with, inside the page (not the token form).
CONTROLS = "main button, main input, main select, main textarea"

# On a fresh machine the first test's set-up installs chromium from Debian (apt-get, a
# few minutes on a slow mirror); the tests themselves take seconds.
pytestmark = pytest.mark.timeout(600)


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still not {what} after {timeout} s"
        time.sleep(0.1)


def predict(port: int, count: int) -> Counter[str]:
    """`count` requests to the demo's stable URL (path form); which version answered each."""
    served: Counter[str] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(count):
            conn.request("POST", "/serving/demo/iris/v1/predict", BODY,
                         {"Content-Type": "application/json"})  # fmt: skip
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            served[resp.getheader("X-Model-Version", "?")] += 1
    finally:
        conn.close()
    return served


class Traffic:
    """Requests to the demo from a thread (about 50/s) while a test watches the page."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            predict(self.port, 5)
            time.sleep(0.1)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(15)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    # Debian's chromium, installed when missing (started in the background at collection).
    browser = playwright.chromium.launch(executable_path=chromium())
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab (its own session storage) at a laptop's width; the page's own script
    errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with running_up(tmp_path_factory.mktemp("console"), "--demo") as up:
        yield up


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A controller with a write and a read token, serving one model endpoint."""
    tokens = (
        "tokens:\n"
        f"  - {{name: ops, token: {WRITE_TOKEN}, access: write, projects: ['*'], host: true}}\n"
        f"  - {{name: viewer, token: {READ_TOKEN}, access: read, projects: ['*']}}\n"
    )
    with running_controller(tmp_path_factory.mktemp("console-tokens"), tokens) as api:
        with Client(api, token=WRITE_TOKEN) as client:
            client.deploy("shop/ranker/1", command=[sys.executable, "examples/custom_model.py"],
                          workdir=ROOT, wait=60)  # fmt: skip
            client.route("shop/ranker", {"1": 100})
        yield api


def version_cell(page: Page, version: str, field: str) -> Any:
    row = f'[data-testid=overview-version][data-model="{MODEL}"][data-version="{version}"]'
    return page.locator(f"{row} [data-testid={field}]").first


def open_model(page: Page, api: str, model: str = MODEL) -> None:
    page.goto(f"{api}/ui/#/models/{model}")
    expect(page.get_by_test_id("model-title")).to_have_text(model)
    expect(page.get_by_test_id("history-row").first).to_be_visible()


def confirm(page: Page, screenshot: str | None = None) -> str:
    """Clicks the page's own confirmation dialog's Confirm; returns what it asked."""
    dialog = page.get_by_test_id("confirm-dialog")
    expect(dialog).to_be_visible()
    asked = dialog.inner_text()
    if screenshot:
        shot(page, screenshot)
    page.get_by_test_id("confirm-ok").click()
    expect(dialog).to_be_hidden()
    return asked


def test_the_demo_page_shows_the_split_and_live_numbers_while_traffic_flows(
    demo: Up, page: Page
) -> None:
    page.goto(f"{demo.api}/ui/")
    expect(page.get_by_test_id("whoami")).to_contain_text("anonymous")
    expect(version_cell(page, "1", "weight")).to_have_text("90%")
    expect(version_cell(page, "2", "weight")).to_have_text("10%")
    expect(page.get_by_test_id("split").first).to_have_attribute(
        "aria-label", "Split: version 1 90%, version 2 10%"
    )
    shot(page, "overview-idle")

    def rps(version: str) -> float:
        text = version_cell(page, version, "rps").inner_text()
        return float(text) if text != "—" else 0.0

    with Traffic(demo.port):
        wait_until(lambda: rps("1") > 0, "showing version 1's req/s")
        expect(version_cell(page, "1", "p50")).to_have_text(re.compile(r"ms$"))
        shot(page, "overview-traffic")

        page.get_by_test_id("model-link").first.click()
        expect(page.get_by_test_id("model-title")).to_have_text(MODEL)
        expect(page.get_by_test_id("chart-rps").locator("canvas")).to_be_visible()
        # The charts' text twin (for screen readers) follows the series stream.
        summary = page.get_by_test_id("chart-rps").locator("p")
        expect(summary).to_contain_text(re.compile(r"version 1: [1-9][0-9]* req/s"), timeout=20_000)
        expect(page.get_by_test_id("chart-replicas").locator("p")).to_contain_text(
            "version 1: 1 / 1 replicas"
        )
        first = page.get_by_test_id("stream-note").inner_text()
        expect(page.get_by_test_id("stream-note")).not_to_have_text(first, timeout=10_000)
        shot(page, "model-live")

        # Every control has a label; nothing is wider than a 1024 px screen.
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll("input, select, textarea")]
                .filter((el) => !el.labels.length && !el.getAttribute("aria-label"))
                .map((el) => el.id || el.outerHTML)"""
        )
        assert unlabelled == []
        page.set_viewport_size({"width": 1024, "height": 800})
        expect(page.get_by_test_id("weights-form")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 1024
        shot(page, "model-1024")


def test_setting_50_50_in_the_page_makes_the_gateway_serve_50_50(demo: Up, page: Page) -> None:
    client = Client(demo.api)
    client.set_weights(MODEL, {"1": 90, "2": 10})
    open_model(page, demo.api)
    expect(page.locator("#weight-1")).to_have_value("90")

    page.locator("#weight-1").fill("50")
    expect(page.get_by_test_id("weights-sum")).to_contain_text("must add up to 100")
    page.locator("#weight-2").fill("50")
    expect(page.get_by_test_id("weights-sum")).to_have_text("Sum 100%.")
    page.get_by_test_id("apply-weights").click()
    asked = confirm(page, "weights-confirm")
    assert "version 1 50%, version 2 50%" in asked
    expect(page.get_by_test_id("traffic-message")).to_contain_text("Weights applied: revision")

    endpoint = client.endpoint(MODEL)
    assert {d.version: d.weight for d in endpoint.rule.destinations} == {"1": 50, "2": 50}
    expect(page.get_by_test_id("model-facts")).to_contain_text(f"revision {endpoint.revision}")
    # The gateway follows the controller's stream within milliseconds; 400 requests at
    # 50/50 put each version within 5 standard deviations (10) of 200.
    served = predict(demo.port, 400)
    assert set(served) == {"1", "2"}, served
    assert 150 <= served["1"] <= 250, served
    expect(page.get_by_test_id("split").first).to_have_attribute(
        "aria-label", "Split: version 1 50%, version 2 50%"
    )
    shot(page, "weights-applied")


def test_a_rollback_from_the_history_takes_effect(demo: Up, page: Page) -> None:
    client = Client(demo.api)
    wanted = client.set_weights(MODEL, {"1": 70, "2": 30}).revision
    latest = client.set_weights(MODEL, {"1": 20, "2": 80}).revision
    open_model(page, demo.api)
    row = page.locator(f'[data-testid=history-row][data-revision="{wanted}"]')
    expect(row).to_contain_text("1: 70%, 2: 30%")
    # The current rule has nothing to roll back to; every other revision has.
    expect(
        page.locator(f'[data-testid=history-row][data-revision="{latest}"] button')
    ).to_have_count(0)
    row.get_by_test_id("history-rollback").click()
    asked = confirm(page, "history-rollback-confirm")
    assert f"revision {wanted}'s rule (1: 70%, 2: 30%)" in asked
    message = page.get_by_test_id("history-message")
    expect(message).to_contain_text(re.compile(r"Rolled back: revision \d+ \(1: 70%, 2: 30%\)"))

    # Revisions are the route table's: a replica the autoscaler added meanwhile takes
    # one too, so the rollback's is later than the latest rule's, not always next to it.
    endpoint = client.endpoint(MODEL)
    assert endpoint.revision > latest
    assert {d.version: d.weight for d in endpoint.rule.destinations} == {"1": 70, "2": 30}
    expect(message).to_contain_text(f"Rolled back: revision {endpoint.revision} ")
    expect(
        page.locator(f'[data-testid=history-row][data-revision="{endpoint.revision}"]')
    ).to_contain_text("current")
    shot(page, "history-rolled-back")


def test_an_edit_made_stale_by_someone_else_is_refused_by_if_match(demo: Up, page: Page) -> None:
    """By keyboard: type, Enter submits, Tab from Cancel (focused first) to Confirm."""
    client = Client(demo.api)
    client.set_weights(MODEL, {"1": 90, "2": 10})
    open_model(page, demo.api)
    expect(page.locator("#weight-1")).to_have_value("90")
    page.locator("#weight-1").focus()
    page.keyboard.press("Control+A")
    page.keyboard.type("60")
    page.keyboard.press("Tab")
    page.keyboard.press("Control+A")
    page.keyboard.type("40")

    theirs = client.set_weights(MODEL, {"1": 80, "2": 20}).revision  # someone else, meanwhile
    expect(page.get_by_test_id("stale-note")).to_contain_text(f"revision {theirs}")
    expect(page.locator("#weight-1")).to_have_value("60")  # the refresh left the edit alone

    page.keyboard.press("Enter")
    expect(page.get_by_test_id("confirm-dialog")).to_be_visible()
    expect(page.get_by_test_id("confirm-cancel")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_test_id("confirm-ok")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("traffic-message")).to_contain_text(
        "Someone else changed this rule; reload"
    )
    shot(page, "stale-refused")
    endpoint = client.endpoint(MODEL)
    assert endpoint.revision == theirs
    assert {d.version: d.weight for d in endpoint.rule.destinations} == {"1": 80, "2": 20}

    page.get_by_test_id("reload-rule").click()
    expect(page.locator("#weight-1")).to_have_value("80")
    expect(page.get_by_test_id("stale-note")).to_be_hidden()


def test_a_rollout_shows_its_progress_and_is_paused_and_aborted_from_the_page(
    demo: Up, page: Page
) -> None:
    client = Client(demo.api)
    client.set_weights(MODEL, {"1": 100})
    client.start_rollout(MODEL, "2", shadow=False, steps=[10, 50], step_seconds=300)
    try:
        open_model(page, demo.api)
        expect(page.get_by_test_id("rollout-phase")).to_have_text("canary")
        expect(page.get_by_test_id("rollout-step")).to_have_text("step 1 of 2 (10%)")
        expect(page.get_by_test_id("rollout-decisions")).to_contain_text("start")
        page.get_by_test_id("rollout-pause").click()
        confirm(page)
        expect(page.get_by_test_id("rollout-phase")).to_have_text("canary (paused)")
        assert client.rollout(MODEL).paused
        shot(page, "rollout-paused")
        page.get_by_test_id("rollout-abort").click()
        assert "goes back to the rule from before the rollout" in confirm(page)
        expect(page.get_by_test_id("rollout-phase")).to_have_text("aborted")
        expect(page.get_by_test_id("rollout-abort")).to_have_count(0)
        assert client.rollout(MODEL).phase == "aborted"
        endpoint = client.endpoint(MODEL)
        assert {d.version: d.weight for d in endpoint.rule.destinations} == {"1": 100}
    finally:
        if client.rollout(MODEL).active:
            client.abort_rollout(MODEL)


def test_a_read_only_token_sees_no_controls(guarded: str, browser: Browser) -> None:
    def sign_in(token: str) -> Page:
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(f"{guarded}/ui/")
        expect(page.get_by_test_id("auth-message")).to_contain_text("needs a token")
        page.get_by_label("API token").fill(token)
        page.get_by_test_id("token-submit").click()
        return page

    writer = sign_in(WRITE_TOKEN)
    expect(writer.get_by_test_id("whoami")).to_contain_text("ops · read and write")
    open_model(writer, guarded, "shop/ranker")
    expect(writer.get_by_test_id("weights-form")).to_be_visible()
    assert writer.locator(CONTROLS).count() > 0
    writer.context.close()

    reader = sign_in(READ_TOKEN)
    expect(reader.get_by_test_id("whoami")).to_contain_text("viewer · read only")
    expect(reader.locator('[data-testid=overview-model][data-model="shop/ranker"]')).to_be_visible()
    shot(reader, "read-only-overview")
    open_model(reader, guarded, "shop/ranker")
    expect(reader.get_by_test_id("version-card")).to_have_count(1)
    expect(reader.get_by_test_id("chart-rps")).to_be_visible()
    # Not disabled: absent. The same page with the same data, and nothing to press.
    assert reader.locator(CONTROLS).count() == 0
    assert reader.get_by_test_id("controls").count() == 0
    shot(reader, "read-only-model")
    # The token stays for the tab: a reload needs no second sign-in.
    reader.reload()
    expect(reader.get_by_test_id("whoami")).to_contain_text("viewer")
    reader.context.close()


def test_a_bad_token_is_refused_with_a_clear_message(guarded: str, page: Page) -> None:
    page.goto(f"{guarded}/ui/")
    page.get_by_label("API token").fill("not-a-token")
    page.get_by_test_id("token-submit").click()
    message = page.get_by_test_id("auth-message")
    expect(message).to_contain_text("The controller refused this token")
    expect(message).to_contain_text("a valid bearer token is required")
    expect(page.get_by_test_id("signed-out")).to_be_visible()
    expect(page.get_by_test_id("whoami")).to_have_text("Not signed in")
    assert page.evaluate("sessionStorage.length") == 0
    assert page.locator(CONTROLS).count() == 0
    shot(page, "bad-token")


def test_the_console_ships_as_package_data() -> None:
    """What /ui/ serves is in the package, uPlot with its licence (no CDN, no build)."""
    console = ROOT / "merlin_dp" / "controller" / "console"
    html = (console / "index.html").read_text()
    for asset in re.findall(r'(?:src|href)="([^"#:]+)"', html):
        if not asset.startswith(".."):
            assert (console / asset).is_file(), asset
    assert "://" not in re.sub(r"<!--.*?-->", "", html, flags=re.S).replace('href="data:,"', "")
    assert "MIT License" in (console / "vendor" / "uplot" / "LICENSE").read_text()
    assert Path(console / "vendor" / "uplot" / "README.md").read_text().startswith("uPlot 1.6.")
