"""Structured output and tool calls: OpenAI request parsing, schema checks, grammars, the prompt
for templates without tools, the streaming call parser — and, with the real bundled model, JSON
that validates against its schema and calls whose arguments validate against their tool."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import jsonschema
import pytest

from services.core.errors import InvalidArgument
from services.core.structured import Structure, Tool, ToolCall, check_schema, make_structure, validate_messages
from services.inference.chat_formats.hermes import HermesFormat, ToolCallParser
from services.inference.flow.service import SamplingInput
from services.inference.models.grammars import (
    grammar_for, int_range, integer_bounds, number_range,
    template_input,
)
from services.wire import openai_chat
from tests.unit.inference.test_batch_engine import MODEL, engine, scheduler  # noqa: F401 - a fixture
from tests.unit.inference.test_registry_and_engine import generated

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"enum": ["c", "f"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
WEATHER = Tool("get_weather", "Current weather of a city", json.dumps(WEATHER_SCHEMA, sort_keys=True))
CLOCK = Tool("get_time", "Time in a timezone", json.dumps({"type": "object", "properties": {
    "tz": {"type": "string", "maxLength": 12}}, "required": ["tz"]}))
PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "tags", "pet", "rating", "score"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
                         "pet": {"$ref": "#/$defs/pet"}, "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                         "score": {"type": "number", "minimum": 0, "maximum": 1}},
          "$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]}}}


def body(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


# --- the OpenAI request -------------------------------------------------------------------------
def test_tools_tool_choice_and_response_format_are_parsed() -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}
    req = openai_chat.parse_request(body(tools=[tool], tool_choice={"type": "function", "function": {
        "name": "get_weather"}}, parallel_tool_calls=False, user="u1"))
    assert req.structure.tool_choice == "function" and req.structure.function == "get_weather"
    assert req.structure.parallel is False and json.loads(req.structure.tools[0].parameters) == WEATHER_SCHEMA
    assert openai_chat.parse_request(body(tools=[tool])).structure.tool_choice == "auto"
    fmt = openai_chat.parse_request(body(response_format={"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON, "strict": True}})).structure
    assert fmt.format == "json_schema" and json.loads(fmt.schema) == PERSON
    assert openai_chat.parse_request(body(response_format={"type": "text"})).structure.plain


def test_tool_turns_in_the_history_are_parsed_and_checked() -> None:
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12 C"}]
    req = openai_chat.parse_request(json.dumps({"model": "m", "messages": messages}).encode())
    assert req.messages[1]["tool_calls"] == [ToolCall("call_1", "get_weather", '{"city":"Oslo"}')]
    assert req.messages[2] == {"role": "tool", "content": "12 C", "tool_call_id": "call_1"}
    validate_messages(req.messages)
    with pytest.raises(InvalidArgument, match="answers no earlier tool call"):
        validate_messages([messages[0], {"role": "tool", "content": "x", "tool_call_id": "call_9"}])


@pytest.mark.parametrize("fields, words", [
    ({"tools": [{"type": "function", "function": {"name": "a"}}], "tool_choice": {"type": "function", "function": {"name": "b"}}},
     "not among tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, r"tools\[0\]\.function\.name"),
    ({"tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]}, "twice"),
    ({"tools": [{"type": "function", "function": {"name": "a"}}], "tool_choice": "sometimes"}, "tool_choice"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "with a name"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"functions": [{"name": "a"}]}, "deprecated"),
    ({"modalities": ["text", "audio"]}, "only text"),
])
def test_bad_tools_and_formats_are_400_naming_the_field(fields: dict, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        openai_chat.parse_request(body(**fields))


@pytest.mark.parametrize("data", [
    json.dumps({"model": "m", "messages": [{"role": ["user"], "content": "hi"}]}).encode(),
    *(body(**{key: 10 ** 400}) for key in ("max_tokens", "max_completion_tokens", "temperature", "seed", "top_k", "n")),
    b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
])
def test_hostile_values_are_400_not_500(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        openai_chat.parse_request(data)


def test_a_tool_message_needs_its_call_id() -> None:
    messages = [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]
    with pytest.raises(InvalidArgument, match=r"messages\[1\].tool_call_id"):
        openai_chat.parse_request(json.dumps({"model": "m", "messages": messages}).encode())


# --- schemas and grammars -----------------------------------------------------------------------
@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "not"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
    ({"type": "string", "minimum": 1}, "minimum"),
    ({"type": "number", "maximum": 0.5}, "maximum"),
])
def test_keywords_the_grammar_cannot_enforce_are_refused_by_name(schema: dict, keyword: str) -> None:
    with pytest.raises(InvalidArgument, match=f"'{keyword}' is (not supported|supported with)|{keyword}: only whole"):
        check_schema(schema, "schema")
    with pytest.raises(InvalidArgument, match=keyword):
        grammar_for(make_structure([], format="json_schema", schema=json.dumps(schema)))


def test_grammar_kinds() -> None:
    assert grammar_for(Structure()) is None
    assert grammar_for(make_structure([WEATHER], "none")) is None
    forced = grammar_for(make_structure([WEATHER, CLOCK], "required"))
    assert forced is not None and not forced.triggers and "root ::= tool-calls" in forced.gbnf
    assert "tool-call )*" in forced.gbnf
    single = grammar_for(make_structure([WEATHER, CLOCK], "function", "get_time"))  # a named function: one call
    assert single is not None and "tool-calls ::= tool-call\n" in single.gbnf and "get_weather" not in single.gbnf
    lazy = grammar_for(make_structure([WEATHER], "auto"))
    assert lazy is not None and lazy.triggers
    both = grammar_for(make_structure([WEATHER], "auto", format="json_object"))
    assert both is not None and not both.triggers and "| tool-calls" in both.gbnf
    # What the grammar dictates after `<tool_call>`: with one tool to call up to its arguments, with
    # several up to the name; a forced call from the first character.
    assert (forced.call_head, forced.starts_with_call) == ('\n{"name": "', True)
    assert (single.call_head, single.starts_with_call) == ('\n{"name": "get_time", "arguments":', True)
    assert (lazy.call_head, lazy.starts_with_call) == ('\n{"name": "get_weather", "arguments":', False)
    assert both.call_head == "" and grammar_for(make_structure([], format="json_object")).call_head == ""
    # JSON strings never hold raw control characters (the converter's own rule allows them).
    assert "\\x00-\\x1F" in grammar_for(make_structure([], format="json_object")).gbnf


@pytest.mark.parametrize("low, high", [(None, None), (0, None), (1, None), (18, None), (None, 5), (None, -3),
                                       (-5, 5), (-120, -7), (1, 5), (0, 100), (7, 1234), (13, 13), (99, 101)])
def test_integer_bounds_become_exact_digit_ranges(low: int | None, high: int | None) -> None:
    _, pattern = int_range(low, high)
    matches = re.compile(f"(?:{pattern})").fullmatch
    for n in range(-1500, 1501):
        assert bool(matches(str(n))) == ((low is None or n >= low) and (high is None or n <= high)), n
    assert not any(matches(junk) for junk in ("01", "-0", "00", "", "1.5"))
    assert integer_bounds({"type": "integer", "exclusiveMinimum": 3, "maximum": 9, "exclusiveMaximum": 7}) == (4, 6)
    with pytest.raises(InvalidArgument, match="no integer"):
        integer_bounds({"type": "integer", "minimum": 5, "maximum": 4})


@pytest.mark.parametrize("bounds", [
    {"minimum": 0}, {"minimum": 0, "maximum": 1}, {"exclusiveMinimum": 0}, {"maximum": 100},
    {"minimum": -90, "maximum": 90}, {"exclusiveMinimum": -3, "exclusiveMaximum": 2}, {"maximum": -2},
    {"exclusiveMaximum": -2}, {"minimum": 2, "exclusiveMaximum": 3}, {"exclusiveMaximum": 0}, {"minimum": -5, "maximum": -5},
])
def test_number_bounds_hold_for_every_decimal(bounds: dict) -> None:
    _, pattern = number_range({"type": "number", **bounds})
    matches = re.compile(f"(?:{pattern})").fullmatch
    checks = {"minimum": lambda v, b: v >= b, "maximum": lambda v, b: v <= b,
              "exclusiveMinimum": lambda v, b: v > b, "exclusiveMaximum": lambda v, b: v < b}
    for i in range(-1300, 1301):
        for fraction in ("", ".0", ".00", ".5", ".25", ".05", ".001", ".999"):
            text = f"{'-' if i < 0 else ''}{abs(i) // 10}{fraction}"
            value = Fraction(text)
            if value == 0 and text.startswith("-"):
                continue  # -0: either way
            assert bool(matches(text)) == all(checks[k](value, b) for k, b in bounds.items()), text
    assert not any(matches(junk) for junk in ("01", "1.", ".5", "00.5", "1e3", ""))


# --- the prompt ---------------------------------------------------------------------------------
def test_templates_without_tools_get_them_in_the_system_message() -> None:
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": "", "tool_calls": [ToolCall("call_1", "get_weather", '{"city": "Oslo"}')]},
               {"role": "tool", "content": "12 C", "tool_call_id": "call_1"}]
    chat, tools = template_input(history, make_structure([WEATHER], "required"), native=False)
    assert tools is None and chat[0]["role"] == "system" and chat[0]["content"].startswith("Be brief.")
    assert '"name":"get_weather"' in chat[0]["content"] and "Call one of the tools now." in chat[0]["content"]
    assert chat[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert chat[3] == {"role": "user", "content": "<tool_response>\n12 C\n</tool_response>"}
    native, tools = template_input(history, make_structure([WEATHER]), native=True)
    assert tools and tools[0]["function"]["name"] == "get_weather" and native[0]["content"] == "Be brief."
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    plain, tools = template_input(history[1:2], make_structure([WEATHER], "none"), native=False)
    assert tools is None and plain == history[1:2]
    assert HermesFormat("{% if tools %}<tool_call>{% endif %}").native_tools and not HermesFormat("{{ x }}").native_tools


# --- the call parser ----------------------------------------------------------------------------
def feed_all(parser: ToolCallParser, pieces: list[str], deltas: list | None = None) -> tuple[str, list[ToolCall]]:
    text, calls = "", []
    for piece in pieces:
        t, c, d = parser.feed(piece)
        text, calls = text + t, calls + c
        if deltas is not None:
            deltas += d
    rest, more = parser.flush()
    return text + rest, calls + more


def test_calls_split_across_chunks_are_parsed_and_text_around_them_kept() -> None:
    structure = make_structure([WEATHER, CLOCK])
    raw = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>\n' \
          '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>'
    for size in (1, 3, 7, len(raw)):
        parser = ToolCallParser(t.name for t in structure.tools)
        text, calls = feed_all(parser, [raw[i:i + size] for i in range(0, len(raw), size)])
        assert text == "Let me check."
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "Oslo", "unit": "c"}), ("get_time", {"tz": "CET"})]
        assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls) and calls[0].id != calls[1].id


def test_a_call_streams_its_name_then_its_arguments_as_written() -> None:
    raw = ('<tool_call>\n{ "name" : "get_weather", "arguments" :  { "city": "Os\\"lo}", "days": [1, {"a": 2}]} }\n'
           '</tool_call><tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>')
    for size in (1, 2, 5, len(raw)):
        deltas: list = []
        _, calls = feed_all(ToolCallParser(["get_weather", "get_time"]), [raw[i:i + size] for i in range(0, len(raw), size)],
                            deltas)
        assert [(d.index, d.id, d.name) for d in deltas if d.id] == [(0, calls[0].id, "get_weather"), (1, calls[1].id, "get_time")]
        for index, call in enumerate(calls):
            assert "".join(d.arguments for d in deltas if d.index == index) == call.arguments
        assert calls[0].arguments == '{ "city": "Os\\"lo}", "days": [1, {"a": 2}]}'
        assert json.loads(calls[0].arguments) == {"city": 'Os"lo}', "days": [1, {"a": 2}]}


def test_what_is_not_a_call_stays_text() -> None:
    structure = make_structure([WEATHER])
    assert feed_all(ToolCallParser(t.name for t in structure.tools), ["a < b and <tool", "box>"]) == ("a < b and <toolbox>", [])
    assert feed_all(ToolCallParser(t.name for t in structure.tools), ['<tool_call>{"name": "nope", "arguments": {}}</tool_call>'])[1] == []
    assert feed_all(ToolCallParser(t.name for t in structure.tools), ["<tool_call>{not json}</tool_call>"]) == ("<tool_call>{not json}</tool_call>", [])
    # An answer that ran out of tokens inside a call: the unfinished call is text.
    assert feed_all(ToolCallParser(t.name for t in structure.tools), ['<tool_call>{"name": "get_we']) == ('<tool_call>{"name": "get_we', [])
    # After complete calls it is an unfinished call, not content.
    text, calls = feed_all(ToolCallParser(t.name for t in structure.tools), ['<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
                                                       '\n<tool_call>{"name'])
    assert text == "" and len(calls) == 1
    # Cut short by max_tokens inside a call whose name is known: that call, with what was written.
    parser = ToolCallParser(["get_weather"])
    text, calls, _ = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os')
    rest, more = parser.flush(truncated=True)
    assert text + rest == "" and [(c.name, c.arguments) for c in calls + more] == [("get_weather", '{"city": "Os')]


# --- with the real model (test_batch_engine's `engine` fixture: the bundled model, loaded) --------


async def collect(generation, model: str, structure: Structure, n: int = 1, **sampling) -> list[dict]:
    choices = [{"text": "", "calls": [], "reason": None} for _ in range(n)]
    messages = [{"role": "user", "content": "What is the weather in Paris? Describe a person as JSON."}]
    async for chunk in generated(generation, model, messages, "", SamplingInput(**sampling), n=n, structure=structure):
        choices[chunk.index]["text"] += chunk.text
        choices[chunk.index]["calls"] += chunk.tool_calls
        choices[chunk.index]["reason"] = chunk.finish_reason or choices[chunk.index]["reason"]
    return choices


async def test_json_schema_output_validates_for_every_choice(engine) -> None:
    _, generation = engine
    structure = make_structure([], format="json_schema", schema=json.dumps(PERSON))
    for choice in await collect(generation, MODEL, structure, n=2, max_tokens=200, temperature=1.0, seed=7):
        assert choice["reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["text"]), PERSON)


async def test_forced_calls_validate_against_their_tool(engine) -> None:
    registry, generation = engine
    stats = scheduler(registry).stats
    named = make_structure([WEATHER, CLOCK], "function", "get_weather", parallel=False)
    [choice] = await collect(generation, MODEL, named, max_tokens=80, temperature=0)
    assert choice["reason"] == "tool_calls" and choice["text"] == "" and len(choice["calls"]) == 1
    assert choice["calls"][0].name == "get_weather"
    # What the grammar dictates was evaluated in one step each, not sampled: the head up to the
    # arguments with the prompt, and what closes the call after them.
    # (The model's last token may write the first "}" of the close itself.)
    tokenize = registry.get(MODEL).engine._model.tokenize
    head, close = ('<tool_call>\n{"name": "get_weather", "arguments":', "\n</tool_call>")
    assert stats["jumped"] >= sum(len(tokenize(text.encode(), add_bos=False, special=True)) for text in (head, close))
    jsonschema.validate(json.loads(choice["calls"][0].arguments), WEATHER_SCHEMA)
    [choice] = await collect(generation, MODEL, make_structure([WEATHER, CLOCK], "required", parallel=False),
                             max_tokens=80, temperature=0.8, seed=3)
    assert choice["reason"] == "tool_calls" and len(choice["calls"]) == 1
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[choice["calls"][0].name]
    jsonschema.validate(json.loads(choice["calls"][0].arguments), tool.schema())


async def test_the_tools_offered_count_in_the_prompt(engine) -> None:
    _, generation = engine
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]
    plain, per_message, _ = await generation.count_tokens(MODEL, messages)
    offered, same, _ = await generation.count_tokens(MODEL, messages, make_structure([WEATHER, CLOCK]))
    assert same == per_message and offered > plain + 50
    assert (await generation.count_tokens(MODEL, messages, make_structure([WEATHER], "none")))[0] == plain


async def test_a_call_the_model_starts_jumps_over_what_the_grammar_dictates(engine) -> None:
    """tool_choice auto: once the answer ends with `<tool_call>` (however the model's tokens split it),
    the scheduler puts the call's head into the next step in one go; so it does for what follows the
    name and the arguments. The model writes only the name and the arguments."""
    import time

    from services.inference.engines.decoding import Decoding
    from services.inference.engines.sequence import Request, Sampling
    from services.inference.models.grammars import CallDictation

    registry, _ = engine
    model = registry.get(MODEL).engine
    batch = scheduler(registry)
    tokenize = lambda text: model._model.tokenize(text.encode(), add_bos=False, special=True)  # noqa: E731
    cases = (([WEATHER], ["Sure. <tool_call>", ' {"city": "Oslo", "unit": "c"}'],
              ['\n{"name": "get_weather", "arguments":', '}\n</tool_call>']),
             ([WEATHER, CLOCK], ["<tool_call>", 'get_time"', ' {"tz": "UTC"}'],
              ['\n{"name": "', ', "arguments":', '}\n</tool_call>']))
    for tools, written, expected in cases:
        grammar = grammar_for(make_structure(tools, "auto"))
        request = Request(MODEL, tokenize("Hi"), Sampling(temperature=0, grammar=grammar), started=time.monotonic(),
                          deadline=None, budget=64, detokenize=model._detokenize, is_end=model._is_end)
        made = batch.sampling.samplers(request, 0)
        d = Decoding(request, 0, batch._sequences[0], made, dictation=CallDictation(grammar))
        dictated = []
        try:
            for piece in written:
                # As if sampled: the grammar takes each token (it would mask the others), then the
                # scheduler reads it.
                for token in batch.sampling.dictated(made, piece) or pytest.fail(f"the grammar refused {piece!r}"):
                    batch._accept(d, token, 0)
                    if d.forced:
                        dictated.append("".join(model._detokenize(t).decode() for t in d.forced))
                        d.todo, d.forced = [], []
            assert dictated == expected
            assert not batch.sampling.dictated(made, "x")  # the call is complete: the grammar takes no more text
        finally:
            made.free(batch._l)
