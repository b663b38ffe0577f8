"""OpenAI's chat and text completions as a remote engine (engines.remote) speaks them to its
upstream: the request body, and the streamed answer's text, reasoning and tool calls."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.core.structured import PLAIN, Structure, ToolCall
from services.inference.engines.sequence import Sampling
from services.inference.models.grammars import CallDelta, tools_json

FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls",
          "content_filter": "stop", "eos": "stop"}


@dataclass
class Chat:
    """What a remote engine sends instead of tokens: the (fitted) chat or raw prompt, its structure,
    and the key that keeps a conversation on one upstream."""

    messages: Sequence[dict[str, Any]]
    prompt: str = ""
    structure: Structure = PLAIN


def request_body(remote_model: str, chat: Chat, sampling: Sampling) -> dict[str, Any]:
    """The body of `POST /chat/completions` (`/completions` for a raw prompt) for the upstream's model."""
    s = sampling
    body: dict[str, Any] = {
        "model": remote_model, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
    }
    if chat.messages:
        body["messages"] = [message_json(m) for m in chat.messages]
    else:
        body["prompt"] = chat.prompt  # the legacy completions API: no chat template
    # Beyond OpenAI's parameters only what departs from the neutral value: vLLM and llama-server
    # both accept top_k, min_p and repetition_penalty; others ignore or refuse what they lack.
    for name, value, neutral in (("top_k", s.top_k, 0), ("min_p", s.min_p, 0.0),
                                 ("repetition_penalty", s.repetition_penalty, 1.0),
                                 ("presence_penalty", s.presence_penalty, 0.0),
                                 ("frequency_penalty", s.frequency_penalty, 0.0)):
        if value != neutral:
            body[name] = value
    if s.repetition_penalty != 1.0:
        body["repeat_penalty"] = s.repetition_penalty  # llama-server's name
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if s.logit_bias:
        body["logit_bias"] = {str(t): b for t, b in s.logit_bias}
    st = chat.structure
    if st.calls_tools:
        body["tools"] = tools_json(st.tools)
        body["tool_choice"] = ({"type": "function", "function": {"name": st.function}}
                               if st.tool_choice == "function" else st.tool_choice)
        body["parallel_tool_calls"] = st.parallel
    if st.format == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif st.format == "json_schema":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "response", "schema": json.loads(st.schema)}}
    # The template options, as vLLM and llama-server take them (others ignore what they lack).
    if st.template.kwargs:
        body["chat_template_kwargs"] = json.loads(st.template.kwargs)
    if st.template.reasoning_effort:
        body["reasoning_effort"] = st.template.reasoning_effort
    return body


def message_json(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m["tool_calls"]]
        if not out["content"]:
            out["content"] = None
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    return out


class StreamedCalls:
    """The upstream's tool calls as they stream (OpenAI's `delta.tool_calls`: the first piece of a call
    carries its index, id and name, the next ones pieces of its arguments), passed on as CallDelta
    pieces numbered in order of appearance, and the finished calls with the same ids (so that they
    are not sent twice)."""

    def __init__(self) -> None:
        self._calls: dict[int, list[str]] = {}  # upstream index -> [id, name, arguments]
        self._order: dict[int, int] = {}  # upstream index -> the call's place here

    def feed(self, call: dict[str, Any]) -> CallDelta | None:
        index = int(call.get("index", 0))
        function = call.get("function") or {}
        name, arguments = function.get("name") or "", function.get("arguments") or ""
        slot = self._calls.get(index)
        if slot is None:
            # A call's first piece; an upstream that sends no id gets one here.
            slot = self._calls[index] = [call.get("id") or ToolCall.new_id(), name, arguments]
            self._order[index] = len(self._order)
            return CallDelta(self._order[index], slot[0], name, arguments)
        slot[1] += name  # (a name sent in pieces: the finished call has all of it)
        slot[2] += arguments
        return CallDelta(self._order[index], arguments=arguments) if arguments else None

    def finished(self) -> list[ToolCall]:
        return [ToolCall(c[0], c[1], c[2] or "{}") for _, c in sorted(self._calls.items())]


def answer_piece(choice: dict[str, Any], calls: StreamedCalls) -> tuple[str, str, list[CallDelta]]:
    """One streamed choice's new text, reasoning and pieces of tool calls."""
    delta = choice.get("delta") or {}
    piece = delta.get("content") or choice.get("text") or ""  # chat, or legacy completions
    # llama-server, vLLM and DeepSeek name it reasoning_content; vLLM's newer, OpenRouter and Ollama's
    # OpenAI API `reasoning`.
    thought = delta.get("reasoning_content") or delta.get("reasoning") or ""
    if not isinstance(thought, str):
        thought = ""
    return piece, thought, [d for call in delta.get("tool_calls") or () if (d := calls.feed(call)) is not None]


def has_usage(given: dict[str, Any] | None) -> bool:
    return bool(given) and given.get("completion_tokens") is not None  # type: ignore[union-attr]
