"""POST /v1/completions (OpenAI's legacy text completions) from request bytes to response bytes:
OpenAI's legacy JSON or SSE rendering of the metered completion flow (services.inference.flow.metered:
rate limit, response cache, generation, usage) run on a raw prompt, without a chat template.

Each prompt of the request is one metered completion (a list of prompts counts one request per
prompt against the rate limit, and each deterministic one is cached on its own); they run at the same
time, so the engine batches them. The x-parley-cache header says `hit` when every prompt was
answered from the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from services.inference.endpoints.chat_completions import JSON, SSE, ChatCompletions, Mark
from services.inference.engines.base import Chunk, Usage
from services.inference.flow.metered import Completion, MeteredCompletions, Started
from services.wire.openai_text import (
    LegacyLogprobs, TextChoice, TextCompletionRequest, TextCompletionWriter, extend, parse_request,
)

_END = object()


class TextCompletions:
    def __init__(self, completions: MeteredCompletions) -> None:
        self.completions = completions

    async def _items(self, req: TextCompletionRequest,
                     timeout: float | None) -> AsyncIterator[tuple[int, Started | Chunk]]:
        """(prompt number, item) of every prompt's metered completion, as they come."""
        def run(prompt: str) -> AsyncIterator[Started | Chunk]:
            return self.completions.run(Completion(req.model, [], req.sampling, prompt=prompt, n=req.n,
                                                   top_logprobs=req.logprobs), timeout)

        if len(req.prompts) == 1:
            async with contextlib.aclosing(run(req.prompts[0])) as items:
                async for item in items:
                    yield 0, item
            return
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(p: int, prompt: str) -> None:
            try:
                async with contextlib.aclosing(run(prompt)) as items:
                    async for item in items:
                        await queue.put((p, item))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put((p, exc))
            finally:
                await queue.put((p, _END))

        tasks = [asyncio.create_task(pump(p, prompt)) for p, prompt in enumerate(req.prompts)]
        try:
            running = len(tasks)
            while running:
                p, item = await queue.get()
                if item is _END:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield p, item
        finally:
            for task in tasks:
                task.cancel()

    async def create(self, body: bytes, timeout: float | None, mark: Mark) -> AsyncIterator[tuple[str, bytes]]:
        """Yields (content type, bytes). `mark` sends the x-parley-cache value before the first bytes."""
        req = parse_request(body)
        count = len(req.prompts) * req.n
        prompt_of = [req.prompts[i // req.n] for i in range(count)]
        choices = [TextChoice(prompt_of[i] if req.echo else "", logprobs=_empty_logprobs(req.logprobs))
                   for i in range(count)]
        offsets = [LegacyLogprobs(len(prompt_of[i])) for i in range(count)]
        writer: TextCompletionWriter | None = None
        started: list[Started] = []
        waiting: list[tuple[int, Chunk]] = []  # chunks that came before every prompt was admitted
        usage = Usage()
        try:
            async for p, item in self._items(req, timeout):
                if isinstance(item, Started):
                    started.append(item)
                    if len(started) < len(req.prompts):
                        continue
                    # Every prompt is admitted: an error before this stays a plain error status.
                    await mark("hit" if all(s.cached for s in started) else "miss")
                    writer = TextCompletionWriter(item.model, item.fingerprint)
                    if req.stream and req.echo:
                        for i in range(count):
                            yield SSE, writer.chunk(i, prompt_of[i], include_usage=req.include_usage)
                    todo, waiting = waiting, []
                elif writer is None:
                    waiting.append((p, item))
                    continue
                else:
                    todo = [(p, item)]
                for p, chunk in todo:
                    i = p * req.n + chunk.index
                    choice = choices[i]
                    choice.text += chunk.text
                    logprobs = offsets[i].json(chunk.logprobs) if choice.logprobs is not None else None
                    if logprobs is not None and choice.logprobs is not None:
                        extend(choice.logprobs, logprobs)
                    if req.stream and (chunk.text or chunk.logprobs):
                        yield SSE, writer.chunk(i, chunk.text, logprobs=logprobs, include_usage=req.include_usage)
                    if chunk.finish_reason is not None:
                        choice.finish_reason = chunk.finish_reason
                        if req.stream:
                            yield SSE, writer.chunk(i, "", finish_reason=chunk.finish_reason,
                                                    include_usage=req.include_usage)
                    if chunk.usage is not None:  # the last chunk of one prompt's completion
                        _add_usage(usage, chunk.usage)
            if writer is None:
                return
            if req.stream:
                if req.include_usage:
                    yield SSE, writer.usage_chunk(usage)
                yield SSE, writer.DONE
            else:
                yield JSON, writer.complete(choices, usage)
        except Exception as exc:
            if writer is None or not req.stream:
                raise  # nothing sent yet, or one JSON answer: the status says it
            yield SSE, writer.error_event(ChatCompletions._failure(exc))
            yield SSE, writer.DONE  # as a chat completion stream ends


def _add_usage(total: Usage, usage: Usage) -> None:
    """One prompt's usage added to the request's (every prompt of a batch counts)."""
    total.prompt_tokens += usage.prompt_tokens
    total.completion_tokens += usage.completion_tokens
    total.cached_prompt_tokens += usage.cached_prompt_tokens


def _empty_logprobs(asked: int | None) -> dict[str, list[Any]] | None:
    """A choice's legacy logprobs to fill in, when the request asks for them."""
    return None if asked is None else {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
