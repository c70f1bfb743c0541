"""Which experts to read ahead for the next layer of a batch of tokens (a prompt, however short).

The decode rule reads at most `prefetch` experts, the likeliest, where one token's guess makes a read
worth it. A batch whose tokens' guessed top k name more experts than that uses most of them (measured
in docs/cache.md), so the read-ahead takes every expert named, in expert order (the order the layer
will run them): each is read once, while the layer before computes, as far as slots allow.
"""
from __future__ import annotations

import numpy as np


def batch_experts(guess: np.ndarray, top_k: int, decode_reads: int) -> list[int] | None:
    """Experts in any token's top_k of guess [T, E] (guessed router probabilities), in expert order,
    when they are more than decode_reads (what the decode rule may read); else None."""
    if len(guess) * top_k <= decode_reads:  # the batch cannot name more: skip the ranking (one decode token)
        return None
    top = np.argpartition(-guess, top_k - 1, axis=1)[:, :top_k]
    experts = np.unique(top)
    return [int(e) for e in experts] if len(experts) > decode_reads else None
