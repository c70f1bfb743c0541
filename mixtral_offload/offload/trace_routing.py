"""Routing replayed from a trace (`bench decode --routing-trace`): the router runs, the trace chooses.

A model of random weights routes near uniformly; replaying a recorded (or calibrated synthetic) trace
gives the expert cache and its prefetch a trained model's locality at any width. How a trace meets a
model of other counts (docs/cache.md, "Routing by a trace"): the forward position p routes as trace
token p mod N; model layer l as trace layer l mod L_t; the expert count and top_k must be the model's.
The hint for layer l + 1 is the trace's recorded guess when it has guesses (none where trace layer
L_t - 1 wraps to 0: it recorded no guess of layer 0), else the router's own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..cache.traces import RoutingTrace
from ..config import ModelArgs
from ..errors import MixtralOffloadError


class TraceRouting:
    """A RoutingOverride (offload/model.py) that replays `trace` on a model of `args`' counts."""

    def __init__(self, trace: RoutingTrace, args: ModelArgs, name: str = "routing trace"):
        if trace.num_tokens < 1:
            raise MixtralOffloadError(f"{name}: no tokens")
        if (trace.num_experts, trace.top_k) != (args.num_local_experts, args.num_experts_per_tok):
            raise MixtralOffloadError(
                f"{name}: {trace.num_experts} experts, top {trace.top_k}; the model has {args.num_local_experts} "
                f"experts, top {args.num_experts_per_tok} (a synthetic trace can be made for any counts)")
        if not np.isfinite(trace.gates).all() or (trace.gates < 0).any():
            raise MixtralOffloadError(f"{name}: gate weights must be finite and non-negative")
        if trace.hint_probs is not None and not np.isfinite(trace.hint_probs).all():
            raise MixtralOffloadError(f"{name}: hint probabilities must be finite")
        self.trace = trace
        self.expert_ids = trace.expert_ids.astype(np.int64)  # [N, L_t, K]

    def _rows(self, position: int, tokens: int) -> np.ndarray:
        return (position + np.arange(tokens)) % self.trace.num_tokens

    def _layer(self, layer: int) -> int:
        return layer % self.trace.num_layers

    def route(self, layer: int, position: int, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trace's experts [T, K] and gate weights [T, K] for the tokens at position.. (probs [T, E])."""
        rows, t_layer = self._rows(position, probs.shape[0]), self._layer(layer)
        ids = torch.from_numpy(self.expert_ids[rows, t_layer]).to(probs.device)
        weights = torch.from_numpy(self.trace.gates[rows, t_layer]).to(probs.device)
        return ids, weights

    def hint(self, layer: int, position: int, guess: torch.Tensor) -> torch.Tensor | None:
        """The hint for `layer` given the router's guess [T, E]: the trace's recorded guess, none at the
        wrap of the trace's layers, or the router's guess for a trace without guesses."""
        if self.trace.hint_probs is None:
            return guess
        t_layer = self._layer(layer)
        if t_layer == 0:
            return None
        rows = self._rows(position, guess.shape[0])
        return torch.from_numpy(self.trace.hint_probs[rows, t_layer - 1]).to(guess.device)


def open_routing_trace(path: str | Path, args: ModelArgs) -> TraceRouting:
    """The trace file at path as routing for a model of args; a bad file is a MixtralOffloadError."""
    return TraceRouting(RoutingTrace.load(path), args, name=f"routing trace {path}")
