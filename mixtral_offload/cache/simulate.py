"""Replay a routing trace against an eviction policy and a cache size, counting hits and misses.

The simulated cache holds `capacity` experts, either in one pool shared by all layers or split
evenly into one pool per layer. Requests arrive in runtime order (token-major, layer-minor, k per
layer); the experts of the layer being computed are protected from eviction. With prefetch, the
guesses for layer l are loaded while layer l - 1 computes, before layer l's requests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from mixtral_offload.cache.policies import OFFLINE_POLICIES, POLICIES, EvictionPolicy, FutureIndex, make_policy
from mixtral_offload.cache.traces import RoutingTrace, noisy_predictions, request_sequence
from mixtral_offload.errors import MixtralOffloadError

PARTITIONS = ("shared", "layer")
DEFAULT_POLICIES = ("lru", "lfu", "gate", "opt")


@dataclass
class SimResult:
    policy: str
    partition: str
    capacity: int  # experts the cache holds, all partitions together
    requests: int
    hits: int  # prefetch hits included
    misses: int  # demand misses: a read the layer had to wait for
    prefetches: int = 0  # experts loaded ahead of their layer
    prefetch_hits: int = 0  # prefetched experts the layer then used
    wasted_prefetches: int = 0  # prefetched experts the layer did not use
    layer_hits: list[int] = field(default_factory=list)  # [L]
    layer_misses: list[int] = field(default_factory=list)  # [L]

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


# A prefetch is read only where the next layer's hinted router probability reaches this: on the demo
# model's trace lower guesses are mostly wrong, and each wasted read costs a whole expert (docs/cache.md).
PREFETCH_MIN_PROB = 0.4


def partition_capacities(capacity: int, num_layers: int, partition: str, top_k: int) -> list[int]:
    """Slots per partition: one pool, or `capacity` split evenly over layers (earlier layers get
    the remainder). Refuses sizes below top_k per pool: a layer's experts must fit at once."""
    if partition not in PARTITIONS:
        raise MixtralOffloadError(f"unknown cache partition {partition!r}; choose one of {', '.join(PARTITIONS)}")
    if partition == "shared":
        sizes = [capacity]
    else:
        base, extra = divmod(capacity, num_layers)
        sizes = [base + (1 if layer < extra else 0) for layer in range(num_layers)]
    if min(sizes) < top_k:
        raise MixtralOffloadError(
            f"a cache of {capacity} experts ({partition} partition) leaves {min(sizes)} slots in a pool; "
            f"each pool needs at least top_k = {top_k}"
        )
    return sizes


def simulate(
    trace: RoutingTrace,
    policy: str,
    capacity: int,
    partition: str = "shared",
    prefetch: float | str | None = None,
    seed: int = 0,
    policy_options: dict[str, float] | None = None,
    prefetch_min_prob: float | None = None,
) -> SimResult:
    """Replay `trace` against `policy` (a name in POLICIES) in a cache of `capacity` experts.

    prefetch: None for demand paging only; "trace" to use the trace's recorded next-layer guesses;
    a float p to make guesses that hold each true expert with probability p (seeded by `seed`).
    prefetch_min_prob: with "trace", guesses whose hinted probability is lower are not read
    (default PREFETCH_MIN_PROB, as the runtime).
    The trace's hint probabilities, when it has them, reach the policy as they do in the runtime.
    """
    L, k = trace.num_layers, trace.top_k
    sizes = partition_capacities(capacity, L, partition, k)
    seq = request_sequence(trace)
    keys, gates = seq.keys, seq.gate.tolist()
    future = FutureIndex(keys) if policy in OFFLINE_POLICIES else None
    policies = [make_policy(policy, future, **(policy_options or {})) for _ in sizes]
    result = SimResult(policy, partition, capacity, len(keys), 0, 0, layer_hits=[0] * L, layer_misses=[0] * L)
    cache = _Replay(policies, sizes, partition == "shared", result)
    min_prob = PREFETCH_MIN_PROB if prefetch_min_prob is None else prefetch_min_prob
    guesses = _guesses(trace, prefetch, seed, min_prob)
    hints = trace.hint_probs
    pos = 0
    for t in range(trace.num_tokens):
        for layer in range(L):
            if hints is not None and layer + 1 < L:
                cache.policy(layer + 1).observe_hint(layer + 1, hints[t, layer][None, :])
            requests = dict(zip(keys[pos : pos + k], gates[pos : pos + k]))
            pos += k
            cache.forward(layer, requests, guesses[t][layer] if guesses is not None else None)
    return result


