"""A prompt's read-ahead: every expert its tokens' guesses name, read once, in the order the layers use them."""
from types import SimpleNamespace

import numpy as np
import torch

from mixtral_offload.cache.expert_cache import ExpertCache
from mixtral_offload.cache.prompt_reads import PROMPT_MIN_TOKENS, prompt_experts
from mixtral_offload.offload.model import group_tokens

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


def test_prompt_experts_are_every_tokens_top_k_in_expert_order():
    guess = np.full((3, EXPERTS), 0.01)
    guess[0, [6, 1]] = 0.5
    guess[1, [1, 3]] = 0.5
    guess[2, [3, 6]] = 0.4
    assert prompt_experts(guess, TOP_K) == [1, 3, 6]


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
        prompt(cache, PROMPT_MIN_TOKENS, seed=slots)
        cache.close()
        expected = [(layer, e) for layer in range(LAYERS) for e in range(EXPERTS)]
        assert store.fills == expected
        assert cache.stats.prefetches == (2 * EXPERTS if slots == 2 * EXPERTS else 2 * 3)
        assert cache.stats.prefetch_waste == 0


def test_a_short_batch_keeps_the_decode_rule():
    store = LoggingStore(2 * EXPERTS)
    cache = ExpertCache(SimpleNamespace(block_nbytes=1), LAYERS, TOP_K, store, prefetch=TOP_K)
    prompt(cache, PROMPT_MIN_TOKENS - 1, seed=0)  # flat guesses: no expert reaches PREFETCH_MIN_PROB
    cache.close()
    assert cache.stats.prefetches == 0
