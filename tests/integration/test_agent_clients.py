"""Tool calling and structured output on POST /v1/chat/completions, through Envoy with the real bundled
model, driven by the clients people build agents with: the openai SDK, LangChain, the OpenAI Agents SDK,
pydantic-ai and instructor.

The model is tiny and its answers are silly. What is asserted is what those clients rely on: the shapes
of tool calls (ids, type, a known name, arguments that validate against the tool's schema), content that
validates against the requested JSON schema, a tool round trip the server accepts, and 400s that name
what was wrong. Each framework is imported inside its own tests: their names (Agent, ModelSettings) clash."""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from services.stack import Stack
from tests.integration.conftest import Caller, new_user

MODEL = "smollm2-135m-instruct"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "An IANA timezone, e.g. Europe/Paris"}},
            "required": ["timezone"],
        },
    },
}
TOOLS = [WEATHER, CLOCK]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
# Deterministic answers are cached: streaming tests ask something else so that they see live generation.
ASK_STREAMED = [{"role": "user", "content": "What is the weather in Oslo, in fahrenheit?"}]
ASK_TIME = [{"role": "user", "content": "What time is it in Tokyo?"}]

# Nested object, enum, array and required fields: the parts of a schema that constrained decoding must honour.
TRIP_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "season": {"type": "string", "enum": ["spring", "summer", "autumn", "winter"]},
        "budget": {
            "type": "object",
            "properties": {"amount": {"type": "integer"}, "currency": {"type": "string", "enum": ["EUR", "USD"]}},
            "required": ["amount", "currency"],
            "additionalProperties": False,
        },
        "sights": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["city", "season", "budget", "sights"],
    "additionalProperties": False,
}


class Forecast(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]
    sunny: bool


class Budget(BaseModel):
    amount: int = Field(ge=10, le=5000)
    currency: Literal["EUR", "USD"]


class Trip(BaseModel):
    """As the SDK sends it: a nested model under $defs and $ref, an optional field as anyOf with null,
    integer bounds and maxItems."""

    city: str
    budget: Budget
    note: str | None
    sights: list[str] = Field(max_length=2)


FORECAST_PROMPT = [{"role": "user", "content": "Give the forecast for Paris: is it sunny? Use celsius."}]


@pytest.fixture(scope="module")
def user(stack: Stack) -> Caller:
    """An account of this module's own: its ~50 requests would spend the shared user's 60 a minute."""
    return new_user(stack.url, "agents")


@pytest.fixture
def client(base_url: str, user: Caller) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=user.api_key, max_retries=0)


def async_client(base_url: str, user: Caller) -> openai.AsyncOpenAI:
    # Made inside each async test: an AsyncOpenAI belongs to the event loop it first runs on.
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=user.api_key, max_retries=0)


def schema_of(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)


def assert_valid_tool_calls(message: Any, tools: list[dict[str, Any]]) -> None:
    """Each call has an id, type function, a name among the tools and arguments (a JSON string) that
    validate against that tool's parameters."""
    assert message.tool_calls, f"no tool calls in {message}"
    ids = [call.id for call in message.tool_calls]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids)
    for call in message.tool_calls:
        assert call.type == "function"
        assert call.function.name in [t["function"]["name"] for t in tools]
        assert isinstance(call.function.arguments, str)
        jsonschema.validate(json.loads(call.function.arguments), schema_of(tools, call.function.name))


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], **extra: Any) -> Any:
    settings = {"temperature": 0, "max_tokens": 64, **extra}
    return client.chat.completions.create(model=MODEL, messages=messages, **settings)


def post(base_url: str, user: Caller, **body: Any) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, "max_tokens": 8, **body},
                      headers=user.headers, timeout=30)


# --- the openai SDK: tools ---------------------------------------------------------------------------


# The tiny model repeats a call for as long as it may, so most tests ask for one call per answer
# (parallel_tool_calls false) and stay short; test_parallel_tool_calls covers the default.


