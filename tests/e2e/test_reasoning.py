"""A reasoning model's thinking in the chat app: folded above the answer — "Thinking…" while it
streams, "Thought for N s" once done, opened by a click — and folded again ("Reasoning") after a
reload. Against a stack of its own whose model opens a think block (tests/integration/conftest.py's
start_thinking_stack): the bundled model, which then thinks until max_tokens."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from services.stack import Stack
from tests.e2e.conftest import screenshot
from tests.e2e.test_chat import new_chat, send, wait_answer
from tests.integration.conftest import start_thinking_stack

# Records the summaries the answer's reasoning showed while it streamed.
WATCH_THOUGHT = """() => {
  window.__labels = [];
  const log = document.querySelector(".log");
  new MutationObserver(() => {
    const last = [...log.querySelectorAll(".msg.assistant")].pop();
    const summary = last && last.querySelector("details.msg-thought:not([hidden]) > summary");
    if (summary && last.dataset.status === "streaming") window.__labels.push(summary.textContent);
  }).observe(log, { subtree: true, childList: true, characterData: true, attributes: true });
}"""


@pytest.fixture(scope="module")
def think_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_thinking_stack(tmp_path_factory.mktemp("web-think-stack"), PARLEY_MAX_TOKENS="48")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def web_url(think_stack: Stack) -> str:
    """This module's pages open on its own stack (the e2e conftest's pages read `web_url`)."""
    return think_stack.url


def test_reasoning_is_folded_above_the_answer_and_after_a_reload(signed_in) -> None:
    page = signed_in()
    new_chat(page)
    page.evaluate(WATCH_THOUGHT)
    send(page, "What is the capital of France?")
    answer = wait_answer(page, timeout=120_000)
    assert "Thinking…" in page.evaluate("window.__labels")

    thought = answer.locator("details.msg-thought")
    summary = thought.locator("summary")
    assert re.fullmatch(r"Thought for \d+ s", summary.inner_text())
    assert thought.get_attribute("open") is None  # folded once done
    assert not thought.locator(".msg-thought-text").is_visible()
    summary.click()
    reasoning = thought.locator(".msg-thought-text")
    assert thought.get_attribute("open") is not None and reasoning.is_visible()
    text = reasoning.inner_text()
    assert text.strip()
    assert text not in answer.locator(".msg-body").inner_text()  # the answer's body is not its reasoning
    assert reasoning.evaluate("el => el.children.length") == 0  # plain text, never markup
    screenshot(page, "chat-reasoning")

    page.reload()
    again = page.locator(".msg.assistant").last.locator("details.msg-thought")
    again.wait_for()
    assert again.locator("summary").inner_text() == "Reasoning" and again.get_attribute("open") is None
    again.locator("summary").click()
    assert again.locator(".msg-thought-text").inner_text() == text
