"""Eviction policies for the expert cache, behind one small protocol.

A cache (the runtime's ExpertCache, or the simulator) owns the resident set and tells its policy
what happens; the policy only keeps scores and, when asked, names a victim. Keys are opaque and
hashable: (layer, expert) here. `now` is a logical clock that increases with each request; Belady's
OPT needs it to be the request's position in the sequence it was given.

Call order the cache follows (ExpertCache.run, and the simulator after it), per layer: observe_hint
for the next layer (when the model computes one), then on_access for each expert the layer uses, then
for each miss victim (when full), on_evict(victim), on_insert(key); then the same for each prefetch.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Protocol

import numpy as np

from mixtral_offload.cache.routing_stats import HintCalibration, LayerRouting
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

    def observe_hint(self, layer: int, probs: np.ndarray) -> None:
        """Router probabilities [T, E] guessed for `layer`'s T tokens before that layer runs."""


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

    def observe_hint(self, layer: int, probs: np.ndarray) -> None:
        pass

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

    def observe_hint(self, layer: int, probs: np.ndarray) -> None:
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

    def observe_hint(self, layer: int, probs: np.ndarray) -> None:
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

    def observe_hint(self, layer: int, probs: np.ndarray) -> None:
        pass

    def victim(self, resident: Collection[Key], protected: Collection[Key], now: int) -> Key:
        nxt = self._next
        never = len(self._index.future)
        candidates = _candidates(resident, protected)
        furthest = max(nxt.get(k, never) for k in candidates)
        return min(k for k in candidates if nxt.get(k, never) == furthest)


class Predictive:
    """Evicts the expert whose next request is expected furthest away, counted in layer visits: the
    layers until its layer runs again, plus, if it is not chosen there (1 - p), the wait for a later
    pick (layers / q), weighed by `wait_weight`. p comes from the next layer's router probabilities
    (the hint, calibrated against what the layer then chose) where the layer has one pending,
    otherwise from the layer's learned token-to-token transitions and recent choices; q is how often
    it was chosen lately. Keys must be (layer, expert). All experts of a pool cost the same to re-read,
    so the cost does not change the order. Ties: the smaller key.
    """

    name = "predictive"

    def __init__(self, wait_weight: float = 0.1) -> None:
        if wait_weight < 0:
            raise MixtralOffloadError(f"wait_weight must be >= 0, got {wait_weight}")
        self._wait_weight = wait_weight  # < 1: the learned chances are weak, the layer distance is certain
        self._layers: dict[int, LayerRouting] = {}
        self._num_layers = 0
        self._num_experts = 0
        self._calibration = HintCalibration()
        self._hints: dict[int, np.ndarray] = {}  # layer -> [E] chance each expert is chosen, not yet run
        self._visit = -1  # the layer of the visit in progress
        self._visit_hint: np.ndarray | None = None  # the hint that layer had, to calibrate against
        self._last_now = -2
        self._terms: dict[int, list[float]] = {}  # layer -> [E] _expert_terms, until the layer's state changes

    def _layer(self, layer: int, num_experts: int) -> LayerRouting:
        if num_experts > self._num_experts:
            self._num_experts = num_experts
            for state in self._layers.values():
                state.grow(num_experts)
            self._terms.clear()
        if layer not in self._layers:
            self._layers[layer] = LayerRouting(self._num_experts)
            self._num_layers = max(self._num_layers, layer + 1)
        return self._layers[layer]

    def observe_hint(self, layer: int, probs: np.ndarray) -> None:
        probs = np.asarray(probs, dtype=np.float64).reshape(-1, np.shape(probs)[-1])  # [T, E]
        self._layer(layer, probs.shape[1])
        self._hints[layer] = 1.0 - np.prod(1.0 - probs, axis=0)  # [E] chosen by any of the T tokens
        self._terms.pop(layer, None)

    def on_access(self, key: Key, gate: float, now: int) -> None:
        layer, expert = key
        state = self._layer(layer, expert + 1)
        if layer != self._visit or now != self._last_now + 1:  # a new visit begins
            if self._visit >= 0:
                chosen = self._layers[self._visit].finish_visit()
                if self._visit_hint is not None:
                    self._calibration.observe(self._visit_hint, chosen)
                self._terms.pop(self._visit, None)
            self._visit, self._visit_hint = layer, self._hints.pop(layer, None)
        state.current.append(expert)
        self._terms.pop(layer, None)
        self._last_now = now

    def on_insert(self, key: Key, now: int) -> None:
        self._layer(key[0], key[1] + 1)

    def on_evict(self, key: Key) -> None:
        pass

    def _next_chance(self, layer: int) -> np.ndarray:
        """[E] chance that each expert is chosen at `layer`'s next visit: the calibrated hint where one is
        pending, otherwise the learned transitions and recent choices."""
        hint = self._hints.get(layer)
        return self._layers[layer].chance() if hint is None else self._calibration.chance(hint)

    def _expert_terms(self, layer: int) -> list[float]:
        """[E] expected visits of `layer` after its next one until each expert is chosen, / layers."""
        state = self._layers[layer]
        return ((1.0 - self._next_chance(layer)) / state.fresh_chance()).tolist()

    def _score(self, ahead: int, term: float) -> float:
        """The eviction score (largest goes) of an expert `ahead` visits from its layer's next run."""
        return ahead + self._wait_weight * self._num_layers * term

    def victim(self, resident: Collection[Key], protected: Collection[Key], now: int) -> Key:
        best, best_score = None, -1.0
        for key in _candidates(resident, protected):
            layer, expert = key
            if layer not in self._layers:  # never seen: nothing says it will be needed
                return key
            terms = self._terms.get(layer)
            if terms is None:
                terms = self._terms[layer] = self._expert_terms(layer)
            ahead = (layer - self._visit) % self._num_layers or self._num_layers
            score = self._score(ahead, terms[expert])
            if score > best_score or (score == best_score and key < best):
                best, best_score = key, score
        return best


class HitDensity(Predictive):
    """An online approximation of Belady: evicts the expert expected to give the fewest hits per slot
    held, p / ahead, where ahead is the layer visits until its layer runs again (certain: the layers run
    in order) and p the chance it is chosen there (the calibrated hint where the layer has one pending,
    otherwise its learned transitions and recent choices; Predictive's estimate, never below
    `min_chance`). A slot held for a far layer costs more visits than one for the next layer. Keys must
    be (layer, expert); all experts of a pool cost the same to re-read. Ties: the smaller key.
    """

    name = "density"

    def __init__(self, min_chance: float = 0.02) -> None:
        if not 0 < min_chance <= 1:
            raise MixtralOffloadError(f"min_chance must be in (0, 1], got {min_chance}")
        super().__init__()
        self._min_chance = min_chance

    def _expert_terms(self, layer: int) -> list[float]:
        """[E] 1 / p, the slot visits held per expected hit at the layer's next visit, per visit ahead."""
        return (1.0 / np.maximum(self._next_chance(layer), self._min_chance)).tolist()

    def _score(self, ahead: int, term: float) -> float:
        """Slot visits held per expected hit (largest goes)."""
        return ahead * term


POLICIES: dict[str, Callable[..., EvictionPolicy]] = {
    "lru": LRU,
    "lfu": LFU,
    "gate": GateWeighted,
    "opt": BeladyOPT,
    "predictive": Predictive,
    "density": HitDensity,
}

OFFLINE_POLICIES = frozenset({"opt"})  # need the future request sequence
DEFAULT_POLICY = "density"  # at least gate's hit rate in every cell measured (docs/cache.md)


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
