"""The one check every chat format's parser must pass: the same raw output fed whole, a character at
a time and at random split points gives the same content, reasoning and calls; a call's streamed
pieces add up to its final arguments. Families' tests call `check` with llama.cpp's
tests/test-chat.cpp cases (and their own) as vectors."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from services.core.structured import Tool, make_structure
from services.inference.chat_formats import ChatFormat, Parsed
from services.inference.chat_formats.base import OutputParser

TOOLS = ("special_function", "python", "get_weather", "get_time", "todo_list", "edit", "magic", "calendar_create_event",
         "html", "complex_function")


@dataclass
class Result:
    content: str
    reasoning: str
    calls: list[tuple[str, Any]]  # (name, arguments as parsed JSON, or the raw text when not JSON)
    ids: list[str]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def feed(parser: OutputParser, pieces: Iterable[str], truncated: bool = False) -> Result:
    out = Parsed()
    for piece in pieces:
        out += parser.feed(piece)
    out += parser.finish(truncated)
    for index, call in enumerate(out.calls):
        streamed = [d for d in out.deltas if d.index == index]
        if streamed:  # a call streamed in pieces is exactly those pieces
            assert streamed[0].id == call.id and streamed[0].name == call.name, (streamed[0], call)
            assert "".join(d.arguments for d in streamed) == call.arguments, (streamed, call)
    return Result(out.content, out.reasoning, [(c.name, _arguments(c.arguments)) for c in out.calls],
                  [c.id for c in out.calls])


def splits(raw: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(raw):
        n = rng.randint(1, 6)
        pieces.append(raw[i:i + n])
        i += n
    return pieces


def parse(fmt: ChatFormat, raw: str, tools: Iterable[str] = TOOLS, thinking_open: bool = False,
          truncated: bool = False, pieces: list[str] | None = None) -> Result:
    structure = make_structure([Tool(name) for name in tools]) if tools else make_structure([])
    return feed(fmt.parser(structure, thinking_open), pieces if pieces is not None else [raw], truncated)


def check(fmt: ChatFormat, raw: str, *, content: str = "", reasoning: str = "",
          calls: Iterable[tuple[str, Any]] = (), tools: Iterable[str] = TOOLS, thinking_open: bool = False,
          truncated: bool = False, ids: list[str] | None = None) -> None:
    """`raw` parses to exactly this, whole and in pieces. Arguments compare as JSON values."""
    tools = tuple(tools)
    expected = (content, reasoning, [(name, _arguments(a) if isinstance(a, str) else a) for name, a in calls])
    ways = [[raw], list(raw)] + [splits(raw, seed) for seed in range(8)]
    for pieces in ways:
        got = parse(fmt, raw, tools, thinking_open, truncated, pieces)
        assert (got.content, got.reasoning, got.calls) == expected, f"split into {pieces!r}"
        if ids is not None:
            assert got.ids == ids
