"""The predictive eviction policy on hand-made routing, and the simulator calling policies exactly as
the runtime cache does."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mixtral_offload.cache.simulate as sim
from mixtral_offload.cache.expert_cache import ExpertCache
from mixtral_offload.cache.policies import Predictive, make_policy
from mixtral_offload.cache.traces import synthetic_trace
from mixtral_offload.errors import MixtralOffloadError
from mixtral_offload.offload.model import group_tokens


def visit(policy, layer, experts, now):
    """One layer runs for one token, as the cache reports it; returns the clock after it."""
    for expert in sorted(experts):
        policy.on_access((layer, expert), 0.5, now)
        now += 1
    return now


def one_hot_hint(experts, num_experts=8):
    probs = np.full((1, num_experts), 0.01)
    probs[0, list(experts)] = 0.45
    return probs


def test_hint_decides_between_two_equally_used_experts():
    # Layer 1 alternates {2, 3} and {4, 5}, and its hint has always named the experts it then chose.
    policy, now = Predictive(), 0
    for token in range(12):
        chosen = (2, 3) if token % 2 == 0 else (4, 5)
        now = visit(policy, 0, (0, 1), now)
        policy.observe_hint(1, one_hot_hint(chosen))
        now = visit(policy, 1, chosen, now)
    # The next token: layer 0 runs, and the hint for layer 1 names 2 and 3 (the alternation agrees).
    now = visit(policy, 0, (0, 1), now)
    resident = {(0, 0), (0, 1), (1, 2), (1, 4)}
    policy.observe_hint(1, one_hot_hint((2, 3)))
    assert policy.victim(resident, {(0, 0), (0, 1)}, now) == (1, 4)
    # A hint that names 4 and 5 instead overrides what the alternation predicts.
    policy.observe_hint(1, one_hot_hint((4, 5)))
    assert policy.victim(resident, {(0, 0), (0, 1)}, now) == (1, 2)


def test_a_prefill_hint_counts_every_token():
    policy, now = Predictive(), 0
    for token in range(12):  # the hint has always been right
        chosen = (2, 3) if token % 2 == 0 else (4, 5)
        now = visit(policy, 0, (0, 1), now)
        policy.observe_hint(1, one_hot_hint(chosen))
        now = visit(policy, 1, chosen, now)
    now = visit(policy, 0, (0, 1), now)
    # two tokens in one forward: the first wants 2 and 6, the second 4 and 6; nobody wants 3
    policy.observe_hint(1, np.concatenate([one_hot_hint((2, 6)), one_hot_hint((4, 6))]))
    resident = {(0, 0), (0, 1), (1, 2), (1, 3), (1, 4)}
    assert policy.victim(resident, {(0, 0), (0, 1)}, now) == (1, 3)
    # 2 and 4 equally hinted: then the one chosen less lately (4 ran at the last token)
    assert policy.victim(resident - {(1, 3)}, {(0, 0), (0, 1)}, now) == (1, 2)


def test_layer_furthest_ahead_goes_first():
    # Every layer always picks the same experts: all equally likely, so the layer distance decides.
    policy, now = Predictive(), 0
    for _ in range(5):
        for layer in range(4):
            now = visit(policy, layer, (0, 1), now)
    now = visit(policy, 0, (0, 1), now)
    now = visit(policy, 1, (0, 1), now)
    now = visit(policy, 2, (0, 1), now)  # layer 2 runs: layer 3 is next, layer 1 is three visits away
    resident = {(3, 0), (0, 0), (1, 0), (2, 0), (2, 1)}
    assert policy.victim(resident, {(2, 0), (2, 1)}, now) == (1, 0)
    assert policy.victim(resident - {(1, 0)}, {(2, 0), (2, 1)}, now) == (0, 0)


def test_transitions_outweigh_recency():
    # One layer cycles A -> B -> C. After A, B always follows; C ran more recently than B but never after A.
    a, b, c = (0, 1), (2, 3), (4, 5)
    policy, now = Predictive(), 0
    for _ in range(10):
        for chosen in (a, b, c):
            now = visit(policy, 0, chosen, now)
            now += 1  # a gap in the clock: the next access starts a new visit of the same layer
    now = visit(policy, 0, a, now)
    resident = {(0, e) for e in range(6)}
    assert policy.victim(resident, {(0, 0), (0, 1)}, now) == (0, 4)


def test_predictive_refuses_a_negative_weight_and_all_protected():
    with pytest.raises(MixtralOffloadError):
        make_policy("predictive", wait_weight=-1.0)
    policy = Predictive()
    visit(policy, 0, (0, 1), 0)
    with pytest.raises(MixtralOffloadError):
        policy.victim({(0, 0), (0, 1)}, {(0, 0), (0, 1)}, 2)


class Recording:
    """Wraps a policy and logs every call with its arguments (collections sorted, hints rounded)."""

    def __init__(self, inner, log):
        self.inner, self.name, self.log = inner, inner.name, log

    def on_access(self, key, gate, now):
        self.log.append(("access", key, round(float(gate), 5), now))
        self.inner.on_access(key, gate, now)

    def on_insert(self, key, now):
        self.log.append(("insert", key, now))
        self.inner.on_insert(key, now)

    def on_evict(self, key):
        self.log.append(("evict", key))
        self.inner.on_evict(key)

    def observe_hint(self, layer, probs):
        self.log.append(("hint", layer, tuple(np.round(np.asarray(probs, dtype=np.float64).ravel(), 4))))
        self.inner.observe_hint(layer, probs)

    def victim(self, resident, protected, now):
        key = self.inner.victim(resident, protected, now)
        self.log.append(("victim", tuple(sorted(resident)), tuple(sorted(protected)), now, key))
        return key


class NullStore:
    """Slots that hold nothing: the cache's bookkeeping runs, experts compute zeros."""

    device = torch.device("cpu")
    direct_choice = False
    decode_threads = None

    def __init__(self, num_slots):
        self.num_slots = num_slots

    def fill(self, slot, key):
        return 1

    def run(self, slot, x):
        return torch.zeros_like(x)

    def run_direct(self, key, x):
        return torch.zeros_like(x)

    def close(self):
        pass