class _Replay:
    """ExpertCache's bookkeeping and policy calls for one token at a time, without slots or reads:
    which keys are resident, which are still loading (inserted, not yet used: the runtime protects
    them until it waits for them), and which were prefetched for a layer."""

    def __init__(self, policies: list[EvictionPolicy], sizes: list[int], shared: bool, result: SimResult):
        self.policies, self.sizes, self.shared, self.result = policies, sizes, shared, result
        self.resident: list[set] = [set() for _ in sizes]
        self.loading: set = set()
        self.prefetched: dict[int, set] = {}  # layer -> keys read ahead for it, not yet used
        self.now = 0

    def policy(self, layer: int) -> EvictionPolicy:
        return self.policies[0 if self.shared else layer]

    def _resident(self, key) -> set:
        return self.resident[0 if self.shared else key[0]]

    def forward(self, layer: int, requests: dict, guess: list[int] | None) -> None:
        """One layer of one token, as ExpertCache.run with T = 1: accesses, misses, prefetch, compute."""
        keys = sorted(requests)
        for key in keys:
            self.policy(layer).on_access(key, requests[key], self.now)
            self.now += 1
        started = self.prefetched.pop(layer, set())
        used = started & requests.keys()
        self.loading -= started - used  # the runtime waits for a wasted prefetch here: evictable from now on
        self.result.prefetch_hits += len(used)
        self.result.wasted_prefetches += len(started) - len(used)
        resident = self._resident(keys[0])
        order = sorted(keys, key=lambda key: (key in self.loading, key not in resident))
        for key in order:
            hit = key in resident
            self.result.hits += hit
            self.result.misses += not hit
            (self.result.layer_hits if hit else self.result.layer_misses)[layer] += 1
        wanted = set(keys)
        self._read_ahead(order, wanted)
        self._prefetch(layer + 1, wanted, guess)
        for key in order:
            if key not in resident and self._reserve(key, set()):
                self._start_read(key)
            self._read_ahead(order, wanted)
            self.loading.discard(key)  # the runtime waits for the read before computing

    def _reserve(self, key, protected: set) -> bool:
        """Room for key: a free slot, or the policy's victim evicted; False if every resident key is kept."""
        resident = self._resident(key)
        if len(resident) < self.sizes[0 if self.shared else key[0]]:
            return True
        keep = protected | self.loading
        if all(k in keep for k in resident):
            return False
        policy = self.policy(key[0])
        victim = policy.victim(resident, keep, self.now)
        resident.remove(victim)
        policy.on_evict(victim)
        return True

    def _start_read(self, key) -> None:
        self._resident(key).add(key)
        self.policy(key[0]).on_insert(key, self.now)
        self.loading.add(key)

    def _read_ahead(self, order: list, wanted: set) -> None:
        for key in order:
            if key not in self._resident(key):
                if not self._reserve(key, wanted):
                    return
                self._start_read(key)

    def _prefetch(self, layer: int, in_use: set, guess: list[int] | None) -> None:
        if not guess:
            return
        protected = in_use | {(layer, e) for e in guess if e >= 0}
        started = self.prefetched.setdefault(layer, set())
        for expert in guess:
            key = (layer, expert)
            if expert < 0 or key in self._resident(key):
                continue
            if not self._reserve(key, protected):
                return
            self._start_read(key)
            started.add(key)
            self.result.prefetches += 1


