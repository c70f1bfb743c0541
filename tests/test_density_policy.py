"""The hit-density eviction policy on hand-made routing, and every online policy deciding from the past
only: its calls on a trace's prefix do not change when the rest of the trace does."""

import numpy as np
import pytest

import mixtral_offload.cache.simulate as sim
from mixtral_offload.cache.policies import OFFLINE_POLICIES, POLICIES, HitDensity, make_policy
from mixtral_offload.cache.routing_stats import LayerRouting
from mixtral_offload.cache.traces import RoutingTrace, synthetic_trace
from mixtral_offload.errors import MixtralOffloadError

from test_predictive_policy import Recording, visit


def run_tokens(policy, choices, tokens, now=0):
    """`tokens` tokens through the layers in order; layer l always chooses choices[l]."""
    for _ in range(tokens):
        for layer, experts in enumerate(choices):
            now = visit(policy, layer, experts, now)
    return now


def test_equal_chances_evict_the_layer_furthest_ahead():
    policy = HitDensity()
    now = run_tokens(policy, [(0, 1)] * 4, 6)
    for layer in range(3):  # layer 2 runs: layer 3 is next, then 0, then 1
        now = visit(policy, layer, (0, 1), now)
    resident = {(3, 0), (0, 0), (1, 0), (2, 0), (2, 1)}
    in_use = {(2, 0), (2, 1)}
    assert policy.victim(resident, in_use, now) == (1, 0)
    assert policy.victim(resident - {(1, 0)}, in_use, now) == (0, 0)
    assert policy.victim({(3, 0), (2, 0), (2, 1)}, in_use, now) == (3, 0)


def test_a_likely_expert_far_ahead_outlives_an_unlikely_one_next():
    # layer 1 always chooses 2 and 3 and layer 3 always 0 and 1: expert 5 of layer 1 is next but unlikely
    choices = [(0, 1), (2, 3), (0, 1), (0, 1)]
    policy = HitDensity()
    now = run_tokens(policy, choices, 30)
    now = visit(policy, 0, (0, 1), now)  # layer 0 runs: layer 1 is one visit ahead, layer 3 three
    for key in ((1, 5), (1, 6)):  # read once long ago, as far as the policy knows
        policy.on_insert(key, now)
    in_use = {(0, 0), (0, 1)}
    assert policy.victim({(0, 0), (0, 1), (1, 5), (3, 0)}, in_use, now) == (1, 5)
    # both likely: the one whose slot waits longer for its hit goes
    assert policy.victim({(0, 0), (0, 1), (1, 2), (3, 0)}, in_use, now) == (3, 0)
    # the lower bound on chances: never-chosen experts of the same layer tie, the smaller key goes
    assert policy.victim({(0, 0), (0, 1), (1, 5), (1, 6)}, in_use, now) == (1, 5)


def test_the_hint_of_the_next_layer_decides():
    # layer 1 alternates {2, 3} and {4, 5} and its hint has always named what it then chose
    policy, now = HitDensity(), 0
    for token in range(12):
        chosen = (2, 3) if token % 2 == 0 else (4, 5)
        now = visit(policy, 0, (0, 1), now)
        probs = np.full((1, 8), 0.01)
        probs[0, list(chosen)] = 0.45
        policy.observe_hint(1, probs)
        now = visit(policy, 1, chosen, now)
    now = visit(policy, 0, (0, 1), now)
    probs = np.full((1, 8), 0.01)
    probs[0, [4, 5]] = 0.45  # against the alternation, which says 2 and 3
    policy.observe_hint(1, probs)
    assert policy.victim({(0, 0), (0, 1), (1, 2), (1, 4)}, {(0, 0), (0, 1)}, now) == (1, 2)


def test_victim_is_the_fewest_expected_hits_per_visit_held():
    # random routing, no hints: each layer's chance from its own LayerRouting fed the same visits
    rng = np.random.default_rng(5)
    layers, experts = 4, 8
    policy, replicas, now, previous = HitDensity(), [LayerRouting(experts) for _ in range(layers)], 0, None
    for token in range(30):
        for layer in range(layers):
            chosen = (6, 7) if now == 0 else tuple(int(e) for e in sorted(rng.choice(experts, 2, replace=False)))
            now = visit(policy, layer, chosen, now)
            if previous is not None:
                previous.finish_visit()
            previous = replicas[layer]
            previous.current.extend(chosen)
            in_use = {(layer, e) for e in chosen}
            others = {(int(l), int(e)) for l, e in zip(rng.integers(0, layers, 6), rng.integers(0, experts, 6))}
            resident = in_use | others
            if token < 2 or not others - in_use:
                continue
            chances = [replica.chance() for replica in replicas]

            def held_per_hit(key):
                ahead = (key[0] - layer) % layers or layers
                return ahead * (1.0 / max(chances[key[0]][key[1]], 0.02)), -key[0], -key[1]

            assert policy.victim(resident, in_use, now) == max(resident - in_use, key=held_per_hit)


def test_density_refuses_a_bad_floor():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(MixtralOffloadError):
            make_policy("density", min_chance=bad)


def spliced(head: RoutingTrace, tail: RoutingTrace, tokens: int) -> RoutingTrace:
    """head's first `tokens` tokens, then tail's tokens after them."""
    def join(a, b):
        return np.concatenate([a[:tokens], b[tokens:]])
    return RoutingTrace(join(head.expert_ids, tail.expert_ids), join(head.gates, tail.gates), head.num_experts,
                        predicted_next=join(head.predicted_next, tail.predicted_next),
                        hint_probs=join(head.hint_probs, tail.hint_probs))


def prefix(trace: RoutingTrace, tokens: int) -> RoutingTrace:
    return RoutingTrace(
        trace.expert_ids[:tokens], trace.gates[:tokens], trace.num_experts,
        predicted_next=trace.predicted_next[:tokens], hint_probs=trace.hint_probs[:tokens])


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - OFFLINE_POLICIES))
@pytest.mark.parametrize("capacity,partition,prefetch", [(8, "shared", None), (10, "shared", "trace"), (12, "layer", None)])
def test_decisions_on_a_prefix_ignore_the_suffix(policy, capacity, partition, prefetch, monkeypatch):
    a = synthetic_trace(40, num_layers=4, seed=21, predict_recall=0.6)
    b = spliced(a, synthetic_trace(40, num_layers=4, seed=22, predict_recall=0.6), 25)
    logs = []

    def recording(*args, **options):
        return Recording(make_policy(*args, **options), logs[-1])

    monkeypatch.setattr(sim, "make_policy", recording)
    for trace in (prefix(a, 25), a, b):
        logs.append([])
        sim.simulate(trace, policy, capacity, partition, prefetch=prefetch)
    head, full_a, full_b = logs
    assert any(call[0] == "victim" for call in head)
    assert full_a[:len(head)] == head == full_b[:len(head)]
    assert full_a != full_b  # the suffixes differ, and so do the calls after the prefix
