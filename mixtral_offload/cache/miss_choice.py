"""Which cache misses read an expert's low-bit copy instead of the full one (--miss-bits).

A miss that reads the low-bit copy costs a fraction of the bytes and evicts nothing, but computes the
expert less faithfully and leaves it uncached; so it suits experts that weigh little in the output.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MissRule:
    """A miss reads the low-bit copy when every token of the expert's group has it at rank >= min_rank
    (1 = the token's first choice) with a gate weight (renormalised over the top-k) below max_gate."""

    max_gate: float
    min_rank: int = 2

    def low_bit(self, weights: np.ndarray, ranks: np.ndarray) -> bool:
        """Whether a group of tokens with these gate weights [n] and ranks [n] takes the low-bit copy."""
        return bool(ranks.min() >= self.min_rank and weights.max() < self.max_gate)

    def takes(self, group, expert_ids: np.ndarray) -> bool:
        """Whether an expert's group of tokens (offload.model.ExpertGroup) in a routing with top-k ids
        expert_ids [T, K] takes the low-bit copy."""
        return self.low_bit(group.weights, group_ranks(expert_ids, group.rows, group.expert))


AUTO = MissRule(max_gate=0.4)                             # measured: BENCHMARKS.md, "Low-bit misses"
MOST = MissRule(max_gate=0.8, min_rank=1)                 # measured: BENCHMARKS.md, "Low-bit read-ahead"
EVERY_MISS = MissRule(max_gate=float("inf"), min_rank=1)   # a bound for tests and benchmarks
RULES = {"auto": AUTO, "most": MOST, "2": AUTO, "3": AUTO}  # by --miss-bits value (2|3: the copy's bits)


def guessed_low_bit(rule: MissRule, guess: np.ndarray, top_k: int) -> set[int]:
    """The experts `rule` would serve from the low-bit copy if guess [T, E] (guessed router probabilities)
    were the routing: each token's top_k with weights renormalised over them, as the model routes; an
    expert no token puts in its top_k is left out (its prefetch reads the full copy)."""
    top = np.argsort(-guess, axis=1, kind="stable")[:, :top_k]            # [T, K] best first
    weights = np.take_along_axis(guess, top, axis=1)
    weights = weights / weights.sum(axis=1, keepdims=True)
    low = set()
    for expert in np.unique(top):
        rows, ranks = np.nonzero(top == expert)
        if rule.low_bit(weights[rows, ranks], ranks + 1):
            low.add(int(expert))
    return low


def group_ranks(expert_ids: np.ndarray, rows: np.ndarray, expert: int) -> np.ndarray:
    """The rank (1 = first choice) of `expert` for each token in rows, from top-k ids [T, K] (best first)."""
    return np.nonzero(expert_ids[rows] == expert)[1] + 1
