"""Fair share: one policy for every engine that queues — which waiting request starts next, how much
of the queue one owner may hold, which running choice gives way to a newcomer, and how a step's
prompt tokens are split. Its users: the batched llama.cpp engine (engines.batch_admission), slot
engines (engines.slots.SlotPool: torch slots, and the remote engine's in-flight places,
engines.remote) and local embedding batches (engines.embedding); each refuses a full queue with
engines.base.queue_full. Remote embeddings alone go upstream unbounded (the upstream queues them).

An owner is the caller a request runs for: a user, and the API key it came through (engines get it
from services.core.identity through the GenerationRequest, engines.request), with the user's weight:
`share_weight` of the user's rate limits (PATCH /v1/rate-limits/{id}, services.cache.ratelimit; 1
unless an admin set it), which the rate-limit check of every metered request returns
(services.inference.flow.metered, services.inference.endpoints.embeddings), and the API key's weight
within its user's share: `share_weight` of the key (PATCH /v1/api-keys/{id}, services.auth; 1 unless
its owner set it), which comes with the caller's Identity (cached for PARLEY_API_KEY_CACHE_SECONDS,
so a change takes effect within that time). Shares are counted per user, weighted: a user's load is
what it runs divided by its weight; a user's API keys split the user's share by their weights, and
never change other users' shares. With fair share on (PARLEY_FAIR_SHARE, the default):
- the next request to start is the oldest of the least loaded user that waits (among that user's
  API keys, the key whose running count divided by its weight is least, then the oldest), so a
  newcomer goes before the requests of a user who already runs many: it starts at the next step;
- once the engine's room (running slots plus queue depth) is taken, a request is refused only when
  its user already holds a weighted equal share of that room: one user filling the queue is refused,
  the next user is not;
- where the engine can pause a running choice without losing it (the batched llama.cpp engine,
  engines.batch_admission: its KV state goes to host RAM and comes back), a request of a user that
  runs nothing first starts on one of a few spare choices beyond the engine's slots (nobody pauses
  for a newcomer's short turn); with those taken, a waiting request whose user runs less than
  another user takes a choice of the most loaded one (`victim`), until their shares are equal;
  engines that cannot pause (engines.slots' torch slots and remote requests in flight,
  engines.embedding's batches) only order and bound their queues;
- the prompt tokens a step of the batched engine evaluates are split between the users that have
  prompts to evaluate by weight (`prefill`), so a long prompt does not hold a newcomer's first
  token back.
Off, every engine serves first come, first served, as llama-server does (the benchmark's baseline).

The policy is pure: engines call it under their own locks with what they run and what waits.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from services.core.identity import optional_identity


@dataclass(frozen=True)
class Owner:
    """Whom a request runs for: a user id ("" for calls without one), the API key id ("" when it came
    with an access token), the user's share weight (2: twice an equal share) and the key's weight
    within the user's share (3: three starts for each one of the user's keys of weight 1)."""

    user: str = ""
    key: str = ""
    weight: float = 1.0
    key_weight: float = 1.0


ANONYMOUS = Owner()


def current_owner(weight: float = 1.0) -> Owner:
    """The caller of the RPC being handled (services.core.identity), or ANONYMOUS."""
    identity = optional_identity()
    if identity is None:
        return Owner(weight=weight)
    return Owner(identity.user_id, identity.api_key_id or "", weight, identity.api_key_weight)


class Entry(Protocol):
    """What waits: a request (or a paused choice) of an owner that takes `cost` running slots."""

    @property
    def owner(self) -> Owner: ...

    @property
    def cost(self) -> int: ...


E = TypeVar("E", bound=Entry)


class Shares:
    """What each user and each of its keys runs (or holds), and the users' weights."""

    def __init__(self, held: Iterable[tuple[Owner, int]] = ()) -> None:
        self.users: collections.Counter[str] = collections.Counter()
        self.keys: collections.Counter[tuple[str, str]] = collections.Counter()
        self.weights: dict[str, float] = {}
        for owner, count in held:
            self.add(owner, count)

    def add(self, owner: Owner, count: int = 1) -> None:
        self.users[owner.user] += count
        self.keys[(owner.user, owner.key)] += count
        self.weights[owner.user] = max(owner.weight, 1e-6)

    def copy(self) -> Shares:
        other = Shares()
        other.users, other.keys, other.weights = self.users.copy(), self.keys.copy(), dict(self.weights)
        return other

    def load(self, owner: Owner, extra: int = 0) -> float:
        return (self.users[owner.user] + extra) / self.weights.get(owner.user, max(owner.weight, 1e-6))

    def key_load(self, owner: Owner) -> float:
        """What the owner's API key runs divided by the key's weight: how its user's keys take turns."""
        return self.keys[(owner.user, owner.key)] / max(owner.key_weight, 1e-6)

    @property
    def total(self) -> int:
        return sum(self.users.values())


