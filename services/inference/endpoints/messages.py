"""POST /v1/messages and /v1/messages/count_tokens from request bytes to response bytes: Anthropic's
rendering (services.wire) of the metered completion flow (services.inference.flow.metered:
rate limit, response cache, generation, usage), the flow /v1/chat/completions runs too.

A streamed request reports its place in the queue: each change sends a `ping` event (what
Anthropic sends to keep a stream alive), so a client waiting behind others sees bytes at once.
From the first byte on, a failure arrives as an `event: error`; before it, as an HTTP status.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

from services.inference.endpoints.chat_completions import JSON, SSE, Mark
from services.inference.flow.metered import Completion, MeteredCompletions, Started
from services.inference.flow.service import Queued
from services.wire import anthropic
from services.wire.anthropic_stream import PING, MessageBuilder, error_event, sse
from services.wire.errors import stream_failure


class Messages:
    def __init__(self, completions: MeteredCompletions) -> None:
        self.completions = completions

    async def count_tokens(self, body: bytes) -> bytes:
        model, messages, structure = anthropic.parse_count_request(body)
        total, _, _ = await self.completions.count_tokens(model, messages, structure)
        return json.dumps({"input_tokens": total}).encode()

    async def create(self, body: bytes, timeout: float | None, mark: Mark) -> AsyncIterator[tuple[str, bytes]]:
        """Yields (content type, bytes). `mark` sends the x-parley-cache value before the first bytes."""
        req = anthropic.parse_request(body)
        completion = Completion(req.model, req.messages, req.sampling, structure=req.structure,
                                report_queue=req.stream)
        builder: MessageBuilder | None = None
        sent = False  # bytes are out: from now on a failure is an error event
        try:
            async with contextlib.aclosing(self.completions.run(completion, timeout)) as items:
                async for item in items:
                    if isinstance(item, Queued):
                        if not sent:
                            await mark("miss")  # a replayed answer never waits
                            sent = True
                        yield SSE, sse(PING)
                        continue
                    if isinstance(item, Started):
                        if not sent:
                            await mark("hit" if item.cached else "miss")
                        builder = MessageBuilder(item.model, item.prompt_tokens, req.stop_sequences)
                        if req.stream:
                            # The first message fixes the HTTP content type of the whole response.
                            sent = True
                            yield SSE, sse(builder.start())
                        continue
                    assert builder is not None
                    events = builder.add(item)
                    if req.stream and events:
                        yield SSE, b"".join(sse(event) for event in events)
                    elif item.usage is not None:
                        yield JSON, json.dumps(builder.message(), ensure_ascii=False).encode()
        except Exception as exc:
            if not sent:
                raise  # nothing sent yet, or one JSON answer: the status says it
            yield SSE, sse(error_event(*stream_failure(exc)))