def test_required_tool_choice_returns_a_tool_call_valid_against_the_schema(client: openai.OpenAI) -> None:
    choice = chat(client, ASK_WEATHER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    assert_valid_tool_calls(choice.message, TOOLS)
    assert len(choice.message.tool_calls) == 1


def test_named_tool_choice_calls_that_function(client: openai.OpenAI) -> None:
    choice = chat(client, ASK_WEATHER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                  parallel_tool_calls=False).choices[0]
    assert_valid_tool_calls(choice.message, TOOLS)
    assert [call.function.name for call in choice.message.tool_calls] == ["get_time"]
    # OpenAI itself answers "stop" when one function is named, "tool_calls" otherwise; clients accept both.
    assert choice.finish_reason in ("tool_calls", "stop")


def test_parallel_tool_calls(client: openai.OpenAI) -> None:
    answer = chat(client, [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}], tools=TOOLS,
                  tool_choice="required", max_tokens=120)
    choice = answer.choices[0]
    # Every call returned is complete, also when the budget ran out in the middle of a further one.
    assert_valid_tool_calls(choice.message, TOOLS)
    assert choice.finish_reason == ("length" if answer.usage.completion_tokens >= 120 else "tool_calls")


def test_auto_tool_choice_answers_with_text_or_valid_tool_calls(client: openai.OpenAI) -> None:
    choice = chat(client, ASK_WEATHER, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False).choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert_valid_tool_calls(choice.message, TOOLS)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_none_tool_choice_never_calls_a_tool(client: openai.OpenAI) -> None:
    choice = chat(client, ASK_WEATHER, tools=TOOLS, tool_choice="none", max_tokens=16).choices[0]
    assert not choice.message.tool_calls
    assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_streamed_tool_calls_assemble_from_indexed_deltas(client: openai.OpenAI) -> None:
    calls: dict[int, dict[str, str]] = {}
    finish_reasons = []
    for chunk in chat(client, ASK_STREAMED, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, stream=True):
        for choice in chunk.choices:
            finish_reasons += [choice.finish_reason] if choice.finish_reason else []
            for delta in choice.delta.tool_calls or []:
                assert isinstance(delta.index, int)
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.id:
                    call["id"] = delta.id
                if delta.type:
                    assert delta.type == "function"
                if delta.function and delta.function.name:
                    call["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    assert finish_reasons == ["tool_calls"]
    assert calls and sorted(calls) == list(range(len(calls)))
    for call in calls.values():
        assert call["id"] and call["name"] in ("get_weather", "get_time")
        jsonschema.validate(json.loads(call["arguments"]), schema_of(TOOLS, call["name"]))


def test_the_sdk_stream_helper_yields_a_final_completion_with_tool_calls(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model=MODEL, messages=ASK_TIME, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, temperature=0, max_tokens=64) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    assert final.choices[0].finish_reason == "tool_calls"
    assert_valid_tool_calls(final.choices[0].message, TOOLS)


def test_a_tool_round_trip_is_accepted(client: openai.OpenAI) -> None:
    first = chat(client, ASK_WEATHER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False).choices[0].message
    assert_valid_tool_calls(first, TOOLS)
    history = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None,
         "tool_calls": [call.model_dump(include={"id", "type", "function"}) for call in first.tool_calls]},
        *[{"role": "tool", "tool_call_id": call.id, "content": "18 degrees, light rain"} for call in first.tool_calls],
    ]
    second = chat(client, history, tools=TOOLS, max_tokens=24).choices[0]
    assert second.message.role == "assistant"
    assert second.message.content or second.message.tool_calls


CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}


# The assistant turn and the tool result as different clients write them: content null, absent or "";
# tool output as a string or as text parts.
@pytest.mark.parametrize(("assistant", "tool_content"), [
    ({"content": None}, "18 degrees"),
    ({}, "18 degrees"),
    ({"content": ""}, [{"type": "text", "text": "18 degrees"}]),
])
def test_tool_history_in_every_client_shape_is_accepted(base_url: str, user: Caller, assistant: dict[str, Any],
                                                         tool_content: Any) -> None:
    messages = [*ASK_WEATHER, {"role": "assistant", "tool_calls": [CALL], **assistant},
                {"role": "tool", "tool_call_id": "call_1", "content": tool_content}]
    response = post(base_url, user, messages=messages, tools=TOOLS, max_tokens=4)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


# --- the openai SDK: structured output --------------------------------------------------------------


