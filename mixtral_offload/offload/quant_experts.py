"""An ExpertBackend that computes routed experts with the quantization kernels on an ExpertPool's views.

reference_expert_forward is the slow, obvious path (plain dequantize + NumPy) to test the kernel against.
"""
from __future__ import annotations

import numpy as np
import torch

from ..quant.format import QuantizedMatrix
from .model import tokens_by_expert
from .store.pool import ExpertPool

from ..quant.kernels import expert_forward as _kernel_expert_forward


def reference_expert_forward(w1: QuantizedMatrix, w3: QuantizedMatrix, w2: QuantizedMatrix, x: np.ndarray) -> np.ndarray:
    """w2 (silu(w1 x) * w3 x) for x [T, D] float32 via the plain dequantizer: [T, D] float32."""
    from ..quant.quantize import dequantize

    gate = x @ dequantize(w1).T                                  # [T, I]
    up = x @ dequantize(w3).T                                    # [T, I]
    hidden = gate / (1.0 + np.exp(-gate)) * up
    return hidden @ dequantize(w2).T                             # [T, D]


def expert_forward(w1: QuantizedMatrix, w3: QuantizedMatrix, w2: QuantizedMatrix, x: np.ndarray,
                   activations: str = "float32") -> np.ndarray:
    """One expert on x [T, D] float32 -> [T, D] float32 with the fused Numba kernels.

    activations 'int8' quantizes the inputs per group for integer dot products (see quant/int8x.py).
    """
    return _kernel_expert_forward(w1, w3, w2, x, activations)


class PoolExperts:
    """Every routed expert computed where it lies in the pool's mapping (no cache, no copies)."""

    def __init__(self, pool: ExpertPool, release_pages: bool = False, activations: str = "float32"):
        self.pool = pool
        self.activations = activations
        self.release_pages = release_pages  # drop the mapped pages after use, so RSS stays flat
        self.views: dict[tuple[int, int], tuple] = {}  # (layer, expert) -> validated views on the mapping

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of each token's routed experts, [T, D] in x's dtype."""
        self.pool.check_size()                                    # a file cut short: an error, not SIGBUS
        x32 = x.detach().float().numpy()                          # [T, D]
        out = np.zeros_like(x32)
        w = weights.float().numpy()                               # [T, K]
        for expert, rows, ranks in tokens_by_expert(expert_ids):
            key = (layer, expert)
            if key not in self.views:
                self.views[key] = self.pool.expert(layer, expert)
            y = expert_forward(*self.views[key], np.ascontiguousarray(x32[rows]), self.activations)
            out[rows] += y * w[rows, ranks, None]   # a token meets each expert at most once
            if self.release_pages:
                self.pool.release(layer, expert)
        return torch.from_numpy(out).to(x.dtype)

    def hint(self, layer: int, probs: torch.Tensor) -> None:
        """No prefetch here: the page cache and the expert cache (cache/) do that."""