def runtime_replay(trace, policy, capacity, partition, prefetch, log):
    cache = ExpertCache(SimpleNamespace(block_nbytes=1), trace.num_layers, trace.top_k, NullStore(capacity),
                        policy=policy, prefetch=prefetch, partition=partition)
    cache.policies = [Recording(p, log) for p in cache.policies]
    x = torch.zeros(1, 2)
    for t in range(trace.num_tokens):
        for layer in range(trace.num_layers):
            if layer + 1 < trace.num_layers:
                cache.hint(layer + 1, torch.from_numpy(trace.hint_probs[t, layer][None, :]))
            routing = group_tokens(torch.from_numpy(trace.expert_ids[t, layer][None, :].astype(np.int64)),
                                   torch.from_numpy(trace.gates[t, layer][None, :]))
            for _ in cache.run(layer, x, routing):
                pass
    cache.close()
    return cache.stats


@pytest.mark.parametrize("policy", ["lru", "gate", "predictive", "density"])
@pytest.mark.parametrize("capacity,partition,prefetch", [(8, "shared", 0), (12, "layer", 0), (10, "shared", 2)])
def test_simulator_calls_the_policy_as_the_runtime_does(policy, capacity, partition, prefetch, monkeypatch):
    trace = synthetic_trace(30, num_layers=4, seed=11, predict_recall=0.6)
    sim_log, runtime_log = [], []
    monkeypatch.setattr(sim, "make_policy", lambda *a, **o: Recording(make_policy(*a, **o), sim_log))
    result = sim.simulate(trace, policy, capacity, partition, prefetch="trace" if prefetch else None)
    stats = runtime_replay(trace, policy, capacity, partition, prefetch, runtime_log)
    assert any(call[0] == "victim" for call in sim_log) and any(call[0] == "hint" for call in sim_log)
    assert sim_log == runtime_log
    assert (result.hits, result.misses) == (sum(stats.hits), sum(stats.misses))
    assert (result.prefetches, result.prefetch_hits) == (stats.prefetches, stats.prefetch_hits)