def _guesses(trace: RoutingTrace, prefetch: float | str | None, seed: int, min_prob: float = 0.0) -> list | None:
    """[T][L][m] experts guessed for layer l + 1 at layer l, as nested lists (-1: none), or None."""
    if prefetch is None:
        return None
    if prefetch == "trace":
        if trace.predicted_next is None:
            raise MixtralOffloadError("prefetch='trace' needs a trace recorded with next-layer predictions")
        guesses = trace.predicted_next.astype(np.int64)
        if min_prob > 0 and trace.hint_probs is not None:
            probs = np.take_along_axis(trace.hint_probs, np.maximum(guesses, 0), axis=-1)
            guesses[probs < min_prob] = -1
        return guesses.tolist()
    if isinstance(prefetch, str) or not 0.0 <= float(prefetch) <= 1.0:
        raise MixtralOffloadError(f"prefetch must be None, 'trace' or a recall in [0, 1], got {prefetch!r}")
    rng = np.random.default_rng(seed)
    return noisy_predictions(trace.expert_ids, trace.num_experts, float(prefetch), rng).tolist()


def prefetch_recall(trace: RoutingTrace) -> float:
    """Fraction of the experts actually chosen at layer l + 1 that were among those predicted at l."""
    if trace.predicted_next is None:
        raise MixtralOffloadError("this trace holds no next-layer predictions")
    if trace.num_layers < 2:
        raise MixtralOffloadError("prefetch recall needs at least 2 layers")
    actual = trace.expert_ids[:, 1:, :]  # [T, L-1, k]
    guessed = trace.predicted_next[:, :-1, :]  # [T, L-1, m]
    found = (actual[..., :, None] == guessed[..., None, :]).any(axis=-1)
    return float(found.mean())


@dataclass
class TableRow:
    policy: str
    partition: str
    capacity: int
    capacity_fraction: float  # of all L * E experts
    hit_rate: float | None  # None: the size is too small for this partition
    vs_opt: float | None  # hit rate / shared OPT's at the same capacity (the true upper bound)
    hits: int = 0
    misses: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    wasted_prefetches: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def hit_rate_table(
    trace: RoutingTrace,
    capacities: Iterable[int],
    policies: Sequence[str] = DEFAULT_POLICIES,
    partitions: Sequence[str] = PARTITIONS,
    prefetch: float | str | None = None,
    seed: int = 0,
    policy_options: dict[str, dict[str, float]] | None = None,
) -> list[TableRow]:
    """Hit rates of every (partition, policy) at every capacity, each also as a fraction of
    demand-paging OPT with one shared pool at that capacity."""
    for name in policies:
        if name not in POLICIES:
            raise MixtralOffloadError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    total = trace.num_layers * trace.num_experts
    options = policy_options or {}
    rows: list[TableRow] = []
    for capacity in capacities:
        opt = simulate(trace, "opt", capacity, "shared").hit_rate
        for partition in partitions:
            for name in policies:
                fraction = capacity / total
                try:
                    res = simulate(trace, name, capacity, partition, prefetch, seed, options.get(name))
                except MixtralOffloadError:
                    rows.append(TableRow(name, partition, capacity, fraction, None, None))
                    continue
                vs_opt = res.hit_rate / opt if opt > 0 else None
                rows.append(
                    TableRow(
                        name, partition, capacity, fraction, res.hit_rate, vs_opt,
                        res.hits, res.misses, res.prefetches, res.prefetch_hits, res.wasted_prefetches,
                    )
                )
    return rows


def format_table(rows: Sequence[TableRow]) -> str:
    """Rows as text: one line per (partition, policy), one column per capacity,
    each cell 'hit rate (fraction of shared OPT)'."""
    capacities = sorted({row.capacity for row in rows})
    fractions = {row.capacity: row.capacity_fraction for row in rows}
    cell = {(row.partition, row.policy, row.capacity): row for row in rows}
    lines_order = list(dict.fromkeys((row.partition, row.policy) for row in rows))
    width = 15
    head = f"{'partition':<10}{'policy':<12}" + "".join(
        f"{f'{c} ({fractions[c]:.1%})':>{width}}" for c in capacities
    )
    lines = ["hit rate (fraction of shared-cache OPT) by cache size in experts", head]
    for partition, policy in lines_order:
        cells = []
        for c in capacities:
            row = cell.get((partition, policy, c))
            if row is None or row.hit_rate is None:
                cells.append(f"{'-':>{width}}")
            else:
                ratio = f"{row.vs_opt:.2f}" if row.vs_opt is not None else "-"
                cells.append(f"{f'{row.hit_rate:.3f} ({ratio})':>{width}}")
        lines.append(f"{partition:<10}{policy:<12}" + "".join(cells))
    return "\n".join(lines)
