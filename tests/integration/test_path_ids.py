"""The URL's id is the only id (issue 20): a body that names another resource than the path is a 400
and changes nothing, on every kind of method with an id in its path; naming the same one is fine."""

from __future__ import annotations

import httpx

from tests.integration.conftest import Caller


def test_a_session_patch_cannot_act_on_another_session(base_url: str, user: Caller) -> None:
    with httpx.Client(base_url=base_url, headers=user.headers, timeout=30) as http:
        own, other = (http.post("/v1/sessions", json={"title": title}).json()["id"] for title in ("own", "other"))
        refused = http.patch(f"/v1/sessions/{own}", json={"id": other, "title": "renamed"})
        assert refused.status_code == 400, refused.text
        assert "session.id" in refused.json()["message"] and "URL" in refused.json()["message"]
        assert http.get(f"/v1/sessions/{other}").json()["title"] == "other"
        assert http.get(f"/v1/sessions/{own}").json()["title"] == "own"
        same = http.patch(f"/v1/sessions/{own}", json={"id": own, "title": "renamed"})
        assert same.status_code == 200 and same.json()["title"] == "renamed"
        chat = http.post(f"/v1/sessions/{own}:chat", json={"session_id": other, "content": "hi"})
        assert chat.status_code == 400, chat.text
        assert http.get(f"/v1/sessions/{other}/messages").json().get("messages", []) == []


def test_a_rate_limit_patch_cannot_change_another_user(base_url: str, admin: Caller, user: Caller) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        admin_id = http.get("/v1/users/me", headers=admin.headers).json()["id"]
        user_id = http.get("/v1/users/me", headers=user.headers).json()["id"]
        before = http.get(f"/v1/rate-limits/{admin_id}", headers=admin.headers).json()
        refused = http.patch(f"/v1/rate-limits/{user_id}", json={"user_id": admin_id, "requests_per_minute": 7},
                             headers=admin.headers)
        assert refused.status_code == 400, refused.text
        assert "rate_limit.user_id" in refused.json()["message"]
        assert http.get(f"/v1/rate-limits/{admin_id}", headers=admin.headers).json() == before


def test_a_model_action_acts_on_the_model_in_its_path(base_url: str, admin: Caller) -> None:
    with httpx.Client(base_url=base_url, headers=admin.headers, timeout=30) as http:
        refused = http.post("/v1/models/smollm2-135m-instruct:unload", json={"id": "all-minilm-l6-v2"})
        assert refused.status_code == 400, refused.text
        counted = http.post("/v1/models/smollm2-135m-instruct:countTokens",
                            json={"model": "other", "messages": [{"role": "user", "content": "hi"}]})
        assert counted.status_code == 400, counted.text


def test_admins_cannot_set_limits_for_a_user_that_does_not_exist(base_url: str, admin: Caller, user: Caller) -> None:
    with httpx.Client(base_url=base_url, headers=admin.headers, timeout=30) as http:
        missing = http.patch("/v1/rate-limits/no-such-user", json={"requests_per_minute": 5})
        assert missing.status_code == 404, missing.text
        assert "no user with id 'no-such-user'" in missing.json()["message"]
        user_id = httpx.get(f"{base_url}/v1/users/me", headers=user.headers).json()["id"]
        found = http.get(f"/v1/users/{user_id}")
        assert found.status_code == 200 and found.json()["username"] == user.username
        assert http.get("/v1/users/me").json()["username"] == "admin"  # the literal path still wins
        unchanged = http.patch(f"/v1/rate-limits/{user_id}", json={"requests_per_minute": -1})
        assert unchanged.status_code == 200, unchanged.text
    assert httpx.get(f"{base_url}/v1/users/{user_id}", headers=user.headers).status_code == 403
