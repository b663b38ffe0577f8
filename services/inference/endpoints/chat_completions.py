"""POST /v1/chat/completions from request bytes to response bytes: OpenAI's JSON or SSE rendering
of the metered completion flow (services.inference.flow.metered: rate limit, response cache, generation,
usage). A replayed answer arrives as the same items as a generated one, so it is rendered the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from services.core.structured import Answer
from services.inference.engines.base import Chunk
from services.inference.flow.metered import Completion, MeteredCompletions, Started
from services.wire import openai_chat
from services.wire.errors import stream_failure

CACHE_HEADER = "x-parley-cache"
SSE = "text/event-stream"
JSON = "application/json"

Mark = Callable[[str], Awaitable[None]]


class ChatCompletions:
    def __init__(self, completions: MeteredCompletions) -> None:
        self.completions = completions

    async def create(self, body: bytes, timeout: float | None, mark: Mark) -> AsyncIterator[tuple[str, bytes]]:
        """Yields (content type, bytes). `mark` sends the x-parley-cache value before the first bytes."""
        req = openai_chat.parse_request(body)
        completion = Completion(req.model, req.messages, req.sampling, structure=req.structure, n=req.n,
                                top_logprobs=req.top_logprobs)
        writer: openai_chat.CompletionWriter | None = None
        logprobs = req.top_logprobs is not None
        choices = [openai_chat.ChoiceResult("", None, [] if logprobs else None) for _ in range(req.n)]
        answers = [Answer() for _ in range(req.n)]
        streamed: set[str] = set()  # ids of calls sent piece by piece
        try:
            async with contextlib.aclosing(self.completions.run(completion, timeout)) as items:
                async for chunk in items:
                    if isinstance(chunk, Started):
                        # Only once admitted: an error before it stays a plain error status.
                        await mark("hit" if chunk.cached else "miss")
                        writer = openai_chat.CompletionWriter(chunk.model, chunk.fingerprint)
                        if req.stream:
                            # The first message fixes the HTTP content type of the whole response.
                            for i in range(req.n):
                                yield SSE, writer.chunk({"role": "assistant", "content": ""},
                                                        include_usage=req.include_usage, index=i)
                        continue
                    assert writer is not None
                    choice = choices[chunk.index]
                    answer = answers[chunk.index]
                    if choice.logprobs is not None:
                        choice.logprobs.extend(chunk.logprobs)
                    if req.stream:
                        for data in _deltas(writer, req, chunk, answer, streamed):
                            yield SSE, data
                    answer.add(chunk.text, chunk.reasoning, chunk.tool_calls)
                    if chunk.finish_reason is not None:
                        choice.finish_reason, choice.text, choice.reasoning = chunk.finish_reason, answer.text, answer.reasoning
                        choice.tool_calls = answer.calls
                    if chunk.usage is not None:  # the request's last chunk
                        if req.stream:
                            if req.include_usage:
                                yield SSE, writer.usage_chunk(chunk.usage)
                            yield SSE, writer.DONE
                        else:
                            yield JSON, writer.complete(choices, chunk.usage)
        except Exception as exc:
            if writer is None or not req.stream:
                raise  # nothing sent yet, or one JSON answer: the status says it
            # The stream is under way (200 and its first chunks are out): it ends with OpenAI's error
            # event, which the SDK raises as an APIError, instead of stopping without a word; then
            # [DONE] as vLLM sends it, so that a client reading lines sees the end it waits for.
            yield SSE, writer.error_event(stream_failure(exc)[1])
            yield SSE, writer.DONE


def _deltas(writer: openai_chat.CompletionWriter, req: openai_chat.ChatCompletionRequest, chunk: Chunk,
            answer: Answer, streamed: set[str]) -> list[bytes]:
    """One chunk of a choice as its stream's deltas: reasoning, text (with logprobs), calls, finish."""
    out = []
    if chunk.reasoning:
        out.append(writer.chunk({"reasoning_content": chunk.reasoning}, include_usage=req.include_usage,
                                index=chunk.index))
    if chunk.text or chunk.logprobs:
        out.append(writer.chunk({"content": chunk.text}, include_usage=req.include_usage, index=chunk.index,
                                logprobs=chunk.logprobs if req.top_logprobs is not None else None))
    # A call's pieces as they are written (its id and name, then its arguments bit by bit); a call that
    # was not streamed so comes whole once complete. Each carries its index within the choice, as the
    # SDK assembles them.
    calls = [openai_chat.call_delta_json(d) for d in chunk.call_deltas]
    streamed.update(d.id for d in chunk.call_deltas if d.id)
    calls += [openai_chat.tool_calls_json([c], at=len(answer.calls) + k)[0]
              for k, c in enumerate(chunk.tool_calls) if c.id not in streamed]
    if calls:
        out.append(writer.chunk({"tool_calls": calls}, include_usage=req.include_usage, index=chunk.index))
    if chunk.finish_reason is not None:
        out.append(writer.chunk({}, chunk.finish_reason, final=True, include_usage=req.include_usage,
                                index=chunk.index))
    return out
