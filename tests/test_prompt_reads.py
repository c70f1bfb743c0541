"""A prompt's read-ahead: every expert its tokens' guesses name, read once, in the order the layers use them."""
import threading
from collections import Counter
from types import SimpleNamespace

import numpy as np
import torch

from mixtral_offload.cache.expert_cache import ExpertCache, HostSlots
from mixtral_offload.cache.prompt_reads import batch_experts
from mixtral_offload.offload.loading import load
from mixtral_offload.offload.model import group_tokens
from mixtral_offload.quant.kernels import expert_kernel

EXPERTS, TOP_K, LAYERS = 8, 2, 3


class LoggingStore:
    """Slots that hold nothing and log each fill (layer, expert) in the order the reader runs them."""

    device = torch.device("cpu")
    direct_choice = False
    decode_threads = None

    def __init__(self, num_slots):
        self.num_slots, self.fills = num_slots, []

    def fill(self, slot, key):
        self.fills.append(key)
        return 1

    def run(self, slot, x):
        return torch.zeros_like(x)

    def close(self):
        pass


def test_batch_experts_are_every_tokens_top_k_in_expert_order_when_more_than_decode_reads():
    guess = np.full((3, EXPERTS), 0.01)
    guess[0, [6, 1]] = 0.5
    guess[1, [1, 3]] = 0.5
    guess[2, [3, 6]] = 0.4
    assert batch_experts(guess, TOP_K, decode_reads=2) == [1, 3, 6]
    assert batch_experts(guess, TOP_K, decode_reads=3) is None  # no more than the decode rule reads
    assert batch_experts(guess[:1], TOP_K, decode_reads=2) is None  # one token names top_k: the decode rule
    same = np.tile(guess[:1], (5, 1))  # five tokens guessing the same two experts
    assert batch_experts(same, TOP_K, decode_reads=2) is None


def prompt(cache, tokens, seed):
    """A prompt through every layer as the model calls the cache: the next layer's guess, then this layer."""
    rng = np.random.default_rng(seed)
    x = torch.zeros(tokens, 4)
    for layer in range(LAYERS):
        probs = rng.dirichlet(np.ones(EXPERTS), tokens)
        if layer + 1 < LAYERS:
            cache.hint(layer + 1, torch.from_numpy(rng.dirichlet(np.ones(EXPERTS), tokens)))
        ids = torch.from_numpy(np.argsort(-probs, axis=1)[:, :TOP_K].copy())
        for _ in cache.run(layer, x, group_tokens(ids, torch.full((tokens, TOP_K), 0.5))):
            pass


def test_a_prompt_reads_each_expert_once_in_layer_order_while_slots_last():
    for slots in (2 * EXPERTS, EXPERTS + 3):  # room for a whole next layer, and for 3 of it
        store = LoggingStore(slots)
        cache = ExpertCache(SimpleNamespace(block_nbytes=1), LAYERS, TOP_K, store, prefetch=TOP_K)
        prompt(cache, 64, seed=slots)
        cache.close()
        expected = [(layer, e) for layer in range(LAYERS) for e in range(EXPERTS)]
        assert store.fills == expected
        assert cache.stats.prefetches == (2 * EXPERTS if slots == 2 * EXPERTS else 2 * 3)
        assert cache.stats.prefetch_waste == 0


