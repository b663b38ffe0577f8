"""OpenAI's Responses API as the `openai` SDK reads it: the Response object, its output items, and the
stream of semantic events (EventWriter). The request side is services.wire.openai_responses."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from parley.inference.v1 import inference_pb2 as pb

from services.core.errors import InvalidArgument
from services.core.structured import Answer, ToolCall

SSE = "text/event-stream"
JSON = "application/json"


def call_item_id(call_id: str) -> str:
    return "fc_" + (call_id[5:] if call_id.startswith("call_") else call_id)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def usage_json(usage: pb.Usage | None) -> dict[str, Any]:
    usage = usage or pb.Usage()
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def message_item(item_id: str, text: str, status: str, role: str = "assistant") -> dict[str, Any]:
    part = ({"type": "output_text", "text": text, "annotations": [], "logprobs": []} if role == "assistant"
            else {"type": "input_text", "text": text})
    return {"id": item_id, "type": "message", "role": role, "status": status, "content": [part]}


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": status}


def call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"id": call_item_id(call.id), "type": "function_call", "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


def output_items(message_id: str, text: str, calls: Sequence[ToolCall], status: str,
                 reasoning: str = "") -> list[dict[str, Any]]:
    """An answer's output: its reasoning (if any), its text as a message (also an empty one, when it
    made no calls), then one function_call item per call."""
    items = [reasoning_item(f"rs_{message_id}", reasoning, status)] if reasoning else []
    items += [message_item(f"msg_{message_id}", text, status)] if text or not calls else []
    return items + [call_item(c) for c in calls]


STATUS_OF_FINISH = {pb.FINISH_REASON_STOP: "completed", pb.FINISH_REASON_TOOL_CALLS: "completed",
                    pb.FINISH_REASON_LENGTH: "incomplete", pb.FINISH_REASON_CANCELLED: "incomplete"}


def response_json(response_id: str, *, created_at: float, model: str, status: str, echo: dict[str, Any],
                  output: list[dict[str, Any]], usage: pb.Usage | None = None, error: dict[str, Any] | None = None,
                  incomplete_reason: str | None = None) -> dict[str, Any]:
    """OpenAI's Response object."""
    done = status in ("completed", "incomplete", "failed")
    return {
        "id": response_id, "object": "response", "created_at": int(created_at), "status": status,
        "background": False, "error": error,
        "incomplete_details": {"reason": incomplete_reason} if status == "incomplete" and incomplete_reason else None,
        "instructions": echo.get("instructions"), "max_output_tokens": echo.get("max_output_tokens"),
        "model": model, "output": output, "parallel_tool_calls": echo.get("parallel_tool_calls", True),
        "previous_response_id": echo.get("previous_response_id"),
        "reasoning": echo.get("reasoning", {"effort": None, "summary": None}),
        "store": echo.get("store", True), "temperature": echo.get("temperature"),
        "text": echo.get("text", {"format": {"type": "text"}}), "tool_choice": echo.get("tool_choice", "auto"),
        "tools": echo.get("tools", []), "top_p": echo.get("top_p"), "truncation": "auto",
        "usage": usage_json(usage) if done and usage is not None else None, "user": echo.get("user"),
        "metadata": echo.get("metadata", {}),
    }


def incomplete_reason(finish: int) -> str | None:
    return "max_output_tokens" if finish == pb.FINISH_REASON_LENGTH else None


def server_error(message: str, code: str = "server_error") -> dict[str, Any]:
    return {"code": code, "message": message}


