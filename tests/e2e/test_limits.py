"""The admin page's Limits panel: an admin sets another user's fair-share weight and token budgets
in the browser (PATCH /v1/rate-limits/{id}), and a value the server refuses is said, not saved."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import PASSWORD, register, screenshot
from tests.integration.conftest import ADMIN_PASSWORD

MODEL = "smollm2-135m-instruct"


def token(base_url: str, username: str, password: str) -> str:
    answer = httpx.post(f"{base_url}/v1/auth/login", json={"username": username, "password": password}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["tokens"]["access_token"]


def limits_of(base_url: str, user_id: str) -> dict:
    admin = token(base_url, "admin", ADMIN_PASSWORD)
    answer = httpx.get(f"{base_url}/v1/rate-limits/{user_id}", headers={"authorization": f"Bearer {admin}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def open_limits(page, username: str):
    """The admin page's Limits form of `username`, opened with its row's Change button."""
    page.get_by_role("link", name="Admin").click()
    panel = page.get_by_role("region", name="Limits")
    panel.get_by_role("button", name=f"Change the limits of {username}").click()
    return panel.get_by_role("form", name=f"Limits of {username}")


def test_admin_sets_a_users_share_weight_and_budget_and_a_bad_weight_is_refused(admin_page, web_url: str) -> None:
    username = register(web_url)
    user_token = token(web_url, username, PASSWORD)
    user_id = httpx.get(f"{web_url}/v1/users/me", headers={"authorization": f"Bearer {user_token}"}, timeout=30).json()["id"]
    # One request, so that the user is in the team's usage the panel lists.
    answer = httpx.post(f"{web_url}/v1/chat/completions", headers={"authorization": f"Bearer {user_token}"}, timeout=60,
                        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    before = limits_of(web_url, user_id)

    page = admin_page
    form = open_limits(page, username)
    assert form.get_by_label("Share weight").input_value() == str(before.get("share_weight", 1)).removesuffix(".0")
    form.get_by_label("Share weight").fill("3")
    form.get_by_label("Tokens per day (UTC)").fill("5000")
    form.get_by_role("button", name="Save").click()
    form.get_by_text(f"Saved: {username} has weight 3").wait_for()

    page.reload()
    row = page.get_by_role("region", name="Limits").locator("tr", has_text=username)
    row.get_by_role("button", name=f"Change the limits of {username}").wait_for()
    assert row.locator("td").nth(1).inner_text() == "3"
    form = open_limits(page, username)
    assert form.get_by_label("Share weight").input_value() == "3"
    assert form.get_by_label("Tokens per day (UTC)").input_value() == "5000"
    assert form.get_by_label("Tokens per month (UTC)").input_value() == str(before.get("tokens_per_month", 0))
    saved = limits_of(web_url, user_id)
    assert saved["share_weight"] == 3
    assert saved["tokens_per_day"] == 5000
    assert saved.get("tokens_per_month", 0) == before.get("tokens_per_month", 0)  # left alone

    form.get_by_label("Share weight").fill("5000")
    form.get_by_role("button", name="Save").click()
    form.get_by_text("share_weight must be at most 1000").wait_for()
    form.scroll_into_view_if_needed()
    screenshot(page, "admin-limits")
    assert limits_of(web_url, user_id)["share_weight"] == 3
    assert row.locator("td").nth(1).inner_text() == "3"

    form.get_by_role("button", name="Back to the defaults").click()
    form.get_by_text(f"Saved: {username} has weight 1").wait_for()
    after = limits_of(web_url, user_id)
    assert after.get("share_weight", 1) == 1
    assert after.get("tokens_per_day", 0) == before.get("tokens_per_day", 0)
