"""Token sampling and generation as a stream of records."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..errors import MixtralOffloadError
from ..profiling import NULL_PROFILER, NullProfiler
from ..validate import float_field, int_field, seed_field

TOP_K_MAX = 1 << 31   # the largest top_k a request may ask for


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked; temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0          # 0: no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        float_field(self.temperature, "temperature", 0)
        float_field(self.top_p, "top_p", 0, 1, low_open=True)
        int_field(self.top_k, "top_k", 0, TOP_K_MAX)
        seed_field(self.seed)


@dataclass(frozen=True)
class GenerationRecord:
    """One generated token and where generation stands."""

    token_id: int
    text: str                  # the text this token completes (may be empty mid-character)
    index: int                 # 0 for the first generated token
    finish_reason: str | None  # None while going on; 'stop' (</s>), 'length' (token limit) or 'context'
    prompt_tokens: int
    prompt_seconds: float      # time to read the prompt (prefill), including the first token
    elapsed_seconds: float     # since generation started

    @property
    def tokens_per_second(self) -> float:
        """Decode speed so far, excluding the prefill."""
        decode_time = self.elapsed_seconds - self.prompt_seconds
        return self.index / decode_time if self.index and decode_time > 0 else 0.0


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick a token id from logits [V] by the sampling params."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = (logits.double() - logits.max()) / params.temperature  # a tiny temperature: -inf, never NaN
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the smallest head >= top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def generate_tokens(prefill: Callable[[list[int]], torch.Tensor], step: Callable[[int], torch.Tensor],
                    prompt: list[int], max_new_tokens: int, params: SamplingParams, eos_id: int,
                    context_size: int, decode_piece: Callable[[int], str],
                    profiler: NullProfiler = NULL_PROFILER) -> Iterator[GenerationRecord]:
    """Read the prompt, then generate one token at a time, yielding a record per generated token.

    prefill(prompt) returns the logits [V] after the prompt; step(token) appends one token and returns
    the logits [V] after it; context_size is how many tokens fit in the model's cache.
    """
    if not prompt:
        raise MixtralOffloadError("the prompt is empty")
    if len(prompt) >= context_size:
        raise MixtralOffloadError(
            f"the prompt has {len(prompt)} tokens but the context holds {context_size}: "
            f"shorten it or raise --max-context")
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    start = time.perf_counter()
    logits = prefill(prompt)
    prompt_seconds = 0.0
    used = len(prompt)
    for index in range(max_new_tokens):
        with profiler.span("sampling"):
            token = sample(logits, params, generator)
        if index == 0:
            prompt_seconds = time.perf_counter() - start
        finish = None
        if token == eos_id:
            finish = "stop"
        elif index + 1 == max_new_tokens:
            finish = "length"
        elif used + 1 >= context_size:
            finish = "context"
        with profiler.span("output"):  # decoding the text and the caller's handling of the record
            text = "" if token == eos_id else decode_piece(token)
            yield GenerationRecord(token, text, index, finish, len(prompt), prompt_seconds,
                                   time.perf_counter() - start)
        if finish:
            return
        logits = step(token)
        used += 1
