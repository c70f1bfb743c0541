"""Mixtral model math in torch, batch size 1, with a KV cache. No I/O: weights arrive as tensors.

Experts are reached only through an `ExpertBackend`, so dense torch experts, quantized Numba
kernels and the paging expert cache all plug in without this file knowing about them.

Shape legend: T = tokens in this forward, S = cached positions, D = hidden size, H = query heads,
G = key/value heads, hd = head dim, E = experts, K = experts per token, V = vocab size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelArgs
from ..errors import MixtralOffloadError
from ..profiling import NULL_PROFILER
from .nonfinite import require_finite


class ExpertBackend(Protocol):
    """Computes the routed experts of one MoE layer."""

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], expert_ids [T, K] int64, weights [T, K] float32 -> sum_k weights * expert_k(x), [T, D]."""
        ...

    def hint(self, layer: int, probs: torch.Tensor) -> None:
        """A guess of layer `layer`'s router probabilities [T, E], made one layer early (for prefetch)."""
        ...


@dataclass
class LayerWeights:
    """Dense weights of one decoder layer, [out, in] like nn.Linear. The projections may instead be
    quantized weights that multiply themselves (`weight.linear(x)`, see `linear`)."""

    attn_norm: torch.Tensor  # [D]
    moe_norm: torch.Tensor   # [D]
    wq: torch.Tensor         # [H*hd, D]
    wk: torch.Tensor         # [G*hd, D]
    wv: torch.Tensor         # [G*hd, D]
    wo: torch.Tensor         # [D, H*hd]
    gate: torch.Tensor       # [E, D]  the router, always a tensor


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype to multiply x's rows in: float32 for several float16 rows on the CPU, else x's own.

    torch's CPU float16 GEMM ran 4x slower than float32 here (256x1024 by 1024x1024: 12.5 ms vs
    3.1 ms, bfloat16 1.2 ms, 2 threads), while a float16 GEMV (one row) is the fastest: memory-bound.
    float16 -> float32 is exact and both accumulate in float32, so the result is the same.
    """
    if x.dtype == torch.float16 and x.device.type == "cpu" and x.dim() >= 2 and x.shape[-2] > 1:
        return torch.float32
    return x.dtype


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ weight.T in x's dtype, multiplied in compute_dtype(x); a weight that is not a tensor (a
    quantized one) multiplies itself: weight.linear(x)."""
    if not isinstance(weight, torch.Tensor):
        return weight.linear(x)
    dtype = compute_dtype(x)
    if dtype == x.dtype:
        return F.linear(x, weight)
    return F.linear(x.to(dtype), weight.to(dtype)).to(x.dtype)


def embedding(tokens: torch.Tensor, table) -> torch.Tensor:
    """Rows of the embedding table for tokens [T]; a table that is not a tensor (one read from a file
    mapping) looks its rows up itself: table.lookup(tokens)."""
    if not isinstance(table, torch.Tensor):
        return table.lookup(tokens)
    return F.embedding(tokens.to(table.device), table)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back to x's dtype before the scale (as Mixtral does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(args: ModelArgs, max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_context, hd] in float32 for rotate-half RoPE."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    angles = torch.outer(torch.arange(max_context, dtype=torch.float32), inv_freq)  # [S, hd/2]
    angles = torch.cat([angles, angles], dim=-1)                                     # [S, hd]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, T, hd] rotated by the tables for its positions (cos, sin [T, hd])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One query per head q [H, 1, hd] against the cached keys/values [G, S, hd]: [H, 1, hd].

    Query heads h of a group share key head h // (H / G). Computed in float32 with two batched
    matmuls: torch's scaled_dot_product_attention took 143 us at S=100 and 20 ms at S=4000 for this
    one-query case on the CPU (fp16, 2 threads), this 105 us and 0.34 ms.
    """
    H, _, hd = q.shape
    G = keys.shape[0]
    grouped = q.reshape(G, H // G, hd).float()                                 # [G, H/G, hd]
    scores = torch.matmul(grouped, keys.transpose(1, 2).float()) * hd ** -0.5  # [G, H/G, S]
    out = torch.matmul(scores.softmax(dim=-1), values.float())                 # [G, H/G, hd]
    return out.reshape(H, 1, hd).to(q.dtype)


def route(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing: (expert ids [T, K], renormalised weights [T, K] float32, all probs [T, E] float32)."""
    probs = F.softmax(F.linear(x, gate).float(), dim=-1)       # [T, E]
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)      # [T, K]
    return expert_ids, weights / weights.sum(dim=-1, keepdim=True), probs