def test_strict_json_schema_content_validates(client: openai.OpenAI) -> None:
    answer = chat(client, [{"role": "user", "content": "Plan a short trip to Rome as JSON."}], max_tokens=160,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "trip", "strict": True, "schema": TRIP_SCHEMA}})
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), TRIP_SCHEMA)


def test_json_object_content_is_a_json_object(client: openai.OpenAI) -> None:
    answer = chat(client, [{"role": "user", "content": "Describe a cat in JSON with a name and an age."}],
                  max_tokens=64, response_format={"type": "json_object"})
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


def test_sdk_parse_with_a_nested_pydantic_model(client: openai.OpenAI) -> None:
    answer = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Plan a trip to Rome."}],
                                           response_format=Trip, temperature=0, max_tokens=120)
    assert isinstance(answer.choices[0].message.parsed, Trip)


def test_sdk_stream_helper_parses_streamed_structured_output(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model=MODEL, messages=FORECAST_PROMPT, response_format=Forecast,
                                        temperature=0, max_tokens=64) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert events.count("content.delta") > 1 and "content.done" in events
    assert isinstance(final.choices[0].message.parsed, Forecast)


# --- errors ------------------------------------------------------------------------------------------


# Keywords OpenAI's strict mode rejects too ("not" would be one, but every refusal says "not").
@pytest.mark.parametrize(("keyword", "tags"), [
    ("uniqueItems", {"type": "array", "items": {"type": "string"}, "uniqueItems": True}),
    ("patternProperties", {"type": "object", "patternProperties": {"^x": {"type": "string"}}}),
])
def test_an_unsupported_schema_keyword_is_400_naming_it(base_url: str, user: Caller, keyword: str,
                                                         tags: dict[str, Any]) -> None:
    schema = {"type": "object", "properties": {"tags": tags}, "required": ["tags"], "additionalProperties": False}
    response = post(base_url, user, messages=ASK_WEATHER,
                    response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                            "schema": schema}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert keyword in error["message"] and error["type"] == "invalid_request_error"


def test_tool_choice_naming_an_unknown_function_is_400(base_url: str, user: Caller) -> None:
    response = post(base_url, user, messages=ASK_WEATHER, tools=TOOLS,
                    tool_choice={"type": "function", "function": {"name": "launch_rocket"}})
    assert response.status_code == 400, response.text
    assert "launch_rocket" in response.json()["error"]["message"]


def test_tool_message_without_tool_call_id_is_400(base_url: str, user: Caller) -> None:
    messages = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": "18 degrees"}]
    response = post(base_url, user, messages=messages, tools=TOOLS)
    assert response.status_code == 400, response.text
    assert "tool_call_id" in response.json()["error"]["message"]


# --- LangChain ---------------------------------------------------------------------------------------


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"18 degrees and light rain in {city}"


def chat_openai(base_url: str, user: Caller, **extra: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{base_url}/v1", api_key=user.api_key, model=MODEL, temperature=0, max_retries=0,
                      **extra)


def test_langchain_tool_loop(base_url: str, user: Caller) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool

    weather = tool(get_weather)
    llm = chat_openai(base_url, user, max_tokens=48)
    messages: list[Any] = [HumanMessage("What is the weather in Paris?")]
    asked = llm.bind_tools([weather], tool_choice="any", parallel_tool_calls=False).invoke(messages)
    assert isinstance(asked, AIMessage) and asked.tool_calls and not asked.invalid_tool_calls
    messages.append(asked)
    for call in asked.tool_calls:
        assert call["name"] == "get_weather"
        jsonschema.validate(call["args"], weather.tool_call_schema.model_json_schema())
        result = weather.invoke(call)
        assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
        messages.append(result)
    answer = llm.bind_tools([weather]).invoke(messages)
    assert isinstance(answer, AIMessage) and (answer.content or answer.tool_calls)


# None: the default method, json_schema since langchain-openai 0.3.
@pytest.mark.parametrize("method", ["json_schema", None, "function_calling"])
def test_langchain_structured_output(base_url: str, user: Caller, method: str | None) -> None:
    llm = chat_openai(base_url, user, max_tokens=64)
    structured = llm.with_structured_output(Forecast, **({"method": method} if method else {}))
    assert isinstance(structured.invoke(FORECAST_PROMPT[0]["content"]), Forecast)


