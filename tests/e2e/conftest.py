"""Browser fixtures: the real stack (tests/integration/conftest.py) and Debian's Chromium driven by
Playwright. Playwright comes from PyPI (`playwright`, its driver included); it never downloads a
browser here: it launches /usr/bin/chromium (`make test` installs Debian's chromium package), each
time with a fresh temporary profile of its own. Screenshots go to the test artifacts folder."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from services.stack import Stack
from tests.integration.conftest import ADMIN_PASSWORD, artifacts_dir, start_stack

CHROMIUM = os.environ.get("PARLEY_TEST_CHROMIUM", "/usr/bin/chromium")
# Headless, no sandbox (CI runs as root), and nothing that calls out to Google's services: the
# machine has no network beyond loopback and the package registries.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "Plenty-long-passphrase-42"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
HERE = Path(__file__).resolve().parent

# What the last browser test releases, so that the stack and Chromium do not idle through the other
# suites (session-scoped fixtures would otherwise live until the very end).
_release: list[Callable[[], object]] = []


def release() -> None:
    while _release:
        _release.pop()()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    if call.when == "call":
        item.stash[_failed] = outcome.get_result().failed


_failed = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield  # the test's own fixtures (pages, contexts) are finalized first
    if nextitem is None or HERE not in Path(nextitem.path).resolve().parents:
        release()


@pytest.fixture(scope="session")
def web_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of the browser tests' own, so their accounts and sessions never meet the API tests'."""
    # Two slots: a few streams of another user's make the app's turn wait in line (test_websocket.py).
    # Answers end at 256 tokens: a story at the default 1024 took past the page's 90 s wait on a slow
    # CI machine; the tests check streaming, stopping and history, not length.
    running = start_stack(tmp_path_factory.mktemp("web-stack"), PARLEY_CONTEXT_LENGTH="2048", PARLEY_PARALLEL_SLOTS="2",
                          PARLEY_MAX_TOKENS="256")
    _release.append(running.stop)
    yield running
    release()


@pytest.fixture(scope="session")
def web_url(web_stack: Stack) -> str:
    return web_stack.url


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: `make test` installs requirements/test.txt")
    # Playwright's sync API keeps an event loop running on this thread until it is stopped; the
    # asyncio tests that follow need it gone, so stopping it is part of the release.
    playwright = sync_playwright().start()
    _release.append(playwright.stop)
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    _release.append(browser.close)
    yield browser
    release()


@pytest.fixture
def new_page(request: pytest.FixtureRequest, browser, web_url: str) -> Iterator[Callable[..., object]]:
    """Opens pages in fresh browser contexts (own storage, cookies and service workers) and
    reports any script error on them as a test failure. A failed test leaves each page's screenshot,
    HTML and console in the artifacts folder (e2e/failed/<test>/)."""
    contexts = []
    errors: list[str] = []
    pages: list[tuple[object, list[str]]] = []

    def open_page(viewport: dict[str, int] = DESKTOP, path: str = "/"):
        context = browser.new_context(viewport=viewport, base_url=web_url)
        context.set_default_timeout(30_000)
        contexts.append(context)
        page = context.new_page()
        console: list[str] = []
        pages.append((page, console))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        page.on("websocket", lambda ws: console.append(f"websocket: {ws.url}"))
        page.goto(path)
        return page

    yield open_page
    if request.node.stash.get(_failed, False):
        keep_failed_pages(request.node.name, pages)
    for context in contexts:
        context.close()
    assert not errors, f"script errors on the page: {errors}"


def register(base_url: str, username: str | None = None) -> str:
    username = username or f"web-{uuid.uuid4().hex[:8]}"
    answer = httpx.post(f"{base_url}/v1/auth/register", json={"username": username, "password": PASSWORD}, timeout=30)
    assert answer.status_code == 200, answer.text
    return username


def sign_in_page(page, username: str, password: str = PASSWORD) -> None:
    """Signs in through the form, as a person would."""
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.locator('body[data-view="home"]').wait_for(state="attached")  # on a phone the list is the home


@pytest.fixture
def signed_in(new_page, web_url: str) -> Callable[..., object]:
    """A page signed in as a new user (or as `username`)."""

    def open_signed_in(viewport: dict[str, int] = DESKTOP, username: str | None = None, password: str = PASSWORD):
        username = username or register(web_url)
        page = new_page(viewport)
        sign_in_page(page, username, password)
        return page

    return open_signed_in


@pytest.fixture
def admin_page(new_page) -> object:
    page = new_page()
    sign_in_page(page, "admin", ADMIN_PASSWORD)
    return page


def keep_failed_pages(test: str, pages: list[tuple[object, list[str]]]) -> None:
    folder = artifacts_dir() / "e2e" / "failed" / test
    folder.mkdir(parents=True, exist_ok=True)
    for i, (page, console) in enumerate(pages):
        try:
            page.screenshot(path=str(folder / f"page{i}.png"), full_page=True)
            (folder / f"page{i}.html").write_text(page.content())
        except Exception as exc:  # noqa: BLE001 - a closed page: keep what can be kept
            console.append(f"(no screenshot: {exc})")
        (folder / f"page{i}.console.txt").write_text("\n".join(console) + "\n")


def screenshot(page, name: str) -> Path:
    folder = artifacts_dir() / "e2e"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path
