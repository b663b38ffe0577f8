"""The chat app in a real browser against the real stack and model: registering, streaming answers
token by token, stopping one, history after a reload, renaming and deleting conversations,
per-conversation settings, safe rendering, and how it looks on a desktop and a phone."""

from __future__ import annotations

import uuid

import httpx

from tests.e2e.conftest import DESKTOP, PASSWORD, PHONE, register, screenshot
from tests.integration.chat import chat
from tests.integration.conftest import Caller

# Records the streamed answer's length at every change of the conversation log.
WATCH_STREAM = """() => {
  window.__lengths = [];
  const log = document.querySelector(".log");
  new MutationObserver(() => {
    const last = [...log.querySelectorAll(".msg.assistant")].pop();
    if (last && last.dataset.status === "streaming") window.__lengths.push(last.querySelector(".msg-body").textContent.length);
  }).observe(log, { subtree: true, childList: true, characterData: true });
}"""


def new_chat(page) -> str:
    page.get_by_role("button", name="New chat").first.click()
    page.get_by_label("Message", exact=True).wait_for()
    return page.url.rsplit("/", 1)[-1]


def send(page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def wait_answer(page, status: str = "complete", timeout: float = 90_000):
    answer = page.locator(f'.msg.assistant[data-status="{status}"]').last
    answer.wait_for(timeout=timeout)
    return answer


def test_register_chat_streams_tokens_and_history_survives_a_reload(new_page) -> None:
    page = new_page()
    page.get_by_role("button", name="Create an account instead").click()
    username = f"web-{uuid.uuid4().hex[:8]}"
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    page.get_by_role("heading", name="Your conversations").wait_for()

    new_chat(page)
    page.evaluate(WATCH_STREAM)
    send(page, "Write a short story about a lighthouse keeper and a storm.")
    # While it streams, Stop is offered; the log is marked busy for screen readers.
    page.get_by_role("button", name="Stop").wait_for()
    answer = wait_answer(page)
    text = answer.locator(".msg-body").inner_text()
    lengths = page.evaluate("window.__lengths")
    growing = sorted(set(n for n in lengths if n > 0))
    assert len(growing) >= 3, f"the answer did not arrive in pieces: {lengths}"
    assert growing[-1] <= len(text) + 1
    assert "tokens" in answer.locator(".msg-note").inner_text()
    assert page.get_by_role("button", name="Stop").is_hidden()
    assert page.get_by_label("Message", exact=True).evaluate("el => el === document.activeElement")
    screenshot(page, "chat-desktop")

    # The service names the conversation after its first message.
    heading = page.get_by_role("heading", level=1)
    page.wait_for_function("() => document.querySelector('#view-title').textContent !== 'New chat'")
    assert heading.inner_text().startswith("Write a short story")

    page.reload()
    page.locator(".msg.assistant").first.wait_for()
    assert page.locator(".msg.user .msg-body").inner_text() == "Write a short story about a lighthouse keeper and a storm."
    assert page.locator(".msg.assistant .msg-body").inner_text().strip() == text.strip()
    assert page.locator(".sessions .session-link").first.inner_text().startswith("Write a short story")


def test_stop_cancels_the_generation_and_keeps_the_partial_answer(signed_in, web_url: str) -> None:
    page = signed_in()
    session_id = new_chat(page)
    send(page, "Write a very long essay about the history of the Roman Empire, with twenty detailed sections.")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .msg-body')?.textContent || '').length > 20")
    page.get_by_role("button", name="Stop").click()
    answer = wait_answer(page, "incomplete", timeout=10_000)
    assert "Stopped" in answer.locator(".msg-note").inner_text()
    stopped_at = answer.locator(".msg-body").inner_text()
    page.wait_for_timeout(1000)
    assert answer.locator(".msg-body").inner_text() == stopped_at  # nothing more arrives
    assert page.get_by_role("button", name="Send").is_enabled()

    # The server kept the partial answer, marked as stopped.
    page.reload()
    stored = page.locator(".msg.assistant").first
    stored.wait_for()
    assert stored.get_attribute("data-status") == "incomplete"
    assert "Stopped before the end" in stored.locator(".msg-note").inner_text()
    assert stored.locator(".msg-body").inner_text().strip()
    assert page.url.endswith(session_id)


# The history of a conversation arrives 1.5 s late, as on a slow connection.
SLOW_HISTORY = """(() => {
  const original = window.fetch;
  window.fetch = (input, init) => {
    const answer = original(input, init);
    const url = typeof input === "string" ? input : input.url;
    return /\\/messages(\\?|$)/.test(url) ? answer.then((r) => new Promise((done) => setTimeout(() => done(r), 1500))) : answer;
  };
})()"""


def test_a_message_sent_while_the_history_loads_is_kept(signed_in) -> None:
    # The history used to replace the log when it arrived, taking the turn sent meanwhile with it:
    # the answer streamed into a message no longer on the page.
    page = signed_in()
    page.add_init_script(SLOW_HISTORY)
    page.reload()
    page.get_by_role("heading", name="Your conversations").wait_for()
    new_chat(page)
    send(page, "Say hello.")
    answer = wait_answer(page, timeout=30_000)
    assert answer.locator(".msg-body").inner_text().strip()
    assert page.locator(".msg.user .msg-body").all_inner_texts() == ["Say hello."]
    assert page.locator(".log .empty").count() == 0


def test_rename_and_delete_conversations(signed_in) -> None:
    page = signed_in()
    first = new_chat(page)
    page.goto("/#/")
    second = new_chat(page)
    assert first != second
    items = page.locator(".sessions li")
    assert items.count() == 2

    page.locator(f'[data-session-id="{first}"]').get_by_role("button", name="Rename New chat").click()
    name = page.get_by_label("New name")
    name.fill("Trip to Lisbon")
    name.press("Enter")
    link = page.get_by_role("link", name="Trip to Lisbon")
    link.wait_for()
    assert link.evaluate("el => el === document.activeElement")

    page.reload()
    page.get_by_role("link", name="Trip to Lisbon").wait_for()

    page.get_by_role("button", name="Delete Trip to Lisbon").click()
    page.get_by_text("Delete “Trip to Lisbon” and its messages?").wait_for()
    page.locator(f'[data-session-id="{first}"]').get_by_role("button", name="Delete", exact=True).click()
    page.locator(f'[data-session-id="{first}"]').wait_for(state="detached")
    assert items.count() == 1
    page.reload()
    page.locator(".sessions li").first.wait_for()
    assert page.locator(".sessions li").count() == 1
    assert page.get_by_role("link", name="Trip to Lisbon").count() == 0


def test_settings_and_model_picker_are_saved_on_the_session(signed_in, web_url: str) -> None:
    page = signed_in()
    session_id = new_chat(page)
    picker = page.get_by_label("Model", exact=True)
    picker.locator("option", has_text="smollm2-135m-instruct").wait_for(state="attached")
    assert picker.locator("option", has_text="all-minilm-l6-v2").count() == 0  # an embedding model cannot chat
    picker.select_option("smollm2-135m-instruct")
    page.get_by_text("Model set to smollm2-135m-instruct.").wait_for()

    page.get_by_role("button", name="Settings").click()
    page.get_by_label("System prompt").fill("Answer in one short sentence.")
    page.get_by_label("Temperature").fill("0")
    page.get_by_role("button", name="Save settings").click()
    page.get_by_text("Saved.", exact=True).wait_for()

    page.reload()
    page.get_by_role("button", name="Settings").click()
    assert page.get_by_label("System prompt").input_value() == "Answer in one short sentence."
    assert page.get_by_label("Temperature").input_value() == "0"
    assert page.get_by_label("Model", exact=True).input_value() == "smollm2-135m-instruct"

    # Emptying the system prompt clears it (the app sends an explicit field mask).
    page.get_by_label("System prompt").fill("")
    page.get_by_label("Temperature").fill("")
    page.get_by_role("button", name="Save settings").click()
    page.get_by_text("Saved.", exact=True).wait_for()
    token = page.evaluate("JSON.parse(localStorage.getItem('parley.auth')).access_token")
    session = httpx.get(f"{web_url}/v1/sessions/{session_id}", headers={"authorization": f"Bearer {token}"}).json()
    assert session["system_prompt"] == ""
    assert "temperature" not in session["sampling"]


def test_html_in_messages_shows_as_text(signed_in) -> None:
    page = signed_in()
    new_chat(page)
    hostile = 'Repeat exactly: <img src=x onerror="window.__xss=1"><script>window.__xss=2</script> **bold**'
    send(page, hostile)
    wait_answer(page)
    log = page.locator(".log")
    assert log.locator("img, script, iframe").count() == 0
    assert page.evaluate("window.__xss") is None
    assert page.locator(".msg.user .msg-body").inner_text() == hostile  # the user's text is never Markdown
    page.reload()
    page.locator(".msg.assistant").first.wait_for()
    assert page.locator(".log img, .log script").count() == 0
    assert page.evaluate("window.__xss") is None


def test_tool_calls_and_results_from_the_api_are_shown(signed_in, web_url: str) -> None:
    page = signed_in()
    session_id = new_chat(page)
    token = page.evaluate("JSON.parse(localStorage.getItem('parley.auth')).access_token")
    weather = {"tools": [{"name": "get_weather", "parameters": '{"type": "object", "properties": {"city": '
                          '{"type": "string", "maxLength": 12}}, "required": ["city"]}'}],
               "tool_choice": "function", "tool_choice_function": "get_weather", "parallel_tool_calls": False}
    caller = Caller("", token, "")
    greedy = {"temperature": 0, "max_tokens": 48}
    with httpx.Client(base_url=web_url, timeout=120) as api:
        events = chat(api, caller, session_id, "What is the weather in Oslo?", structured=weather, sampling=greedy)
        [call] = [c for e in events if "delta" in e for c in e["delta"]["tool_calls"]]
        chat(api, caller, session_id, "", tool_results=[{"tool_call_id": call["id"], "content": "<b>12 C</b>, cloudy"}],
             sampling=greedy)
    page.reload()
    tool = page.locator(".msg.tool")
    tool.wait_for()
    assert tool.get_by_role("heading").inner_text() == "Tool"
    assert tool.locator(".msg-body code").inner_text() == "<b>12 C</b>, cloudy"  # shown as text, never markup
    shown = page.locator(".msg.assistant .msg-calls code").first.inner_text()
    assert shown == f"get_weather({call['arguments']})"
    assert page.locator(".log b").count() == 0
    screenshot(page, "chat-tool-turn")


def test_a_conversation_made_through_the_responses_api_is_listed_and_shown(signed_in, web_url: str) -> None:
    page = signed_in()
    token = page.evaluate("JSON.parse(localStorage.getItem('parley.auth')).access_token")
    headers = {"authorization": f"Bearer {token}"}
    short = {"model": "smollm2-135m-instruct", "max_output_tokens": 12, "temperature": 0}
    with httpx.Client(base_url=web_url, timeout=120, headers=headers) as api:
        first = api.post("/v1/responses", json={**short, "input": "Plan a picnic.", "instructions": "Be brief."})
        assert first.status_code == 200, first.text
        second = api.post("/v1/responses", json={**short, "input": "And dessert?",
                                                 "previous_response_id": first.json()["id"]})
        assert second.status_code == 200, second.text
    answers = [r.json()["output"][0]["content"][0]["text"] for r in (first, second)]
    page.reload()
    link = page.get_by_role("link", name="Plan a picnic.")
    link.click()
    page.locator(".msg.assistant").nth(1).wait_for()
    bodies = page.locator(".msg .msg-body").all_inner_texts()
    assert [b.strip() for b in bodies[::2]] == ["Plan a picnic.", "And dessert?"]
    assert [b.strip() for b in bodies[1::2]] == [a.strip() for a in answers]
    screenshot(page, "chat-responses-api")


MARKDOWN_CASES = """async () => {
  const { renderMarkdown } = await import("/markdown.js");
  const render = (text) => renderMarkdown(document.createElement("div"), text);
  const hostile = render('<img src=x onerror="window.__xss=1"> [click](javascript:window.__xss=3) ' +
    '[ok](https://example.com) <a href="javascript:1">a</a>\\n\\n```html\\n<script>window.__xss=4</script>\\n```');
  const rich = render("# Title\\n\\nSome **bold**, *italic* and `code`.\\n\\n- one\\n- two\\n\\n1. first\\n2. second\\n\\n> quoted\\n\\n---");
  const streaming = render("Here:\\n\\n```python\\nprint('hi')");
  const bare = render("See https://example.org/a_b and **https://example.net**.");
  return {
    tags: [...hostile.querySelectorAll("*")].map((el) => el.tagName),
    links: [...hostile.querySelectorAll("a")].map((a) => a.getAttribute("href")),
    text: hostile.textContent,
    code: hostile.querySelector("pre code").textContent,
    rich: [...rich.querySelectorAll("*")].map((el) => el.tagName),
    streaming: streaming.querySelector("pre code")?.textContent,
    bare: [...bare.querySelectorAll("a")].map((a) => [a.getAttribute("href"), a.textContent]),
    xss: window.__xss,
  };
}"""


def test_markdown_in_answers_is_rendered_without_html_injection(new_page) -> None:
    page = new_page()
    result = page.evaluate(MARKDOWN_CASES)
    assert result["xss"] is None
    assert set(result["tags"]) <= {"P", "A", "PRE", "CODE", "BR"}
    assert result["links"] == ["https://example.com"]
    assert '<img src=x onerror="window.__xss=1">' in result["text"]
    assert "[click](javascript:window.__xss=3)" in result["text"]
    assert result["code"] == "<script>window.__xss=4</script>"
    assert {"H3", "STRONG", "EM", "CODE", "UL", "OL", "LI", "BLOCKQUOTE", "HR"} <= set(result["rich"])
    assert result["streaming"] == "print('hi')"  # an unfinished fence renders as code while it streams
    # A bare URL is a link labelled with itself (it once recursed until the stack overflowed).
    assert result["bare"] == [["https://example.org/a_b", "https://example.org/a_b"],
                              ["https://example.net", "https://example.net"]]


def test_phone_viewport_chat_fits_the_screen(signed_in) -> None:
    page = signed_in(PHONE)
    # On a phone the conversation list is the home screen; a chat takes the whole screen.
    page.get_by_role("button", name="New chat").first.click()
    page.get_by_label("Message", exact=True).wait_for()
    assert page.locator("#sidebar").is_hidden()
    send(page, "Give me three tips for a good night's sleep.")
    wait_answer(page)
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"horizontal scrolling on a phone: {width}"
    # Every control is on the screen, and buttons are big enough to tap.
    outside = page.evaluate("""() => [...document.querySelectorAll('main button, main select, main textarea, main a')]
        .filter((el) => el.offsetParent !== null)
        .filter((el) => { const r = el.getBoundingClientRect(); return r.left < 0 || r.right > window.innerWidth; })
        .map((el) => el.textContent || el.tagName)""")
    assert outside == []
    box = page.get_by_role("button", name="Send").bounding_box()
    assert box and box["height"] >= 40
    screenshot(page, "chat-phone")
    page.get_by_role("link", name="Conversations").click()
    page.locator(".sessions li").first.wait_for()
    assert page.locator("#main").is_hidden()


def test_keyboard_only_sign_in_and_chat(new_page, web_url: str) -> None:
    username = register(web_url)
    page = new_page(DESKTOP)
    page.keyboard.press("Tab")  # the skip link comes first
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.get_by_label("Username").focus()
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Your conversations").wait_for()
    # Focus moved to the new page's heading, so a screen reader announces it.
    assert page.evaluate("document.activeElement.id") == "view-title"
    page.get_by_role("button", name="New chat").first.focus()
    page.keyboard.press("Enter")
    page.get_by_label("Message", exact=True).wait_for()
    page.wait_for_function("() => document.activeElement && document.activeElement.tagName === 'TEXTAREA'")
    page.keyboard.type("Say hello.")
    page.keyboard.press("Enter")
    wait_answer(page)
    # Every control has an accessible name; the answer area is a live region.
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, select, button')]
        .filter((el) => !el.labels?.length && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map((el) => el.outerHTML)""")
    assert unlabelled == []
    assert page.locator(".log").get_attribute("aria-live") == "polite"
    assert page.locator(".log").get_attribute("role") == "log"
