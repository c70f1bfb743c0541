"""What a cache policy learns online about routing: per layer, which experts follow which from one
token to the next and how often each was chosen lately; across layers, how far the prefetch hint
(the next layer's router probabilities, computed one layer early) can be trusted.

Shape legend: E = experts per layer.
"""

from __future__ import annotations

import numpy as np

PAIR_PRIOR = 0.25  # pseudo-count of every transition i -> j before any is seen (1 / 4: top-2 of 8)
RECENCY_RATE = 0.05  # weight of the newest visit in the moving average of how often an expert is chosen
HINT_BINS = 20  # hint calibration: equal-width bins of the hinted probability on [0, 1]


class LayerRouting:
    """One layer's visits (the experts it ran for a token, or for all tokens of a forward) in order."""

    def __init__(self, num_experts: int) -> None:
        E = num_experts
        self.last: list[int] = []  # experts of the last finished visit
        self.current: list[int] = []  # experts of the visit in progress
        self.pair = np.full((E, E), PAIR_PRIOR)  # [E, E] visits with i in the previous set and j in the next
        self.pair_from = np.ones(E)  # [E] visits with i in the previous set
        self.recent = np.full(E, PAIR_PRIOR)  # [E] moving average of "chosen at a visit"

    def grow(self, num_experts: int) -> None:
        """Make room for expert ids below num_experts, with the same priors."""
        extra = num_experts - len(self.pair_from)
        if extra > 0:
            self.pair = np.pad(self.pair, ((0, extra), (0, extra)), constant_values=PAIR_PRIOR)
            self.pair_from = np.pad(self.pair_from, (0, extra), constant_values=1.0)
            self.recent = np.pad(self.recent, (0, extra), constant_values=PAIR_PRIOR)

    def finish_visit(self) -> list[int]:
        """Fold the visit in progress into the counts; returns its experts."""
        chosen = np.zeros(len(self.recent))
        chosen[self.current] = 1.0
        if self.last:
            self.pair[self.last] += chosen
            self.pair_from[self.last] += 1.0
        self.recent += RECENCY_RATE * (chosen - self.recent)
        self.last, self.current = self.current, []
        return self.last

    def chance(self) -> np.ndarray:
        """[E] probability that each expert is chosen at the layer's next visit: the mean of what
        followed the latest visit's experts before, and of how often each was chosen lately."""
        latest = self.current or self.last
        if not latest:
            return self.recent.copy()
        follows = (self.pair[latest] / self.pair_from[latest, None]).sum(axis=0) / len(latest)
        return 0.5 * follows + 0.5 * self.recent

    def fresh_chance(self) -> np.ndarray:
        """[E] per-visit chance of being chosen, for visits beyond the next one (never below 1e-3)."""
        return np.maximum(self.recent, 1e-3)


class HintCalibration:
    """How often an expert given hint probability p was then chosen, per bin of p (all layers together:
    router softmax values are not calibrated chances of being among the top k)."""

    def __init__(self) -> None:
        self.chosen = np.full(HINT_BINS, 0.5)  # [bins] prior: half a hit
        self.seen = np.ones(HINT_BINS)  # [bins]

    @staticmethod
    def _bins(hint: np.ndarray) -> np.ndarray:
        return np.minimum((hint * HINT_BINS).astype(int), HINT_BINS - 1)

    def observe(self, hint: np.ndarray, chosen: list[int]) -> None:
        """A layer ran: `hint` [E] had guessed it, `chosen` are the experts it used."""
        bins = self._bins(hint)
        self.chosen += np.bincount(bins[chosen], minlength=HINT_BINS)
        self.seen += np.bincount(bins, minlength=HINT_BINS)

    def chance(self, hint: np.ndarray) -> np.ndarray:
        """[E] calibrated probability that each expert is chosen, given the hint [E]."""
        bins = self._bins(hint)
        return self.chosen[bins] / self.seen[bins]
