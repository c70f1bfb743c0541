"""Mixtral model math in torch, batch size 1, with a KV cache. No I/O: weights arrive as tensors.

Experts are reached only through an `ExpertBackend`, so dense torch experts, quantized Numba
kernels and the paging expert cache all plug in without this file knowing about them.

Shape legend: T = tokens in this forward, S = cached positions, D = hidden size, H = query heads,
G = key/value heads, hd = head dim, E = experts, K = experts per token, V = vocab size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelArgs
from ..errors import MixtralOffloadError
from ..profiling import NULL_PROFILER
from .nonfinite import require_finite
from ..quant.linear import Linear, compute_dtype


@dataclass(frozen=True)
class ExpertGroup:
    """The tokens one expert gets in one MoE layer."""

    expert: int
    rows: np.ndarray    # token indices [n] (int64)
    weights: np.ndarray  # each token's gate weight for this expert [n] float32
    gate_mass: float    # the tokens' summed gate weights for it (what gate-guided eviction weighs)


@dataclass(frozen=True)
class Routing:
    """One MoE layer's routing: every token's experts and weights, and the tokens grouped by expert."""

    expert_ids: np.ndarray   # [T, K] int64
    weights: np.ndarray      # [T, K] float32, renormalised over the K
    groups: list[ExpertGroup]


class ExpertBackend(Protocol):
    """Runs routed experts; the MoE block (`Mixtral._moe`) groups the tokens and combines the outputs.

    Backends only say where an expert's weights are and run it: torch tensors (`offload/experts.py`),
    the mapped pool, or the paging cache (`cache/expert_cache.py`).
    """

    stats: object | None           # what a cache did (cache.expert_cache.CacheStats); None without a cache
    decode_threads: int | None     # CPU kernel threads for a decode step (None: all)

    def run(self, layer: int, x: torch.Tensor, routing: Routing) -> Iterator[tuple[ExpertGroup, torch.Tensor]]:
        """Each group's expert on x[group.rows] ([n, D] -> [n, D]), in the order the backend prefers."""
        ...

    def hint(self, layer: int, probs: torch.Tensor) -> None:
        """A guess of layer `layer`'s router probabilities [T, E], made one layer early (for prefetch)."""
        ...

    def set_profiler(self, profiler) -> None:
        """Record the backend's spans and counters into profiler."""
        ...


