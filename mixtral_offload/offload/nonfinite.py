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
def located(model, tokens: list[int], chunk: int | None = None) -> Iterator[None]:
    """Turn a NonFiniteError of model.forward(tokens, chunk=chunk) into an error naming the position and the
    first layer whose output is not finite; the model's cache is left holding what it held before."""
    start = model.position
    try:
        yield
    except NonFiniteError as exc:
        where = first_nonfinite(model, tokens, start, chunk)
        model.truncate(start)
        raise MixtralOffloadError(f"non-finite values in the forward pass at position {start}"
                                  f"{f'..{start + len(tokens) - 1}' if len(tokens) > 1 else ''}: {exc}; "
                                  f"first in {where} (damaged weights? `mixtral-offload verify` checks them)") from None


@torch.inference_mode()
def first_nonfinite(model, tokens: list[int], start: int, chunk: int | None = None) -> str:
    """Re-run tokens from position start one block at a time, in pieces of chunk as the forward ran them;
    the first block whose output is not finite."""
    from .model import rms_norm

    model.truncate(start)
    eps, step = model.args.rms_norm_eps, chunk or len(tokens)
    pieces = range(0, len(tokens), step)
    hs = [model.embed(torch.tensor(tokens[a:a + step], dtype=torch.long)) for a in pieces]  # [T_c, D] per piece
    if not all(bool(torch.isfinite(h).all()) for h in hs):
        return "the embedding rows of the tokens"
    for index, layer in enumerate(model.layers):
        for c, a in enumerate(pieces):
            h = hs[c] + model._attention(index, layer, rms_norm(hs[c], layer.attn_norm, eps), start + a)
            if not bool(torch.isfinite(h).all()):
                return f"layer {index} (attention)"
            hs[c] = h + model._moe(index, layer, h, start + a)
            if not bool(torch.isfinite(hs[c]).all()):
                return f"layer {index} (experts)"
    return "the output head (final norm and lm_head)"