def test_a_batch_drops_the_reads_of_wrong_guesses_not_begun():
    store = LoggingStore(2 * EXPERTS)
    release = threading.Event()
    fill = store.fill
    store.fill = lambda slot, key: (key != (1, 0) or release.wait(5)) and fill(slot, key)  # the reader stalls
    cache = ExpertCache(SimpleNamespace(block_nbytes=1), LAYERS, TOP_K, store, prefetch=TOP_K)
    x, tokens = torch.zeros(16, 4), 16
    cache.hint(1, torch.eye(EXPERTS).repeat(2, 1))  # 16 tokens guessing every expert of layer 1
    for layer, experts in ((0, [0, 1]), (1, [0, 1])):
        ids = torch.tensor(experts).repeat(tokens, 1)
        if layer == 1:
            threading.Timer(0.5, release.set).start()  # after the run below has dropped what it can
        for _ in cache.run(layer, x, group_tokens(ids, torch.full((tokens, TOP_K), 0.5))):
            pass
    cache.close()
    assert store.fills == [(0, 0), (0, 1), (1, 0), (1, 1)]  # (1, 2)..(1, 7) dropped before their reads began
    assert (cache.stats.prefetches, cache.stats.prefetch_hits, cache.stats.prefetch_waste) == (8, 2, 6)
    assert len(cache.free) == 2 * EXPERTS - 4 and set(cache.slot_of) == set(store.fills)


def test_one_token_keeps_the_decode_rule():
    store = LoggingStore(2 * EXPERTS)
    cache = ExpertCache(SimpleNamespace(block_nbytes=1), LAYERS, TOP_K, store, prefetch=TOP_K)
    prompt(cache, 1, seed=0)  # flat guesses: no expert reaches PREFETCH_MIN_PROB
    cache.close()
    assert cache.stats.prefetches == 0


class LoggingSlots(HostSlots):
    """RAM slots that log each expert they read, in the order the reader reads them."""

    def __init__(self, *args):
        super().__init__(*args)
        self.fills = []

    def fill(self, slot, key):
        self.fills.append(key)
        return super().fill(slot, key)


class LoggingExperts:
    """An expert backend that logs the (layer, expert) pairs a forward runs, in order."""

    def __init__(self, backend):
        self.backend, self.used = backend, []
        self.stats, self.decode_threads = backend.stats, backend.decode_threads

    def run(self, layer, x, routing):
        self.used += [(layer, group.expert) for group in routing.groups]
        return self.backend.run(layer, x, routing)

    def hint(self, layer, probs):
        self.backend.hint(layer, probs)

    def set_profiler(self, profiler):
        self.backend.set_profiler(profiler)


def test_a_short_prompt_under_a_budget_reads_each_needed_expert_once_in_layer_order(converted_int4, monkeypatch):
    runtime = load(converted_int4, dtype="float32")
    logged = runtime.model.experts = LoggingExperts(runtime.model.experts)
    ids = [1, 415, 5565, 302, 4843, 349]  # a six-token chat message
    expected = runtime._prefill(ids)
    pool = logged.backend.source
    kernel = expert_kernel(pool.spec, pool.args.hidden_size, pool.args.intermediate_size, "int8")

    def budgeted():
        slots = LoggingSlots(pool, 16, kernel)  # half of the 32 experts
        cache = ExpertCache(pool, 4, 2, slots, policy="gate", prefetch=2)
        runtime.model.experts, runtime.model.prefetch_hints = cache, True
        runtime.reset()
        assert torch.equal(runtime._prefill(ids), expected)
        cache.close()
        return slots.fills, cache.stats

    fills, stats = budgeted()
    needed = set(logged.used)
    reads = Counter(fills)
    assert all(reads[key] == 1 for key in needed)  # each needed expert read once
    assert [layer for layer, _ in fills] == sorted(layer for layer, _ in fills)  # in layer order
    assert len(set(fills) - needed) <= stats.prefetch_waste  # wrong guesses, read unless dropped before begun
    # 15 needed outside layer 0 (which no layer before reads ahead for): the batch rule read 14 ahead, 12 used
    assert sum(1 for layer, _ in needed if layer > 0) == 15
    assert (stats.prefetches, stats.prefetch_hits, stats.misses) == (14, 12, [4, 1, 2, 0])
    # the decode rule alone: the 6 tokens' mean guess reaches PREFETCH_MIN_PROB for no expert
    monkeypatch.setattr("mixtral_offload.cache.expert_cache.batch_experts", lambda *args: None)
    _, stats = budgeted()
    assert (stats.prefetches, sum(stats.misses)) == (0, len(needed))
