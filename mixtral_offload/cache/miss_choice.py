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


AUTO = MissRule(max_gate=0.4)                             # --miss-bits auto|2|3 (measured: BENCHMARKS.md)
EVERY_MISS = MissRule(max_gate=float("inf"), min_rank=1)   # a bound for benchmarks: nothing enters a slot on demand


def group_ranks(expert_ids: np.ndarray, rows: np.ndarray, expert: int) -> np.ndarray:
    """The rank (1 = first choice) of `expert` for each token in rows, from top-k ids [T, K] (best first)."""
    return np.nonzero(expert_ids[rows] == expert)[1] + 1
