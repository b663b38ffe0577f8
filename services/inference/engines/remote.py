"""A remote engine: the model runs on OpenAI-compatible servers (vLLM, llama-server, TGI, Ollama) and
Parley stays in front of them — accounts, rate limits, the response cache, conversations, metrics.

Catalogue entry: {"id": "...", "engine": "remote", "source": "http://host:port/v1" (or a list of such
URLs: replicas of one model), "params": {"model": "<upstream model name; default: the id>",
"api_key_env": "<env var holding the upstream's key>", "timeout_seconds": 60,
"health_interval_seconds": 5, "max_in_flight": 16, "tokenizer": "<GGUF path or package:... whose
vocabulary and chat template count prompts; default: an estimate>"}}.

One pooled HTTP client per model streams `POST /chat/completions` (a raw prompt, the legacy
completions API, `POST /completions`). Errors map to Parley's codes:
upstream 429 is RESOURCE_EXHAUSTED with its Retry-After, 400/422 INVALID_ARGUMENT with its message,
5xx, timeouts and unreachable servers UNAVAILABLE naming the model. A caller that leaves closes the
upstream response (and its connection) at once; the upstream sees the disconnect and stops.

Replicas: each request goes to the healthy upstream with the fewest requests outstanding, except that
a conversation (recognised by its opening messages, which every turn resends) sticks to the upstream
that served it, where its prefix is cached. A periodic `GET /models` marks each upstream healthy or
failed; a failed one is skipped until a check succeeds, and a request that cannot connect tries the
next one. The model reports failed (with the reasons) only when every upstream has failed. All of this
is engines.upstream.UpstreamPool's, which a remote embedding model (engines.remote_embedding) shares.

In flight: at most `params.max_in_flight` requests per upstream (default: what the upstream says it
runs at once — llama-server's `GET /props` at the server's root answers `total_slots`, asked once at
load — else 16) go upstream at once; the model's limit is the sum over its upstreams. The others wait
in the one line every engine queues in (engines.slots.SlotPool, with an in-flight place for a slot,
ordered and bounded by engines.fair: users in turn, a full queue refused with RESOURCE_EXHAUSTED only
to the user holding more than its share), are told their place as it moves (Queued), and go upstream
as places free up; a place is given back however its request ends (answered, failed, cancelled while
it waited or the caller gone). So one user flooding a remote model cannot shut the others out, which
an upstream serving first come, first served would. Remote embeddings (engines.remote_embedding)
are not bounded here: they go upstream at once, and the upstream queues them.

Prompt tokens are counted here only to check the context window, fit long chats and meter requests
whose upstream sends no usage: exactly with `params.tokenizer` (the same GGUF the upstream serves, or
one with the same vocabulary), otherwise estimated at 4 UTF-8 bytes a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.core.errors import DeadlineExceeded, InvalidArgument, ParleyError, Unavailable
from services.core.structured import PLAIN, Structure, ToolCall
from services.inference import metrics
from services.inference.engines.base import Chunk, Engine, EngineError, Usage
from services.inference.engines.remote_wire import (
    FINISH, Chat, StreamedCalls, answer_piece, has_usage, request_body,
)
from services.inference.engines.request import Admitted, GenerationRequest, Queued, queue_places
from services.inference.engines.slots import InLine, Slot, SlotPool
from services.inference.engines.upstream import PoolBacked, Upstream, UpstreamPool, describe, error_text
from services.inference.engines.weights import resolve_source
from services.inference.flow import fitting, offloop
from services.inference.models.chat_template import ChatTemplate, TemplateError
from services.inference.models.grammars import call_json
from services.inference.models.hardware import EngineSettings

BYTES_PER_TOKEN = 4  # the estimate without a tokenizer
IN_FLIGHT = 16  # requests sent to one upstream at once, unless params.max_in_flight or the upstream says


@dataclass
class RemoteRequest:
    """One request to an upstream: what to send, then the open response being read."""

    body: dict[str, Any]
    chat: Chat  # counted after the answer when the upstream sends no usage
    affinity: str
    started: float
    deadline: float | None
    upstream: Upstream | None = None
    response: httpx.Response | None = None
    span: Any = None
    usage: Usage = field(default_factory=Usage)
    ended: bool = False  # the upstream call's bookkeeping is done
    release: Any = None  # the engine's clean-up, once the request was admitted
    _cancelled: bool = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        """The caller is done with it: an open response is closed now (the upstream stops)."""
        self._cancelled = value
        if value and not self.ended and self.release is not None:
            asyncio.ensure_future(self.release(self, "cancelled", ""))


class RemoteEngine(InLine, PoolBacked, Engine):
    """A chat model served upstream: the chat itself is sent (the upstream renders it, applies its
    own grammars and checks its own context limit); tokens are counted here only to fit long chats
    and meter upstreams that send no usage."""

    engine_name = "remote"

    def __init__(self, model_id: str, path: str, settings: EngineSettings, params: dict) -> None:
        super().__init__(model_id, path, settings, params)
        self.pool = UpstreamPool(model_id, path, params, self._learn_context)
        self._text: Any = None  # a GGUF vocabulary and chat template, when params.tokenizer names one
        self._slot_pool: SlotPool | None = None  # the in-flight places and the line of those waiting (load)

    @property
    def remote_model(self) -> str:
        return self.pool.remote_model

    def info(self) -> dict[str, Any]:
        return {**super().info(), "max_in_flight": self._slot_pool.size if self._slot_pool is not None else 0}

    # --- life cycle ----------------------------------------------------------------------------
    async def load(self) -> None:
        """Reads the tokenizer (if named), opens the pool and checks the upstreams; fails when none answers."""
        if self.params.get("tokenizer"):
            self._text = await asyncio.to_thread(GgufText, self.params["tokenizer"])
            self.vocab_size = self._text.vocab_size
        try:
            await self.pool.open()
            limit = await self._in_flight_limit()
        except BaseException:
            await self.close()
            raise
        self._slot_pool = SlotPool([Slot(i) for i in range(limit)], self.settings.queue_depth, self.settings.fair_share)

    async def _in_flight_limit(self) -> int:
        """The model's in-flight limit: params.max_in_flight per upstream, else what each upstream
        says it runs at once (llama-server's total_slots), else IN_FLIGHT; summed over the upstreams."""
        configured = self.params.get("max_in_flight")
        if configured:
            return int(configured) * len(self.upstreams)
        told = await asyncio.gather(*(self.pool.parallel(u) for u in self.upstreams))
        return sum(n or IN_FLIGHT for n in told)

    async def close(self) -> None:
        await self.pool.close()
        if self._text is not None:
            await asyncio.to_thread(self._text.close)
            self._text = None

    def _learn_context(self, model: dict[str, Any]) -> None:
        """The context window: the configured one (the catalogue's context_length, else
        PARLEY_CONTEXT_LENGTH), at most what the upstream's model list says (vLLM: max_model_len;
        llama-server: meta.n_ctx_train), as the llama.cpp engine caps it at the model's own."""
        size = model.get("max_model_len") or (model.get("meta") or {}).get("n_ctx_train")
        if isinstance(size, int) and size > 0:
            self.context_length = min(self.settings.context_length, size)

    # --- counting ------------------------------------------------------------------------------
    @property
    def native_tools(self) -> bool:
        return True  # tools travel to the upstream as they are

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, structure: Structure = PLAIN) -> str:
        if self._text is not None:
            return self._text.template.render(messages, add_generation_prompt, tools, structure.template)
        text = "".join(f"{m['role']}\n{m.get('content') or ''}\n" for m in messages)
        return text + (json.dumps(tools) if tools else "")

    def _tokenize(self, text: str) -> list[int]:
        if self._text is not None:
            return self._text.tokenize(text)
        return [0] * -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN)  # an estimate: only its length is used

    # --- generation ------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Queued | Admitted | Chunk]:
        """The chat (fitted, when asked) goes upstream as it is; its grammars, stop strings and
        parsing of reasoning and calls are the upstream's, which validates the sampling too
        (logit_bias ids are its vocabulary's). It waits for an in-flight place first (Queued, when
        asked); a full line is RESOURCE_EXHAUSTED now."""
        tokens: list[int] = []
        dropped, sent = 0, request.messages
        if request.fit is None:
            # Nothing is counted before the upstream starts: it checks its own context limit (its 400
            # is a 400) and reports the prompt's tokens in its usage; `_stream` counts them after the
            # answer only when it sends none. Admitted reports 0 prompt tokens.
            fitting.check_characters(request.messages, request.prompt, *request.characters)
        else:
            tokens, dropped, sent = await self._fitted(request, request.fit)
        if request.n > 1:
            raise InvalidArgument("n > 1 is not supported by the remote engine")
        if request.top_logprobs is not None:
            raise InvalidArgument("logprobs are not supported by the remote engine")
        chat = Chat(sent, request.prompt, request.structure)
        call = RemoteRequest(request_body(self.remote_model, chat, request.sampling), chat, _affinity(chat), request.started,
                             request.deadline)
        call.usage.prompt_tokens = len(tokens)  # 0 unless the chat was fitted (counted) before
        places = self._slot_pool
        if places is None:
            raise Unavailable(f"model {self.model_id!r} is not loaded")
        waiter = places.enqueue((), request.owner, key=call)  # in line (or in flight) now; a full line raises
        expiry = asyncio.get_running_loop().call_later(
            max(0.0, request.deadline - time.monotonic()), places.refuse, waiter,
            DeadlineExceeded("the deadline passed while the request waited for the engine"))
        try:
            if request.report_queue:
                async with contextlib.aclosing(queue_places(lambda: self.queue_place(call), self.line_moved)) as queued:
                    async for place in queued:
                        yield place
            await places.wait(waiter)  # DEADLINE_EXCEEDED when its deadline passes first
            await self._admit(call)
            yield Admitted(len(tokens), dropped)
            async with contextlib.aclosing(self._stream(call)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            expiry.cancel()
            call.cancelled = True  # closes an open response now, however this ended
            places.withdraw(waiter)  # its in-flight place, or its place in line, goes to the next

    def _pick(self, affinity: str, tried: set[int]) -> Upstream | None:
        return self.pool.pick(affinity, tried)

    async def _admit(self, request: RemoteRequest) -> None:
        """Sends the request and waits for the upstream's answer to begin (its status); raises the
        mapped error when no upstream takes it."""
        path = "chat/completions" if "messages" in request.body else "completions"
        call = await self.pool.send(path, request.body, request.affinity)
        request.upstream, request.response, request.span = call.upstream, call.response, call.span
        request.release = self._release

    async def _release(self, request: RemoteRequest, outcome: str, error: str) -> None:
        """Closes the upstream response (the upstream sees the disconnect and stops) and ends the
        call's span and metrics; once per request."""
        if request.ended or request.upstream is None or request.response is None:
            return
        request.ended = True
        self.pool.end(request.upstream, request.span, outcome, error)
        await request.response.aclose()

    async def _stream(self, request: RemoteRequest) -> AsyncIterator[Chunk]:
        """The upstream's SSE stream as chunks. A stream cut before its end raises UNAVAILABLE (what
        came before it was already yielded); the deadline ends it with "cancelled"."""
        response, upstream = request.response, request.upstream
        assert response is not None and upstream is not None
        usage = request.usage
        tick = metrics.token_timer(self.model_id)
        calls = StreamedCalls()
        reason: str | None = None
        text: list[str] = []
        thoughts: list[str] = []
        upstream_usage: dict[str, Any] | None = None
        outcome, error = "ok", ""
        try:
            # Silence longer than timeout_seconds is httpx's ReadTimeout; the deadline is checked per line.
            async for line in response.aiter_lines():
                if request.deadline is not None and time.monotonic() > request.deadline:
                    reason, outcome = "cancelled", "deadline"
                    break
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    raise Unavailable(f"model {self.model_id!r}: upstream error: {error_text(event['error'])}")
                if event.get("usage"):
                    upstream_usage = event["usage"]
                for choice in event.get("choices") or ():
                    piece, thought, deltas = answer_piece(choice, calls)
                    if piece or thought or deltas:
                        if not usage.time_to_first_token_ms:
                            usage.time_to_first_token_ms = (time.monotonic() - request.started) * 1000
                        tick()
                        text.append(piece)
                        thoughts.append(thought)
                        yield Chunk(text=piece, reasoning=thought, call_deltas=deltas)
                    if choice.get("finish_reason"):
                        reason = FINISH.get(choice["finish_reason"], "stop")
            if reason is None:
                raise Unavailable(f"model {self.model_id!r}: upstream {upstream.url} ended the answer early")
            finished = calls.finished()
            if finished and reason == "stop":
                reason = "tool_calls"
            await self._usage(request, upstream_usage, "".join(text), "".join(thoughts), finished)
            yield Chunk(finish_reason=reason, usage=usage, tool_calls=finished)
        except (httpx.HTTPError, ValueError) as exc:
            outcome, error = "cut", describe(exc)
            raise Unavailable(f"model {self.model_id!r}: upstream {upstream.url} failed mid-answer: {error}") from exc
        except ParleyError as exc:
            outcome, error = "cut", exc.message
            raise
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            if outcome == "ok" and reason is None:
                outcome = "cancelled"  # the consumer left
            await self._release(request, outcome, error)

    async def _usage(self, request: RemoteRequest, given: dict[str, Any] | None, text: str, reasoning: str,
                     calls: list[ToolCall]) -> None:
        """The upstream's usage when it sent one, else counted here."""
        usage = request.usage
        if not has_usage(given) and not usage.prompt_tokens:
            # Only now, and only for an upstream that sends no usage: counting before the call
            # delayed its start (rendering and tokenizing compete with every request on the loop).
            chat = request.chat
            usage.prompt_tokens = len(await offloop.run(self.prompt_tokens, chat.messages, chat.prompt,
                                                        chat.structure))
        if has_usage(given):
            assert given is not None
            usage.prompt_tokens = int(given.get("prompt_tokens") or usage.prompt_tokens)
            usage.completion_tokens = int(given["completion_tokens"])
            details = given.get("prompt_tokens_details") or {}
            usage.cached_prompt_tokens = int(details.get("cached_tokens") or 0)
            completion = given.get("completion_tokens_details") or {}
            usage.reasoning_tokens = int(completion.get("reasoning_tokens") or 0)
            if reasoning and not usage.reasoning_tokens:  # llama-server sends no such detail
                usage.reasoning_tokens = min(self._text_tokens(reasoning), usage.completion_tokens)
            return
        written = text + reasoning + "".join(json.dumps(call_json(c)) for c in calls)
        usage.completion_tokens = len(self._tokenize(written)) - len(self._tokenize(""))
        if reasoning:
            usage.reasoning_tokens = self._text_tokens(reasoning)


class GgufText:
    """A GGUF's vocabulary and chat template, without its weights: exact prompt counts for a remote
    model served from the same file (llama.cpp loads only the vocabulary)."""

    def __init__(self, source: str) -> None:
        import llama_cpp
        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose

        path = resolve_source(source)
        set_verbose(False)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            self._model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"params.tokenizer: llama.cpp could not read {path}: {exc}") from exc
        self.vocab_size = self._model.n_vocab()
        metadata = self._model.metadata()
        self._add_bos = str(metadata.get("tokenizer.ggml.add_bos_token")).lower() == "true"
        try:
            self.template = ChatTemplate(metadata.get("tokenizer.chat_template"))
        except TemplateError as exc:
            self._model.close()
            raise EngineError(f"params.tokenizer: {exc}") from exc

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=True)

    def close(self) -> None:
        self._model.close()


def _affinity(chat: Chat) -> str:
    """A conversation's key: its opening (the system prompt and first question), which each of its
    turns resends; the upstream that served it holds that prefix in its cache."""
    opening = []
    for m in chat.messages:
        opening.append(f"{m['role']}\x00{m.get('content') or ''}")
        if m["role"] == "user":
            break
    return hashlib.blake2b("\x01".join(opening or [chat.prompt]).encode(), digest_size=12).hexdigest()


