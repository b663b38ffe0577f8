"""A chat rendered with a real template the way the llama.cpp engine renders it (llama-cpp-python's
Jinja2ChatFormatter), after the format's `template_messages`: what the model would read."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from services.core.structured import Tool, ToolCall, make_structure
from services.inference.chat_formats import ChatFormat
from services.inference.structured import template_input

CALL = ToolCall("call_0123456789abcdefghijklmn", "special_function", '{"arg1": 1}')


def render(fmt: ChatFormat, messages: Sequence[dict[str, Any]], tools: Iterable[str] = ("special_function",)) -> str:
    formatter = pytest.importorskip("llama_cpp.llama_chat_format").Jinja2ChatFormatter
    chat, offered = template_input(messages, make_structure([Tool(name) for name in tools]), native=True)
    render = formatter(template=fmt.template, eos_token="</s>", bos_token="<s>")
    return render(messages=fmt.template_messages(chat), tools=offered).prompt


def call_and_result(*calls: ToolCall) -> list[dict[str, Any]]:
    """A user's question, the model's calls and their results."""
    calls = calls or (CALL,)
    return [{"role": "user", "content": "Call it"}, {"role": "assistant", "content": "", "tool_calls": list(calls)}] + [
        {"role": "tool", "content": f"result {i}", "tool_call_id": call.id} for i, call in enumerate(calls)]
