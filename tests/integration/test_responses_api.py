"""The OpenAI Responses API (POST /v1/responses and friends) through Envoy with the real bundled model,
driven by the `openai` SDK and the OpenAI Agents SDK's default Responses model.

A stored response is a turn of a saved conversation: the tests check what the web app would see
(GET /v1/sessions and /messages), that previous_response_id appends to the latest answer's session
and forks an older one without touching the original, ownership, store: false, retrieval, deletion,
input items, and a chain continued after a restart of the whole stack. The model is tiny: asserted
are shapes and storage, never the quality of an answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from services.stack import Stack
from tests.integration.conftest import Caller, new_user, stack_env

MODEL = "smollm2-135m-instruct"
SHORT = {"model": MODEL, "max_output_tokens": 16}
WEATHER = {
    "type": "function", "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False},
}


class Verdict(BaseModel):
    ok: bool


class Running:
    """The module's stack, which one test restarts on the same data dir."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.stack = self._start()

    def _start(self) -> Stack:
        stack = Stack(env=self.env, log_dir=Path(self.env["PARLEY_DATA_DIR"]) / "logs")
        stack.start()
        try:
            stack.wait_healthy(timeout=180)
        except Exception:
            stack.stop()
            raise
        return stack

    def restart(self) -> None:
        self.stack.stop()
        self.stack = self._start()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    env = stack_env(tmp_path_factory.mktemp("responses"), PARLEY_PARALLEL_SLOTS="2", PARLEY_CONTEXT_LENGTH="2048")
    running = Running(env)
    yield running
    running.stack.stop()


@pytest.fixture(scope="module")
def owner(running: Running) -> Caller:
    return new_user(running.stack.url, "resp")


@pytest.fixture(scope="module")
def stranger(running: Running) -> Caller:
    return new_user(running.stack.url, "other")


def client_of(running: Running, caller: Caller) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.stack.url}/v1", api_key=caller.api_key, max_retries=0)


@pytest.fixture
def client(running: Running, owner: Caller) -> openai.OpenAI:
    return client_of(running, owner)


