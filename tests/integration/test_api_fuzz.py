"""Schemathesis fuzzes every operation of the OpenAPI document the gateway serves
(GET /v1/openapi.json, generated from the protos by tools/openapi.py) against the real stack, as a
signed-in user. The bar: no 5xx but a documented 503, every answer (status, content type, body,
each server-sent event) as the document says, and no request left hanging.

Bounded to about two minutes: a few explicit, boundary and random examples per operation, each
generation capped at a handful of tokens. The counts (requests, statuses, failures per operation)
are written to test-artifacts/fuzz/summary.json and printed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.stack import ROOT, Stack
from tests.integration.conftest import ADMIN_PASSWORD, Caller, artifacts_dir, new_user, sign_in, start_stack

# Random examples per operation, after its explicit and boundary ("coverage") examples.
MAX_EXAMPLES = 12
# No answer here takes long with tokens capped; a request still open after this is a hang.
REQUEST_TIMEOUT_SECONDS = 30
GENERATING = r"^/v1/(chat/completions|completions|responses|messages)$|:(generate|chat)$"
# The most tokens any generated request may ask for.
MAX_TOKENS = 3

OPENAPI = ROOT / "build" / "openapi.json"

STATS: dict[str, Any] = {"requests": 0, "seconds": 0.0, "statuses": Counter(), "by_operation": Counter(),
                         "seconds_by_operation": Counter(), "failed_requests": Counter()}


@schemathesis.check
def no_server_error_but_503(ctx: CheckContext, response: Any, case: Any) -> bool | None:
    """5xx only as the documented 503 (a service not available), never 500/502/504."""
    if response.status_code >= 500 and response.status_code != 503:
        raise AssertionError(f"{response.status_code} is a server error, and only 503 is documented: "
                             f"{response.content[:300]!r}")
    return None


CHECKS = [no_server_error_but_503, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own: the fuzzer's failed sign-ins lock the loopback address out of logging in
    (as they should), and its random accounts and sessions stay out of other tests' way."""
    running = start_stack(tmp_path_factory.mktemp("fuzz-stack"), PARLEY_PARALLEL_SLOTS="2",
                          PARLEY_CONTEXT_LENGTH="2048")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def fuzzer(fuzz_stack: Stack) -> Caller:
    """A user of its own, with rate limits far above what the fuzzer sends (its 429s would hide the rest)."""
    stack = fuzz_stack
    admin = sign_in(stack.url, "admin", ADMIN_PASSWORD)
    caller = new_user(stack.url, "fuzz")
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        me = http.get("/v1/users/me", headers=caller.headers).json()
        raised = http.patch(f"/v1/rate-limits/{me['id']}", headers=admin.headers,
                            json={"requests_per_minute": 1_000_000, "tokens_per_minute": 100_000_000})
        assert raised.status_code == 200, raised.text
    return caller


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    counts = {**STATS, "statuses": dict(sorted(STATS["statuses"].items())),
              "by_operation": dict(sorted(STATS["by_operation"].items())),
              "seconds_by_operation": {k: round(v, 1) for k, v in STATS["seconds_by_operation"].most_common()},
              "failed_requests": dict(sorted(STATS["failed_requests"].items())),
              "failed_requests_total": sum(STATS["failed_requests"].values())}
    path = artifacts_dir() / "fuzz"
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(counts, indent=2) + "\n")
    print(f"\nfuzz: {counts['requests']} requests in {counts['seconds']:.0f} s over "
          f"{len(counts['by_operation'])} operations; statuses {counts['statuses']}; "
          f"{counts['failed_requests_total']} failed requests")


# The document the gateway serves (test_openapi.py checks that it is this file). Loaded when the
# tests are collected, before any stack runs: the base URL and the credential come with each call.
schema = schemathesis.openapi.from_path(OPENAPI, config=SchemathesisConfig.from_dict({
    "request-timeout": REQUEST_TIMEOUT_SECONDS,
    "max-stream-events": 400,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
    # Generating operations: no boundary phase (a variant of each of their dozens of fields is an
    # answer each, minutes of them even with 3 tokens); the document's example and random requests,
    # valid and invalid, instead. tests/unit/inference covers their parsers' boundaries.
    "operations": [{"include-path-regex": GENERATING,
                    "phases": {"coverage": {"enabled": False},
                               "fuzzing": {"generation": {"mode": "all", "max-examples": MAX_EXAMPLES}}}}],
}))


def _cap(body: dict[str, Any], key: str) -> None:
    """At most MAX_TOKENS for a well-formed count (absent counts as large); malformed values stay,
    they are what the fuzzer is testing."""
    value = body.get(key)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS):
        body[key] = MAX_TOKENS


def cap_generation(case: Any) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    path = case.operation.path
    if path in ("/v1/chat/completions", "/v1/completions"):
        _cap(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 2:
            body["n"] = 2  # choices are generated side by side: 16 of them cost 16 answers
    elif path == "/v1/responses":
        _cap(body, "max_output_tokens")
    elif path == "/v1/messages":
        _cap(body, "max_tokens")
    elif path.endswith((":generate", ":chat")):
        sampling = body.get("sampling")
        if sampling is None:
            body["sampling"] = sampling = {}
        if isinstance(sampling, dict):
            _cap(sampling, "max_tokens")


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=MAX_EXAMPLES)
def test_every_operation_answers_as_documented(case: Any, fuzz_stack: Stack, fuzzer: Caller) -> None:
    cap_generation(case)
    label = case.operation.label
    started = time.monotonic()
    response = case.call(base_url=fuzz_stack.url, headers={"authorization": f"Bearer {fuzzer.api_key}"},
                         timeout=REQUEST_TIMEOUT_SECONDS)
    STATS["seconds"] += time.monotonic() - started
    STATS["seconds_by_operation"][label] += round(time.monotonic() - started, 3)
    STATS["requests"] += 1
    STATS["statuses"][str(response.status_code)] += 1
    STATS["by_operation"][f"{label} {response.status_code}"] += 1
    try:
        case.validate_response(response, checks=CHECKS)
    except BaseException:  # Schemathesis raises an exception group
        STATS["failed_requests"][label] += 1
        raise
