"""Eviction policies for the expert cache, behind one small protocol.

A cache (the runtime's ExpertCache, or the simulator) owns the resident set and tells its policy
what happens; the policy only keeps scores and, when asked, names a victim. Keys are opaque and
hashable: (layer, expert) here. `now` is a logical clock that increases with each request; Belady's
OPT needs it to be the request's position in the sequence it was given.

Call order the cache follows: on a hit, on_access; on a miss, victim (when full), on_evict(victim),
on_insert(key), on_access(key). A prefetch is an on_insert without an on_access.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Protocol

from mixtral_offload.errors import MixtralOffloadError

Key = Hashable


class EvictionPolicy(Protocol):
    name: str

    def on_access(self, key: Key, gate: float, now: int) -> None:
        """`key` was used, with router weight `gate`, at time `now`."""

    def on_insert(self, key: Key, now: int) -> None:
        """`key` became resident (demand miss or prefetch)."""

    def on_evict(self, key: Key) -> None:
        """`key` left the cache."""

    def victim(self, resident: Collection[Key], protected: Collection[Key], now: int) -> Key:
        """The resident key to evict; never one in `protected` (in use by the current layer)."""


def _candidates(resident: Collection[Key], protected: Collection[Key]) -> list[Key]:
    candidates = [key for key in resident if key not in protected]
    if not candidates:
        raise MixtralOffloadError(
            f"no expert can be evicted: all {len(resident)} resident experts are in use; the cache needs more slots"
        )
    return candidates


class LRU:
    """Least recently used: the baseline."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def on_access(self, key: Key, gate: float, now: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_insert(self, key: Key, now: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_evict(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, resident: Collection[Key], protected: Collection[Key], now: int) -> Key:
        for key in self._order:
            if key in resident and key not in protected:
                return key
        # resident keys the policy never heard of (should not happen) go first, in a fixed order
        return min(_candidates(resident, protected))


class LFU:
    """Least frequently used; counts survive eviction (an expert's popularity is a property of the
    model, not of its stay in the cache). Ties: least recently used, then the smaller key."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[Key, int] = {}
        self._last: dict[Key, int] = {}

    def on_access(self, key: Key, gate: float, now: int) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = now

    def on_insert(self, key: Key, now: int) -> None:
        self._last.setdefault(key, now)

    def on_evict(self, key: Key) -> None:
        pass

    def victim(self, resident: Collection[Key], protected: Collection[Key], now: int) -> Key:
        count, last = self._count, self._last
        return min(_candidates(resident, protected), key=lambda k: (count.get(k, 0), last.get(k, -1), k))


class GateWeighted:
    """Recency and frequency weighted by the router: each key's score is the sum of the gate
    weights it received, each decayed by half every `half_life` clock ticks. Evicts the lowest
    score; ties go to the least recently used, then the smaller key.

    The score is kept as log(score) + now * ln2 / half_life, which orders keys the same way at any
    later time, so nothing has to be re-decayed when the clock moves.
    """

    name = "gate"

    def __init__(self, half_life: float = 256.0, min_gate: float = 1e-3) -> None:
        if half_life <= 0:
            raise MixtralOffloadError(f"half_life must be positive, got {half_life}")
        self._rate = math.log(2.0) / half_life
        self._min_gate = min_gate  # a zero gate would give log(0)
        self._level: dict[Key, float] = {}
        self._last: dict[Key, int] = {}

    def on_access(self, key: Key, gate: float, now: int) -> None:
        gate = max(float(gate), self._min_gate)
        shift = now * self._rate
        old = self._level.get(key)
        decayed = math.exp(old - shift) if old is not None else 0.0
        self._level[key] = math.log(decayed + gate) + shift
        self._last[key] = now

    def on_insert(self, key: Key, now: int) -> None:
        # a prefetched key starts as if it had received the smallest gate now
        if key not in self._level:
            self._level[key] = math.log(self._min_gate) + now * self._rate
        self._last.setdefault(key, now)

    def on_evict(self, key: Key) -> None:
        pass

    def victim(self, resident: Collection[Key], protected: Collection[Key], now: int) -> Key:
        level, last = self._level, self._last
        return min(_candidates(resident, protected), key=lambda k: (level.get(k, -math.inf), last.get(k, -1), k))


class FutureIndex:
    """Where each key is requested in a sequence; shared by the OPT policies of a partitioned cache."""

    def __init__(self, future: Sequence[Key]) -> None:
        self.future = list(future)
        self.positions: dict[Key, list[int]] = {}
        for i, key in enumerate(self.future):
            self.positions.setdefault(key, []).append(i)
        never = len(self.future)
        self.next_use = [never] * len(self.future)  # [R] next position of the same key, or R
        seen: dict[Key, int] = {}
        for i in range(len(self.future) - 1, -1, -1):
            key = self.future[i]
            self.next_use[i] = seen.get(key, never)
            seen[key] = i

    def first_use_from(self, key: Key, now: int) -> int:
        """The first position >= now where `key` is requested, or len(future)."""
        positions = self.positions.get(key)
        if not positions:
            return len(self.future)
        i = bisect.bisect_left(positions, now)
        return positions[i] if i < len(positions) else len(self.future)


class BeladyOPT:
    """Belady's offline optimum for demand paging: evict the key whose next use is furthest away.

    Offline only: it is given the whole request sequence, and `now` must be the position of the
    request in it. Ties (several never used again): the smaller key.
    """

    name = "opt"

    def __init__(self, future: Sequence[Key] | FutureIndex) -> None:
        self._index = future if isinstance(future, FutureIndex) else FutureIndex(future)
        self._next: dict[Key, int] = {}

    def on_access(self, key: Key, gate: float, now: int) -> None:
        index = self._index
        if 0 <= now < len(index.future) and index.future[now] == key:
            self._next[key] = index.next_use[now]
        else:
            self._next[key] = index.first_use_from(key, now + 1)

    def on_insert(self, key: Key, now: int) -> None:
        self._next[key] = self._index.first_use_from(key, now)

    def on_evict(self, key: Key) -> None:
        self._next.pop(key, None)

    def victim(self, resident: Collection[Key], protected: Collection[Key], now: int) -> Key:
        nxt = self._next
        never = len(self._index.future)
        candidates = _candidates(resident, protected)
        furthest = max(nxt.get(k, never) for k in candidates)
        return min(k for k in candidates if nxt.get(k, never) == furthest)


POLICIES: dict[str, Callable[..., EvictionPolicy]] = {
    "lru": LRU,
    "lfu": LFU,
    "gate": GateWeighted,
    "opt": BeladyOPT,
}

OFFLINE_POLICIES = frozenset({"opt"})  # need the future request sequence


def make_policy(name: str, future: Sequence[Key] | FutureIndex | None = None, **options: float) -> EvictionPolicy:
    """A policy by its registry name; `future` is required by (and only passed to) offline ones."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise MixtralOffloadError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    if name in OFFLINE_POLICIES:
        if future is None:
            raise MixtralOffloadError(f"policy {name!r} is offline: it needs the future request sequence")
        return cls(future, **options)
    return cls(**options)
