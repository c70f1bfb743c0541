"""Eviction policies and the trace-replay simulator."""

import numpy as np
import pytest

from mixtral_offload.cache.policies import LFU, LRU, POLICIES, BeladyOPT, GateWeighted, make_policy
from mixtral_offload.cache.simulate import (
    format_table,
    hit_rate_table,
    partition_capacities,
    prefetch_recall,
    simulate,
)
from mixtral_offload.cache.traces import RoutingTrace, synthetic_trace
from mixtral_offload.errors import MixtralOffloadError


def one_layer_trace(experts, num_experts=8, gates=None):
    """A top-1 trace of one layer from a list of expert ids."""
    ids = np.array(experts)[:, None, None]
    g = np.ones(ids.shape) if gates is None else np.array(gates, dtype=float)[:, None, None]
    return RoutingTrace(ids, g, num_experts)


def random_trace(tokens, layers, experts, seed):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(experts)[:2] for _ in range(tokens * layers)]).reshape(tokens, layers, 2)
    return RoutingTrace(ids, np.full(ids.shape, 0.5), experts, source="uniform")


def cyclic_trace(tokens, layers, experts):
    """Each layer cycles through all its experts two at a time: the worst case for LRU."""
    t = np.arange(tokens)[:, None]
    first = (2 * t + np.arange(layers)[None, :]) % experts
    ids = np.stack([first, (first + 1) % experts], axis=2)
    return RoutingTrace(ids, np.full(ids.shape, 0.5), experts, source="cyclic")


def test_lru_exact_hits_and_evictions():
    # capacity 3: 0m 1m 2m 0h 3m(evicts 1) 1m(evicts 2) 0h 2m(evicts 3)
    res = simulate(one_layer_trace([0, 1, 2, 0, 3, 1, 0, 2]), "lru", 3)
    assert (res.hits, res.misses, res.requests) == (2, 6, 8)
    lru = LRU()
    for now, key in enumerate(["a", "b", "c"]):
        lru.on_insert(key, now)
        lru.on_access(key, 1.0, now)
    lru.on_access("a", 1.0, 3)
    assert lru.victim({"a", "b", "c"}, set(), 4) == "b"
    assert lru.victim({"a", "b", "c"}, {"b"}, 4) == "c"
    lru.on_evict("b")
    assert lru.victim({"a", "c"}, set(), 5) == "c"


def test_lfu_ties_deterministic():
    lfu = LFU()
    for now, key in enumerate([(0, 3), (0, 1), (0, 2), (0, 3)]):
        lfu.on_insert(key, now)
        lfu.on_access(key, 0.5, now)
    resident = {(0, 1), (0, 2), (0, 3)}
    assert lfu.victim(resident, set(), 9) == (0, 1)  # counts 1,1,2: the older of the two ones
    lfu2 = LFU()
    for key in [(0, 5), (0, 4)]:
        lfu2.on_insert(key, 0)
        lfu2.on_access(key, 0.5, 0)  # same count, same time: the smaller key
    assert lfu2.victim({(0, 5), (0, 4)}, set(), 1) == (0, 4)
    # counts survive eviction
    lfu.on_evict((0, 3))
    lfu.on_insert((0, 3), 10)
    lfu.on_access((0, 3), 0.5, 10)
    assert lfu.victim({(0, 1), (0, 3)}, set(), 11) == (0, 1)


def test_gate_weighted_prefers_high_gates_and_recency():
    gate = GateWeighted(half_life=4)
    gate.on_access("low", 0.1, 0)
    gate.on_access("high", 0.9, 0)
    assert gate.victim({"low", "high"}, set(), 1) == "low"
    gate.on_access("low", 0.1, 20)  # five half-lives later a small recent gate beats a big old one
    assert gate.victim({"low", "high"}, set(), 21) == "high"
    tie = GateWeighted()
    for key in ["b", "a", "c"]:
        tie.on_access(key, 0.5, 7)
    assert tie.victim({"a", "b", "c"}, set(), 8) == "a"  # equal score and time: the smaller key
    tie.on_access("a", 0.5, 8)
    assert tie.victim({"a", "b", "c"}, {"b"}, 9) == "c"


def test_opt_evicts_furthest_next_use():
    future = ["a", "b", "c", "a", "b", "d", "a", "c"]
    opt = BeladyOPT(future)
    for now in range(3):
        opt.on_insert(future[now], now)
        opt.on_access(future[now], 1.0, now)
    # at 3 'a' is used next at 3, 'b' at 4, 'c' at 7
    assert opt.victim({"a", "b", "c"}, set(), 3) == "c"
    res = simulate(one_layer_trace([0, 1, 2, 0, 1, 3, 0, 2]), "opt", 3)
    assert res.hits == 4  # 0 1 2 m, 0 1 h, 3 m (evicts 1, never used again), 0 2 h


def all_traces():
    return [
        random_trace(120, 8, 8, seed=1),
        synthetic_trace(150, num_layers=8, seed=2),
        synthetic_trace(150, num_layers=8, seed=3, skew=1.0),
        cyclic_trace(80, 8, 8),
    ]