@dataclass(frozen=True)
class Policy:
    """An engine's policy: on (`fair`) or first come, first served; `slots` choices run at once and
    `queue_depth` more may wait."""

    fair: bool
    slots: int
    queue_depth: int

    def line(self, waiting: Sequence[E], running: Shares, limit: int | None = None) -> list[E]:
        """The order in which the waiting entries (given in arrival order) would start if nothing
        ended meanwhile: what admission follows and what queue places are read from."""
        if not self.fair:
            return list(waiting[:limit])
        # Each (user, key) is served in arrival order: only the oldest entry of each can go next.
        queues: dict[tuple[str, str], collections.deque[tuple[int, E]]] = {}
        for i, entry in enumerate(waiting):
            queues.setdefault((entry.owner.user, entry.owner.key), collections.deque()).append((i, entry))
        shares = running.copy()
        order: list[E] = []
        while queues and (limit is None or len(order) < limit):
            key = min(queues, key=lambda k: (shares.load(queues[k][0][1].owner),
                                             shares.key_load(queues[k][0][1].owner), queues[k][0][0]))
            _, entry = queues[key].popleft()
            if not queues[key]:
                del queues[key]
            shares.add(entry.owner, entry.cost)
            order.append(entry)
        return order

    def next(self, waiting: Sequence[E], running: Shares) -> E | None:
        """The entry to start next, or None when nothing waits."""
        first = self.line(waiting, running, limit=1)
        return first[0] if first else None

    def ahead(self, entry: Entry, waiting: Sequence[E], running: Shares) -> int | None:
        """The running slots the entries before `entry` in line would take; None if it does not wait."""
        ahead = 0
        for other in self.line(waiting, running):
            if other is entry:
                return ahead
            ahead += other.cost
        return None

    def fits(self, owner: Owner, cost: int, held: Shares) -> bool:
        """Whether a new entry may wait (else the engine answers engines.base.queue_full: HTTP 429);
        `held` is what every owner runs and has waiting. Once the room (slots + queue depth) is
        taken, first come, first served refuses everybody; fair share refuses only an owner that
        holds its weighted share of the room already (one holding nothing always gets one entry in)."""
        room = self.slots + self.queue_depth
        if held.total == 0 or held.total + cost <= room:
            return True
        if self.fair:
            weights = dict(held.weights)
            weights[owner.user] = max(owner.weight, 1e-6)
            holders = sum(w for u, w in weights.items() if held.users[u] or u == owner.user)
            share = room * weights[owner.user] / holders
            return held.users[owner.user] == 0 or held.users[owner.user] + cost <= share
        return False

    def victim(self, newcomer: Owner, cost: int, running: Shares) -> str | None:
        """The user one of whose running choices should pause for `newcomer`'s entry when no slot is
        free: the most loaded user that would, one choice lighter, still carry at least the
        newcomer's load with its entry. None with fair share off or when shares are even (so one
        running choice is never paused for another: they would swap places every step)."""
        if not self.fair:
            return None
        users = [u for u, n in running.users.items() if n > 0 and u != newcomer.user]
        if not users:
            return None
        heaviest = max(users, key=lambda u: running.users[u] / running.weights[u])
        if running.load(newcomer, cost) <= (running.users[heaviest] - 1) / running.weights[heaviest]:
            return heaviest
        return None

    def prefill(self, wants: Sequence[tuple[Owner, int]], room: int) -> list[int]:
        """How many of its prompt tokens each entry (in arrival order: owner, tokens left) evaluates
        in a step with `room` tokens. First come, first served fills the room in order; fair share
        gives each user a weighted part of the room, and what a user leaves goes to the others in
        order."""
        given = [0] * len(wants)
        if room <= 0:
            return given
        if self.fair:
            users: dict[str, float] = {}
            for owner, _ in wants:
                users[owner.user] = max(owner.weight, 1e-6)
            parts = {u: int(room * w / sum(users.values())) for u, w in users.items()}
            for i, (owner, tokens) in enumerate(wants):
                given[i] = min(tokens, parts[owner.user])
                parts[owner.user] -= given[i]
        left = room - sum(given)
        for i, (_, tokens) in enumerate(wants):
            more = min(tokens - given[i], left)
            given[i] += more
            left -= more
        return given


class Line(Generic[E]):
    """What waits for one engine, in arrival order (a paused choice goes back in front), read through
    the engine's Policy. Not thread-safe: the engine holds its own lock around it."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.entries: list[E] = []

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[E]:
        return iter(list(self.entries))

    def held(self, running: Shares) -> Shares:
        """What each owner runs and has waiting."""
        held = running.copy()
        for entry in self.entries:
            held.add(entry.owner, entry.cost)
        return held

    def fits(self, owner: Owner, cost: int, running: Shares) -> bool:
        """Whether the owner's new entry may wait (Policy.fits)."""
        return self.policy.fits(owner, cost, self.held(running))

    def add(self, entry: E) -> None:
        self.entries.append(entry)

    def put_back(self, entry: E) -> None:
        self.entries.insert(0, entry)

    def remove(self, entry: E) -> None:
        self.entries.remove(entry)

    def drop(self, gone: Callable[[E], bool]) -> list[E]:
        """Takes out the entries for which `gone` is true, and returns them."""
        dropped = [e for e in self.entries if gone(e)]
        if dropped:
            self.entries = [e for e in self.entries if not gone(e)]
        return dropped

    def next(self, running: Shares) -> E | None:
        return self.policy.next(self.entries, running)

    def ahead(self, entry: Entry, running: Shares) -> int | None:
        return self.policy.ahead(entry, self.entries, running)