class RoutingOverride(Protocol):
    """Replaces the router's choice (offload/trace_routing.py replays a trace); the router still runs."""

    def route(self, layer: int, position: int, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids [T, K] and weights [T, K] for the T tokens from `position` on, given the router's probs [T, E]."""
        ...

    def hint(self, layer: int, position: int, guess: torch.Tensor) -> torch.Tensor | None:
        """The hint to pass for `layer` given the router's guess [T, E]; None: no hint."""
        ...


@dataclass
class LayerWeights:
    """Dense weights of one decoder layer: norms and the router as tensors, projections as layers
    (quant/linear.py: float tensors or int8 weights; the model only calls them)."""

    attn_norm: torch.Tensor  # [D]
    moe_norm: torch.Tensor   # [D]
    wq: Linear               # [H*hd, D]
    wk: Linear               # [G*hd, D]
    wv: Linear               # [G*hd, D]
    wo: Linear               # [D, H*hd]
    gate: torch.Tensor       # [E, D]  the router: its precision decides the experts


class TensorEmbedding:
    """An embedding table held as a tensor: `embed(tokens)` gathers rows [T, D]."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens.to(self.table.device), self.table)


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

    Query heads h of a group share key head h // (H / G). Two batched float32 matmuls: torch's
    scaled_dot_product_attention is much slower for one query on the CPU (docs/architecture.md).
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

    def __init__(self, args: ModelArgs, embed, layers: list[LayerWeights], norm: torch.Tensor, lm_head: Linear,
                 experts: ExpertBackend, max_context: int, dtype: torch.dtype, device: torch.device,
                 prefetch_hints: bool = False, routing: RoutingOverride | None = None):
        self.args = args
        self.routing = routing  # None: the router's choice stands
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head  # embed(tokens) -> [T, D]
        self.experts = experts
        self.max_context = max_context
        self.prefetch_hints = prefetch_hints
        self.dtype, self.device = dtype, torch.device(device)
        G, hd = args.num_key_value_heads, args.head_dim
        shape = (args.num_hidden_layers, G, max_context, hd)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)   # [L, G, S, hd]
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        # in the compute dtype once (apply_rope casts them to the activations' dtype, as transformers does)
        self.cos, self.sin = (table.to(self.device, dtype) for table in rope_tables(args, max_context))
        self.position = 0  # tokens already in the cache
        self.profiler = NULL_PROFILER

    def reset(self) -> None:
        """Forget the sequence (the cache is overwritten, not cleared)."""
        self.position = 0

    def truncate(self, length: int) -> None:
        """Keep only the first `length` cached positions."""
        self.position = min(self.position, length)

    def set_profiler(self, profiler) -> None:
        """Record the model's spans and its expert backend's into profiler."""
        self.profiler = profiler
        self.experts.set_profiler(profiler)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, last_only: bool = False, chunk: int | None = None) -> torch.Tensor:
        """Append tokens [T] at the current position; return float32 logits [T, V] on the CPU.

        With last_only, only the last position's logits are computed ([1, V]): all a prompt needs.
        With chunk, the tokens go layer by layer in pieces of `chunk`: every piece through layer l (its keys
        and values appended in order, so piece c attends to pieces <= c) before layer l + 1. The work
        buffers hold one piece, and a budgeted cache reads each layer's experts once for the whole prompt
        instead of once per piece; the logits equal those of one forward per piece.
        """
        T = tokens.shape[0]
        start = self.position
        if start + T > self.max_context:
            raise MixtralOffloadError(
                f"context limit reached: {start + T} tokens do not fit in the context of {self.max_context}")
        profiler = self.profiler
        profiler.token("prefill" if T > 1 else "decode")
        pieces = range(0, T, chunk or T)
        hs = [self.embed(tokens[a:a + (chunk or T)]) for a in pieces]          # [T_c, D] per piece
        for index, layer in enumerate(self.layers):
            for c, a in enumerate(pieces):
                h = hs[c]
                with profiler.span("attention", layer=index):
                    h = h + self._attention(index, layer, rms_norm(h, layer.attn_norm, self.args.rms_norm_eps),
                                            start + a)
                hs[c] = h + self._moe(index, layer, h, start + a)
        for h in hs:  # int8 dense kernels would turn NaN into finite noise
            require_finite(h, "the hidden states")
        self.position = start + T
        with profiler.span("lm_head"):
            h = rms_norm(hs[-1][-1:] if last_only else torch.cat(hs), self.norm, self.args.rms_norm_eps)
            return self.lm_head(h).float().cpu()                               # [T, V]

    def _attention(self, index: int, layer: LayerWeights, x: torch.Tensor, start: int) -> torch.Tensor:
        """Attention of x [T, D] at positions start.. against the cached ones before them; appends its K and V."""
        args, T = self.args, x.shape[0]
        H, G, hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        q = layer.wq(x).view(T, H, hd).transpose(0, 1)                         # [H, T, hd]
        k = layer.wk(x).view(T, G, hd).transpose(0, 1)                         # [G, T, hd]
        v = layer.wv(x).view(T, G, hd).transpose(0, 1)                         # [G, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = start + T
        self.k_cache[index, :, start:end] = k
        self.v_cache[index, :, start:end] = v
        keys, values = self.k_cache[index, :, :end], self.v_cache[index, :, :end]  # [G, S, hd]
        if T == 1:
            out = decode_attention(q, keys, values)                            # [H, 1, hd]
        else:  # query i sits at position start+i and sees keys 0..start+i
            mask = torch.ones(T, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
            # a batch dimension of 1: torch's CPU flash kernel takes only 4-D inputs; 3-D ones go to the
            # plain math path, 2.2x slower at 256 queries x 1,024 keys (BENCHMARKS.md, issue 18)
            dtype = compute_dtype(q)
            out = F.scaled_dot_product_attention(q.to(dtype)[None], keys.to(dtype)[None], values.to(dtype)[None],
                                                 attn_mask=mask, enable_gqa=H != G)[0].to(q.dtype)  # [H, T, hd]
        return layer.wo(out.transpose(0, 1).reshape(T, H * hd))               # [T, D]

    def _moe(self, index: int, layer: LayerWeights, h: torch.Tensor, start: int) -> torch.Tensor:
        """The MoE block of h [T, D] at positions start..: route, group tokens by expert, let the backend
        run each expert, combine."""
        args = self.args
        with self.profiler.span("router", layer=index):
            x = rms_norm(h, layer.moe_norm, args.rms_norm_eps)                 # [T, D]
            expert_ids, weights, probs = route(x, layer.gate, args.num_experts_per_tok)
            if self.routing is not None:
                expert_ids, weights = self.routing.route(index, start, probs)
            if self.prefetch_hints and index + 1 < len(self.layers):
                # The residual entering this MoE block predicts the next layer's routing well;
                # the guess lets the backend start reading those experts while this layer computes.
                upcoming = self.layers[index + 1]
                guess = F.softmax(F.linear(rms_norm(h, upcoming.moe_norm, args.rms_norm_eps), upcoming.gate).float(), -1)
                if self.routing is not None:
                    guess = self.routing.hint(index + 1, start, guess)
                if guess is not None:
                    self.experts.hint(index + 1, guess)
            routing = group_tokens(expert_ids, weights)
        with self.profiler.span("experts", layer=index):
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
            T = x.shape[0]
            for group, y in self.experts.run(index, x, routing):
                if T == 1:  # decode: one fused add, no index tensors (they cost more than the add here)
                    out.add_(y.float(), alpha=float(group.weights[0]))
                    continue
                if out.device.type == "cpu":  # in NumPy: torch's indexed add and product woke its threads
                    # per call, ~4x the CPU time of the whole combine here (BENCHMARKS.md, issue 18)
                    rows = slice(None) if len(group.rows) == T else group.rows
                    out.numpy()[rows] += y.float().numpy() * group.weights[:, None]
                    continue
                scaled = y.float() * torch.from_numpy(group.weights).to(x.device)[:, None]
                if len(group.rows) == T:
                    out += scaled
                else:  # a token meets each expert once, so rows are distinct: a plain indexed add
                    out[torch.from_numpy(group.rows).to(x.device)] += scaled
            return out.to(x.dtype)


def group_tokens(expert_ids: torch.Tensor, weights: torch.Tensor) -> Routing:
    """Tokens grouped by expert (ascending expert id) from top-k routing ids [T, K] and weights [T, K]."""
    ids = expert_ids.cpu().numpy()
    w = weights.float().cpu().numpy()
    if ids.shape[0] == 1:  # decode: one token, its K experts are distinct
        groups = [ExpertGroup(int(e), np.zeros(1, np.int64), w[0, k:k + 1], float(w[0, k]))
                  for k, e in sorted(enumerate(ids[0]), key=lambda p: p[1])]
    else:
        groups = []
        for expert in np.unique(ids):
            rows, ranks = np.nonzero(ids == expert)
            groups.append(ExpertGroup(int(expert), rows, w[rows, ranks], float(w[rows, ranks].sum())))
    return Routing(ids, w, groups)