def rest(running: Running, caller: Caller, path: str) -> Any:
    answer = httpx.get(f"{running.stack.url}{path}", headers=caller.headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def sessions(running: Running, caller: Caller) -> list[dict[str, Any]]:
    return rest(running, caller, "/v1/sessions?page_size=200")["sessions"]


def messages(running: Running, caller: Caller, session_id: str) -> list[dict[str, Any]]:
    return rest(running, caller, f"/v1/sessions/{session_id}/messages?page_size=200")["messages"]


def session_of(running: Running, caller: Caller, response_id: str) -> dict[str, Any]:
    """The session whose messages hold this response's answer (the web app's view of it)."""
    message_id = response_id.removeprefix("resp_")
    for session in sessions(running, caller):
        if any(m["id"] == message_id for m in messages(running, caller, session["id"])):
            return session
    raise AssertionError(f"no session holds {response_id}")


def test_create_stores_a_conversation_the_web_app_shows(running: Running, owner: Caller,
                                                        client: openai.OpenAI) -> None:
    before = len(sessions(running, owner))
    response = client.responses.create(input="Name a colour.", instructions="Answer in one word.",
                                       metadata={"ticket": "42"}, temperature=0, **SHORT)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete") and response.model == MODEL
    assert [item.type for item in response.output] == ["message"]
    assert response.output[0].content[0].type == "output_text"
    assert response.instructions == "Answer in one word." and response.metadata == {"ticket": "42"}
    assert response.usage is not None and 0 < response.usage.output_tokens <= 16
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens

    listed = sessions(running, owner)
    assert len(listed) == before + 1
    session = session_of(running, owner, response.id)
    assert session["title"] == "Name a colour." and session["system_prompt"] == "Answer in one word."
    stored = messages(running, owner, session["id"])
    assert [(m["role"], m["content"]) for m in stored] == [
        ("MESSAGE_ROLE_USER", "Name a colour."), ("MESSAGE_ROLE_ASSISTANT", response.output_text)]
    assert stored[1]["status"] == "MESSAGE_STATUS_COMPLETE" and stored[1]["completion_tokens"] == response.usage.output_tokens

    again = client.responses.retrieve(response.id)
    assert (again.id, again.status, again.output_text, again.metadata) == (
        response.id, response.status, response.output_text, {"ticket": "42"})
    assert again.output[0].id == response.output[0].id


def test_stream_events_assemble_with_the_sdk_helpers(running: Running, owner: Caller, client: openai.OpenAI) -> None:
    # A JSON schema keeps the answer short enough to complete: the helpers' final response needs
    # response.completed, and text_format parses the answer.
    with client.responses.stream(model=MODEL, input="Is the sky blue?", text_format=Verdict,
                                 max_output_tokens=32, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "response.output_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text and isinstance(final.output_parsed, Verdict)
    assert final.status == "completed" and final.text.format.type == "json_schema"
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_previous_response_id_appends_to_the_latest_and_forks_an_older_one(
        running: Running, owner: Caller, client: openai.OpenAI) -> None:
    first = client.responses.create(input="My name is Ada.", **SHORT)
    second = client.responses.create(input="What is my name?", previous_response_id=first.id, **SHORT)
    assert second.previous_response_id == first.id
    original = session_of(running, owner, first.id)
    assert session_of(running, owner, second.id)["id"] == original["id"]  # appended
    chain = messages(running, owner, original["id"])
    assert [m["content"] for m in chain[::2]] == ["My name is Ada.", "What is my name?"]
    assert [m["id"] for m in chain[1::2]] == [first.id[5:], second.id[5:]]

    count = len(sessions(running, owner))
    fork = client.responses.create(input="Tell me a colour instead.", previous_response_id=first.id, **SHORT)
    assert len(sessions(running, owner)) == count + 1
    forked = session_of(running, owner, fork.id)
    assert forked["id"] != original["id"] and forked["title"] == original["title"]
    copied = messages(running, owner, forked["id"])
    assert [(m["role"], m["content"]) for m in copied[:2]] == [(m["role"], m["content"]) for m in chain[:2]]
    assert [m["content"] for m in copied[2:3]] == ["Tell me a colour instead."]
    assert messages(running, owner, original["id"]) == chain  # the original is untouched

    # The original's latest answer still continues the original.
    third = client.responses.create(input="Thanks.", previous_response_id=second.id, **SHORT)
    assert session_of(running, owner, third.id)["id"] == original["id"]
    items = client.responses.input_items.list(third.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "Thanks.")]


def test_function_tool_round_trip(running: Running, owner: Caller, client: openai.OpenAI) -> None:
    asked = client.responses.create(input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=64, model=MODEL, temperature=0)
    assert asked.status == "completed", asked.output
    [call] = asked.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])

    answered = client.responses.create(
        previous_response_id=asked.id, tools=[WEATHER], **SHORT,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}])
    assert answered.output and answered.output[0].type == "message"
    stored = messages(running, owner, session_of(running, owner, answered.id)["id"])
    assert [m["role"] for m in stored] == ["MESSAGE_ROLE_USER", "MESSAGE_ROLE_ASSISTANT", "MESSAGE_ROLE_TOOL",
                                           "MESSAGE_ROLE_ASSISTANT"]
    assert stored[1]["tool_calls"][0]["id"] == call.call_id and stored[2]["tool_call_id"] == call.call_id
    [item] = client.responses.input_items.list(answered.id).data
    assert (item.type, item.call_id, item.output) == ("function_call_output", call.call_id, "18 C and sunny")

    # A call streamed: its item, its arguments, its end, as the helpers assemble them.
    with client.responses.stream(model=MODEL, input="What is the weather in Oslo?", tools=[WEATHER],
                                 max_output_tokens=64, tool_choice={"type": "function", "name": "get_weather"},
                                 temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.completed", [(e.type, getattr(e, "delta", None)) for e in events]
    final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    [streamed] = [item for item in final.output if item.type == "function_call"]
    assert streamed.name == "get_weather"
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == streamed.arguments
    jsonschema.validate(json.loads(streamed.arguments), WEATHER["parameters"])


async def test_openai_agents_default_responses_model_runs_a_one_tool_agent(running: Running, owner: Caller) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # no exporter to reach
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        cities.append(city)
        return "18 degrees and light rain"

    model = OpenAIResponsesModel(model=MODEL, openai_client=openai.AsyncOpenAI(
        base_url=f"{running.stack.url}/v1", api_key=owner.api_key, max_retries=0))
    agent = Agent(name="forecaster", instructions="Answer weather questions with the get_weather tool.",
                  model=model, tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(tool_choice="get_weather", parallel_tool_calls=False, max_tokens=64,
                                               temperature=0))
    result = await Runner.run(agent, "What is the weather in Lisbon?", max_turns=2)
    assert result.final_output == "18 degrees and light rain"
    assert len(cities) == 1 and isinstance(cities[0], str)
    # The Agents SDK stores by default: the turn is a conversation of the owner's.
    [raw] = result.raw_responses
    assert raw.response_id and raw.response_id.startswith("resp_")
    stored = messages(running, owner, session_of(running, owner, raw.response_id)["id"])
    assert stored[-1]["tool_calls"][0]["name"] == "get_weather"


def test_another_users_response_is_not_found(running: Running, owner: Caller, stranger: Caller,
                                             client: openai.OpenAI) -> None:
    mine = client.responses.create(input="A secret: 1234.", **SHORT)
    session = session_of(running, owner, mine.id)
    before = messages(running, owner, session["id"])
    theirs = client_of(running, stranger)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError) as caught:
        theirs.responses.create(input="What was the secret?", previous_response_id=mine.id, **SHORT)
    assert caught.value.body["type"] == "not_found_error"  # OpenAI's error shape
    assert sessions(running, stranger) == []
    assert messages(running, owner, session["id"]) == before


