"""A chat completion stream that fails once under way ends with OpenAI's error event (the SDK
raises it as an APIError) rather than stopping without a word; before the request is admitted, the
failure stays a plain status."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from services.inference.endpoints.chat_completions import ChatCompletions
from services.inference.engines.base import Chunk, EngineError
from services.inference.flow.metered import MeteredCompletions
from services.inference.flow.service import Admitted

RECORD = SimpleNamespace(entry=SimpleNamespace(id="tiny"), fingerprint=lambda: "1-2")


class Failing:
    """Generation that is admitted and yields `before` chunks, then raises (before admission when
    `before` is negative)."""

    def __init__(self, before: int) -> None:
        self.before = before

    async def generate(self, *args: Any, **kwargs: Any):
        if self.before >= 0:
            yield Admitted(RECORD, 5, 0)  # type: ignore[arg-type]
        for i in range(self.before):
            yield Chunk(text=f"piece{i} ")
        raise EngineError("generation failed: llama_decode returned -3")


async def run(before: int, stream: bool) -> list[tuple[str, bytes]]:
    completions = ChatCompletions(MeteredCompletions(Failing(before), registry=None, cache=None))  # type: ignore[arg-type]
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()

    async def mark(value: str) -> None:
        pass

    return [part async for part in completions.create(body, None, mark)]


async def test_a_stream_that_fails_midway_ends_with_an_error_event() -> None:
    parts = await run(before=2, stream=True)
    assert parts[-1][1] == b"data: [DONE]\n\n"  # after the error, as vLLM ends such a stream
    events = [json.loads(data[len(b"data: "):]) for _, data in parts[:-1]]
    assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["piece0 ", "piece1 "]
    assert events[-1] == {"error": {"message": "generation failed: llama_decode returned -3", "type": "server_error",
                                    "param": None, "code": "server_error"}}


@pytest.mark.parametrize("before, stream", [(-1, True), (2, False)])
async def test_before_admission_or_without_a_stream_the_failure_is_the_status(before: int, stream: bool) -> None:
    with pytest.raises(EngineError):
        await run(before, stream)
