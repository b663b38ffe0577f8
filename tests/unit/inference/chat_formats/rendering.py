"""A chat rendered with a real template the way every engine renders it
(services.inference.models.chat_template, which applies the format's `template_messages`): what the
model would read."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from services.core.structured import Tool, ToolCall, make_structure
from services.inference.chat_formats import ChatFormat
from services.inference.models.chat_template import ChatTemplate
from services.inference.models.grammars import template_input

CALL = ToolCall("call_0123456789abcdefghijklmn", "special_function", '{"arg1": 1}')


def render(fmt: ChatFormat, messages: Sequence[dict[str, Any]], tools: Iterable[str] = ("special_function",)) -> str:
    chat, offered = template_input(messages, make_structure([Tool(name) for name in tools]), native=True)
    template = ChatTemplate(fmt.template, bos_token="<s>", eos_token="</s>")
    assert type(template.format) is type(fmt)
    return template.render(chat, tools=offered)


def call_and_result(*calls: ToolCall) -> list[dict[str, Any]]:
    """A user's question, the model's calls and their results."""
    calls = calls or (CALL,)
    return [{"role": "user", "content": "Call it"}, {"role": "assistant", "content": "", "tool_calls": list(calls)}] + [
        {"role": "tool", "content": f"result {i}", "tool_call_id": call.id} for i, call in enumerate(calls)]