class EventWriter:
    """One response's stream of semantic events, as OpenAI sends them: response.created and
    .in_progress; per output item .output_item.added, its content (.content_part.added,
    .output_text.delta… or .reasoning_text.delta…, .output_text.done or .reasoning_text.done,
    .content_part.done — or .function_call_arguments.delta and .done), .output_item.done; then
    .completed, .incomplete or .failed. The reasoning item comes first and closes when the text or a
    call begins. Every event carries its sequence_number. Also accumulates the final Response object
    (the non-streamed answer)."""

    def __init__(self, response_id: str, message_id: str, model: str, echo: dict[str, Any]) -> None:
        self.response_id = response_id
        self.message_id = message_id
        self.model = model
        self.echo = echo
        self.created_at = time.time()
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.said = Answer()  # the message's text and the reasoning item's, as they stream
        self._message_open = False
        self._reasoning_at: int | None = None  # the open reasoning item's output index
        self.final: dict[str, Any] | None = None  # the Response once finished or failed

    def _event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode()

    def response(self, status: str, **extra: Any) -> dict[str, Any]:
        return response_json(self.response_id, created_at=self.created_at, model=self.model, status=status,
                             echo=self.echo, output=self.output, **extra)

    def start(self) -> list[bytes]:
        return [self._event("response.created", response=self.response("in_progress")),
                self._event("response.in_progress", response=self.response("in_progress"))]

    def _open_message(self) -> list[bytes]:
        self._message_open = True
        item = message_item(f"msg_{self.message_id}", "", "in_progress")
        item["content"] = []
        self.output.append(item)
        index = len(self.output) - 1
        return [self._event("response.output_item.added", output_index=index, item=item),
                self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def _close_message(self, status: str) -> list[bytes]:
        self._message_open = False
        index = next(i for i, item in enumerate(self.output) if item["type"] == "message")
        text = self.said.text
        item = message_item(f"msg_{self.message_id}", text, status)
        self.output[index] = item
        part = item["content"][0]
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _open_reasoning(self) -> list[bytes]:
        item = reasoning_item(f"rs_{self.message_id}", "", "in_progress")
        item["content"] = []
        self.output.append(item)
        self._reasoning_at = index = len(self.output) - 1
        return [self._event("response.output_item.added", output_index=index, item=item),
                self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                            part={"type": "reasoning_text", "text": ""})]

    def _close_reasoning(self, status: str) -> list[bytes]:
        if self._reasoning_at is None:
            return []
        index, self._reasoning_at = self._reasoning_at, None
        text = self.said.reasoning
        item = reasoning_item(self.output[index]["id"], text, status)
        self.output[index] = item
        return [self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=item["content"][0]),
                self._event("response.output_item.done", output_index=index, item=item)]

    def delta(self, text: str, calls: Sequence[ToolCall], reasoning: str = "") -> list[bytes]:
        events: list[bytes] = []
        if reasoning and (self._reasoning_at is not None or not self.output):
            # Reasoning opens an answer (chat formats split it off the front); any after the text or
            # a call began is the stored message's, not a second item of this stream.
            if self._reasoning_at is None:
                events += self._open_reasoning()
            at = self._reasoning_at
            assert at is not None
            self.said.add("", reasoning)
            events.append(self._event("response.reasoning_text.delta", item_id=self.output[at]["id"], output_index=at,
                                      content_index=0, delta=reasoning))
        if text or calls:
            events += self._close_reasoning("completed")
        if text:
            if not self._message_open and not any(i["type"] == "message" for i in self.output):
                events += self._open_message()
            if self._message_open:
                self.said.add(text)
                index = len(self.output) - 1
                events.append(self._event("response.output_text.delta", item_id=f"msg_{self.message_id}",
                                          output_index=index, content_index=0, delta=text, logprobs=[]))
        for call in calls:
            if self._message_open:
                events += self._close_message("completed")
            item = call_item(call, "in_progress")
            item["arguments"] = ""
            self.output.append(item)
            index = len(self.output) - 1
            done = call_item(call)
            events += [self._event("response.output_item.added", output_index=index, item=item),
                       self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                   delta=call.arguments),
                       self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   name=call.name, arguments=call.arguments)]
            self.output[index] = done
            events.append(self._event("response.output_item.done", output_index=index, item=done))
        return events

    def finish(self, finish_reason: int, usage: pb.Usage) -> list[bytes]:
        status = STATUS_OF_FINISH.get(finish_reason, "completed")
        events = self._close_reasoning(status)
        if not any(i["type"] != "reasoning" for i in self.output):
            events += self._open_message()  # an answer with neither text nor calls is still an (empty) message
        if self._message_open:
            events += self._close_message(status)
        self.final = self.response(status, usage=usage, incomplete_reason=incomplete_reason(finish_reason))
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return events + [self._event(kind, response=self.final)]

    def fail(self, message: str) -> list[bytes]:
        events = self._close_reasoning("incomplete")
        if self._message_open:
            events += self._close_message("incomplete")
        self.final = self.response("failed", error=server_error(message))
        return events + [self._event("response.failed", response=self.final)]


def item_list_json(items: list[dict[str, Any]], limit: int, order: str, after: str) -> dict[str, Any]:
    """OpenAI's list of input items: `order` asc or desc, from the item after `after`."""
    if limit == 0:
        limit = 20
    if not 1 <= limit <= 100:
        raise InvalidArgument("limit must be between 1 and 100")
    if order not in ("", "asc", "desc"):
        raise InvalidArgument('order must be "asc" or "desc"')
    ordered = items if order == "asc" else list(reversed(items))
    if after:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise InvalidArgument(f"after: no item {after!r} in this response's input")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}
