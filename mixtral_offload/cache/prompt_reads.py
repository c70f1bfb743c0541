"""Which experts to read ahead for the next layer of a many-token batch (a prompt).

A prompt of PROMPT_MIN_TOKENS tokens or more uses nearly every expert of a layer, so the likeliest
one or two (the decode rule, PREFETCH_MIN_PROB) are far too few: the read-ahead takes every expert
that any token's guessed routing puts in its top k, in expert order (the order the layer will run
them), so each is read once, while this layer computes, as far as slots allow.
"""
from __future__ import annotations

import numpy as np

PROMPT_MIN_TOKENS = 64


def prompt_experts(guess: np.ndarray, top_k: int) -> list[int]:
    """Experts in any token's top_k of guess [T, E] (guessed router probabilities), in expert order."""
    top = np.argpartition(-guess, top_k - 1, axis=1)[:, :top_k]
    return [int(e) for e in np.unique(top)]
