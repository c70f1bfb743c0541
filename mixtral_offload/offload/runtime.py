"""The public runtime: load a model directory, then generate, chat or score text."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

import numba

from ..config import ModelArgs
from ..errors import MixtralOffloadError
from .generate import GenerationRecord, SamplingParams, generate_tokens
from .model import Mixtral
from .nonfinite import located, require_finite
from .tokenizer import Message, StreamDecoder, Tokenizer

PREFILL_CHUNK = 256  # prompt tokens per piece of a prefill: bounds the work buffers (attention scores, activations)
SCORE_CHUNK = 64     # tokens per forward when every position's logits are kept ([T, V] float32 each)


@dataclass
class PerplexityResult:
    """Teacher-forced scores of a text: BOS prepended, every following token scored."""

    perplexity: float
    tokens: int
    nll: list[float] = field(repr=False)  # per scored token, in nats


class Runtime:
    """A loaded model with its tokenizer; keeps the KV cache of the last sequence to reuse its prefix."""

    def __init__(self, model: Mixtral, tokenizer: Tokenizer, path: Path | None = None, memory_plan=None):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.memory_plan = memory_plan  # the budget's plan (offload.memory_plan.MemoryPlan) when experts are cached
        self.args = model.args
        self.cached_ids: list[int] = []
        self.reused_tokens = 0  # prompt tokens the last prefill took from the KV cache instead of computing
        if tokenizer.vocab_size > self.args.vocab_size:
            raise MixtralOffloadError(
                f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is {self.args.vocab_size}")

    @property
    def max_context(self) -> int:
        """Tokens that fit in the KV cache."""
        return self.model.max_context

    def set_profiler(self, profiler) -> None:
        """Record spans and counters of the model and of its expert backend into profiler."""
        self.model.set_profiler(profiler)

    def cache_stats(self):
        """The expert cache's CacheStats, or None when experts are not cached."""
        return self.model.experts.stats

    # -- feeding tokens -------------------------------------------------------------------------
    def _forward(self, ids: list[int], last_only: bool = False, chunk: int | None = None) -> torch.Tensor:
        # decode steps leave a core to the expert cache's reader when it asks; a prefill is compute-bound
        # and keeps them all (docs/architecture.md, Threads)
        with kernel_threads(self.model.experts.decode_threads if len(ids) == 1 else None), \
                located(self.model, ids, chunk):
            tokens = torch.tensor(ids, dtype=torch.long)
            logits = require_finite(self.model.forward(tokens, last_only, chunk), "the logits")
        self.cached_ids += ids
        return logits

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        """Make the cache hold exactly ids, reusing the longest cached prefix; logits [V] after the last."""
        keep = 0
        for a, b in zip(self.cached_ids, ids[:-1]):
            if a != b:
                break
            keep += 1
        self.model.truncate(keep)
        del self.cached_ids[keep:]
        self.reused_tokens = keep
        # layer by layer in pieces of PREFILL_CHUNK: each layer's experts are read once for the whole prompt
        return self._forward(ids[keep:], last_only=True, chunk=PREFILL_CHUNK)[-1]

    def reset(self) -> None:
        """Forget the cached sequence."""
        self.model.reset()
        self.cached_ids = []

    # -- public API -----------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Iterator[GenerationRecord]:
        """Continue a prompt (text gets BOS prepended, no chat template); yields a record per token."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params = SamplingParams(temperature, top_p, top_k, seed)
        stream = StreamDecoder(self.tokenizer)
        usable = self.tokenizer.vocab_size  # a padded vocab: ids past the tokenizer's pieces are never sampled
        return generate_tokens(lambda prompt_ids: self._prefill(prompt_ids)[:usable],
                               lambda token: self._forward([token])[-1][:usable], ids, max_new_tokens,
                               params, self.tokenizer.eos_id, self.max_context, stream.push, self.model.profiler)

    def chat(self, messages: list[Message], **sampling) -> Iterator[GenerationRecord]:
        """The assistant's next reply to a conversation in the Mixtral-Instruct template."""
        return self.generate(self.tokenizer.encode_chat(messages), **sampling)

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Float32 logits [T, V] of every position of ids, from an empty cache."""
        self.reset()
        return torch.cat([self._forward(ids[s:s + SCORE_CHUNK]) for s in range(0, len(ids), SCORE_CHUNK)])

    def perplexity(self, text: str | list[int]) -> PerplexityResult:
        """Teacher-forced perplexity of a text; texts longer than the context are scored in windows."""
        ids = self.tokenizer.encode(text) if isinstance(text, str) else list(text)
        if len(ids) < 2:
            raise MixtralOffloadError("perplexity needs at least one token after BOS")
        nll: list[float] = []
        for window_start in range(0, len(ids) - 1, self.max_context - 1):  # windows overlap by one token
            window = ids[window_start:window_start + self.max_context]
            self.reset()
            for start in range(0, len(window) - 1, SCORE_CHUNK):
                chunk = window[start:start + SCORE_CHUNK]
                targets = torch.tensor(window[start + 1:start + 1 + len(chunk)])
                logprobs = torch.log_softmax(self._forward(chunk)[:len(targets)], dim=-1)
                nll += (-logprobs.gather(1, targets[:, None])[:, 0]).tolist()
        self.reset()
        return PerplexityResult(math.exp(sum(nll) / len(nll)), len(nll), nll)


def default_context(args: ModelArgs, max_context: int | None) -> int:
    """The KV cache length: the requested one, else min(4096, the model's maximum)."""
    if max_context is None:
        return min(4096, args.max_position_embeddings)
    if not 1 < max_context <= args.max_position_embeddings:
        raise MixtralOffloadError(f"--max-context must be between 2 and {args.max_position_embeddings}")
    return max_context


@contextlib.contextmanager
def kernel_threads(count: int | None):
    """Run this thread's parallel Numba kernels on `count` threads for a block (None: leave them as they are)."""
    if count is None:
        yield
        return
    saved = numba.get_num_threads()
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(saved)