@pytest.mark.parametrize("trace_index", range(4))
def test_opt_is_an_upper_bound(trace_index):
    trace = all_traces()[trace_index]
    for capacity in (16, 24, 32, 48):
        best = simulate(trace, "opt", capacity, "shared").hit_rate
        for partition in ("shared", "layer"):
            for policy in POLICIES:
                assert simulate(trace, policy, capacity, partition).hit_rate <= best + 1e-12, (policy, partition, capacity)


def test_cyclic_trace_defeats_lru_but_not_opt():
    trace = cyclic_trace(80, 8, 8)
    assert simulate(trace, "lru", 24, "layer").hits == 0
    assert simulate(trace, "opt", 24, "layer").hits > 0


class Checking:
    """Wraps a policy and fails if it names a protected or non-resident victim."""

    def __init__(self, inner):
        self.inner, self.name, self.victims = inner, inner.name, 0

    def on_access(self, key, gate, now):
        self.inner.on_access(key, gate, now)

    def on_insert(self, key, now):
        self.inner.on_insert(key, now)

    def on_evict(self, key):
        self.inner.on_evict(key)

    def victim(self, resident, protected, now):
        key = self.inner.victim(resident, protected, now)
        assert key in resident and key not in protected
        self.victims += 1
        return key


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_protected_keys_never_evicted(name, monkeypatch):
    import mixtral_offload.cache.simulate as sim

    made = []

    def wrapped(policy, future=None, **options):
        made.append(Checking(make_policy(policy, future, **options)))
        return made[-1]

    monkeypatch.setattr(sim, "make_policy", wrapped)
    trace = synthetic_trace(60, num_layers=4, seed=4)
    for capacity, partition, prefetch in [(2, "shared", None), (3, "shared", 0.5), (8, "layer", 1.0), (12, "layer", None)]:
        simulate(trace, name, capacity, partition, prefetch=prefetch)
    assert sum(p.victims for p in made) > 0
    policy = make_policy(name, future=[(0, 0), (0, 1)]) if name == "opt" else make_policy(name)
    for now, key in enumerate([(0, 0), (0, 1)]):
        policy.on_insert(key, now)
        policy.on_access(key, 1.0, now)
    assert policy.victim({(0, 0), (0, 1)}, {(0, 0)}, 2) == (0, 1)
    with pytest.raises(MixtralOffloadError):
        policy.victim({(0, 0), (0, 1)}, {(0, 0), (0, 1)}, 2)


def test_capacity_below_top_k_refused():
    trace = synthetic_trace(10, num_layers=4, seed=0)
    with pytest.raises(MixtralOffloadError, match="top_k"):
        simulate(trace, "lru", 1)
    with pytest.raises(MixtralOffloadError, match="top_k"):
        simulate(trace, "lru", 7, "layer")  # 2, 2, 2, 1 slots
    assert partition_capacities(9, 4, "layer", 2) == [3, 2, 2, 2]
    with pytest.raises(MixtralOffloadError):
        partition_capacities(9, 4, "ring", 2)


def test_unknown_and_offline_policies():
    with pytest.raises(MixtralOffloadError, match="unknown"):
        make_policy("mru")
    with pytest.raises(MixtralOffloadError, match="future"):
        make_policy("opt")
    assert isinstance(make_policy("gate", half_life=10.0), GateWeighted)


def test_prefetch_accounting():
    trace = synthetic_trace(100, num_layers=6, seed=7)
    base = simulate(trace, "lru", 24, "layer")
    perfect = simulate(trace, "lru", 24, "layer", prefetch=1.0)
    useless = simulate(trace, "lru", 24, "layer", prefetch=0.0)
    for res in (perfect, useless):
        assert res.prefetches == res.prefetch_hits + res.wasted_prefetches
        assert res.hits + res.misses == res.requests
    assert useless.prefetch_hits == 0 and useless.wasted_prefetches > 0
    # perfect guesses leave only layer 0's misses
    assert perfect.misses == sum(perfect.layer_misses[:1]) and perfect.misses < base.misses
    assert perfect.wasted_prefetches == 0


def test_prefetch_from_trace_predictions_and_recall():
    trace = synthetic_trace(400, num_layers=6, seed=8, predict_recall=0.7)
    assert prefetch_recall(trace) == pytest.approx(0.7, abs=0.03)
    res = simulate(trace, "lru", 24, "shared", prefetch="trace")
    assert res.prefetch_hits > 0
    with pytest.raises(MixtralOffloadError):
        prefetch_recall(synthetic_trace(10, num_layers=2))
    with pytest.raises(MixtralOffloadError):
        simulate(synthetic_trace(10, num_layers=2), "lru", 4, prefetch="trace")


def test_hit_rate_table_and_format():
    trace = synthetic_trace(80, num_layers=4, seed=9)
    rows = hit_rate_table(trace, [6, 8, 16], policies=("lru", "opt"))
    assert len(rows) == 3 * 2 * 2
    shared_opt = [r for r in rows if r.policy == "opt" and r.partition == "shared"]
    assert all(r.vs_opt == pytest.approx(1.0) for r in shared_opt)
    too_small = [r for r in rows if r.capacity == 6 and r.partition == "layer"]
    assert all(r.hit_rate is None for r in too_small)  # 6 experts over 4 layers: 1 slot in some pools
    text = format_table(rows)
    assert "lru" in text and "opt" in text and "-" in text
    assert len(text.splitlines()) == 2 + 4