def test_store_false_keeps_nothing(running: Running, owner: Caller, client: openai.OpenAI) -> None:
    anchor = client.responses.create(input="Remember: blue.", **SHORT)
    session = session_of(running, owner, anchor.id)
    count, before = len(sessions(running, owner)), messages(running, owner, session["id"])

    fleeting = client.responses.create(input="Say something.", store=False, **SHORT)
    assert fleeting.id.startswith("resp_") and fleeting.output and fleeting.usage.output_tokens > 0
    follow = client.responses.create(input="And more?", previous_response_id=anchor.id, store=False, **SHORT)
    assert follow.output
    assert len(sessions(running, owner)) == count
    assert messages(running, owner, session["id"]) == before  # served from the chain, not appended
    for gone in (fleeting.id, follow.id):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(gone)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(input="Go on.", previous_response_id=gone, **SHORT)


def test_delete_and_input_items(running: Running, owner: Caller, client: openai.OpenAI) -> None:
    given = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
             {"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Bye."}]
    first = client.responses.create(input=given, **SHORT)
    newest = client.responses.input_items.list(first.id)
    assert [(i.role, i.content[0].text) for i in newest.data] == [("user", "Bye."), ("assistant", "Hello!"),
                                                                  ("user", "Hi.")]
    page = client.responses.input_items.list(first.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["Hi.", "Hello!"] and page.has_more
    rest_page = client.responses.input_items.list(first.id, order="asc", after=page.last_id)
    assert [i.content[0].text for i in rest_page.data] == ["Bye."] and not rest_page.has_more

    second = client.responses.create(input="Again.", previous_response_id=first.id, **SHORT)
    session = session_of(running, owner, first.id)
    assert len(messages(running, owner, session["id"])) == 6
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    assert [m["content"] for m in messages(running, owner, session["id"])][:3] == ["Hi.", "Hello!", "Bye."]
    assert len(messages(running, owner, session["id"])) == 4
    # The session's only response gone, the session goes too.
    client.responses.delete(first.id)
    assert session["id"] not in [s["id"] for s in sessions(running, owner)]


def test_unsupported_and_bad_requests_are_openai_400s(client: openai.OpenAI) -> None:
    cases = [({"background": True}, "background"),
             ({"tools": [{"type": "web_search"}]}, "function tools"),
             ({"max_output_tokens": 0}, "max_output_tokens"),
             ({"text": {"format": {"type": "xml"}}}, "text.format")]
    for extra, words in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(input="Hi.", **{**SHORT, **extra})
        assert words in caught.value.body["message"] and caught.value.body["type"] == "invalid_request_error"


def test_a_chain_continues_after_a_restart_of_the_whole_stack(running: Running, owner: Caller) -> None:
    first = client_of(running, owner).responses.create(input="Remember the number 7.", **SHORT)
    running.restart()
    client = client_of(running, owner)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    after = client.responses.create(input="Which number?", previous_response_id=first.id, **SHORT)
    session = session_of(running, owner, first.id)
    assert session_of(running, owner, after.id)["id"] == session["id"]
    assert [m["id"] for m in messages(running, owner, session["id"])][1::2] == [first.id[5:], after.id[5:]]
