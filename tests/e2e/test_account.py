"""Accounts in the browser: silent token refresh, errors in plain words, API keys, and the admin page
that only admins see."""

from __future__ import annotations

import json

import httpx

from tests.e2e.conftest import PASSWORD, register, screenshot
from tests.e2e.test_chat import new_chat, send


def test_expired_access_token_is_refreshed_silently(signed_in) -> None:
    page = signed_in()
    before = page.evaluate("JSON.parse(localStorage.getItem('parley.auth'))")
    # An access token the server no longer accepts, as after its 15 minutes.
    page.evaluate("""() => { const auth = JSON.parse(localStorage.getItem('parley.auth'));
        auth.access_token = 'expired.' + auth.access_token.split('.').slice(1).join('.') + 'x';
        localStorage.setItem('parley.auth', JSON.stringify(auth)); }""")
    page.reload()
    page.get_by_role("heading", name="Your conversations").wait_for()
    new_chat(page)  # an authenticated call that works
    after = page.evaluate("JSON.parse(localStorage.getItem('parley.auth'))")
    assert after["access_token"] != before["access_token"]
    assert after["refresh_token"] != before["refresh_token"]  # refresh tokens rotate
    assert page.get_by_role("heading", name="Sign in to Parley").count() == 0


def test_revoked_refresh_token_leads_back_to_sign_in(signed_in) -> None:
    page = signed_in()
    page.evaluate("""() => { const auth = JSON.parse(localStorage.getItem('parley.auth'));
        auth.access_token = 'bad'; auth.refresh_token = 'revoked';
        localStorage.setItem('parley.auth', JSON.stringify(auth)); }""")
    page.reload()
    page.get_by_role("heading", name="Sign in to Parley").wait_for()
    page.get_by_text("Your sign-in expired. Please sign in again.").wait_for()


def test_errors_are_explained_in_plain_words(signed_in) -> None:
    page = signed_in()
    # The HTTP chat turn's errors (the app's path where WebSocket is unavailable); on the socket, a
    # turn refused before it starts is explained with the same words (web/api.js, HTTP_STATUS).
    page.add_init_script("delete window.WebSocket")
    page.reload()
    new_chat(page)

    # The server is busy: 429 with Retry-After before the turn starts.
    def busy(route):
        route.fulfill(status=429, headers={"retry-after": "7", "content-type": "application/json"},
                      body=json.dumps({"code": 8, "message": "queue full"}))

    page.route("**/v1/sessions/*:chat", busy)
    send(page, "Hello?")
    page.get_by_text("Too many requests: the server is busy. Try again in 7 seconds.").wait_for()
    assert page.get_by_label("Message", exact=True).input_value() == "Hello?"  # kept for the retry
    page.unroute("**/v1/sessions/*:chat")

    page.route("**/v1/sessions/*:chat", lambda route: route.fulfill(
        status=503, headers={"content-type": "application/json"},
        body=json.dumps({"code": 14, "message": "inference is not serving"})))
    send(page, "Hello again?")
    page.get_by_text("The service is unavailable right now (inference is not serving). Try again in a moment.").wait_for()
    page.unroute("**/v1/sessions/*:chat")

    page.context.set_offline(True)
    send(page, "Anyone there?")
    page.get_by_text("You are offline. Reconnect to the network and try again.").first.wait_for()
    page.context.set_offline(False)


def test_api_keys_are_created_shown_once_used_and_revoked(signed_in, web_url: str) -> None:
    page = signed_in()
    page.get_by_role("link", name="API keys").click()
    page.get_by_role("heading", name="API keys").wait_for()
    page.get_by_label("Name").fill("notebook")
    page.get_by_label("Weight among your keys").fill("3")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator(".secret-value").inner_text()
    assert secret.startswith("pk-")
    page.get_by_text("this is the only time it is shown").wait_for()
    # The key works as a credential for programs.
    assert httpx.get(f"{web_url}/v1/models", headers={"authorization": f"Bearer {secret}"}).status_code == 200
    row = page.locator("tr", has_text="notebook")
    row.wait_for()
    assert secret not in page.locator(".keys").inner_text()  # the list shows only its start
    assert row.locator("td").nth(2).inner_text() == "3"  # its share weight among the user's keys

    page.reload()
    page.locator("tr", has_text="notebook").wait_for()
    assert page.locator(".secret-value").count() == 0  # never shown again

    page.get_by_role("button", name="Revoke notebook").click()
    page.get_by_role("button", name="Confirm revoking notebook").click()
    page.get_by_text("No API keys yet.").wait_for()
    page.wait_for_timeout(1100)  # the gateway's API key cache (1 s in tests)
    assert httpx.get(f"{web_url}/v1/models", headers={"authorization": f"Bearer {secret}"}).status_code == 401


def test_admin_page_shows_hardware_models_and_metrics_and_loads_models(admin_page) -> None:
    page = admin_page
    page.get_by_role("link", name="Admin").click()
    page.get_by_role("heading", name="Administration").wait_for()
    hardware = page.get_by_role("region", name="Hardware")
    hardware.get_by_text("physical cores").wait_for()
    assert "llama.cpp" in hardware.inner_text()
    metrics = page.get_by_role("region", name="Metrics")
    metrics.locator("dl, .error-text").first.wait_for()

    row = page.locator('tr[data-model-id="smollm2-135m-instruct"]')
    row.get_by_text("ready").wait_for()
    assert row.get_by_role("cell").nth(4).inner_text() == "hermes"  # the chat format its template was read as
    screenshot(page, "admin-desktop")
    row.get_by_role("button", name="Unload smollm2-135m-instruct").click()
    page.locator('tr[data-model-id="smollm2-135m-instruct"] .model-state', has_text="not loaded").wait_for()
    page.get_by_role("button", name="Load smollm2-135m-instruct").click()
    page.locator('tr[data-model-id="smollm2-135m-instruct"] .model-state', has_text="ready").wait_for(timeout=120_000)


def test_admin_page_is_not_offered_to_users(signed_in) -> None:
    page = signed_in()
    assert page.get_by_role("link", name="Admin").count() == 0
    page.goto(page.url.split("#")[0] + "#/admin")
    page.get_by_role("heading", name="Page not found").wait_for()


def test_wrong_password_is_said_plainly(new_page, web_url: str) -> None:
    username = register(web_url)
    page = new_page()
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill("not-the-right-passphrase-1")
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.get_by_text("Wrong username or password.").wait_for()
    assert page.get_by_label("Password").evaluate("el => el === document.activeElement")


def test_usage_page_shows_budgets_and_use_and_the_admin_sees_the_team(signed_in, admin_page, web_url: str) -> None:
    username = register(web_url)
    token = httpx.post(f"{web_url}/v1/auth/login", json={"username": username, "password": PASSWORD},
                       timeout=30).json()["tokens"]["access_token"]
    answer = httpx.post(f"{web_url}/v1/chat/completions", headers={"authorization": f"Bearer {token}"}, timeout=60,
                        json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    used = answer.json()["usage"]

    page = signed_in(username=username)
    page.get_by_role("link", name="Usage").click()
    page.get_by_role("heading", name="Usage").wait_for()
    page.get_by_role("cell", name="Today (UTC)").wait_for()
    row = page.get_by_role("table", name="Your use per day and model").locator("tr", has_text="smollm2-135m-instruct")
    assert row.locator("td").all_inner_texts()[2:5] == ["1", str(used["prompt_tokens"]), str(used["completion_tokens"])]

    admin_page.get_by_role("link", name="Admin").click()
    admin_page.get_by_role("region", name="Usage").locator("tr", has_text=username).wait_for()
