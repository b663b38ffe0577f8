"""The remote engine's in-flight limit in-process: requests beyond params.max_in_flight wait in the
fair-share line (engines.slots.SlotPool), report their places, are refused when the line is full, and
give their place back however they end. httpx.MockTransport plays a slow upstream whose answers the
test lets go one by one; a real llama-server is in tests/integration/test_remote_api.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import httpx
import pytest

from services.core import config
from services.core.config import ConfigError
from services.core.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.inference.engines.fair import Owner
from services.inference.engines.remote import IN_FLIGHT, RemoteEngine
from services.inference.engines.request import Admitted, GenerationRequest, Queued
from services.inference.engines.sequence import Chunk, Sampling
from services.inference.engines.upstream import UpstreamPool
from services.inference.models.hardware import EngineSettings
from services.inference.models.registry import load_catalogue
from services.inference.settings import InferenceSettings

A, B = "http://a.test/v1", "http://b.test/v1"
ALICE, BOB, CAROL = Owner("alice"), Owner("bob"), Owner("carol")


def sse_answer(text: str) -> bytes:
    events = [{"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 1}}]
    return ("".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n").encode()


class SlowUpstream:
    """Upstreams whose each chat request (named by its message) answers only once the test opens its
    gate; `arrived` is the order the requests reached them in. `slots` answers GET /props per host."""

    def __init__(self, slots: dict[str, object] | None = None) -> None:
        self.slots = slots or {}
        self.arrived: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.failing: set[str] = set()

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path, host = request.url.path, request.url.host
        if path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "up-model"}]})
        if path == "/props":  # at the server's root, not under /v1
            if host not in self.slots:
                return httpx.Response(404, json={"error": {"message": "File Not Found"}})
            return httpx.Response(200, json={"total_slots": self.slots[host]})
        name = json.loads(request.content)["messages"][-1]["content"]
        self.arrived.append(name)
        if name in self.failing:
            return httpx.Response(500, json={"error": {"message": "the upstream broke"}})
        gate = self.gate(name)

        async def body():
            await gate.wait()
            yield sse_answer(name)

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> SlowUpstream:
    mock = SlowUpstream({"b.test": 3})
    monkeypatch.setattr(UpstreamPool, "transport", httpx.MockTransport(mock))
    return mock


@contextlib.asynccontextmanager
async def engine_with(sources: str = A, queue_depth: int = 4, **params: object):
    settings = EngineSettings("remote", "cpu", 1, 0, "", "", 1024, 1, queue_depth=queue_depth)
    engine = RemoteEngine("far", sources, settings, {"model": "up-model", "health_interval_seconds": 60, **params})
    await engine.load()
    try:
        yield engine
    finally:
        await engine.close()


def request(name: str, owner: Owner, deadline: float = 30.0) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": name}], "", Sampling(), time.monotonic(),
                             time.monotonic() + deadline, (100_000, "test"), report_queue=True, owner=owner)


class Caller:
    """One request read to its end in a task: what it got, or the error it ended with."""

    def __init__(self, engine: RemoteEngine, name: str, owner: Owner, deadline: float = 30.0) -> None:
        self.items: list[Queued | Admitted | Chunk] = []
        self.error: BaseException | None = None
        self.stream = engine.generate(request(name, owner, deadline))
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for item in self.stream:
                self.items.append(item)
        except Exception as exc:  # noqa: BLE001 - the test reads it
            self.error = exc

    @property
    def queued(self) -> list[int]:
        return [i.position for i in self.items if isinstance(i, Queued)]

    @property
    def admitted(self) -> bool:
        return any(isinstance(i, Admitted) for i in self.items)

    @property
    def text(self) -> str:
        return "".join(i.text for i in self.items if isinstance(i, Chunk))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)


async def start(engine: RemoteEngine, *calls: tuple[str, Owner]) -> list[Caller]:
    """The requests started in this order, each in flight or in line before the next starts."""
    callers = []
    for name, owner in calls:
        callers.append(Caller(engine, name, owner))
        await settle()
    return callers


async def test_a_request_beyond_the_limit_waits_is_told_its_place_and_is_then_served(upstream: SlowUpstream) -> None:
    async with engine_with(max_in_flight=1) as engine:
        first, second = await start(engine, ("a1", ALICE), ("b1", BOB))
        assert upstream.arrived == ["a1"] and first.admitted and not second.admitted
        assert second.queued == [1] and second.items[0].wait_seconds >= 0
        assert (engine.running, engine.waiting) == (1, 1)
        upstream.gate("a1").set()
        await settle()
        assert first.text == "a1" and upstream.arrived == ["a1", "b1"] and second.admitted
        assert (engine.running, engine.waiting) == (1, 0)
        upstream.gate("b1").set()
        await asyncio.gather(first.task, second.task)
        assert second.text == "b1" and (engine.running, engine.waiting) == (0, 0)


async def test_another_user_goes_before_a_flooding_users_queued_requests(upstream: SlowUpstream) -> None:
    async with engine_with(max_in_flight=1) as engine:
        *flood, other = await start(engine, ("a1", ALICE), ("a2", ALICE), ("a3", ALICE), ("c1", CAROL))
        # Carol's request goes ahead of Alice's waiting ones, which are told their new places.
        assert [c.queued for c in flood] == [[], [1, 2], [2, 3]] and other.queued == [1]
        for name in ("a1", "c1", "a2", "a3"):
            upstream.gate(name).set()
            await settle()
        assert upstream.arrived == ["a1", "c1", "a2", "a3"]
        await asyncio.gather(*(c.task for c in (*flood, other)))
        assert all(c.error is None for c in (*flood, other))


async def test_a_full_line_refuses_the_flooding_user_and_not_the_other(upstream: SlowUpstream) -> None:
    async with engine_with(max_in_flight=1, queue_depth=2) as engine:
        *flood, refused = await start(engine, ("a1", ALICE), ("a2", ALICE), ("a3", ALICE), ("a4", ALICE))
        assert isinstance(refused.error, ResourceExhausted) and refused.error.retry_after
        assert "queue depth 2" in refused.error.message and "a4" not in upstream.arrived
        [other] = await start(engine, ("b1", BOB))
        assert other.error is None and other.queued == [1] and engine.waiting == 3
        for gate in ("a1", "b1", "a2", "a3"):
            upstream.gate(gate).set()
        await asyncio.gather(*(c.task for c in (*flood, other)))
        assert other.text == "b1" and (engine.running, engine.waiting) == (0, 0)


async def test_a_waiter_that_leaves_frees_its_place(upstream: SlowUpstream) -> None:
    async with engine_with(max_in_flight=1) as engine:
        first, cancelled = await start(engine, ("a1", ALICE), ("b1", BOB))
        closed = engine.generate(request("c1", CAROL))
        assert await closed.__anext__() == Queued(2, 0.0)  # nothing has ended yet: no wait to estimate from
        assert engine.waiting == 2 and cancelled.queued == [1]
        cancelled.task.cancel()  # the caller's task is cancelled as it waits
        await settle()
        assert engine.waiting == 1 and (await closed.__anext__()).position == 1  # pushed: it moved up
        await closed.aclose()  # the consumer goes while the generator sits at a Queued item
        assert engine.waiting == 0
        upstream.gate("a1").set()
        await first.task
        assert upstream.arrived == ["a1"] and (engine.running, engine.waiting) == (0, 0)
        later = Caller(engine, "d1", ALICE)
        upstream.gate("d1").set()
        await later.task
        assert later.text == "d1" and later.queued == []


async def test_a_failed_or_abandoned_upstream_call_gives_its_place_back(upstream: SlowUpstream) -> None:
    upstream.failing.add("boom")
    async with engine_with(max_in_flight=1) as engine:
        failed = Caller(engine, "boom", ALICE)
        await failed.task
        assert isinstance(failed.error, Unavailable) and engine.running == 0
        gone = Caller(engine, "a1", ALICE)
        waiting = Caller(engine, "b1", BOB)
        await settle()
        assert gone.admitted and waiting.queued == [1]
        gone.task.cancel()  # the caller leaves mid-answer: the upstream response is closed
        await settle()
        assert waiting.admitted and upstream.arrived == ["boom", "a1", "b1"] and engine.running == 1
        upstream.gate("b1").set()
        await waiting.task
        assert (engine.running, engine.waiting) == (0, 0)


async def test_a_deadline_passing_in_line_is_deadline_exceeded(upstream: SlowUpstream) -> None:
    async with engine_with(max_in_flight=1) as engine:
        [first] = await start(engine, ("a1", ALICE))
        late = Caller(engine, "b1", BOB, deadline=0.05)
        await late.task
        assert isinstance(late.error, DeadlineExceeded) and engine.waiting == 0
        upstream.gate("a1").set()
        await first.task
        assert upstream.arrived == ["a1"] and engine.running == 0


async def test_the_limit_is_configured_or_told_by_each_upstream(upstream: SlowUpstream, tmp_path: Path) -> None:
    async with engine_with(f"{A},{B}") as engine:  # a.test has no /props, b.test runs 3 at once
        assert engine.info()["max_in_flight"] == IN_FLIGHT + 3
    async with engine_with(f"{A},{B}", max_in_flight=2) as engine:  # the catalogue's, per upstream
        assert engine.info()["max_in_flight"] == 4
    upstream.slots["a.test"] = "many"  # an answer that is not a count is ignored
    async with engine_with(A) as engine:
        assert engine.info()["max_in_flight"] == IN_FLIGHT
    path = tmp_path / "models.json"
    for bad in (0, 1.5, "4", True):
        path.write_text(json.dumps([{"id": "far", "engine": "remote", "source": A, "params": {"max_in_flight": bad}}]))
        settings = config.load(InferenceSettings, {"PARLEY_MODELS_FILE": str(path), "PARLEY_DEFAULT_MODEL": "far"})
        with pytest.raises(ConfigError, match="max_in_flight"):
            load_catalogue(settings)
