"""What the service hands an engine and what it gets back (engines.base.Engine.generate): one
GenerationRequest in; out, Queued while it waits (when asked), Admitted once the engine has taken it,
then its chunks (engines.sequence.Chunk). `queue_places` is every engine's way to yield Queued."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.core.structured import PLAIN, Structure
from services.inference.engines.fair import ANONYMOUS, Owner
from services.inference.engines.sequence import Sampling
from services.inference.flow.fitting import Fit


@dataclass(frozen=True)
class GenerationRequest:
    """One validated generation: a chat (messages) or a raw prompt, and how to answer it."""

    messages: Sequence[dict[str, Any]]  # empty with a raw prompt
    prompt: str
    sampling: Sampling  # defaults applied (services.inference.flow.service.resolve_sampling)
    started: float  # time.monotonic() when the request arrived
    deadline: float
    # The most characters the messages may hold for this model, and what sets that limit (named in the
    # error): a chat that cannot fit is refused, or cut when fitted, before anything renders it.
    characters: tuple[int, str]
    asked_max_tokens: int | None = None  # max_tokens as given (None: the default): a fitted chat keeps room for it
    reserve_tokens: int = 0  # room kept for an answer without max_tokens when the fit names none
    structure: Structure = PLAIN
    n: int = 1
    top_logprobs: int | None = None
    fit: Fit | None = None  # fit a long chat to the context window by leaving out its oldest turns
    report_queue: bool = False  # yield Queued while the request waits for room
    owner: Owner = ANONYMOUS  # whom it runs for, and the weight of their share (engines.fair)


@dataclass(frozen=True)
class Queued:
    """Before Admitted, when the request asked for it: it waits for room in the engine."""

    position: int  # 1: it starts when one running answer ends
    wait_seconds: float  # the engine's estimate


@dataclass(frozen=True)
class Admitted:
    """The prompt fits and the engine has taken the request; its chunks follow."""

    prompt_tokens: int  # 0 when an upstream counts them (it reports them in the last chunk's usage)
    dropped: int  # history messages left out to fit the context window (fitting.Fit)


async def queue_places(place: Callable[[], tuple[int, float] | None],
                       line_moved: Callable[[], asyncio.Event | None]) -> AsyncIterator[Queued]:
    """A waiting request's place in line each time it changes, until the engine takes it: `place` (the
    engine's queue_place for the request: (place, 1 first; estimated seconds), or None once it runs)
    is read again each time the engine's `line_moved` event is set — pushed, not polled. Listening
    starts before each read, so no move in between is missed; an engine that reports no places
    (line_moved None) yields nothing."""
    last = None
    while True:
        moved = line_moved()
        where = place()
        if moved is None or where is None:
            return
        if where[0] != last:
            last = where[0]
            yield Queued(where[0], where[1])
        await moved.wait()
