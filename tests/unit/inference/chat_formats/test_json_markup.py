"""The parsers built on chat_formats/markup.py, on random mixes of their markup: whole or in pieces,
the same answer (the harness also checks that streamed pieces add up to each call), and an answer
without calls is the text as written."""

from __future__ import annotations

import random

from services.inference.chat_formats.firefunction import FireFunctionFormat
from services.inference.chat_formats.functionary import FunctionaryV31Format, FunctionaryV32Format
from services.inference.chat_formats.llama3 import Llama3Format
from services.inference.chat_formats.mistral import MistralFormat
from tests.unit.inference.chat_formats.harness import parse, splits

PIECES = ('{"name": "special_function", "arguments": {"arg1": 1}}', '{"name": "get_time", "parameters": {}}',
          "<tool_call>", "</tool_call>", " functools[", "]", ",", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]123456789",
          "special_function", "<function=special_function>", "</function>", "<|python_tag|>", ">>>", "all\n", "\n",
          " ", "Hello", '{"arg1": 1}', "{", "}", '"', ";", "[THINK]", "[/THINK]", 'python.call(code="x")', '{"na',
          '[{"name": "special_function", "arguments": {}, "id": "abcdefghi"}]')
FORMATS = (Llama3Format(""), FireFunctionFormat(""), FunctionaryV31Format(""), FunctionaryV32Format(""),
           MistralFormat("[THINK]"))


def answers(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8))) for _ in range(n)]


def test_any_split_gives_the_same_answer() -> None:
    for i, raw in enumerate(answers(150, seed=1)):
        for fmt in FORMATS:
            for truncated in (False, True):
                whole = parse(fmt, raw, truncated=truncated)
                for pieces in (list(raw), splits(raw, i)):
                    split = parse(fmt, raw, truncated=truncated, pieces=pieces)
                    assert (split.content, split.reasoning, split.calls) == (whole.content, whole.reasoning,
                                                                               whole.calls), (fmt.name, raw, pieces)


def test_an_answer_without_calls_is_the_text_as_written() -> None:
    for raw in answers(300, seed=2):
        for fmt in (Llama3Format(""), FireFunctionFormat(""), FunctionaryV31Format(""), MistralFormat("")):
            answer = parse(fmt, raw)
            assert answer.calls or answer.content == raw, (fmt.name, raw)
