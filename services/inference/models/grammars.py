"""Structured output and tool calls inside inference: the grammar that enforces them, the prompt
that tells the model about its tools, and the parser that turns what it writes into tool calls.

The grammar writes calls in one format, whatever the model: `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>` (Hermes/Qwen style), which every family's parser reads besides its own syntax
(services.inference.chat_formats). A chat template that renders tools itself gets them natively; for
any other template the tools are described in the system message (GENERIC_TOOLS_PROMPT) and past
calls and results are written into the messages in the Hermes format.

Grammars are GBNF, from llama.cpp's JSON-schema converter (llama_cpp.llama_grammar, taught integer
bounds here), and enforced
by the engine's sampler:
- response_format json_object / json_schema: the whole answer is JSON of the schema;
- tool_choice required: the whole answer is one or more calls (one when parallel_tool_calls is
  false), each call's arguments following its tool's parameters; a named function: one call of it;
- tool_choice auto: free text, and a lazy grammar that takes over from the moment the model writes
  `<tool_call>` until the call is complete; with a response_format as well, the answer is either
  JSON of the format or calls.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.core.errors import InvalidArgument
from services.core.structured import BOUNDS, Structure, Tool, ToolCall, canonical_json

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# JSON strings may not hold raw control characters: the converter's `char` allows them.
JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'

GENERIC_TOOLS_PROMPT = """You can call these tools (JSON Schema of each function's arguments):
<tools>
{tools}
</tools>
To call a tool, write a JSON object with the tool's name and arguments inside tags:
<tool_call>
{{"name": "<tool name>", "arguments": {{<arguments>}}}}
</tool_call>"""


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar (root rule `root`). With triggers it is lazy: free text until the model writes
    one of the trigger words, then the grammar, starting at the trigger word."""

    gbnf: str
    triggers: tuple[str, ...] = ()
    # Calls: what follows `<tool_call>` in every one, as the grammar dictates it (call_head; "": the
    # grammar writes no calls), and whether the answer is calls from its first character.
    call_head: str = ""
    starts_with_call: bool = False


# --- JSON Schema -> grammar -----------------------------------------------------------------------
@functools.lru_cache(maxsize=128)
def grammar_for(structure: Structure) -> Grammar | None:
    """The grammar that enforces the structure, or None for free text. Cached: an agent sends the
    same tools every turn, and converting them runs on the event loop (~1 ms for ten tools)."""
    if structure.plain:
        return None
    converter = _converter()
    rules = []
    try:
        answer = None
        if structure.format != "text":
            schema = json.loads(structure.schema) if structure.format == "json_schema" else {"type": "object"}
            answer = converter.visit(converter.resolve_refs(schema, "response-format"), "answer")
        calls = None
        if structure.calls_tools:
            tools = [t for t in structure.tools if structure.tool_choice != "function" or t.name == structure.function]
            options = []
            for tool in tools:
                options.append({"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.schema()},
                                "required": ["name", "arguments"]})
            call = converter.visit(converter.resolve_refs({"anyOf": options}, "tools"), "call")
            rules.append(f'tool-call ::= "{json.dumps(OPEN)[1:-1]}\\n" {call} "\\n{json.dumps(CLOSE)[1:-1]}"')
            # A named function is one call, as vLLM and llama-server make it: clients that name one
            # (instructor, structured output through tools) expect exactly one, and small models
            # otherwise repeat it until max_tokens.
            several = structure.parallel and structure.tool_choice != "function"
            rules.append("tool-calls ::= tool-call ( [ \\n]? tool-call )*" if several else "tool-calls ::= tool-call")
            calls = "tool-calls"
    except (ValueError, KeyError, AssertionError, TypeError, RecursionError) as exc:
        raise InvalidArgument(f"the JSON Schema could not be turned into a grammar: {exc}") from None
    lines = [JSON_CHAR if line.startswith("char ::=") else line for line in converter.format_grammar().splitlines()]
    forced = structure.tool_choice in ("required", "function")
    head = ""
    if calls and (forced or answer is None):
        root, triggers = calls, (() if forced else (OPEN,))
        head = call_head(tools)
    elif calls:
        root, triggers = f"{answer} | {calls}", ()
    else:
        root, triggers = answer, ()
    return Grammar("\n".join([f"root ::= {root}", *rules, *lines]), triggers, head, bool(head) and forced)


def after_reasoning(grammar: Grammar, end: str) -> Grammar:
    """The grammar for a prompt that opened the model's reasoning block: free text (the reasoning)
    until the model writes the block's end marker, then the grammar's answer (a lazy grammar that
    starts at the marker). A grammar that is lazy already waits for its own trigger words."""
    if grammar.triggers:
        return grammar
    first, _, rest = grammar.gbnf.partition("\n")
    assert first.startswith("root ::= ")
    root = f'root ::= "{json.dumps(end)[1:-1]}" [ \\t\\n]* ( {first[len("root ::= "):]} )'
    return Grammar(f"{root}\n{rest}", (end,), grammar.call_head, False)


def call_head(tools: Sequence[Tool]) -> str:
    """What every call starts with after `<tool_call>`, as the grammar writes it: up to the name's
    opening quote, or with one tool to call, up to where its arguments begin."""
    if len(tools) == 1:
        return f'\n{{"name": {json.dumps(tools[0].name)}{AFTER_NAME}'
    return '\n{"name": "'


AFTER_NAME = ', "arguments":'  # the model writes " {" as one token
AFTER_ARGUMENTS = "}\n" + CLOSE


class CallDictation:
    """Where a call's text is dictated by its grammar rather than chosen by the model: its head after
    `<tool_call>` (call_head), what follows the name (`, "arguments":`) and what follows the
    arguments (`}` and `</tool_call>`). The engine feeds it the text of every token written; where
    that text reaches dictated text, feed returns the rest of it (the token may have written its
    first characters), which the engine evaluates in one step instead of sampling token by token. If
    the grammar does not take it, refused() stops the dictation for the rest of the answer."""

    def __init__(self, grammar: Grammar) -> None:
        self._head = grammar.call_head
        self._state = "out"  # out of a call | name (in it) | arguments (in them) | lost
        self._tail = ""  # out of a call: the last characters, to see `<tool_call>` however it is split
        self._escaped = self._in_string = False
        self._depth = 0

    def start(self) -> str:
        """A forced call's `<tool_call>` and head, dictated from the answer's first character."""
        self._enter(self._head)
        return OPEN + self._head

    def refused(self) -> None:
        self._state = "lost"

    def feed(self, text: str) -> str:
        i = 0
        while i < len(text):
            dictated = self._step(text[i])
            i += 1
            if dictated is None:
                continue
            written = text[i:]
            self._enter(dictated)
            if dictated.startswith(written):
                return dictated[len(written):]
            if not written.startswith(dictated):
                self._state = "lost"
                return ""
            i += len(dictated)  # the token wrote all of it and more: read on from there
        return ""

    def _enter(self, dictated: str) -> None:
        """The state once `dictated` is written."""
        if dictated.endswith(AFTER_NAME):
            self._state, self._depth, self._in_string, self._escaped = "arguments", 0, False, False
        elif dictated.endswith(CLOSE):
            self._state, self._tail = "out", ""
        else:  # a head that stops at the name's opening quote
            self._state, self._escaped = "name", False

    def _step(self, c: str) -> str | None:
        """Reads one character; returns the text dictated from there, if any."""
        if self._state == "out":
            self._tail = (self._tail + c)[-len(OPEN):]
            return self._head if self._tail == OPEN else None
        if self._state == "lost" or self._escaped:
            self._escaped = False
            return None
        if c == "\\":
            self._escaped = self._state == "name" or self._in_string
        elif self._state == "name":
            return AFTER_NAME if c == '"' else None
        elif c == '"':
            self._in_string = not self._in_string
        elif not self._in_string and c in "{[":
            self._depth += 1
        elif not self._in_string and c in "}]":
            self._depth -= 1
            return AFTER_ARGUMENTS if self._depth == 0 else None
        return None


def _converter() -> Any:
    """llama.cpp's JSON-schema converter, taught bounds on integers and numbers (it ignores them)."""
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class Converter(SchemaConverter):  # type: ignore[misc]
        def visit(self, schema: Any, name: str) -> str:
            kind = schema.get("type") if isinstance(schema, dict) else None
            if kind in ("integer", "number") and any(b in schema for b in BOUNDS):
                rule = int_range(*integer_bounds(schema)) if kind == "integer" else number_range(schema)
                rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
                return self._add_rule(rule_name, f"( {rule[0]} ) space")
            return super().visit(schema, name)

    return Converter(prop_order={"name": 0, "arguments": 1}, allow_fetch=False, dotall=False, raw_pattern=False)


def integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """Inclusive bounds from minimum / maximum / exclusiveMinimum / exclusiveMaximum."""
    lows = [int(schema["minimum"])] if "minimum" in schema else []
    lows += [int(schema["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in schema else []
    highs = [int(schema["maximum"])] if "maximum" in schema else []
    highs += [int(schema["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in schema else []
    low, high = max(lows, default=None), min(highs, default=None)
    if low is not None and high is not None and low > high:
        raise InvalidArgument(f"no integer lies between the bounds of {canonical_json(schema)}")
    return low, high


def int_range(low: int | None, high: int | None) -> tuple[str, str]:
    """A GBNF expression, and the same as a Python regex (for tests), matching exactly the JSON
    integers from low to high (either may be open)."""
    gbnf: list[str] = []
    regex: list[str] = []

    def add(pair: tuple[str, str]) -> None:
        gbnf.append(pair[0])
        regex.append(pair[1])

    if low is None or low < 0:  # negative numbers: "-" and the magnitudes
        top = None if low is None else -low
        bottom = 1 if high is None or high >= 0 else -high
        g, r = _naturals(bottom, top)
        add((f'"-" ( {g} )', f"-(?:{r})"))
    if high is None or high >= 0:
        add(_naturals(max(low or 0, 0), high))
    return " | ".join(gbnf), "|".join(f"(?:{r})" for r in regex)


ANY_FRACTION = ('( "." [0-9]+ )?', r"(?:\.[0-9]+)?")
ZERO_FRACTION = ('( "." "0"+ )?', r"(?:\.0+)?")
SOME_FRACTION = ('"." [0-9]* [1-9] [0-9]*', r"\.[0-9]*[1-9][0-9]*")


def number_range(schema: dict[str, Any]) -> tuple[str, str]:
    """A GBNF expression and the same Python regex for JSON numbers (no exponent) within whole-number
    bounds: `minimum`, `maximum` and their exclusive forms."""
    low = (int(schema["minimum"]), False) if "minimum" in schema else None
    if "exclusiveMinimum" in schema and (low is None or schema["exclusiveMinimum"] >= low[0]):
        low = (int(schema["exclusiveMinimum"]), True)
    high = (int(schema["maximum"]), False) if "maximum" in schema else None
    if "exclusiveMaximum" in schema and (high is None or schema["exclusiveMaximum"] <= high[0]):
        high = (int(schema["exclusiveMaximum"]), True)
    parts: list[tuple[str, str]] = []
    # v >= 0: its magnitude between max(low, 0) and high.
    if high is None or high[0] > 0 or (high[0] == 0 and not high[1]):
        bottom = (0, False) if low is None or low[0] < 0 else low
        parts += _magnitudes(bottom, high, "")
    # v < 0: "-" and a magnitude above 0 (or -high) up to -low.
    if low is None or low[0] < 0:
        bottom = (0, True) if high is None or high[0] >= 0 else (-high[0], high[1])
        parts += _magnitudes(bottom, None if low is None else (-low[0], low[1]), "-")
    if not parts:
        raise InvalidArgument(f"no number lies between the bounds of {canonical_json(schema)}")
    return " | ".join(f"( {g} )" for g, _ in parts), "|".join(f"(?:{r})" for _, r in parts)


def _magnitudes(low: tuple[int, bool], high: tuple[int, bool] | None, sign: str) -> list[tuple[str, str]]:
    """Decimals m (integer part I, fraction F) with low <= m <= high, each end (value, exclusive):
    I strictly between the ends with any F, I at an exclusive low end with F above zero, I at an
    inclusive high end with F zero."""
    first = low[0] + 1 if low[1] else low[0]
    last = None if high is None else high[0] - 1
    spans = []
    if last is None or first <= last:
        spans.append((first, last, ANY_FRACTION))
    if low[1] and (high is None or low[0] < high[0]):
        spans.append((low[0], low[0], SOME_FRACTION))
    if high is not None and not high[1] and (high[0] > low[0] or (high[0] == low[0] and not low[1])):
        spans.append((high[0], high[0], ZERO_FRACTION))
    lead = ('"-" ', "-") if sign else ("", "")
    out = []
    for start, end, fraction in spans:
        g, r = _naturals(start, end)
        out.append((f"{lead[0]}( {g} ) {fraction[0]}", f"{lead[1]}(?:{r}){fraction[1]}"))
    return out


def _naturals(low: int, high: int | None) -> tuple[str, str]:
    """0 <= low <= n <= high (high None: unbounded), without leading zeros."""
    parts: list[tuple[str, str]] = []
    width = len(str(low))
    last = len(str(high)) if high is not None else width
    for digits in range(width, last + 1):
        start = low if digits == width else 10 ** (digits - 1)
        end = high if high is not None and digits == last else 10 ** digits - 1
        parts.append(_same_width(str(start), str(end)))
    if high is None:  # every longer number
        parts.append((f"[1-9] [0-9]{{{width},}}", f"[1-9][0-9]{{{width},}}"))
    return " | ".join(f"( {g} )" for g, _ in parts), "|".join(f"(?:{r})" for _, r in parts)


def _same_width(lo: str, hi: str) -> tuple[str, str]:
    """The decimal strings from lo to hi, both of the same width."""
    if lo == hi:
        return f'"{lo}"', lo
    if lo[0] == hi[0]:
        g, r = _same_width(lo[1:], hi[1:])
        return f'"{lo[0]}" ( {g} )', f"{lo[0]}(?:{r})"
    rest = len(lo) - 1
    any_rest = (" [0-9]" * rest, "[0-9]" * rest)
    if lo[1:] == "0" * rest and hi[1:] == "9" * rest:  # whole blocks: one class for the first digit
        return f"[{lo[0]}-{hi[0]}]{any_rest[0]}", f"[{lo[0]}-{hi[0]}]{any_rest[1]}"
    parts = []
    g, r = _same_width(lo[1:], "9" * rest) if rest else ("", "")
    parts.append((f'"{lo[0]}" ( {g} )' if rest else f'"{lo[0]}"', f"{lo[0]}(?:{r})" if rest else lo[0]))
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append((f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}]{any_rest[0]}", f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}]{any_rest[1]}"))
    g, r = _same_width("0" * rest, hi[1:]) if rest else ("", "")
    parts.append((f'"{hi[0]}" ( {g} )' if rest else f'"{hi[0]}"', f"{hi[0]}(?:{r})" if rest else hi[0]))
    return " | ".join(f"( {g} )" for g, _ in parts), "|".join(f"(?:{r})" for _, r in parts)


# --- the prompt ----------------------------------------------------------------------------------
def tools_json(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """The tools in OpenAI's shape, as templates expect them."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.schema()}}
            for t in tools]


def call_json(call: ToolCall) -> dict[str, Any]:
    return {"name": call.name, "arguments": json.loads(call.arguments or "{}")}


def template_input(messages: Sequence[dict[str, Any]], structure: Structure,
                   native: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the tools to hand to the chat template."""
    offered = list(structure.tools) if structure.calls_tools else []
    if native:
        out = []
        for m in messages:
            message = {"role": m["role"], "content": m.get("content") or ""}
            if m.get("tool_calls"):
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": call_json(c)}
                                         for c in m["tool_calls"]]
            if m.get("tool_call_id"):
                message["tool_call_id"] = m["tool_call_id"]
            out.append(message)
        return out, (tools_json(offered) or None)
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            written = "\n".join(f"{OPEN}\n{json.dumps(call_json(c), ensure_ascii=False)}\n{CLOSE}" for c in m["tool_calls"])
            content = f"{content}\n{written}" if content else written
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": content})
    if offered:
        prompt = GENERIC_TOOLS_PROMPT.format(tools="\n".join(canonical_json(t) for t in tools_json(offered)))
        if structure.tool_choice == "function":
            prompt += f"\nCall the tool {structure.function} now."
        elif structure.tool_choice == "required":
            prompt += "\nCall one of the tools now."
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


# --- what the model writes -> text and calls ------------------------------------------------------
@dataclass(frozen=True)
class CallDelta:
    """A piece of a call while it is written: the first carries its id and name, the next ones the
    following characters of its arguments (which add up to the finished call's `arguments`)."""

    index: int  # the call's place among the choice's calls
    id: str = ""
    name: str = ""
    arguments: str = ""
