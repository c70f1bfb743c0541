"""Non-finite values at run time: a cheap check of each forward pass's output, and, only after one
failed, a re-run of the failing tokens layer by layer to name where the first NaN or inf appeared."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import MixtralOffloadError


class NonFiniteError(MixtralOffloadError):
    """A forward pass produced NaN or inf."""


def require_finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """values, or NonFiniteError if any of them is NaN or inf (one reduction over the tensor)."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(f"{what} hold NaN or inf")
    return values


@contextmanager
def located(model, tokens: list[int]) -> Iterator[None]:
    """Turn a NonFiniteError of model.forward(tokens) into an error naming the position and the first
    layer whose output is not finite; the model's cache is left holding what it held before."""
    start = model.position
    try:
        yield
    except NonFiniteError as exc:
        where = first_nonfinite(model, tokens, start)
        model.truncate(start)
        raise MixtralOffloadError(f"non-finite values in the forward pass at position {start}"
                                  f"{f'..{start + len(tokens) - 1}' if len(tokens) > 1 else ''}: {exc}; "
                                  f"first in {where} (damaged weights? `mixtral-offload verify` checks them)") from None


@torch.inference_mode()
def first_nonfinite(model, tokens: list[int], start: int) -> str:
    """Re-run tokens from position start one block at a time; the first block whose output is not finite."""
    from .model import rms_norm

    model.truncate(start)
    eps, count = model.args.rms_norm_eps, len(tokens)
    h = model.embed(torch.tensor(tokens, dtype=torch.long))                             # [T, D]
    if not bool(torch.isfinite(h).all()):
        return "the embedding rows of the tokens"
    cos, sin = model.cos[start:start + count], model.sin[start:start + count]
    for index, layer in enumerate(model.layers):
        h = h + model._attention(index, layer, rms_norm(h, layer.attn_norm, eps), cos, sin)
        if not bool(torch.isfinite(h).all()):
            return f"layer {index} (attention)"
        h = h + model._moe(index, layer, h)
        if not bool(torch.isfinite(h).all()):
            return f"layer {index} (experts)"
    return "the output head (final norm and lm_head)"