# --- the OpenAI Agents SDK ---------------------------------------------------------------------------


def agents_model(base_url: str, user: Caller) -> Any:
    from agents import OpenAIChatCompletionsModel, set_tracing_disabled

    set_tracing_disabled(True)  # no exporter to reach
    return OpenAIChatCompletionsModel(model=MODEL, openai_client=async_client(base_url, user))


async def test_openai_agents_run_calls_the_tool_and_goes_on(base_url: str, user: Caller) -> None:
    from agents import Agent, MaxTurnsExceeded, ModelSettings, Runner, function_tool

    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"18 degrees and light rain in {city}"

    # tool_choice "required" on the first turn only: reset_tool_choice (the default) frees the next turns.
    agent = Agent(name="forecaster", instructions="Answer weather questions with the get_weather tool.",
                  model=agents_model(base_url, user), tools=[get_weather],
                  model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0,
                                               max_tokens=48))
    try:
        result = await Runner.run(agent, "What is the weather in Paris?", max_turns=3)
    except MaxTurnsExceeded:
        # A tiny model may call the tool again on every free turn; every turn was still accepted.
        assert len(calls) >= 2
    else:
        assert isinstance(result.final_output, str)
    assert calls and all(isinstance(city, str) for city in calls)


async def test_openai_agents_stop_on_first_tool_returns_the_tool_output(base_url: str, user: Caller) -> None:
    from agents import Agent, ModelSettings, Runner, function_tool

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "18 degrees and light rain"

    agent = Agent(name="forecaster", model=agents_model(base_url, user), tools=[get_weather],
                  tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(tool_choice="get_weather", parallel_tool_calls=False, temperature=0,
                                               max_tokens=48))
    result = await Runner.run(agent, "What is the weather in Paris?", max_turns=2)
    assert result.final_output == "18 degrees and light rain"


# --- pydantic-ai -------------------------------------------------------------------------------------


def pydantic_ai_model(base_url: str, user: Caller) -> Any:
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(MODEL, provider=OpenAIProvider(openai_client=async_client(base_url, user)))


@pytest.mark.parametrize("output", ["tool", "native"])
async def test_pydantic_ai_agent_calls_the_tool_and_returns_the_output_type(base_url: str, user: Caller,
                                                                            output: str) -> None:
    from pydantic_ai import Agent, NativeOutput, RunContext
    from pydantic_ai.settings import ModelSettings

    calls: list[str] = []

    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"18 degrees and sunny in {city}"

    # By default nothing makes the model call get_weather before answering (pydantic-ai sends "required"
    # over get_weather and its output tool final_result, or "auto" with NativeOutput), and a tiny model
    # may answer at once. So each step names what it must do (settings per step, from a callable): the
    # first forces get_weather (a named tool_choice); the next force the answer: the output tool
    # final_result (named again) or, with NativeOutput, response_format json_schema and tool_choice "none".
    def settings(ctx: RunContext[None]) -> ModelSettings:
        first = ctx.run_step <= 1
        answer: Any = ["final_result"] if output == "tool" else "none"
        return ModelSettings(tool_choice=["get_weather"] if first else answer, parallel_tool_calls=False,
                             temperature=0, max_tokens=64)

    output_type = Forecast if output == "tool" else NativeOutput(Forecast)
    agent = Agent(pydantic_ai_model(base_url, user), output_type=output_type, tools=[get_weather],
                  model_settings=settings, retries=1)
    result = await agent.run("What is the forecast for Paris?")
    assert isinstance(result.output, Forecast)
    assert calls


# --- instructor --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_returns_a_valid_instance(client: openai.OpenAI, mode: str) -> None:
    import instructor

    patched = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
    # TOOLS mode names the tool: one call per answer, or the tiny model repeats it until max_tokens.
    one_call = {"parallel_tool_calls": False} if mode == "TOOLS" else {}
    forecast = patched.chat.completions.create(model=MODEL, response_model=Forecast, messages=FORECAST_PROMPT,
                                               max_retries=1, temperature=0, max_tokens=64, **one_call)
    assert isinstance(forecast, Forecast)