class Mixtral:
    """The Mixtral decoder with a KV cache for one sequence; `forward` appends tokens to it."""

    def __init__(self, args: ModelArgs, embed: torch.Tensor, layers: list[LayerWeights], norm: torch.Tensor,
                 lm_head: torch.Tensor, experts: ExpertBackend, max_context: int, prefetch_hints: bool = False):
        self.args = args
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.experts = experts
        self.max_context = max_context
        self.prefetch_hints = prefetch_hints
        self.dtype, self.device = embed.dtype, embed.device
        G, hd = args.num_key_value_heads, args.head_dim
        shape = (args.num_hidden_layers, G, max_context, hd)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)   # [L, G, S, hd]
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # in the compute dtype once (apply_rope casts them to the activations' dtype, as transformers does)
        self.cos, self.sin = (table.to(self.device, self.dtype) for table in rope_tables(args, max_context))
        self.position = 0  # tokens already in the cache
        self.profiler = NULL_PROFILER

    def reset(self) -> None:
        """Forget the sequence (the cache is overwritten, not cleared)."""
        self.position = 0

    def truncate(self, length: int) -> None:
        """Keep only the first `length` cached positions."""
        self.position = min(self.position, length)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Append tokens [T] at the current position; return float32 logits [T, V] on the CPU.

        With last_only, only the last position's logits are computed ([1, V]): all a prompt needs.
        """
        T = tokens.shape[0]
        start = self.position
        if start + T > self.max_context:
            raise MixtralOffloadError(
                f"context limit reached: {start + T} tokens do not fit in the context of {self.max_context}")
        profiler = self.profiler
        profiler.token("prefill" if T > 1 else "decode")
        h = embedding(tokens, self.embed)                                      # [T, D]
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        for index, layer in enumerate(self.layers):
            with profiler.span("attention", layer=index):
                h = h + self._attention(index, layer, rms_norm(h, layer.attn_norm, self.args.rms_norm_eps), cos, sin)
            h = h + self._moe(index, layer, h)
        require_finite(h, "the hidden states")  # [T, D]: int8 dense kernels would turn NaN into finite noise
        self.position = start + T
        with profiler.span("lm_head"):
            h = rms_norm(h[-1:] if last_only else h, self.norm, self.args.rms_norm_eps)
            return linear(h, self.lm_head).float().cpu()                      # [T, V]

    def _attention(self, index: int, layer: LayerWeights, x: torch.Tensor, cos, sin) -> torch.Tensor:
        args, T, start = self.args, x.shape[0], self.position
        H, G, hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        q = linear(x, layer.wq).view(T, H, hd).transpose(0, 1)                 # [H, T, hd]
        k = linear(x, layer.wk).view(T, G, hd).transpose(0, 1)                 # [G, T, hd]
        v = linear(x, layer.wv).view(T, G, hd).transpose(0, 1)                 # [G, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = start + T
        self.k_cache[index, :, start:end] = k
        self.v_cache[index, :, start:end] = v
        keys, values = self.k_cache[index, :, :end], self.v_cache[index, :, :end]  # [G, S, hd]
        if T == 1:
            out = decode_attention(q, keys, values)                            # [H, 1, hd]
        else:  # query i sits at position start+i and sees keys 0..start+i
            mask = torch.ones(T, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
            dtype = compute_dtype(q)
            out = F.scaled_dot_product_attention(q.to(dtype), keys.to(dtype), values.to(dtype), attn_mask=mask,
                                                 enable_gqa=H != G).to(q.dtype)  # [H, T, hd]
        return linear(out.transpose(0, 1).reshape(T, H * hd), layer.wo)       # [T, D]

    def _moe(self, index: int, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        args = self.args
        with self.profiler.span("router", layer=index):
            x = rms_norm(h, layer.moe_norm, args.rms_norm_eps)                 # [T, D]
            expert_ids, weights, _ = route(x, layer.gate, args.num_experts_per_tok)
            if self.prefetch_hints and index + 1 < len(self.layers):
                # The residual entering this MoE block predicts the next layer's routing well;
                # the guess lets the backend start reading those experts while this layer computes.
                upcoming = self.layers[index + 1]
                guess = F.softmax(F.linear(rms_norm(h, upcoming.moe_norm, args.rms_norm_eps), upcoming.gate).float(), -1)
                self.experts.hint(index + 1, guess)
        with self.profiler.span("experts", layer=index):
            return self.experts.forward(index, x, expert_ids, weights)


class TorchExperts:
    """All experts resident as torch tensors: the float reference backend."""

    def __init__(self, w1: list[torch.Tensor], w3: list[torch.Tensor], w2: list[torch.Tensor]):
        self.w1, self.w3, self.w2 = w1, w3, w2  # per layer: [E, I, D], [E, I, D], [E, D, I]

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of each token's routed experts, [T, D]."""
        out = torch.zeros_like(x)
        for expert, rows, ranks in tokens_by_expert(expert_ids):
            token_idx = torch.from_numpy(rows).to(x.device)
            xs = x[token_idx]
            y = linear(F.silu(linear(xs, self.w1[layer][expert])) * linear(xs, self.w3[layer][expert]),
                         self.w2[layer][expert])
            out.index_add_(0, token_idx, (y * weights[token_idx, torch.from_numpy(ranks).to(x.device), None]).to(x.dtype))
        return out

    def hint(self, layer: int, probs: torch.Tensor) -> None:
        """Everything is resident: nothing to prefetch."""


def tokens_by_expert(expert_ids: torch.Tensor):
    """For each expert used in expert_ids [T, K]: (expert, token indices, top-k rank of each), ascending expert.

    Indices come back as int64 NumPy arrays (cheap to make; torch and NumPy both index with them).
    """
    ids = expert_ids.cpu().numpy()
    if ids.shape[0] == 1:  # decode: one token, its K experts are distinct
        return [(int(e), np.zeros(1, np.int64), np.array([k])) for k, e in sorted(enumerate(ids[0]), key=lambda p: p[1])]
    groups = []
    for expert in np.unique(ids):
        rows, ranks = np.nonzero(ids == expert)
        groups.append((int(expert), rows, ranks))
    return groups
